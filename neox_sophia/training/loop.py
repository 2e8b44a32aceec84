"""`neox-sophia train`: one rank of a run (alone, or under deepspeed / torchrun / mpirun / srun).

    start: process group -> output folders writable (training/preflight.py) -> the save folder
           locked for this run (training/savelock.py), before any other setup work
    setup: TP x PP x DP grid -> tokenizer -> datasets (data checks) -> free space for checkpoints
           -> model -> optimizer (by the YAML type) -> DeepSpeed engine (PipelineEngine when
           pipe_parallel_size >= 1) -> LR schedule -> resume from `load` (the config's settings
           win over the checkpoint's, training/resume.py)
    loop:  train step; every hessian_interval steps the Sophia Hessian step (step % k == k-1,
           after that step's update, on samples no training step uses); log; eval; checkpoint;
           stop here, saved, if any rank got SIGTERM/SIGINT (training/lifecycle.py).

Training steps and Hessian refreshes read one sample stream (neox_sophia.data.schedule): the
Hessian batch of refresh j is the H global sequences (NeoXConfig.hessian_batch: the same at
every layout; by default half a training batch) that follow the training batches of its k steps:
fresh data, a function of the step only, not of train_iters.

A run never writes a checkpoint from non-finite weights or optimizer state, and retention never
deletes the newest checkpoint whose next step had a finite loss (the one to go back to when the
loss diverges; the stop message names it and the command to resume from it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, Optional

import torch
import torch.distributed as dist

from neox_sophia.config.neox import NeoXConfig
from neox_sophia.convert.neox import is_neox_checkpoint
from neox_sophia.data.datasets import sample_indices
from neox_sophia.data.schedule import SampleSchedule
from neox_sophia.training import checkpoint as ckpt
from neox_sophia.training import resume, savelock
from neox_sophia.training.checkpoint import is_universal
from neox_sophia.training.components import (
    Checkpointing,
    Evaluation,
    HessianRefresh,
    Hooks,
    MetricsLog,
    grad_norm,
    layout_record,
)
from neox_sophia.training.finetune import (
    load_weights_only,
    neox_needs_weights_only,
    weights_only,
)
from neox_sophia.training.lifecycle import StopSignals, TrainingError, log, signal_name
from neox_sophia.training.preflight import (
    check_free_space,
    check_output_folders,
    parameter_count,
    refuse_untrainable,
)
from neox_sophia.training.sophia_groups import refresh_hessian_floors
from neox_sophia.training.startup import clock as startup
from neox_sophia.training.steps import (
    collate,
    hessian_batches,
    pipeline_train_step,
    plain_train_step,
)

if TYPE_CHECKING:
    import deepspeed

    from neox_sophia.config.neox import Layout
    from neox_sophia.optim.schedules import AnnealingLR
    from neox_sophia.parallel.topology import Grid


@dataclass
class RunResult:
    step: int
    train_loss: Dict[int, float] = field(default_factory=dict)
    val_loss: Dict[int, float] = field(default_factory=dict)
    hessian_updates: int = 0
    nonfinite_steps: int = 0
    grad_norm: Optional[float] = None
    stopped_by: Optional[str] = None
    """The signal (SIGTERM, SIGINT) that ended the run before train_iters, if one did."""


@dataclass
class Run:
    """One rank's built run: the config, the DeepSpeed engine around the model and the optimizer,
    the LR schedule, where this rank sits, the data, and the components the loop asks."""
    cfg: NeoXConfig
    engine: "deepspeed.DeepSpeedEngine"
    """A PipelineEngine when pipe_parallel_size >= 1."""
    optimizer: torch.optim.Optimizer
    """The client optimizer (Sophia or torch's AdamW), which DeepSpeed wraps."""
    scheduler: "AnnealingLR"
    grid: "Grid"
    layout: "Layout"
    vocab_size: int
    """The tokenizer's (the model's is padded)."""
    train_data: "torch.utils.data.Dataset"
    """Sample i of the training stream (data/streams.py: epochs, blends)."""
    valid_data: Optional["torch.utils.data.Dataset"]
    device: torch.device
    schedule: SampleSchedule
    """Where each step's and each Hessian refresh's samples are in the training stream."""
    hessian: HessianRefresh
    """Sophia's Hessian refresh, due every hessian_interval steps (never for AdamW)."""
    good_checkpoint: Optional[int] = None
    """The newest checkpoint whose next step had a finite loss: retention keeps it."""

    @property
    def pipeline(self) -> bool:
        return self.cfg.parallel.pipe_parallel_size >= 1

    def hessian_micro_batches(self, refresh: int) -> list:
        """This rank's share of Hessian batch ``refresh`` (steps.hessian_batches)."""
        size, micro_steps = self.cfg.hessian_batch(self.layout.world_size)
        return hessian_batches(self.train_data, self.schedule.hessian_start(refresh), size, micro_steps, self.layout,
                               self.grid.dp_rank, self.device)

    def train_micro_batches(self, step: int) -> list:
        """This rank's micro-batches of training step ``step`` (from 0)."""
        lay, start = self.layout, self.schedule.train_start(step)
        return [collate(self.train_data, [start + i for i in sample_indices(0, m, self.grid.dp_rank, lay.dp,
                                                                             lay.micro_batch_size,
                                                                             lay.gradient_accumulation_steps)],
                        self.device) for m in range(lay.gradient_accumulation_steps)]

    def eval_micro_batches(self, evaluation: int) -> list:
        """This rank's share of validation pass ``evaluation``: eval_iters batches of
        train_batch_size sequences, as NeoX counts them (its evaluate() runs
        gradient_accumulation_steps micro-batches per eval iteration on every data-parallel
        rank); pass p reads the validation samples right after pass p-1's, as NeoX's iterator."""
        lay = self.layout
        return self.micro_batches(self.valid_data, evaluation,
                                  self.cfg.logging.eval_iters * lay.gradient_accumulation_steps)

    def micro_batches(self, dataset, step: int, grad_accum: int) -> list:
        lay, g = self.layout, self.grid
        return [collate(dataset, sample_indices(step, m, g.dp_rank, lay.dp, lay.micro_batch_size, grad_accum),
                        self.device) for m in range(grad_accum)]


def _device() -> torch.device:
    if torch.cuda.is_available():
        # modulo: under `srun --gpus-per-task=1` (or --gpu-bind) a task sees only its own GPU
        local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def start_process_group(cfg: NeoXConfig) -> torch.device:
    """This rank's device and the process group (idempotent)."""
    from neox_sophia.parallel.topology import init_distributed

    device = _device()
    init_distributed(cfg.launch.distributed_backend if device.type == "cuda" else "gloo")
    return device


def setup(cfg: NeoXConfig) -> Run:
    import deepspeed

    from neox_sophia.data.tokenizers import build_tokenizer_or_refuse
    from neox_sophia.model import build_model
    from neox_sophia.model.compile import apply_compile
    from neox_sophia.model.gpt_neox import global_named_parameters
    from neox_sophia.optim.groups import role_groups
    from neox_sophia.optim.schedules import AnnealingLR
    from neox_sophia.parallel.topology import MegatronMPU, initialize_model_parallel

    startup.mark("imports and config")
    device = start_process_group(cfg)
    layout = cfg.layout(dist.get_world_size())
    if cfg.training.train_iters is None:
        raise TrainingError("train_iters: not set; say how many optimizer steps to train")
    refuse_untrainable(cfg, layout.world_size)  # what `plan` refuses too (training/preflight.py)
    grid = initialize_model_parallel(cfg.parallel.model_parallel_size, cfg.parallel.pipeline_stages)
    startup.mark("distributed")
    data = cfg.data
    tokenizer = build_tokenizer_or_refuse(data)
    padded = cfg.padded_vocab_size(tokenizer.vocab_size)
    startup.mark("tokenizer")
    schedule = _sample_schedule(cfg, layout)
    train_data, valid_data = _datasets(cfg, layout, tokenizer, schedule)  # the data checks, before the model
    startup.mark("datasets")
    torch.manual_seed(cfg.training.seed)
    model = build_model(cfg.model, cfg.parallel, padded, grid, cfg.training.seed).to(device)
    apply_compile(model, cfg.performance.compile_model, device)
    check_free_space(cfg, parameter_count(model, layout.dp, device), dist.get_rank())
    _count_replicated_once_per_stage(model, grid)
    startup.mark("model")
    bs = cfg.hessian_tokens(layout.world_size) if cfg.hessian_interval else None
    params = cfg.optimizer.params
    groups = role_groups(global_named_parameters(model), cfg.optimizer.weight_decay,
                         embedding_weight_decay=cfg.optimizer.embedding_weight_decay,
                         overrides=params.group_overrides())
    optimizer = params.build(groups, bs)
    # A PipelineModule brings its own grid; a plain module gets megatron-core's groups.
    mpu = None if cfg.parallel.pipe_parallel_size >= 1 else MegatronMPU()
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=mpu,
                                      config=cfg.deepspeed_config(layout.world_size))
    _keep_fp32_grad_norm(engine)
    scheduler = AnnealingLR(optimizer, cfg.lr_schedule())
    startup.mark("engine")
    return Run(cfg, engine, optimizer, scheduler, grid, layout, tokenizer.vocab_size, train_data, valid_data, device,
               schedule, HessianRefresh(cfg))


def _sample_schedule(cfg: NeoXConfig, layout) -> SampleSchedule:
    k = cfg.hessian_interval
    return SampleSchedule(layout.train_batch_size, cfg.hessian_batch(layout.world_size)[0] if k else 0, k)


def _datasets(cfg: NeoXConfig, layout, tokenizer, schedule: SampleSchedule):
    from neox_sophia.data.datasets import build_datasets

    t = cfg.training
    evals = t.train_iters // cfg.logging.eval_interval + 1
    num_samples = (schedule.samples_needed(t.train_iters),
                   evals * cfg.logging.eval_iters * layout.train_batch_size, 0)  # NeoX's count
    train, valid, _ = build_datasets(cfg.data, seq_length=cfg.model.seq_length, seed=t.seed,
                                     num_samples=num_samples, tokenizer=tokenizer)
    if train is None:
        raise TrainingError("data_path: no training data configured; set data_path (or train_data_paths), "
                            "e.g. prepare the built-in corpus with `neox-sophia corpus`")
    return train, (valid if cfg.logging.eval_iters > 0 else None)


def resume_from_load(run: Run) -> tuple:
    """(step, non-finite steps so far) from `load`, or (0, 0) for a fresh start. `load` is a save
    directory saved at this run's layout (its latest complete checkpoint), one checkpoint folder
    in it, or a universal checkpoint (any layout); with finetune / no_load_optim, weights only from
    any of those or from a GPT-NeoX checkpoint. The settings are the config's (resume.py)."""
    c = run.cfg.checkpoint
    _clean_save_folder(c.save)
    if not c.load or first_run(c.load, c.save):
        return 0, 0
    if weights_only(c):  # NeoX's finetune / no_load_optim (training/finetune.py)
        state = load_weights_only(run, c.load)
        where = state["where"]
    elif is_neox_checkpoint(c.load):
        raise TrainingError(neox_needs_weights_only(c.load))
    else:
        requested = resume.hyperparameters(run.optimizer)  # the config's, before the load replaces them
        state, saved_groups, where = _load_checkpoint(run, c.load)
        resume.apply_config(run.optimizer, requested)
        resume.announce(resume.group_changes(saved_groups, requested)
                        + resume.record_changes(state.get("run", {}), resume.run_record(run.cfg, run.layout)))
    if "scheduler" in state:  # absent in a checkpoint converted from Hugging Face: the schedule starts
        run.scheduler.load_state_dict(state["scheduler"])
    refresh_hessian_floors(run.optimizer)  # a universal checkpoint carries h, not the floors
    step = int(state["step"])
    _continue_stream(run, step, state)
    log.info("resumed from %s at step %d", where, step)
    if dist.get_rank() == 0:
        print(f"neox-sophia: resumed from {where} at step {step}", flush=True)
    return step, state.get("nonfinite_steps", 0)


def _clean_save_folder(save: Optional[str]) -> None:
    """What killed saves left in this run's own save folder goes, a line each (rank 0; all wait)."""
    if not save:
        return
    group = dist.is_initialized() and dist.get_world_size() > 1
    if not group or dist.get_rank() == 0:
        for path in ckpt.clean_leftovers(save):
            log.info("removed %s (left by a save that did not finish)", path)
            print(f"neox-sophia: removed {path} (left by a save that did not finish)", flush=True)
    if group:
        dist.barrier()


def first_run(load: str, save: Optional[str]) -> bool:
    """`load` is this run's own save folder (compared as resolved paths) and holds no checkpoint
    yet: the first run of a resumable setup, or one that died before its first checkpoint."""
    if not save or os.path.realpath(load) != os.path.realpath(save):
        return False
    return not os.path.isdir(load) or ckpt.holds_only_leftovers(load)


def _load_checkpoint(run: Run, load: str) -> tuple:
    """(client state, the param groups' saved hyperparameters, where) after loading ``load``'s
    weights and optimizer state into the run."""
    if is_universal(load):
        state, groups = _load_universal(run, load)
        return state, groups, load
    directory, tag = ckpt.locate(load)
    _check_layout(run, directory, tag)
    ckpt.saved_config(directory, tag)  # the checkpoint tools read it: a damaged one is named now
    state = ckpt.load(run.engine, directory, tag)
    return state, resume.hyperparameters(run.optimizer), os.path.join(directory, tag)


def _continue_stream(run: Run, step: int, state: Dict[str, object]) -> None:
    """The sample stream goes on where the checkpoint left it; the retention guard too."""
    run.schedule.resume_at(step, state.get("data_position"))
    run.train_data.ensure(run.schedule.samples_needed(run.cfg.training.train_iters))
    run.good_checkpoint = state.get("good_checkpoint")


def _check_layout(run: Run, directory: str, tag: str) -> None:
    saved = ckpt.saved_layout(directory, tag)
    if saved is None:  # written before layouts were recorded
        return
    current = layout_record(run)
    differ = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if differ:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in differ.items())
        raise TrainingError(f"load: {directory} was saved at another layout ({what}); to resume at this one, "
                            f"consolidate it first: `neox-sophia convert consolidate --checkpoint {directory} "
                            f"--output DIR` and set load to DIR (weights, exp_avg and hessian carry over exactly)")


def _load_universal(run: Run, directory: str) -> tuple:
    from neox_sophia.convert.universal import load_universal
    from neox_sophia.training.reshard import load_universal_into

    checkpoint = load_universal(directory)
    if checkpoint.config.get("optimizer", {}).get("type", run.cfg.optimizer.type) != run.cfg.optimizer.type:
        raise TrainingError(f"load: {directory} holds {checkpoint.config['optimizer']['type']} state; this run's "
                            f"optimizer is {run.cfg.optimizer.type}")
    load_universal_into(run.engine, run.optimizer, checkpoint, directory)
    return {**checkpoint.client_state, "step": checkpoint.step}, checkpoint.param_groups


def train_step(run: Run, step: int, result: RunResult) -> bool:
    """Train step ``step`` (from 0) and, when due, its Hessian refresh; returns whether the update
    was applied (False: a non-finite loss or gradient, the step skipped)."""
    batches = run.train_micro_batches(step)
    outcome = (pipeline_train_step if run.pipeline else plain_train_step)(run.engine, run.optimizer, batches)
    if outcome.finite:
        run.scheduler.step()
    result.grad_norm = grad_norm(run.engine)  # before the Hessian step clips its own gradient
    if run.hessian.due(step):
        run.hessian(run, step)
        result.hessian_updates += 1
    result.train_loss[step + 1] = outcome.loss
    return outcome.finite


def train_loop(run: Run, start_step: int = 0, nonfinite: int = 0, signals: Optional[StopSignals] = None,
               hooks: Optional[Hooks] = None) -> RunResult:
    """Train from ``start_step`` to train_iters. With ``signals`` (installed handlers; `train` gives
    them) the ranks stop together, saved, at the first step boundary after a SIGTERM/SIGINT.
    ``hooks``: what a tool or test attaches (training/components.py)."""
    hooks = hooks or Hooks()
    t = run.cfg.training
    evaluation, checkpoints = Evaluation(run.cfg, hooks.evaluate), Checkpointing(run, start_step)
    metrics = MetricsLog(run, start_step, lambda step: {"eval": evaluation.to_come(run, step),
                                                        "save": checkpoints.to_come(step)})
    result = RunResult(start_step, nonfinite_steps=nonfinite)
    step, in_a_row = start_step, 0
    log.info("training steps %d..%d", step + 1, t.train_iters)
    try:
        while step < t.train_iters:
            refreshes = result.hessian_updates
            applied = train_step(run, step, result)
            if not startup.reported:
                startup.report(log, dist.get_rank())
            checkpoints.step_done(run, step, applied)
            step += 1
            metrics.progress.step()
            in_a_row = 0 if applied else in_a_row + 1
            result.nonfinite_steps += 0 if applied else 1
            if in_a_row >= t.max_nonfinite_steps:
                raise checkpoints.diverged(run, step, in_a_row)
            for hook in hooks.after_step:
                hook(run, step, result)
            if metrics.due(step):
                metrics.train(run, step, result, hessian_update=result.hessian_updates > refreshes)
            if evaluation.due(run, step):
                with metrics.progress.pause("eval"):
                    result.val_loss[step] = evaluation(run, step)
                metrics.eval(step, result.val_loss[step])
            saved = False
            if checkpoints.due(step):
                with metrics.progress.pause("save"):
                    saved = checkpoints.save(run, step, result.nonfinite_steps)
            result.step = step
            # every rank takes part, so that all stop at this same step (and save it together)
            if signals is not None and step < t.train_iters and (signum := signals.agreed(run.device)):
                _stop(run, checkpoints, step, result, signum, saved)
                break
    finally:
        metrics.close()
    if result.stopped_by is None:
        log.info("finished at step %d", result.step)
    return result


def _stop(run: Run, checkpoints: Checkpointing, step: int, result: RunResult, signum: int, saved: bool) -> None:
    """The ranks agreed to stop after ``step`` (a signal): save there unless just saved, say so."""
    save = run.cfg.checkpoint.save
    if save and not saved:
        saved = checkpoints.save(run, step, result.nonfinite_steps)
    where = (f"saved checkpoint at step {step} in {save}" if saved
             else f"stopped at step {step}; no checkpoint saved" + ("" if save else " (save is not set)"))
    message = f"received {signal_name(signum)}: {where}"
    log.warning("%s", message)
    if dist.get_rank() == 0:
        print(f"neox-sophia train: {message}", flush=True)
    result.stopped_by = signal_name(signum)


def _count_replicated_once_per_stage(model: torch.nn.Module, grid) -> None:
    """DeepSpeed's fp32 gradient clipping counts a parameter that is not model-parallel only on
    model-parallel rank 0, and under the PipelineEngine that group spans the pipeline stages too:
    the norms, biases and other TP-replicated weights of every stage but the first would be left
    out of the global norm. Tagging them as `model_parallel` on TP rank 0 counts each exactly once
    (ZeRO and the bf16 optimizer already use the TP rank; for them this changes nothing)."""
    if grid.tp_rank != 0:
        return
    for param in model.parameters():
        if not getattr(param, "tensor_model_parallel", False):
            param.model_parallel = True


def _keep_fp32_grad_norm(engine) -> None:
    """DeepSpeed computes the gradient norm when it clips plain fp32 gradients (no ZeRO, no
    fp16/bf16 optimizer) but drops it; keep it so that every layout logs grad_norm."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip() -> None:
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip


def train(cfg: NeoXConfig, open_log: Callable[[], None] = lambda: None) -> RunResult:
    """The whole run. Before any setup work the output folders are checked and the save folder is
    locked for this run; ``open_log`` (the rank log) is called once it is ours."""
    start_process_group(cfg)
    check_output_folders(cfg)
    with savelock.hold(cfg.checkpoint.save):
        open_log()
        run = setup(cfg)
        log.info("set up: world size %d (tp %d, pp %d, dp %d), %s, %s", run.layout.world_size, run.layout.tp,
                 run.layout.pp, run.layout.dp, run.device, dist.get_backend())
        start, nonfinite = resume_from_load(run)
        if start >= cfg.training.train_iters and dist.get_rank() == 0:
            print(f"neox-sophia: nothing to train: the checkpoint in {cfg.checkpoint.load} is at step {start} "
                  f"and train_iters is {cfg.training.train_iters}; raise train_iters or use a new save/load "
                  f"directory", flush=True)
        with StopSignals() as signals:
            return train_loop(run, start, nonfinite, signals)

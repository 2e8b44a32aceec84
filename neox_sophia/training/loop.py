"""`neox-sophia train`: one rank of a run (alone, or under deepspeed / torchrun / mpirun / srun).

    setup: process group and TP x PP x DP grid -> tokenizer -> model -> optimizer (by the YAML
           type) -> DeepSpeed engine (PipelineEngine when pipe_parallel_size >= 1) -> LR schedule
           -> datasets -> resume from `load`
    loop:  train step; every hessian_interval steps the Sophia Hessian step (step % k == k-1,
           after that step's update, on samples no training step uses); log; eval; checkpoint;
           stop here, saved, if any rank got SIGTERM/SIGINT (training/lifecycle.py).

The Hessian batch of refresh j is H global samples (optimizer.params.hessian_batch_size; by
default half a training batch) taken after the training stream's train_iters x B samples: fresh
data, a function of the global sample index only.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from neox_sophia.config.neox import NeoXConfig
from neox_sophia.data.datasets import sample_indices
from neox_sophia.parallel.topology import tensor_parallel_group
from neox_sophia.training import checkpoint as ckpt
from neox_sophia.training.checkpoint import is_universal
from neox_sophia.training.lifecycle import StopSignals, log, signal_name
from neox_sophia.training.metrics import Metrics, Progress
from neox_sophia.training.steps import (collate, evaluate, hessian_uniforms, pipeline_hessian_step,
                                        pipeline_train_step, plain_hessian_step, plain_train_step)


class TrainingError(RuntimeError):
    """The run cannot go on (the message says why and what to change)."""


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
    cfg: NeoXConfig
    engine: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    grid: object
    layout: object
    vocab_size: int
    train_data: object
    valid_data: Optional[object]
    device: torch.device

    @property
    def pipeline(self) -> bool:
        return self.cfg.parallel.pipe_parallel_size >= 1

    def hessian_micro_batches(self, refresh: int) -> list:
        """This rank's share of Hessian batch ``refresh``: the global samples
        [base, base + H) after the training stream's train_iters x B samples, H the Hessian batch
        size, laid out over micro-steps and ranks like a training step."""
        lay, g, cfg = self.layout, self.grid, self.cfg
        size, micro_steps = cfg.hessian_batch(lay.world_size)
        base = cfg.training.train_iters * lay.train_batch_size + refresh * size
        return [collate(self.train_data, [base + i for i in sample_indices(0, m, g.dp_rank, lay.dp,
                                                                            lay.micro_batch_size, micro_steps)],
                        self.device) for m in range(micro_steps)]

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


def setup(cfg: NeoXConfig) -> Run:
    import deepspeed

    from neox_sophia.data.tokenizers import build_tokenizer
    from neox_sophia.model import build_model
    from neox_sophia.optim.factory import build_optimizer, weight_decay_groups
    from neox_sophia.optim.schedules import AnnealingLR
    from neox_sophia.parallel.topology import MegatronMPU, init_distributed, initialize_model_parallel

    device = _device()
    init_distributed(cfg.launch.distributed_backend if device.type == "cuda" else "gloo")
    layout = cfg.layout(dist.get_world_size())
    if cfg.training.train_iters is None:
        raise TrainingError("train_iters: not set; say how many optimizer steps to train")
    if cfg.optimizer.type == "sophia" and cfg.optimizer.params["estimator"] != "gnb":
        raise TrainingError(f"optimizer.params.estimator: the trainer implements 'gnb' (Sophia-G); "
                            f"'{cfg.optimizer.params['estimator']}' needs a double backward and is available "
                            f"for single-process use as neox_sophia.optim.hessian.hutchinson")
    if cfg.engine.resolved_precision == "fp16" and cfg.engine.zero_stage == 0:
        # DeepSpeed 0.19's engine.backward() applies the loss scale only for ZeRO optimizers, but
        # its non-ZeRO fp16 optimizers divide the gradients by it all the same (deepspeedai/
        # DeepSpeed PR #8393, open): every gradient would reach Sophia loss_scale times too small
        # (measured: 65536x), which Sophia, unlike Adam, is not invariant to.
        raise TrainingError("zero_optimization: fp16 needs ZeRO stage 1 or 2 with this DeepSpeed: at stage 0 "
                            "it never applies the loss scale but still divides the gradients by it "
                            "(deepspeedai/DeepSpeed PR #8393); set zero_optimization.stage to 1 (it works "
                            "with pipe parallelism too), or use bf16")
    grid = initialize_model_parallel(cfg.parallel.model_parallel_size, cfg.parallel.pipeline_stages)
    data = cfg.data
    tokenizer = build_tokenizer(data.tokenizer_type, data.vocab_file, data.merge_file)
    padded = cfg.padded_vocab_size(tokenizer.vocab_size)
    torch.manual_seed(cfg.training.seed)
    model = build_model(cfg.model, cfg.parallel, padded, grid, cfg.training.seed).to(device)
    _count_replicated_once_per_stage(model, grid)
    bs = cfg.hessian_tokens(layout.world_size) if cfg.optimizer.type == "sophia" else None
    optimizer = build_optimizer(cfg.optimizer.optimizer, weight_decay_groups(model, cfg.optimizer.weight_decay), bs=bs)
    # A PipelineModule brings its own grid; a plain module gets megatron-core's groups.
    mpu = None if cfg.parallel.pipe_parallel_size >= 1 else MegatronMPU()
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=mpu,
                                      config=cfg.deepspeed_config(layout.world_size))
    _keep_fp32_grad_norm(engine)
    scheduler = AnnealingLR(optimizer, cfg.lr_schedule())
    train_data, valid_data = _datasets(cfg, layout, tokenizer)
    return Run(cfg, engine, optimizer, scheduler, grid, layout, tokenizer.vocab_size, train_data, valid_data, device)


def _datasets(cfg: NeoXConfig, layout, tokenizer):
    from neox_sophia.data.datasets import build_datasets

    t = cfg.training
    interval = cfg.hessian_interval
    hessian_samples = (t.train_iters // interval + 1) * cfg.hessian_batch(layout.world_size)[0] if interval else 0
    evals = t.train_iters // cfg.logging.eval_interval + 1
    num_samples = (t.train_iters * layout.train_batch_size + hessian_samples,
                   evals * cfg.logging.eval_iters * layout.micro_batch_size * layout.dp, 0)
    train, valid, _ = build_datasets(cfg.data, seq_length=cfg.model.seq_length, seed=t.seed,
                                     num_samples=num_samples, tokenizer=tokenizer)
    if train is None:
        raise TrainingError("data_path: no training data configured; set data_path (or train_data_paths), "
                            "e.g. prepare the built-in corpus with `neox-sophia corpus`")
    return train, (valid if cfg.logging.eval_iters > 0 else None)


def _resume(run: Run) -> tuple:
    """(step, non-finite steps so far) from `load`, or (0, 0) for a fresh start. `load` is a
    checkpoint directory saved at this run's layout, or a universal checkpoint (any layout)."""
    cfg = run.cfg.checkpoint
    if not cfg.load:
        return 0, 0
    fresh = not os.path.isdir(cfg.load) or not os.listdir(cfg.load)
    if fresh and cfg.load == cfg.save:  # the first run of a resumable setup
        return 0, 0
    if is_universal(cfg.load):
        state = _load_universal(run, cfg.load)
        where = cfg.load
    else:
        _check_layout(run, cfg.load)
        tag, state = ckpt.load(run.engine, cfg.load)
        where = os.path.join(cfg.load, tag)
    if "scheduler" in state:  # absent in a checkpoint converted from Hugging Face: the schedule starts
        run.scheduler.load_state_dict(state["scheduler"])
    log.info("resumed from %s at step %d", where, state["step"])
    if dist.get_rank() == 0:
        print(f"neox-sophia: resumed from {where} at step {state['step']}", flush=True)
    return int(state["step"]), state.get("nonfinite_steps", 0)


def _layout_record(run: Run) -> Dict[str, object]:
    """What a checkpoint's files depend on: a DeepSpeed checkpoint resumes only at the same."""
    return {"model_parallel_size": run.layout.tp, "pipe_parallel_size": run.cfg.parallel.pipe_parallel_size,
            "data_parallel_size": run.layout.dp, "zero_stage": run.cfg.engine.zero_stage,
            "precision": run.cfg.engine.resolved_precision}


def _check_layout(run: Run, directory: str) -> None:
    saved = ckpt.saved_layout(directory)
    if saved is None:  # written before layouts were recorded
        return
    current = _layout_record(run)
    differ = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if differ:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in differ.items())
        raise TrainingError(f"load: {directory} was saved at another layout ({what}); to resume at this one, "
                            f"consolidate it first: `neox-sophia convert consolidate --checkpoint {directory} "
                            f"--output DIR` and set load to DIR (weights, exp_avg and hessian carry over exactly)")


def _load_universal(run: Run, directory: str) -> Dict[str, object]:
    from neox_sophia.convert.universal import load_universal
    from neox_sophia.training.reshard import load_universal_into

    checkpoint = load_universal(directory)
    if checkpoint.config.get("optimizer", {}).get("type", run.cfg.optimizer.type) != run.cfg.optimizer.type:
        raise TrainingError(f"load: {directory} holds {checkpoint.config['optimizer']['type']} state; this run's "
                            f"optimizer is {run.cfg.optimizer.type}")
    load_universal_into(run.engine, run.optimizer, checkpoint, directory)
    return {**checkpoint.client_state, "step": checkpoint.step}


def _sophia_statistics(run: Run) -> Dict[str, float]:
    from neox_sophia.optim.sophia import Sophia, SophiaStatistics

    if not isinstance(run.optimizer, Sophia):
        return {"clip_frac": None, "win_rate": None}
    sums = run.optimizer.statistics_sums()
    if dist.get_world_size() > 1:
        dist.all_reduce(sums)  # ratios are right whether the state is sharded or replicated
    stats = SophiaStatistics.from_sums(sums)
    return {"clip_frac": stats.clip_frac, "win_rate": stats.win_rate}


def _should_save(cfg: NeoXConfig, step: int) -> bool:
    c = cfg.checkpoint
    if not c.save:
        return False
    return (step == cfg.training.train_iters or (c.checkpoint_factor and step % c.checkpoint_factor == 0)
            or step in (c.extra_save_iters or ()))


def _save(run: Run, step: int, nonfinite: int) -> None:
    state = {"step": step, "scheduler": run.scheduler.state_dict(), "nonfinite_steps": nonfinite}
    path = ckpt.save(run.engine, run.cfg.checkpoint.save, step, state, run.cfg.values,
                     keep_last=run.cfg.checkpoint.keep_last_n_checkpoints, layout=_layout_record(run))
    log.info("saved checkpoint %s", path)


def _one_step(run: Run, step: int, result: RunResult) -> bool:
    """Train step `step` (and its Hessian refresh); returns whether the update was applied."""
    lay, cfg = run.layout, run.cfg
    batches = run.micro_batches(run.train_data, step, lay.gradient_accumulation_steps)
    if run.pipeline:
        outcome = pipeline_train_step(run.engine, run.optimizer, batches)
    else:
        outcome = plain_train_step(run.engine, run.optimizer, batches)
    if outcome.finite:
        run.scheduler.step()
    result.grad_norm = _grad_norm(run.engine)  # before the Hessian step clips its own gradient
    k = run.cfg.hessian_interval
    if k and step % k == k - 1:
        hessian = run.hessian_micro_batches(step // k)
        u = hessian_uniforms(cfg.training.seed, step // k, hessian, cfg.model.seq_length)
        fn = pipeline_hessian_step if run.pipeline else plain_hessian_step
        fn(run.engine, run.optimizer, hessian, u, run.vocab_size, tensor_parallel_group())
        result.hessian_updates += 1
    result.train_loss[step + 1] = outcome.loss
    return outcome.finite


def train_loop(run: Run, start_step: int = 0, nonfinite: int = 0,
               signals: Optional[StopSignals] = None) -> RunResult:
    """Train from ``start_step`` to train_iters. With ``signals`` (installed handlers; `train` gives
    them) the ranks stop together, saved, at the first step boundary after a SIGTERM/SIGINT."""
    cfg, lay = run.cfg, run.layout
    t = cfg.training
    rank = dist.get_rank()
    metrics = Metrics(cfg.logging, rank, t.train_iters, cfg.values, start_step=start_step)
    result = RunResult(start_step, nonfinite_steps=nonfinite)
    progress, in_a_row, began = Progress(), 0, time.time()
    step = start_step
    log.info("training steps %d..%d", step + 1, t.train_iters)
    try:
        while step < t.train_iters:
            refreshes = result.hessian_updates
            applied = _one_step(run, step, result)
            hessian_update = result.hessian_updates > refreshes
            step += 1
            progress.step()
            in_a_row = 0 if applied else in_a_row + 1
            result.nonfinite_steps += 0 if applied else 1
            if in_a_row >= t.max_nonfinite_steps:
                raise TrainingError(f"the loss was not finite for {in_a_row} steps in a row (step {step}); "
                                    f"lower the lr (optimizer.params.lr) or raise rho, or resume from the last "
                                    f"checkpoint (max_nonfinite_steps={t.max_nonfinite_steps})")
            if step % cfg.logging.log_interval == 0 or step == t.train_iters:
                record = {"step": step, "loss": result.train_loss[step], "lr": run.scheduler.get_last_lr()[0],
                          "grad_norm": result.grad_norm, "hessian_update": hessian_update,
                          "elapsed_s": time.time() - began, "nonfinite_steps": result.nonfinite_steps,
                          **_sophia_statistics(run)}
                record.update(progress.report(lay.train_batch_size * cfg.model.seq_length, t.train_iters - step,
                                              _pauses_to_come(run, step)))
                metrics.train(record)
                log.info("step %d/%d", step, t.train_iters)
            if run.valid_data is not None and step % cfg.logging.eval_interval == 0:
                with progress.pause("eval"):
                    p = step // cfg.logging.eval_interval
                    loss = evaluate(run.engine, run.micro_batches(run.valid_data, p, cfg.logging.eval_iters),
                                    run.pipeline)
                result.val_loss[step] = loss
                metrics.eval(step, loss)
            saved = _should_save(cfg, step)
            if saved:
                with progress.pause("save"):
                    _save(run, step, result.nonfinite_steps)
            result.step = step
            # every rank takes part, so that all stop at this same step (and save it together)
            if signals is not None and step < t.train_iters and (signum := signals.agreed(run.device)):
                _stop(run, step, result, signum, saved)
                break
    finally:
        metrics.close()
    if result.stopped_by is None:
        log.info("finished at step %d", result.step)
    return result


def _pauses_to_come(run: Run, step: int) -> Dict[str, int]:
    """How many evals and checkpoint saves are still to come after ``step`` (for the ETA;
    extra_save_iters are left out)."""
    cfg = run.cfg
    end = cfg.training.train_iters
    every = cfg.checkpoint.checkpoint_factor
    saves = (end // every - step // every if every else 0) + (0 if every and end % every == 0 else 1)
    evals = end // cfg.logging.eval_interval - step // cfg.logging.eval_interval
    return {"eval": evals if run.valid_data is not None else 0, "save": saves if cfg.checkpoint.save else 0}


def _stop(run: Run, step: int, result: RunResult, signum: int, saved: bool) -> None:
    """The ranks agreed to stop after ``step`` (a signal): save there unless just saved, say so."""
    save = run.cfg.checkpoint.save
    if save and not saved:
        _save(run, step, result.nonfinite_steps)
    where = (f"saved checkpoint at step {step} in {save}" if save
             else f"stopped at step {step}; no checkpoint saved (save is not set)")
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


def _grad_norm(engine) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def train(cfg: NeoXConfig) -> RunResult:
    run = setup(cfg)
    log.info("set up: world size %d (tp %d, pp %d, dp %d), %s, %s", run.layout.world_size, run.layout.tp,
             run.layout.pp, run.layout.dp, run.device, dist.get_backend())
    start, nonfinite = _resume(run)
    if start >= cfg.training.train_iters and dist.get_rank() == 0:
        print(f"neox-sophia: nothing to train: the checkpoint in {cfg.checkpoint.load} is at step {start} "
              f"and train_iters is {cfg.training.train_iters}; raise train_iters or use a new save/load "
              f"directory", flush=True)
    with StopSignals() as signals:
        return train_loop(run, start, nonfinite, signals)

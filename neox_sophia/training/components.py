"""The parts of the training loop that own a schedule (torchtitan-style components). Each says
when it is due and does its work; `train_loop` (training/loop.py) only steps and asks them.

    HessianRefresh   Sophia's Hessian step every hessian_interval steps (step % k == k-1, after
                     that step's update), by the configured estimator
    Evaluation       the validation pass every eval_interval steps
    Checkpointing    saves at checkpoint_factor, extra_save_iters and the last step; the newest
                     checkpoint whose next step was finite (the one to go back to); the stop message
                     after a divergence
    MetricsLog       a train record every log_interval steps (metrics.jsonl, console, ETA)

Hooks are what tools and tests attach to a run instead of patching the loop: ``evaluate``
replaces the validation step (the convergence benchmark evaluates on a fixed held-out set and
stops its clock meanwhile), ``after_step`` callables see every step's result.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from neox_sophia.parallel.topology import tensor_parallel_group
from neox_sophia.training import checkpoint as ckpt
from neox_sophia.training import resume
from neox_sophia.training.lifecycle import TrainingError, log
from neox_sophia.training.metrics import Metrics, Progress
from neox_sophia.training.sophia_groups import refresh_hessian_floors, statistics_record
from neox_sophia.training.steps import (
    evaluate,
    hessian_uniforms,
    on_every_rank,
    pipeline_hessian_step,
    plain_hessian_step,
    plain_hutchinson_step,
)

if TYPE_CHECKING:
    from neox_sophia.config.neox import NeoXConfig
    from neox_sophia.training.loop import Run, RunResult


@dataclass
class Hooks:
    """What a tool or test attaches to `train_loop`."""
    evaluate: Callable[..., float] = evaluate
    """(engine, micro-batches, pipeline) -> validation loss; the loop passes the validation pass's
    micro-batches (Run.eval_micro_batches)."""
    after_step: List[Callable[["Run", int, "RunResult"], None]] = field(default_factory=list)
    """Called with (run, steps done, result) after each step's update and Hessian refresh."""


# ------------------------------------------------------------------------------ Hessian refresh
def _gnb_refresh(run: "Run", refresh: int) -> None:
    """Sophia-G: labels sampled from the model's softmax, keyed by global sample and position."""
    batches = run.hessian_micro_batches(refresh)
    uniforms = hessian_uniforms(run.cfg.training.seed, refresh, batches, run.cfg.model.seq_length)
    step = pipeline_hessian_step if run.pipeline else plain_hessian_step
    step(run.engine, run.optimizer, batches, uniforms, run.vocab_size, tensor_parallel_group())


def _hutchinson_refresh(run: "Run", refresh: int) -> None:
    """Sophia-H: probes keyed by global parameter name and coordinate (the config refuses the
    PipelineEngine and half precision for it)."""
    from neox_sophia.model.gpt_neox import global_named_parameters
    from neox_sophia.parallel.probes import parameter_probes

    named = [(name, p) for name, p in global_named_parameters(run.engine.module) if p.requires_grad]
    probes = parameter_probes(named, run.cfg.training.seed, refresh, run.grid.tp_rank, run.grid.tp_size)
    plain_hutchinson_step(run.engine, run.optimizer, run.hessian_micro_batches(refresh), probes,
                          run.cfg.optimizer.params.hutchinson_fd_eps)


# optimizer.params.estimator -> its refresh (the names of optim.hessian.ESTIMATORS)
HESSIAN_REFRESHES = {"gnb": _gnb_refresh, "hutchinson": _hutchinson_refresh}


class HessianRefresh:
    """Every k = hessian_interval steps the Hessian step (none for an optimizer without one)."""

    def __init__(self, cfg: "NeoXConfig"):
        self.k = cfg.hessian_interval
        self.refresh = HESSIAN_REFRESHES[cfg.optimizer.params.estimator] if self.k else None

    def due(self, step: int) -> bool:
        """After training step ``step`` (from 0)."""
        return bool(self.k) and step % self.k == self.k - 1

    def __call__(self, run: "Run", step: int) -> None:
        self.refresh(run, step // self.k)  # refresh j reads the j-th Hessian batch of the sample stream
        refresh_hessian_floors(run.optimizer)


# ----------------------------------------------------------------------------------- evaluation
class Evaluation:
    """The validation pass every eval_interval steps (when there is validation data)."""

    def __init__(self, cfg: "NeoXConfig", evaluate_fn: Callable[..., float]):
        self.interval = cfg.logging.eval_interval
        self.evaluate = evaluate_fn

    def due(self, run: "Run", step: int) -> bool:
        return run.valid_data is not None and step % self.interval == 0

    def __call__(self, run: "Run", step: int) -> float:
        return self.evaluate(run.engine, run.eval_micro_batches(step // self.interval), run.pipeline)

    def to_come(self, run: "Run", step: int) -> int:
        end = run.cfg.training.train_iters
        return end // self.interval - step // self.interval if run.valid_data is not None else 0


# -------------------------------------------------------------------------------- checkpointing
def layout_record(run: "Run") -> Dict[str, object]:
    """What a checkpoint's files depend on: a DeepSpeed checkpoint resumes only at the same."""
    return {"model_parallel_size": run.layout.tp, "pipe_parallel_size": run.cfg.parallel.pipe_parallel_size,
            "data_parallel_size": run.layout.dp, "zero_stage": run.cfg.engine.zero_stage,
            "precision": run.cfg.engine.resolved_precision,
            # optimizer param groups, one per parameter role (earlier versions: two, by weight decay)
            "param_groups": "by_role"}


def in_save_folder(run: "Run", step: int) -> bool:
    save = run.cfg.checkpoint.save
    return bool(step and save and os.path.isfile(os.path.join(save, ckpt.tag_for(step), ckpt.MARKER)))


class Checkpointing:
    """Saves, and which checkpoint of this timeline a diverged run should go back to."""

    def __init__(self, run: "Run", start_step: int):
        c = run.cfg.checkpoint
        self.save_dir, self.factor, self.extra = c.save, c.checkpoint_factor, set(c.extra_save_iters or ())
        self.end = run.cfg.training.train_iters
        self.saved = {start_step} if in_save_folder(run, start_step) else set()  # checkpoints of this timeline

    def due(self, step: int) -> bool:
        return bool(self.save_dir) and (step == self.end or bool(self.factor and step % self.factor == 0)
                                        or step in self.extra)

    def to_come(self, step: int) -> int:
        """Saves after ``step`` (extra_save_iters left out)."""
        if not self.save_dir:
            return 0
        every = self.factor
        return (self.end // every - step // every if every else 0) + (0 if every and self.end % every == 0 else 1)

    def step_done(self, run: "Run", step: int, applied: bool) -> None:
        """Training step ``step`` (from 0) ran: when it was finite and a checkpoint of this
        timeline is at ``step``, that checkpoint is the one to go back to (retention keeps it)."""
        if applied and step in self.saved:
            run.good_checkpoint = step

    def save(self, run: "Run", step: int, nonfinite: int) -> bool:
        """Checkpoint ``step`` unless the weights or optimizer state hold a non-finite value (then
        say so and keep the checkpoints there are); return whether it was written."""
        bad = ckpt.nonfinite_tensor(run.engine.module, run.optimizer)
        if not on_every_rank(bad is None):
            where = f" ({bad})" if bad else ""
            message = (f"step {step}: no checkpoint written: the weights or optimizer state are not finite{where}; "
                       f"the checkpoints in {run.cfg.checkpoint.save} are kept")
            log.warning("%s", message)
            if dist.get_rank() == 0:
                print(f"neox-sophia: {message}", flush=True)
            return False
        state = {"step": step, "scheduler": run.scheduler.state_dict(), "nonfinite_steps": nonfinite,
                 "data_position": run.schedule.position(step), "good_checkpoint": run.good_checkpoint,
                 "run": resume.run_record(run.cfg, run.layout)}
        protect = [run.good_checkpoint] if run.good_checkpoint is not None else []
        path = ckpt.save(run.engine, run.cfg.checkpoint.save, step, state, run.cfg.values,
                         keep_last=run.cfg.checkpoint.keep_last_n_checkpoints, layout=layout_record(run),
                         protect=protect)
        log.info("saved checkpoint %s", path)
        self.saved.add(step)
        return True

    @staticmethod
    def diverged(run: "Run", step: int, in_a_row: int) -> TrainingError:
        """The stop after max_nonfinite_steps: it names the checkpoint to go back to and how."""
        cfg = run.cfg
        head = (f"the loss was not finite for {in_a_row} steps in a row (step {step}; "
                f"max_nonfinite_steps={cfg.training.max_nonfinite_steps})")
        lr = cfg.optimizer.params.lr
        change = f"--set optimizer.params.lr={lr / 2:g}" + (" (or a higher optimizer.params.rho)"
                                                              if cfg.optimizer.type == "sophia" else "")
        good = run.good_checkpoint
        if good is None or not in_save_folder(run, good):
            return TrainingError(f"{head}; no checkpoint precedes it: start again with changed settings, e.g. {change}")
        where = os.path.join(cfg.checkpoint.save, ckpt.tag_for(good))
        return TrainingError(f"{head}; {where} is the newest checkpoint whose next step was finite: resume from it "
                             f"with changed settings, i.e. the same command with --set load={where} and e.g. {change}")


# ---------------------------------------------------------------------------------- metrics log
class MetricsLog:
    """A train record every log_interval steps and at the end; eval records; the ETA, which
    leaves out the evaluations and saves still to come (``pauses``)."""

    def __init__(self, run: "Run", start_step: int, pauses: Callable[[int], Dict[str, int]]):
        cfg = run.cfg
        self.interval, self.end = cfg.logging.log_interval, cfg.training.train_iters
        self.tokens_per_step = run.layout.train_batch_size * cfg.model.seq_length
        self.metrics = Metrics(cfg.logging, dist.get_rank(), self.end, cfg.values, start_step=start_step)
        self.progress, self.began, self.pauses = Progress(), time.time(), pauses

    def due(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.end

    def train(self, run: "Run", step: int, result: "RunResult", hessian_update: bool) -> None:
        record = {"step": step, "loss": result.train_loss[step], "lr": run.scheduler.get_lr(),
                  "grad_norm": result.grad_norm, "hessian_update": hessian_update,
                  "elapsed_s": time.time() - self.began, "nonfinite_steps": result.nonfinite_steps,
                  **statistics_record(run.optimizer)}
        record.update(self.progress.report(self.tokens_per_step, self.end - step, self.pauses(step)))
        self.metrics.train(record)
        log.info("step %d/%d", step, self.end)

    def eval(self, step: int, loss: float) -> None:
        self.metrics.eval(step, loss)

    def close(self) -> None:
        self.metrics.close()


def grad_norm(engine) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)

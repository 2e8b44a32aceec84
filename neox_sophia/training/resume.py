"""What a resume takes from the checkpoint, and what from the config: the config wins.

A checkpoint gives back the weights, the optimizer's per-parameter state (exp_avg, hessian, ...),
the step, the LR schedule's position, the RNG states and the sample stream's position. The
settings come from the config of the run that resumes. torch's Optimizer.load_state_dict, which
DeepSpeed's engine.load_checkpoint calls on the client optimizer (the plain engine, the bf16
optimizer, ZeRO-1/2 with a rigid checkpoint), replaces every param group's values with the saved
ones; so after the load the values the freshly built optimizer holds are put back
(``apply_config``): the keys of optimizer.defaults and weight_decay, i.e. the hyperparameters
(rho, betas, eps, bs, weight decay...), lr excepted (the LR schedule sets it from the config).
Every other key of a group (a counter an optimizer keeps there) stays as saved.

Each setting that differs from the checkpoint is said once, on rank 0 (stdout and rank log):

    resume: optimizer.params.rho 0.05 -> 0.1
    resume: train_iters 6 -> 12

for the hyperparameters and for the run's length, batch sizes and LR schedule (``run_record``,
kept in every checkpoint's client state).
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch.distributed as dist

from neox_sophia.training.lifecycle import log

OWN_KEYS = {"weight_decay": "weight_decay"}
"""Param-group keys set by a top-level config key; the others are optimizer.params.<key>."""


def hyperparameters(optimizer) -> List[Dict[str, Any]]:
    """Per param group, the values of the keys the config defines (lr excepted)."""
    keys = sorted((set(optimizer.defaults) | {"weight_decay"}) - {"lr"})
    return [{key: group[key] for key in keys if key in group} for group in optimizer.param_groups]


def apply_config(optimizer, requested: List[Dict[str, Any]]) -> None:
    for group, values in zip(optimizer.param_groups, requested):
        group.update(values)


def _same(a: Any, b: Any) -> bool:
    as_tuple = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731 - betas: list or tuple
    return as_tuple(a) == as_tuple(b)


def _show(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def group_changes(saved: List[Dict[str, Any]], requested: List[Dict[str, Any]]) -> List[str]:
    """One line per (setting, saved value, value now) that differs, in group order."""
    lines: List[str] = []
    for old, new in zip(saved, requested):
        for key, value in new.items():
            if key in old and not _same(old[key], value):
                name = OWN_KEYS.get(key, f"optimizer.params.{key}")
                line = f"resume: {name} {_show(old[key])} -> {_show(value)}"
                if line not in lines:
                    lines.append(line)
    return lines


def run_record(cfg, layout) -> Dict[str, Any]:
    """The run's length, global batch sizes and LR schedule, by config key (a checkpoint keeps it)."""
    schedule = cfg.lr_schedule()
    record = {"train_iters": cfg.training.train_iters, "train_batch_size": layout.train_batch_size,
              "optimizer.params.lr": schedule.lr, "min_lr": schedule.min_lr, "lr_decay_iters": schedule.decay_iters,
              "warmup": schedule.warmup, "lr_decay_style": schedule.style}
    if cfg.hessian_interval:
        record["optimizer.params.hessian_batch_size"] = cfg.hessian_batch(layout.world_size)[0]
    return record


def record_changes(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    return [f"resume: {key} {_show(saved[key])} -> {_show(value)}" for key, value in current.items()
            if key in saved and not _same(saved[key], value)]


def announce(lines: List[str]) -> None:
    for line in lines:
        log.info("%s", line)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"neox-sophia: {line}", flush=True)

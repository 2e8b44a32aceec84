"""Learning-rate schedules with GPT-NeoX's formulas (megatron/learning_rates.py, AnnealingLR).

With n the optimizer step, E the decay steps and W = warmup * E the warmup steps (NeoX counts
warmup as a fraction of the decay steps):

    n <= W:   lr * max(1, n) / W
    n >  W:   style(lr, min_lr, n - W, E - W), never below min_lr

One difference, on purpose: past E the step is held at E, so a cosine schedule stays at min_lr
instead of rising again (NeoX lets cos() come back up when train_iters > lr_decay_iters).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List

# style -> lr after warmup, given (lr, min_lr, steps since warmup, decay steps after warmup)
DecayStyle = Callable[[float, float, float, float], float]
DECAY_STYLES: Dict[str, DecayStyle] = {
    "constant": lambda lr, min_lr, n, e: lr,
    "linear": lambda lr, min_lr, n, e: lr * (e - n) / e,
    "cosine": lambda lr, min_lr, n, e: min_lr + (lr - min_lr) / 2.0 * (math.cos(math.pi * n / e) + 1.0),
    "exponential": lambda lr, min_lr, n, e: lr * math.exp(-0.693 * n / e),
}


@dataclass(frozen=True)
class LRSchedule:
    lr: float
    min_lr: float
    decay_iters: int
    warmup: float
    style: str

    @property
    def warmup_iters(self) -> float:
        return self.warmup * self.decay_iters

    def lr_at(self, step: int) -> float:
        w, e = self.warmup_iters, self.decay_iters
        if w > 0 and step <= w:
            return self.lr * max(1, step) / w
        after, span = min(step, e) - w, e - w
        value = DECAY_STYLES[self.style](self.lr, self.min_lr, after, span) if span > 0 else self.lr
        return max(value, self.min_lr)


class AnnealingLR:
    """Sets every param group's lr from an LRSchedule; DeepSpeed calls step() after each
    optimizer step and keeps state_dict() in its checkpoints."""

    def __init__(self, optimizer, schedule: LRSchedule, last_step: int = 0):
        self.optimizer = optimizer
        self.schedule = schedule
        self.num_iters = last_step
        self._apply()

    def _apply(self) -> None:
        lr = self.schedule.lr_at(self.num_iters)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # lr_scale: e.g. the AdamW groups of a split Sophia

    def step(self, step: int | None = None) -> None:
        self.num_iters = self.num_iters + 1 if step is None else step
        self._apply()

    def get_lr(self) -> float:
        return self.schedule.lr_at(self.num_iters)

    def get_last_lr(self) -> List[float]:  # per group: the schedule's lr times the group's lr_scale
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"num_iters": self.num_iters}

    def load_state_dict(self, state: dict) -> None:
        self.num_iters = int(state["num_iters"])
        self._apply()

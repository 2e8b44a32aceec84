"""Where each step's samples sit in the training split's sample stream.

Training steps and Sophia's Hessian refreshes read one stream of global sample indices, in
windows of k steps (k = hessian_interval): the k training batches of B samples, then the H
samples of the Hessian refresh that follows step k-1 of the window:

    | step 0 | step 1 | ... | step k-1 | Hessian 0 | step k | ... | step 2k-1 | Hessian 1 | ...
      B        B              B          H           B

So training step s (from 0) starts at s*B + (s div k)*H, and refresh j at (j+1)*k*B + j*H. Both
are functions of the step alone: not of train_iters (extending a run by raising train_iters
leaves every earlier and later sample where it was) and not of the layout. Every Hessian batch
is fresh data that no training step reads. Without a Hessian (AdamW) step s starts at s*B.

A checkpoint records the stream position reached (``position``); a resume continues from it
(``resume_at``), so a run resumed with another batch size or Hessian batch goes on with unread
samples instead of re-reading or skipping any.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class SampleSchedule:
    batch: int
    """B: samples per training step (train_batch_size)."""
    hessian_batch: int = 0
    """H: samples per Hessian refresh (0 without one)."""
    interval: Optional[int] = None
    """k: steps between Hessian refreshes (None without one)."""
    anchor_step: int = 0
    anchor_position: int = 0
    """Stream position at the start of step anchor_step (a resume moves the anchor)."""

    def refreshes_before(self, step: int) -> int:
        """Hessian refreshes after steps 0..step-1 (they follow steps k-1, 2k-1, ...)."""
        return step // self.interval if self.interval else 0

    def train_start(self, step: int) -> int:
        """Stream position of training step ``step``'s first sample."""
        refreshes = self.refreshes_before(step) - self.refreshes_before(self.anchor_step)
        return self.anchor_position + (step - self.anchor_step) * self.batch + refreshes * self.hessian_batch

    def hessian_start(self, refresh: int) -> int:
        """Stream position of Hessian refresh ``refresh``'s first sample (it follows step (refresh+1)*k - 1)."""
        return self.train_start((refresh + 1) * self.interval) - self.hessian_batch

    def position(self, step: int) -> int:
        """Samples read before step ``step`` (what a checkpoint at ``step`` records)."""
        return self.train_start(step)

    def resume_at(self, step: int, position: Optional[int]) -> None:
        """Continue at ``step`` from the recorded ``position`` (None: a checkpoint without one,
        whose position the formula gives)."""
        if position is not None:
            self.anchor_step, self.anchor_position = step, int(position)

    def samples_needed(self, train_iters: int) -> int:
        """Stream length that steps up to ``train_iters`` (and their refreshes) read."""
        return self.train_start(train_iters)

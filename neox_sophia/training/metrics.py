"""What a run reports: one JSON object per logged step in log_dir/metrics.jsonl, a readable line
on rank 0's stdout, and TensorBoard scalars when tensorboard_dir is set (and tensorboard is
installed). Only rank 0 writes.

metrics.jsonl records:
    train: step, loss, lr, grad_norm, clip_frac, win_rate, hessian_update, tokens_per_s, elapsed_s
    eval:  step, val_loss
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Dict, Optional


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _count(value: float) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


def format_train_line(record: Dict[str, Any], train_iters: int) -> str:
    parts = [f"step {record['step']:>{len(str(train_iters))}}/{train_iters}",
             f"loss {record['loss']:.4f}", f"lr {record['lr']:.3e}"]
    if record.get("clip_frac") is not None:
        parts.append(f"clip {record['clip_frac']:.3f}")
    if record.get("grad_norm") is not None:
        parts.append(f"gnorm {record['grad_norm']:.3f}")
    parts.append(f"{_count(record['tokens_per_s'])} tok/s")
    parts.append(f"ETA {_duration(record.get('eta_s', float('nan')))}")
    if record.get("nonfinite_steps"):
        parts.append(f"skipped {record['nonfinite_steps']}")
    return " | ".join(parts)


class Metrics:
    def __init__(self, log_dir: Optional[str], tensorboard_dir: Optional[str], rank: int, train_iters: int):
        self.rank = rank
        self.train_iters = train_iters
        self.file = None
        self.tensorboard = None
        if rank != 0:
            return
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            self.file = open(os.path.join(log_dir, "metrics.jsonl"), "a")
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional dependency
                print("neox-sophia: tensorboard_dir is set but tensorboard is not installed "
                      "(pip install tensorboard); not writing event files", file=sys.stderr)
            else:
                self.tensorboard = SummaryWriter(tensorboard_dir)

    def write(self, record: Dict[str, Any], line: Optional[str] = None) -> None:
        if self.rank != 0:
            return
        if line:
            print(line, flush=True)
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tensorboard:
            prefix = "eval" if "val_loss" in record else "train"
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(f"{prefix}/{key}", value, record["step"])

    def train(self, record: Dict[str, Any]) -> None:
        self.write(record, format_train_line(record, self.train_iters))

    def eval(self, step: int, val_loss: float) -> None:
        ppl = math.exp(val_loss) if val_loss < 50 else float("inf")
        self.write({"step": step, "val_loss": val_loss}, f"eval step {step} | val_loss {val_loss:.4f} | ppl {ppl:.2f}")

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tensorboard:
            self.tensorboard.close()

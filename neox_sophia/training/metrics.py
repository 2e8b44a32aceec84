"""What a run reports: one JSON object per logged step in log_dir/metrics.jsonl, a readable line
on rank 0's stdout, TensorBoard scalars when tensorboard_dir is set (and tensorboard is installed)
and Weights & Biases when use_wandb is true (and wandb is installed). Only rank 0 writes.

metrics.jsonl records:
    train: step, loss, lr, grad_norm, clip_frac, win_rate, hessian_update, tokens_per_s, elapsed_s,
           eta_s, nonfinite_steps; with Sophia also groups: {role: {win_rate, clip_frac,
           hessian_mean, hessian_rms, hessian_zero_frac, hessian_floor}} per parameter role
           (embedding, output, attention, mlp, norms_biases; roles updated by AdamW are absent)
    eval:  step, val_loss

TensorBoard and wandb get the same scalars, nested ones as train/groups/<role>/<name>.

tokens_per_s counts training time only (``Progress``); the ETA adds the evals and checkpoint saves
still to come, each at the duration last measured for it.

Every line is strict JSON: a value that is not a finite number (a loss that went NaN) is written
as null and named, with what it was, under "nonfinite" ({"loss": null, "nonfinite": {"loss":
"nan"}}). Each step appears once: a run that starts at step S (a resume, or a fresh start after a
crash before the first checkpoint) moves the records of steps after S, which it is about to train
again, from metrics.jsonl to metrics.replayed.jsonl.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from typing import Any, Dict, Iterator, Optional


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


METRICS_FILE, REPLAYED_FILE = "metrics.jsonl", "metrics.replayed.jsonl"


def json_line(record: Dict[str, Any]) -> str:
    """``record`` as strict JSON (see the module docstring for non-finite numbers)."""
    bad = {key: repr(value) for key, value in record.items() if isinstance(value, float) and not math.isfinite(value)}
    if bad:
        record = {**{key: None if key in bad else value for key, value in record.items()}, "nonfinite": bad}
    return json.dumps(record, allow_nan=False)


def _step_of(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut by a kill: not a record


def drop_replayed(log_dir: str, start_step: int) -> int:
    """Move the records of steps after ``start_step`` (and lines cut short by a kill) from
    metrics.jsonl to metrics.replayed.jsonl; return how many moved."""
    path = os.path.join(log_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    keep, moved = [], []
    for line in lines:
        step = _step_of(line)
        (keep if step is not None and step <= start_step else moved).append(line)
    if not moved:
        return 0
    with open(os.path.join(log_dir, REPLAYED_FILE), "a") as f:
        f.writelines(line if line.endswith("\n") else line + "\n" for line in moved)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
    return len(moved)


class Progress:
    """Throughput and ETA of the training steps since the last report. Time inside ``pause(kind)``
    (an eval, a checkpoint save) is left out of the throughput and counted per kind instead."""

    def __init__(self) -> None:
        self.window_start = time.time()
        self.window_steps = 0
        self.paused_s = 0.0
        self.cost_s: Dict[str, float] = {}  # kind -> duration of its last occurrence

    def step(self) -> None:
        self.window_steps += 1

    @contextlib.contextmanager
    def pause(self, kind: str) -> Iterator[None]:
        began = time.time()
        try:
            yield
        finally:
            self.cost_s[kind] = time.time() - began
            self.paused_s += self.cost_s[kind]

    def report(self, tokens_per_step: int, remaining_steps: int, remaining: Dict[str, int]) -> Dict[str, float]:
        """{tokens_per_s, eta_s} of this window, then a new window. ``remaining``: kind -> how many
        pauses of that kind are still to come (those not measured yet count as free)."""
        train_s = max(time.time() - self.window_start - self.paused_s, 1e-9)
        step_s = train_s / max(self.window_steps, 1)
        eta = remaining_steps * step_s + sum(n * self.cost_s.get(kind, 0.0) for kind, n in remaining.items())
        out = {"tokens_per_s": self.window_steps * tokens_per_step / train_s, "eta_s": eta}
        self.window_start, self.window_steps, self.paused_s = time.time(), 0, 0.0
        return out


class Metrics:
    def __init__(self, logging_cfg, rank: int, train_iters: int, run_config: Optional[Dict[str, Any]] = None,
                 start_step: int = 0):
        """``logging_cfg``: the LoggingConfig section; ``run_config``: the merged config values
        (recorded by wandb); ``start_step``: the step the run starts from (records after it are
        moved aside, see the module docstring)."""
        self.rank = rank
        self.train_iters = train_iters
        self.file = None
        self.tensorboard = None
        self.wandb = None
        if rank != 0:
            return
        if logging_cfg.log_dir:
            os.makedirs(logging_cfg.log_dir, exist_ok=True)
            moved = drop_replayed(logging_cfg.log_dir, start_step)
            if moved:
                print(f"neox-sophia: moved {moved} record(s) of steps after {start_step}, which this run trains "
                      f"again, from {METRICS_FILE} to {REPLAYED_FILE}", flush=True)
            self.file = open(os.path.join(logging_cfg.log_dir, METRICS_FILE), "a")
        if logging_cfg.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional dependency
                print("neox-sophia: tensorboard_dir is set but tensorboard is not installed "
                      "(pip install tensorboard); not writing event files", file=sys.stderr)
            else:
                self.tensorboard = SummaryWriter(logging_cfg.tensorboard_dir)
        if logging_cfg.use_wandb:
            self.wandb = _start_wandb(logging_cfg, run_config)

    def write(self, record: Dict[str, Any], line: Optional[str] = None) -> None:
        if self.rank != 0:
            return
        if line:
            print(line, flush=True)
        if self.file:
            self.file.write(json_line(record) + "\n")
            self.file.flush()
        scalars = _scalars("eval" if "val_loss" in record else "train", record)
        if self.tensorboard:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, record["step"])
        if self.wandb:
            self.wandb.log(scalars, step=record["step"])

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
        if self.wandb:
            self.wandb.finish()


def _scalars(prefix: str, record: Dict[str, Any]) -> Dict[str, float]:
    """prefix/key -> number for every numeric entry of ``record`` but step, nested dicts flattened
    (groups.embedding.win_rate -> train/groups/embedding/win_rate); None and flags are left out."""
    out: Dict[str, float] = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update(_scalars(f"{prefix}/{key}", value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = value
    return out


def _start_wandb(logging_cfg, run_config: Optional[Dict[str, Any]]):
    """The wandb module with a run started, or None (said in one line) when it cannot be."""
    try:
        import wandb
    except ImportError:
        print("neox-sophia: use_wandb is true but wandb is not installed (pip install wandb); "
              "training without it", file=sys.stderr)
        return None
    if logging_cfg.wandb_host:  # a self-hosted server; WANDB_BASE_URL is how wandb is pointed at one
        os.environ["WANDB_BASE_URL"] = logging_cfg.wandb_host
    try:
        wandb.init(project=logging_cfg.wandb_project, group=logging_cfg.wandb_group,
                   name=logging_cfg.wandb_run_name, entity=logging_cfg.wandb_team, config=run_config,
                   dir=logging_cfg.log_dir)
    except Exception as e:  # not logged in, no network...: the run matters more than its dashboard
        print(f"neox-sophia: use_wandb: wandb.init failed ({type(e).__name__}: {e}); training without it "
              f"(run `wandb login`, or set use_wandb to false)", file=sys.stderr)
        return None
    return wandb

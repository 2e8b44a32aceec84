"""One rank's life in a multi-rank run: its own log file, a failure that stops every rank, and a
SIGTERM that ends the run at a checkpoint.

Rank log. With log_dir set, every rank writes log_dir/rank_00003.log: its lifecycle lines (start,
resume, evals, checkpoints, stop, finish), the Python warnings it shows, and its error with the
traceback if it fails. Rank 0's stdout stays the readable progress line; metrics.jsonl is rank 0's.

Failure. `neox-sophia train` catches any exception of its rank (``RankProcess.fail``): it prints
"rank R failed: <error>" on stderr (with the traceback when the error is not one of ours, whose
one-line messages say what to change), logs the traceback, writes the marker log_dir/failed_rank_R
and, when the run has other ranks, ends the process at once with os._exit: no interpreter shutdown
that could wait on peers. Its sockets close, so a peer blocked in a gloo collective fails at once;
that peer's own "rank Q failed" line then names the rank that failed first (from its marker).
Under NCCL a collective waits for its timeout instead, so the launcher stops the others: deepspeed's
launch.py polls every second and SIGTERMs the rest when a rank exits nonzero (SIGKILL after 30 s),
as do torchrun, mpirun and `srun --kill-on-bad-exit=1`. Exit codes: 2 for errors of ours (config,
data, checkpoint, training), 1 for anything else, 130 for a second Ctrl-C.

SIGTERM (pre-emption, scancel, the launchers' teardown) and SIGINT (Ctrl-C) only set a flag
(``StopSignals``). At every step boundary the ranks all-reduce it (MAX), so all of them see it at
the same step even when the signal reached only some: they save a checkpoint there (the normal
save, when `save` is set), print "received SIGTERM: saved checkpoint at step N in DIR" and exit
with code 0. 0, because the stop is not a failure: deepspeed's launcher and torchrun treat a
nonzero rank as failed (killing or restarting the others) and srun/mpirun report it as an error,
while SLURM requeues a pre-empted job by its state, not by the exit code; whether training is done
is in the message and the checkpoint's step. A repeated SIGTERM changes nothing (launchers repeat
it). A second SIGINT stops at once (KeyboardInterrupt); a checkpoint it interrupts has no
`complete` marker, so resuming skips it and takes the previous one. Grace periods are the
launcher's: deepspeed's launch.py waits 30 s per rank after its SIGTERM, SLURM waits KillWait
(default 30 s) before SIGKILL; one step plus one save must fit in that (`sbatch --signal=TERM@120`
sends it ahead of a time limit). Before the first step (setup, resume) the handlers are not yet
installed and a SIGTERM ends the process as usual: there is nothing new to save.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("neox_sophia.rank")
log.propagate = False
log.addHandler(logging.NullHandler())  # no rank log (no log_dir, or a library caller): lines are dropped
log.setLevel(logging.INFO)

MARKER_PREFIX = "failed_rank_"


def rank_log_path(log_dir: str, rank: int) -> str:
    return os.path.join(log_dir, f"rank_{rank:05d}.log")


def marker_path(log_dir: str, rank: int) -> str:
    return os.path.join(log_dir, f"{MARKER_PREFIX}{rank:05d}")


class TrainingError(RuntimeError):
    """The run cannot go on (the message says why and what to change)."""


def our_errors() -> tuple:
    """Errors whose one-line message says what to change (exit code 2, no traceback on stderr)."""
    from neox_sophia.config import ConfigError
    from neox_sophia.data.datasets import DataError
    from neox_sophia.training.checkpoint import CheckpointError

    return ConfigError, DataError, TrainingError, CheckpointError, FileNotFoundError


class RankProcess:
    """This process as one rank of a run: ``open_log`` once the config is known, ``fail`` on any
    exception."""

    def __init__(self) -> None:
        from neox_sophia.parallel.topology import launcher_environment

        launcher_environment()  # RANK / WORLD_SIZE from mpirun or srun, as init_distributed reads them
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.started = time.time()
        self.log_dir: Optional[str] = None

    def open_log(self, log_dir: Optional[str]) -> None:
        if not log_dir:
            return
        os.makedirs(log_dir, exist_ok=True)
        self.log_dir = log_dir
        if os.path.exists(marker_path(log_dir, self.rank)):  # from an earlier run
            os.remove(marker_path(log_dir, self.rank))
        handler = logging.FileHandler(rank_log_path(log_dir, self.rank))
        handler.setFormatter(logging.Formatter(f"%(asctime)s rank {self.rank} %(levelname)s %(message)s"))
        log.addHandler(handler)
        _log_warnings_too()
        log.info("start: rank %d of %d on %s, pid %d: %s", self.rank, self.world_size, socket.gethostname(),
                 os.getpid(), " ".join(sys.argv))

    def fail(self, error: BaseException) -> int:
        """Report ``error``; return the exit code (alone) or end the process (other ranks exist)."""
        if isinstance(error, SystemExit):
            raise error
        ours = isinstance(error, our_errors())
        code = 130 if isinstance(error, KeyboardInterrupt) else 2 if ours else 1
        message = (str(error) if ours else "interrupted (Ctrl-C)" if isinstance(error, KeyboardInterrupt)
                   else f"{type(error).__name__}: {error}")
        first = self._first_failure()
        line = f"rank {self.rank} failed: {message}" if self.world_size > 1 else message
        if first is not None:  # most likely a consequence: name the cause first
            line = f"rank {self.rank} stopped because rank {first['rank']} failed: {first['error']} (here: {message})"
        log.error("failed: %s\n%s", line, "".join(traceback.format_exception(error)).rstrip())
        if not ours and first is None and not isinstance(error, KeyboardInterrupt):  # a peer's: in its log
            traceback.print_exception(error, file=sys.stderr)
        print(f"neox-sophia train: {line}", file=sys.stderr)
        self._mark(message)
        if self.world_size == 1:
            return code
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)  # no shutdown that could wait on peers (see the module docstring)

    def _mark(self, message: str) -> None:
        if not self.log_dir:
            return
        path = marker_path(self.log_dir, self.rank)
        try:
            with open(f"{path}.tmp", "w") as f:
                json.dump({"rank": self.rank, "time": time.time(), "error": message}, f)
            os.replace(f"{path}.tmp", path)
        except OSError:
            pass  # the marker is a courtesy to the peers; the error is on stderr already

    def _first_failure(self) -> Optional[dict]:
        """The earliest marker another rank of this run wrote (None if none)."""
        if not self.log_dir:
            return None
        found = []
        try:
            names = os.listdir(self.log_dir)
        except OSError:
            return None
        for name in names:
            if name.startswith(MARKER_PREFIX) and not name.endswith(".tmp"):
                try:
                    with open(os.path.join(self.log_dir, name)) as f:
                        marker = json.load(f)
                except (OSError, ValueError):
                    continue
                if marker.get("rank") != self.rank and marker.get("time", 0) >= self.started:
                    found.append(marker)
        return min(found, key=lambda m: m["time"]) if found else None


def _log_warnings_too() -> None:
    """Python warnings go to the rank log as well as where they went before (stderr)."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        log.warning("%s", warnings.formatwarning(message, category, filename, lineno, line).rstrip())
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


class StopSignals:
    """SIGTERM and SIGINT as a request to stop at the next step boundary (see the module docstring).
    Use as a context manager around the loop; ``agreed()`` is a collective every rank calls."""

    def __init__(self) -> None:
        self.received = 0  # the signal number (the larger, when both came)
        self._interrupts = 0
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:  # a second Ctrl-C: stop now
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
        log.warning("received %s: stopping at the next step boundary", signal.Signals(signum).name)
        self.received = max(self.received, signum)

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received (0: none), the same on every rank."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.received
        # NCCL reduces CUDA tensors only; gloo (also used on GPUs when asked for) CPU ones
        where = device if dist.get_backend() == "nccl" else torch.device("cpu")
        flag = torch.tensor([self.received], dtype=torch.int32, device=where)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name

"""Time from the process's start to the first training step, phase by phase.

setup() marks the end of each phase (``mark``); the training loop reports after the first step
(``report``): on rank 0's stdout, and as one JSON line in the rank log, which
tools/bench_startup.py reads.

    neox-sophia: first step 14.2 s after start: imports 3.1, distributed 0.4, tokenizer 0.1,
                 model 2.9, engine 1.2, datasets 0.6, first step 5.9
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, Optional

_LOADED = time.time()


def process_start() -> float:
    """The wall-clock time this process started (Linux: from /proc; elsewhere: when this module
    was first imported, which misses the interpreter's own start and the imports before it)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return _LOADED


class StartupClock:
    """Seconds per phase, each from the previous mark (the first from the process's start)."""

    def __init__(self) -> None:
        self.phases: Dict[str, float] = {}
        self._last: Optional[float] = None
        self.reported = False

    def mark(self, phase: str) -> None:
        now = time.time()
        self.phases[phase] = now - (process_start() if self._last is None else self._last)
        self._last = now

    def report(self, log, rank: int) -> Dict[str, float]:
        """Mark the first step done and say how long everything took (once per process)."""
        self.mark("first step")
        self.reported = True
        total = sum(self.phases.values())
        log.info("startup %s", json.dumps({"total_s": total, "phases_s": self.phases}))
        if rank == 0:
            parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.phases.items())
            print(f"neox-sophia: first step {total:.1f} s after start: {parts}", flush=True)
        return self.phases


clock = StartupClock()

"""Fault injection, for the tests that kill a run in the middle of a save and prove that nothing
is lost (tests/test_failures.py). A production run never sets the variable.

    NEOX_SOPHIA_FAULT=POINT:STEP     kill -9 this process when the save of checkpoint STEP
                                     reaches POINT (one of POINTS)
    NEOX_SOPHIA_FAULT=file:STEP:N    kill -9 it while DeepSpeed writes the N-th file of that save,
                                     with half of the file on disk
"""
from __future__ import annotations

import contextlib
import os
import signal
from typing import Iterator

ENV = "NEOX_SOPHIA_FAULT"
POINTS = (
    "checkpoint_start",             # the folder exists, marked incomplete, nothing in it yet
    "checkpoint_before_marker",     # every rank's files written, no `complete` marker
    "checkpoint_latest_tmp",        # `latest.tmp<pid>` written, not yet renamed over `latest`
    "checkpoint_before_retention",  # the new checkpoint is `latest`; old ones not yet deleted
    "checkpoint_during_retention",  # an old checkpoint unmarked, its files not yet deleted
)


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def fault_point(name: str, step: int) -> None:
    if os.environ.get(ENV) == f"{name}:{step}":
        _kill()


@contextlib.contextmanager
def file_fault(engine, step: int) -> Iterator[None]:
    """Within the block, the N-th file DeepSpeed writes for checkpoint ``step`` is cut in half and
    the process killed (when NEOX_SOPHIA_FAULT asks for it)."""
    kind, _, rest = os.environ.get(ENV, "").partition(":")
    at_step, _, nth = rest.partition(":")
    if kind != "file" or at_step != str(step) or not nth.isdigit():
        yield
        return
    writer, original, written = engine.checkpoint_engine, engine.checkpoint_engine.save, [0]

    def save(state_dict, path):
        original(state_dict, path)
        written[0] += 1
        if written[0] == int(nth):
            os.truncate(path, os.path.getsize(path) // 2)
            _kill()

    writer.save = save
    try:
        yield
    finally:
        writer.save = original

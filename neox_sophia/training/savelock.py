"""One run at a time per save folder: SAVE/neox-sophia.lock names the run that owns the folder.

Two runs writing one `save` would resume from each other's steps, replace each other's
checkpoints and interleave their logs. So rank 0 of a run creates the lock file (O_EXCL: one
creator wins, also on NFS) before any setup work and removes it when the run ends, however it
ends, short of a kill. The file holds the holder's host, pid, process start time, boot id and
command. A second run finds it and refuses in one line naming the holder, unless the holder is
provably dead:

    same host, same boot, the pid gone (or reused by a process that started later)
        -> taken over, with a line saying so (a kill -9 or an out-of-memory kill left it)
    another host (a shared filesystem), or a file that cannot be read
        -> refused: only its host can tell whether that run is alive; the line names the file
           to delete once you know it is not

Every rank learns rank 0's verdict (a broadcast), so a refused run ends on all ranks at once.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sys
import time
from typing import Any, Dict, Iterator, Optional

import torch.distributed as dist

from neox_sophia.training.checkpoint import CheckpointError

LOCK_FILE = "neox-sophia.lock"
TAKEOVER_TIMEOUT_S = 60  # a take-over in progress older than this was killed midway


class SaveFolderInUse(CheckpointError):
    """Another run owns the save folder (the message names it and what to do)."""


def _boot_id() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _process_start(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def this_process() -> Dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": time.time(), "boot_id": _boot_id(),
            "process_start": _process_start(pid), "command": " ".join(sys.argv), "token": secrets.token_hex(8)}


def is_dead(holder: Dict[str, Any]) -> bool:
    """Whether ``holder`` (a lock record) is provably no longer running: only on its own host."""
    if holder.get("host") != socket.gethostname():
        return False
    if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
        return True  # the host rebooted since
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    recorded, now = holder.get("process_start"), _process_start(pid)
    return recorded is not None and now is not None and recorded != now  # the pid was reused


def describe(holder: Dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {started}: `{holder.get('command', '?')}`"


def _read(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            record = json.load(f)
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


def _create(path: str, record: Dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return True


class SaveLock:
    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_FILE)
        self.record = this_process()
        self.took_over: Optional[Dict[str, Any]] = None

    def acquire(self) -> None:
        """Own the folder, or raise SaveFolderInUse."""
        for _ in range(3):
            if _create(self.path, self.record):
                return
            holder = _read(self.path)
            if holder is None:
                if not os.path.exists(self.path):
                    continue  # released meanwhile
                raise SaveFolderInUse(f"save: {self.folder} has a lock file {self.path} that cannot be read; if no "
                                      f"run uses this folder, delete that file and start again")
            if not is_dead(holder):
                raise SaveFolderInUse(f"save: {self.folder} is in use by another run ({describe(holder)}); wait "
                                      f"for it to end or set save to another folder; if that run is gone (its "
                                      f"host crashed), delete {self.path} and start again")
            if self._take_over(holder):
                return
            time.sleep(0.5)  # another run is taking it over: look again
        raise SaveFolderInUse(f"save: {self.folder}: other runs keep taking its lock {self.path}; start one run "
                              f"per save folder")

    def _take_over(self, dead: Dict[str, Any]) -> bool:
        """Replace the lock of the dead holder, one taker at a time (a second lock guards it)."""
        guard = self.path + ".takeover"
        with contextlib.suppress(OSError):
            if time.time() - os.path.getmtime(guard) > TAKEOVER_TIMEOUT_S:
                os.remove(guard)  # a taker killed midway
        if not _create(guard, self.record):
            return False
        try:
            if _read(self.path) != dead:  # someone else took it over first
                return False
            os.remove(self.path)
            if not _create(self.path, self.record):
                return False
            self.took_over = dead
            return True
        finally:
            os.remove(guard)

    def release(self) -> None:
        if _read(self.path) == self.record:  # never remove a lock that is not ours
            os.remove(self.path)


@contextlib.contextmanager
def hold(folder: Optional[str]) -> Iterator[Optional[SaveLock]]:
    """Own ``folder`` for the duration of the block (nothing when it is None). Rank 0 takes the
    lock; every rank raises SaveFolderInUse when it cannot. A collective when distributed."""
    if not folder:
        yield None
        return
    rank = dist.get_rank() if dist.is_initialized() else 0
    lock, verdict = None, [None]
    if rank == 0:
        lock = SaveLock(folder)
        try:
            lock.acquire()
        except SaveFolderInUse as e:
            verdict = [str(e)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise SaveFolderInUse(verdict[0])
    if lock is not None and lock.took_over is not None:
        print(f"neox-sophia: save: took over the lock of {folder} from a run that is no longer running "
              f"({describe(lock.took_over)})", flush=True)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()

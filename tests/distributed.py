"""Run a function on N local CPU ranks (gloo), the way a launcher would, and collect results.

    results = run_ranks(worker, world_size=2, args=(...,))

`worker(rank, world_size, *args)` runs in a fresh spawned process with the launcher's
environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and DeepSpeed on its CPU
accelerator; whatever it returns (tensors, dicts...) comes back through torch.save files.
An exception on any rank fails the call with that rank's traceback.
"""
from __future__ import annotations

import os
import socket
import tempfile
from typing import Any, Callable, List, Sequence

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, outdir: str, fn: Callable, args: Sequence[Any],
           accelerator: str = "cpu"):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR=accelerator)
    torch.set_num_threads(1)  # N ranks share this machine's cores
    result = fn(rank, world_size, *args)
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, args: Sequence[Any] = (), accelerator: str = "cpu") -> List[Any]:
    """``accelerator``: DeepSpeed's ("cpu", or "cuda" for tests marked gpu)."""
    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(_entry, args=(world_size, free_port(), outdir, fn, tuple(args), accelerator),
                           nprocs=world_size, join=True, start_method="spawn")
        return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=True)
                for r in range(world_size)]

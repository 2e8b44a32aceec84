"""Checks a run makes before it builds anything, so that what would fail at the first checkpoint
(after checkpoint_factor steps, with a traceback) fails at once in one line naming the key:

    output folders   save, log_dir and tensorboard_dir are folders this rank can write (created
                     when missing); a path under a regular file, or without permission, is refused
    free space       the save folder's filesystem holds at least one checkpoint more (refused
                     otherwise) and should hold two (a warning): a save writes the new checkpoint
                     before retention deletes an old one. The size is `neox-sophia plan`'s
                     estimate, for the built model's parameter count (before DeepSpeed's setup).

The data and tokenizer checks (files present and complete, token ids within the vocabulary) run
in setup() before the model and DeepSpeed (neox_sophia.data.datasets.build_datasets).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

from neox_sophia.config import ConfigError

GIB = 1024 ** 3


def _blocking_file(path: str) -> str:
    """The first existing ancestor of ``path`` (or itself) that is not a folder, if any."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        prefix = os.sep.join(parts[:i])
        if os.path.lexists(prefix) and not os.path.isdir(prefix):
            return prefix
    return ""


def writable_folder(key: str, path: str) -> None:
    """Create ``path`` if needed and prove this process can write in it, or raise ConfigError."""
    blocking = _blocking_file(path)
    if blocking:
        raise ConfigError(f"{key}: {path} cannot be a folder: {blocking} is a file; set {key} to a folder", key)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".neox-sophia-write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"{key}: {path} is not a folder this run can write ({e.strerror or e}); set {key} to a "
                          f"writable folder", key) from None


def check_output_folders(cfg) -> None:
    for key, path in (("save", cfg.checkpoint.save), ("log_dir", cfg.logging.log_dir),
                      ("tensorboard_dir", cfg.logging.tensorboard_dir)):
        if path:
            writable_folder(key, path)


def parameter_count(model, dp: int, device) -> int:
    """The built model's parameters, all ranks of one data-parallel replica (a collective; the
    TP-replicated norms and biases are counted once per TP rank: an estimate's rounding)."""
    import torch
    import torch.distributed as dist

    count = torch.tensor([float(sum(p.numel() for p in model.parameters()))], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(count)
    return int(count.item()) // dp


def check_free_space(cfg, parameters: int, rank: int = 0) -> None:
    """``parameters``: the model's (plan's count, or parameter_count's)."""
    from neox_sophia.plan import checkpoint_bytes

    save = cfg.checkpoint.save
    if not save:
        return
    need = checkpoint_bytes(parameters, cfg.engine.resolved_precision, cfg.engine.zero_stage)
    free = free_bytes(save)
    where = f"save: {save} has {free / GIB:.2f} GiB free"
    if free < need:
        raise ConfigError(f"{where}, less than one checkpoint ({need / GIB:.2f} GiB, the estimate of `neox-sophia "
                          f"plan`); free space there or set save to a folder with room", "save")
    if free < 2 * need and rank == 0:
        print(f"neox-sophia: {where}, room for fewer than two checkpoints of {need / GIB:.2f} GiB: a save may run "
              f"out of space (the previous checkpoint would stay intact)", file=sys.stderr, flush=True)


def free_bytes(path: str) -> int:
    """Free bytes of the filesystem ``path`` is (or will be created) on."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free

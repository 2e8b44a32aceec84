"""What a run checks before it builds anything, in one place, so that `plan` refuses the same and
what would fail later (at the first checkpoint, after checkpoint_factor steps, with a traceback)
fails at once in one line naming the key.

    refuse_untrainable(cfg, world_size)   # ConfigError, one line: a setting train cannot run
    missing_for_training(cfg)             # lines: what train needs that is not there (yet)
    check_output_folders(cfg)             # save, log_dir, tensorboard_dir: folders this rank can write
    check_free_space(cfg, parameters)     # the save filesystem holds one checkpoint (two: no warning)

The first are contradictions inside the config (a precision the engine mishandles, a batch the
world size cannot split; an estimator without a step for the engine is refused at config load);
`plan` refuses them too. The second depend on the machine or on files still to come (data,
tokenizer files, train_iters in another file), so `plan` only warns about them. Output folders are
created when missing; a path under a regular file, or without permission, is refused. Free space:
a save writes the new checkpoint before retention deletes an old one, so the save folder's
filesystem must hold one checkpoint more (refused otherwise) and should hold two (a warning); the
size is `neox-sophia plan`'s estimate for the built model's parameter count (before DeepSpeed's
setup). The data and tokenizer contents (files complete, token ids within the vocabulary) are
checked in setup() before the model (neox_sophia.data.datasets.build_datasets).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import List

from neox_sophia.config.base import ConfigError

GIB = 1024 ** 3


def refuse_untrainable(cfg, world_size: int) -> None:
    """Raise ConfigError for a config `train` would refuse at ``world_size`` ranks."""
    if cfg.engine.resolved_precision == "fp16" and cfg.engine.zero_stage == 0:
        # DeepSpeed 0.19's engine.backward() applies the loss scale only for ZeRO optimizers, but
        # its non-ZeRO fp16 optimizers divide the gradients by it all the same (deepspeedai/
        # DeepSpeed PR #8393, open): every gradient would reach Sophia loss_scale times too small
        # (measured: 65536x), which Sophia, unlike Adam, is not invariant to.
        raise cfg._error(ConfigError("zero_optimization: fp16 needs ZeRO stage 1 or 2 with this DeepSpeed: at stage 0 "
                          "it never applies the loss scale but still divides the gradients by it "
                          "(deepspeedai/DeepSpeed PR #8393); set zero_optimization.stage to 1 (it works "
                          "with pipe parallelism too), or use bf16", "zero_optimization"))
    cfg.layout(world_size)
    if cfg.hessian_interval is not None:
        cfg.hessian_batch(world_size)
    cfg.deepspeed_config(world_size)


def missing_for_training(cfg) -> List[str]:
    """What `train` needs and does not find here: train_iters, the data, the tokenizer files."""
    missing = []
    if cfg.training.train_iters is None:
        missing.append("train_iters: not set; say how many optimizer steps to train")
    data = cfg.data
    prefixes = [data.data_path] if data.data_path else [*(data.train_data_paths or []),
                                                      *(data.valid_data_paths or []), *(data.test_data_paths or [])]
    if not prefixes:
        missing.append("data_path: no training data configured; set data_path (or train_data_paths)")
    for prefix in dict.fromkeys(prefixes):
        if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
            missing.append(f"data_path: {prefix}.bin/.idx not found here")
    from neox_sophia.data.tokenizers import tokenizer_class

    tokenizer = tokenizer_class(data.tokenizer_type)
    for key in tokenizer.file_keys if tokenizer.local_files else ():
        path = getattr(data, key)
        if path is None:
            missing.append(f"{key}: {data.tokenizer_type} needs it; not set")
        elif not os.path.exists(path):
            missing.append(f"{key}: {path} not found here")
    return missing


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

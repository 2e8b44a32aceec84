"""Checkpoint files: read safely, find the step to read, and the config saved with it."""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Optional

import torch

from neox_sophia.training.checkpoint import (MARKER, CheckpointError, complete_tags, newest_complete_tag,
                                             read_config_file, tag_for)


def _safe_classes() -> list:
    """The non-tensor objects DeepSpeed 0.19 pickles into its checkpoint files, and nothing else:

    LossScaler / DynamicLossScaler  ZeRO optimizer state 'loss_scaler' (static under fp32/bf16,
                                    dynamic under fp16)
    ZeroStageEnum                   ZeRO optimizer state 'zero_stage'
    fragment_address                ZeRO / bf16 optimizer state 'param_slice_mappings' (numel, start)
    numpy arrays                    GPT-NeoX's client state 'np_rng_state' (np.random.get_state(): a
                                    uint32 array); rebuilt as data, nothing executed
    """
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    multiarray = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    numpy_arrays = [multiarray.multiarray._reconstruct, np.ndarray, np.dtype]
    numpy_arrays += [getattr(np.dtypes, name) for name in ("UInt32DType", "Int64DType", "Float64DType")
                     if hasattr(getattr(np, "dtypes", None), name)]
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, *numpy_arrays]


def load_file(path: str) -> Any:
    """torch.load(weights_only=True) of one checkpoint file, memory-mapped (tensors the caller never
    touches are never read); CheckpointError naming the file when it is missing or unreadable."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete (a rank's file was not written "
                              f"or was removed). Copy the file back, or read another step (--step N)")
    try:
        with torch.serialization.safe_globals(_safe_classes()):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # a legacy (non-zip) file cannot be memory-mapped
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds on truncated or foreign files
        text = str(e).strip()
        # a weights_only refusal says what it refused after "WeightsUnpickler error:"
        refused = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
        detail = ("weights_only refused: " + " ".join(refused.group(1).split()) if refused
                  else (text.splitlines() or [""])[0].split(". ")[0])
        raise CheckpointError(f"{path}: could not be read ({type(e).__name__}: {detail[:300]}); the file is "
                              f"truncated or is not a DeepSpeed checkpoint file (it is loaded with "
                              f"weights_only=True: tensors and DeepSpeed's few record types only). Restore it, "
                              f"or read another step (--step N)") from e


def resolve(save_dir: str, step: Optional[int] = None) -> str:
    """The tag to read: global_step{step}, or `latest` when it is complete, else the newest
    complete checkpoint (as checkpoint.resolve_tag does for resuming)."""
    if not os.path.isdir(save_dir):
        raise CheckpointError(f"{save_dir}: no such directory; pass the run's `save` directory (it holds "
                              f"`latest` and global_stepN/)")
    tags = complete_tags(save_dir)
    available = ", ".join(str(s) for s, _ in tags) or "none"
    if step is not None:
        tag = tag_for(step)
        if not os.path.isdir(os.path.join(save_dir, tag)):
            raise CheckpointError(f"{os.path.join(save_dir, tag)}: no such checkpoint; complete steps in "
                                  f"{save_dir}: {available}")
        if not os.path.isfile(os.path.join(save_dir, tag, MARKER)):
            raise CheckpointError(f"{os.path.join(save_dir, tag)}: has no '{MARKER}' marker, so its save did not "
                                  f"finish and its files may be partial; read a complete step instead "
                                  f"({available})")
        return tag
    tag = newest_complete_tag(save_dir)
    if tag is None:
        partial = sorted(d for d in os.listdir(save_dir) if re.match(r"^global_step\d+$", d))
        why = (f"{', '.join(partial)} {'has' if len(partial) == 1 else 'have'} no '{MARKER}' marker (the save did "
               f"not finish)" if partial else f"no global_stepN/ with a '{MARKER}' marker")
        raise CheckpointError(f"{save_dir}: no complete checkpoint ({why}); pass a `save` directory with a complete "
                              f"checkpoint")
    return tag


def read_config(path: str) -> Dict[str, Any]:
    """config.yml of the checkpoint directory ``path`` (global_stepN/) as a dict."""
    return read_config_file(os.path.join(path, "config.yml"), fix="restore config.yml, or read another step (--step N)",
                            missing="the trainer writes it with every checkpoint and the reader needs it to know the "
                                    "model and the layout")


def neox_config(values: Dict[str, Any], where: str):
    """The NeoXConfig of saved config values; CheckpointError naming ``where`` when invalid."""
    from neox_sophia.config import ConfigError, config_from_values

    try:
        return config_from_values(dict(values), {key: where for key in values})
    except ConfigError as e:
        raise CheckpointError(f"{where}: the saved config is not valid here ({e})") from e

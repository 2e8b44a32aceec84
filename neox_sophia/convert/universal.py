"""The universal (layout-free) checkpoint: one directory any layout can resume from.

    DIR/
      model.safetensors       every parameter, full size, fp32, by global name (vocab padding kept)
      optimizer.safetensors   every per-parameter optimizer-state tensor, full size, fp32, keyed
                              "<global name>/<state key>" (Sophia: exp_avg, hessian; AdamW:
                              exp_avg, exp_avg_sq)
      meta.json               format "neox-sophia-universal", version 1, step, tag, the layout it
                              was read from, optimizer type, client state (scheduler included),
                              padded vocab size
      config.yml              the merged config values of the run

The directory is built under a temporary sibling name and renamed into place, so a crash leaves
either the whole checkpoint or none (and a previous one replaced with overwrite=True stays until
the new one is complete). safetensors files hold tensors only: nothing in them is executed.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from neox_sophia.convert.output import write_directory
from neox_sophia.convert.reader import FullCheckpoint
from neox_sophia.training.checkpoint import UNIVERSAL_META, CheckpointError, read_config_file, read_file

FORMAT = "neox-sophia-universal"
VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
CONFIG_FILE = "config.yml"
SEP = "/"  # "<name>/<state key>": global names contain dots, never slashes
AGAIN = "consolidate the checkpoint again"
INCOMPLETE = "the universal checkpoint is incomplete, consolidate it again"


def _jsonable(value: Any, where: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: cannot be written to {UNIVERSAL_META} ({e})") from e


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _tensors(named: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """fp32, contiguous and sharing no memory (safetensors refuses shared tensors)."""
    out, seen = {}, set()
    for name, t in named.items():
        t = t.detach().to(torch.float32).contiguous()
        storage = t.untyped_storage().data_ptr()
        if storage in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _fill(directory: str, ckpt: FullCheckpoint) -> None:
    for name in ckpt.optimizer:
        if SEP in name:
            raise ValueError(f"parameter name '{name}' contains '{SEP}'")
    save_file(_tensors(ckpt.weights), os.path.join(directory, MODEL_FILE), metadata={"format": FORMAT})
    state = {f"{name}{SEP}{key}": value for name, entry in ckpt.optimizer.items() for key, value in entry.items()}
    save_file(_tensors(state), os.path.join(directory, OPTIMIZER_FILE), metadata={"format": FORMAT})
    optimizer_block = ckpt.config.get("optimizer") if isinstance(ckpt.config.get("optimizer"), dict) else {}
    embed = ckpt.weights.get("embed_in.weight")
    meta = {
        "format": FORMAT, "version": VERSION, "step": int(ckpt.step), "tag": ckpt.tag,
        "source_layout": _jsonable(ckpt.layout, "layout"),
        "optimizer": {"type": optimizer_block.get("type"),
                      "state_keys": sorted({k for entry in ckpt.optimizer.values() for k in entry}),
                      "param_groups": _jsonable(ckpt.param_groups, "param_groups")},
        "client_state": _jsonable(ckpt.client_state, "client_state"),
        "padded_vocab_size": int(embed.shape[0]) if embed is not None else None,
        "parameters": list(ckpt.weights),  # in model order (safetensors stores them sorted by name)
    }
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        yaml.safe_dump(_jsonable(ckpt.config, "config"), f, sort_keys=False)
    with open(os.path.join(directory, UNIVERSAL_META), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    for name in (MODEL_FILE, OPTIMIZER_FILE, CONFIG_FILE, UNIVERSAL_META):
        _fsync(os.path.join(directory, name))


def save_universal(out_dir: str, ckpt: FullCheckpoint, overwrite: bool = False) -> str:
    """Write ``ckpt`` as a universal checkpoint at ``out_dir``; returns its path. Refuses an
    existing ``out_dir`` (FileExistsError) unless ``overwrite``."""
    out_dir = os.path.abspath(out_dir)
    write_directory(out_dir, overwrite, lambda tmp: _fill(tmp, ckpt))
    return out_dir


def read_meta(directory: str) -> Dict[str, Any]:
    """meta.json of a universal checkpoint, checked for format and version."""
    path = os.path.join(directory, UNIVERSAL_META)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: not a universal checkpoint (no {UNIVERSAL_META}); write one with "
                              f"`neox-sophia convert consolidate`")
    meta = read_file(path, json.load, fix=AGAIN)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (format {found!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: version {meta.get('version')!r}; this neox-sophia reads version {VERSION}; "
                              f"use the neox-sophia release that wrote it, or consolidate the original again")
    return meta


def read_config(directory: str) -> Dict[str, Any]:
    """The config values of a universal checkpoint (CheckpointError when missing or damaged)."""
    return read_config_file(os.path.join(directory, CONFIG_FILE), fix=AGAIN, missing=INCOMPLETE)


def _load_tensors(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; {INCOMPLETE}")
    try:
        out = {}
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
        return out
    except Exception as e:  # safetensors raises its own error types on a damaged file
        raise CheckpointError(f"{path}: could not be read ({type(e).__name__}: {e}); the file is truncated or "
                              f"damaged, {AGAIN}") from e


def load_universal(directory: str) -> FullCheckpoint:
    """The FullCheckpoint a universal checkpoint holds (CheckpointError when it is damaged)."""
    meta = read_meta(directory)
    config = read_config(directory)
    weights = _load_tensors(os.path.join(directory, MODEL_FILE))
    order = [n for n in meta.get("parameters") or [] if n in weights]
    weights = {name: weights[name] for name in order + sorted(set(weights) - set(order))}
    optimizer: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in _load_tensors(os.path.join(directory, OPTIMIZER_FILE)).items():
        name, _, state_key = key.rpartition(SEP)
        if not name or name not in weights:
            raise CheckpointError(f"{os.path.join(directory, OPTIMIZER_FILE)}: '{key}' names no parameter of "
                                  f"{MODEL_FILE}; {AGAIN}")
        optimizer.setdefault(name, {})[state_key] = value
    optimizer = {name: optimizer[name] for name in weights if name in optimizer}
    return FullCheckpoint(config=config, step=int(meta["step"]), tag=meta.get("tag") or "", layout=meta.get(
        "source_layout") or {}, weights=weights, optimizer=optimizer, client_state=meta.get("client_state") or {},
        param_groups=(meta.get("optimizer") or {}).get("param_groups") or [])


__all__ = ["save_universal", "load_universal", "read_meta", "read_config", "FORMAT", "VERSION", "MODEL_FILE",
           "OPTIMIZER_FILE"]


def read_any(path: str, step=None, optimizer_state: bool = True) -> FullCheckpoint:
    """A FullCheckpoint from a `save` directory (any layout) or a universal checkpoint."""
    from neox_sophia.convert.reader import read_checkpoint
    from neox_sophia.training.checkpoint import is_universal

    if is_universal(path):
        return load_universal(path)
    return read_checkpoint(path, step=step, optimizer_state=optimizer_state)

"""Checkpoints in GPT-NeoX's layout, written so that a crash never loses the previous one.

    save/
      latest                    the tag of the newest COMPLETE checkpoint (replaced atomically)
      global_step1000/          DeepSpeed's files (model and ZeRO-sharded optimizer state,
                                including Sophia's exp_avg and hessian), plus
        rng_rank{r}.pt          every rank's RNG states
        config.yml              the merged config the run used
        layout.json             TP, PP, DP, ZeRO stage and precision it was saved at
        complete                written last: the checkpoint is whole

A run killed while writing global_step2000/ leaves `latest` at global_step1000 and no
`complete` marker in global_step2000/, so resuming skips it. Loading reads `latest`, checks the
marker, and otherwise falls back to the newest complete tag. Our own files are read with
torch.load(weights_only=True).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import yaml

MARKER = "complete"
LATEST = "latest"
LAYOUT = "layout.json"
UNIVERSAL_META = "meta.json"  # a universal (layout-free) checkpoint: neox_sophia.convert.universal
_TAG = re.compile(r"^global_step(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be resumed from (the message says what to do)."""


def tag_for(step: int) -> str:
    return f"global_step{step}"


def complete_tags(directory: str) -> List[Tuple[int, str]]:
    """(step, tag) of every complete checkpoint under ``directory``, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _TAG.match(name)
        if match and os.path.isfile(os.path.join(directory, name, MARKER)):
            found.append((int(match.group(1)), name))
    return sorted(found)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fault_point(name: str, step: int) -> None:
    """Tests kill the process here (NEOX_SOPHIA_FAULT=name:step) to prove a partial save is harmless."""
    if os.environ.get("NEOX_SOPHIA_FAULT") == f"{name}:{step}":
        os.kill(os.getpid(), 9)


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(engine, directory: str, step: int, client_state: Dict[str, Any], config_values: Dict[str, Any],
         keep_last: Optional[int] = None, layout: Optional[Dict[str, Any]] = None) -> str:
    """Write checkpoint ``step`` on every rank; return its path."""
    tag = tag_for(step)
    path = os.path.join(directory, tag)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(path):  # a leftover of a save that died: never mix two writes
            shutil.rmtree(path)
    _barrier()
    engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), os.path.join(path, f"rng_rank{rank}.pt"))
    _barrier()
    _fault_point("checkpoint_before_marker", step)
    if rank == 0:
        with open(os.path.join(path, "config.yml"), "w") as f:
            yaml.safe_dump(config_values, f, sort_keys=False)
        if layout is not None:
            _write_atomic(os.path.join(path, LAYOUT), json.dumps(layout) + "\n")
        _write_atomic(os.path.join(path, MARKER), json.dumps({"step": step, "time": time.time()}) + "\n")
        _write_atomic(os.path.join(directory, LATEST), tag + "\n")
        if keep_last:
            for _, old in complete_tags(directory)[:-keep_last]:
                shutil.rmtree(os.path.join(directory, old), ignore_errors=True)
    _barrier()
    return path


def resolve_tag(directory: str) -> str:
    """The tag to resume from: `latest` when it names a complete checkpoint, else the newest
    complete one. Raises CheckpointError when there is none."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"load: {directory} does not exist; unset load (or set it to a "
                              f"directory with checkpoints) to start from scratch")
    tag = newest_complete_tag(directory)
    if tag is None:
        raise CheckpointError(f"load: {directory} has no complete checkpoint (no global_stepN/ with a "
                              f"'{MARKER}' marker); point load at a checkpoint directory or unset it")
    return tag


def newest_complete_tag(directory: str) -> Optional[str]:
    """`latest` when it names a complete checkpoint, else the newest complete one, else None."""
    latest = os.path.join(directory, LATEST)
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        if tag and os.path.isfile(os.path.join(directory, tag, MARKER)):
            return tag
    tags = complete_tags(directory)
    return tags[-1][1] if tags else None


def saved_layout(directory: str) -> Optional[Dict[str, Any]]:
    """The layout record of the checkpoint ``load`` would resume from (None if it has none)."""
    path = os.path.join(directory, resolve_tag(directory), LAYOUT)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def is_universal(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, UNIVERSAL_META))


def load(engine, directory: str) -> Tuple[str, Dict[str, Any]]:
    """Load the checkpoint to resume from into ``engine``; return (tag, client_state)."""
    tag = resolve_tag(directory)
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        path, client_state = engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=False)
    except Exception as e:  # DeepSpeed raises many kinds on truncated or foreign files
        raise CheckpointError(f"load: {os.path.join(directory, tag)} could not be read ({type(e).__name__}: "
                              f"{e}); remove it to fall back to an older checkpoint") from e
    if path is None:
        raise CheckpointError(f"load: DeepSpeed found no checkpoint files in {os.path.join(directory, tag)}")
    rng_file = os.path.join(directory, tag, f"rng_rank{rank}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=True))
    return tag, client_state or {}

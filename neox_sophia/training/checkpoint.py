"""Checkpoints in GPT-NeoX's layout, written so that a crash never loses the previous one.

    save/
      latest                    the tag of the newest COMPLETE checkpoint (replaced atomically)
      global_step1000/          DeepSpeed's files (model and ZeRO-sharded optimizer state,
                                including Sophia's exp_avg and hessian), plus
        incomplete              written first: a save of ours is in progress
        rng_rank{r}.pt          every rank's RNG states
        config.yml              the merged config the run used
        layout.json             TP, PP, DP, ZeRO stage and precision it was saved at
        complete                written last: the checkpoint is whole (`incomplete` then goes)

A run killed while writing global_step2000/ leaves `latest` at global_step1000 and no
`complete` marker in global_step2000/, so resuming skips it; ``clean_leftovers`` removes such a
folder (and `latest.tmp<pid>` files a kill left) with a line when the run starts again. Only
folders marked `incomplete` are removed: a global_stepN/ without either marker is not ours (a
GPT-NeoX checkpoint, say) and is left alone. Retention unmarks an old checkpoint (`complete` ->
`incomplete`) before deleting its files, so a kill in between leaves a folder that is cleaned,
never one that looks whole. Loading reads `latest`, checks the marker, and otherwise falls back
to the newest complete tag; `load` may also name one checkpoint folder (global_stepN/). Every
file of ours is read with torch.load(weights_only=True) or a YAML/JSON parser, and a damaged one
is a CheckpointError naming it. A full disk during a save is one line naming the folder.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import yaml

from neox_sophia.training.faults import fault_point, file_fault

MARKER = "complete"
INCOMPLETE = "incomplete"
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


def _write_atomic(path: str, text: str, before_rename: Callable[[], None] = lambda: None) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    before_rename()
    os.replace(tmp, path)


# the temporary files of _write_atomic, by the name of what they replace: no other file is touched
_LATEST_TMP = re.compile(r"^latest\.tmp\d+$")
_MARKER_TMP = re.compile(r"^(complete|incomplete|layout\.json)\.tmp\d+$")


def _partial(directory: str, name: str) -> bool:
    """A checkpoint folder of ours whose save did not finish."""
    path = os.path.join(directory, name)
    return bool(_TAG.match(name) and os.path.isfile(os.path.join(path, INCOMPLETE))
                and not os.path.isfile(os.path.join(path, MARKER)))


def clean_leftovers(directory: str) -> List[str]:
    """Remove what a killed save left in ``directory``: checkpoint folders marked `incomplete` (and
    not `complete`) and the temporary files of our atomic writes; return what was removed. Call it
    only on a folder this run owns (the save folder, under its lock) before any save of this run."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if _partial(directory, name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        elif _LATEST_TMP.match(name) and os.path.isfile(path):
            os.remove(path)
            removed.append(path)
        elif _TAG.match(name) and os.path.isdir(path):
            for tmp in sorted(os.listdir(path)):
                if _MARKER_TMP.match(tmp):
                    os.remove(os.path.join(path, tmp))
                    removed.append(os.path.join(path, tmp))
    return removed


def holds_only_leftovers(directory: str) -> bool:
    """Whether ``directory`` holds nothing but what ``clean_leftovers`` removes, `latest` and the
    lock: a first run that crashed before its first checkpoint, which the same command restarts."""
    from neox_sophia.training.savelock import LOCK_FILE

    return all(name == LATEST or name.startswith(LOCK_FILE) or _LATEST_TMP.match(name) or _partial(directory, name)
               for name in os.listdir(directory))


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


@torch.no_grad()
def nonfinite_tensor(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Optional[str]:
    """The first of this rank's weights (the module's, and the optimizer's fp32 master copies under
    ZeRO or bf16) and optimizer-state tensors (Sophia's hessian included) that holds a non-finite
    value, named; None when all are finite. No checkpoint is written from such state."""
    for name, param in module.named_parameters():
        if not bool(torch.isfinite(param).all()):
            return f"weight {name}"
    for i, group in enumerate(optimizer.param_groups):
        for j, param in enumerate(group["params"]):
            if not bool(torch.isfinite(param).all()):
                return f"master weights of param group {i}"
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    return f"optimizer state '{key}' of param group {i}, tensor {j}"
    return None


def _out_of_space(error: BaseException, directory: str) -> bool:
    """Whether a failed write ran out of space. torch.save reports a full disk as a RuntimeError
    ("file write failed") without errno, so then the free space decides."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    if "No space left" in text or "Disk quota exceeded" in text:
        return True
    try:
        return "write failed" in text and shutil.disk_usage(directory).free < (64 << 20)
    except OSError:
        return False


def save(engine, directory: str, step: int, client_state: Dict[str, Any], config_values: Dict[str, Any],
         keep_last: Optional[int] = None, layout: Optional[Dict[str, Any]] = None,
         protect: Iterable[int] = ()) -> str:
    """Write checkpoint ``step`` on every rank; return its path. Retention keeps the newest
    ``keep_last`` complete checkpoints and the steps in ``protect``. A full disk is a
    CheckpointError naming the folder; the previous checkpoints are untouched either way."""
    tag = tag_for(step)
    path = os.path.join(directory, tag)
    try:
        _write(engine, directory, step, client_state, config_values, layout)
    except Exception as e:
        if not _out_of_space(e, directory):
            raise
        if not dist.is_initialized() or dist.get_rank() == 0:
            shutil.rmtree(path, ignore_errors=True)  # give the space back; it is marked incomplete anyway
        previous = newest_complete_tag(directory)
        kept = (f"the previous checkpoint {os.path.join(directory, previous)} is intact" if previous
                else "no checkpoint was lost")
        raise CheckpointError(f"save: no space left on the device of {directory} while writing {tag} ({e}); {kept}; "
                              f"free space there or set save to a folder with room, then run the same command "
                              f"again") from e
    if not dist.is_initialized() or dist.get_rank() == 0:
        _retain(directory, step, keep_last, protect)
    _barrier()
    return path


def _write(engine, directory: str, step: int, client_state: Dict[str, Any], config_values: Dict[str, Any],
           layout: Optional[Dict[str, Any]]) -> None:
    tag = tag_for(step)
    path = os.path.join(directory, tag)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(path):  # a leftover of a save that died, or an older timeline: never mix two writes
            shutil.rmtree(path)
        os.makedirs(path)
        _write_atomic(os.path.join(path, INCOMPLETE), json.dumps({"pid": os.getpid(), "time": time.time()}) + "\n")
    _barrier()
    fault_point("checkpoint_start", step)
    with file_fault(engine, step):
        engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), os.path.join(path, f"rng_rank{rank}.pt"))
    _barrier()
    fault_point("checkpoint_before_marker", step)
    if rank == 0:
        with open(os.path.join(path, "config.yml"), "w") as f:
            yaml.safe_dump(config_values, f, sort_keys=False)
        if layout is not None:
            _write_atomic(os.path.join(path, LAYOUT), json.dumps(layout) + "\n")
        _write_atomic(os.path.join(path, MARKER), json.dumps({"step": step, "time": time.time()}) + "\n")
        os.remove(os.path.join(path, INCOMPLETE))
        _write_atomic(os.path.join(directory, LATEST), tag + "\n",
                      before_rename=lambda: fault_point("checkpoint_latest_tmp", step))


def _retain(directory: str, step: int, keep_last: Optional[int], protect: Iterable[int]) -> None:
    """Delete the complete checkpoints up to ``step`` beyond the newest ``keep_last``, except those
    in ``protect``: each is unmarked (`complete` -> `incomplete`) before its files go."""
    fault_point("checkpoint_before_retention", step)
    if not keep_last:
        return
    kept = set(protect)
    # checkpoints after this one belong to a timeline this run left (it resumed from an older one):
    # they are replaced when the run reaches their steps, never counted as the newest
    for old_step, old in [t for t in complete_tags(directory) if t[0] <= step][:-keep_last]:
        if old_step in kept:
            continue
        folder = os.path.join(directory, old)
        os.replace(os.path.join(folder, MARKER), os.path.join(folder, INCOMPLETE))
        fault_point("checkpoint_during_retention", step)
        shutil.rmtree(folder, ignore_errors=True)


def locate(load: str) -> Tuple[str, str]:
    """(save directory, tag) that ``load`` names: a save directory (its `latest` complete
    checkpoint, see resolve_tag) or one checkpoint folder in it (global_stepN/ with its marker)."""
    load = os.path.normpath(load)
    if _TAG.match(os.path.basename(load)) and os.path.isfile(os.path.join(load, MARKER)):
        return os.path.dirname(load), os.path.basename(load)
    return load, resolve_tag(load)


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


RESUME_FIX = "move it out of the way to resume from the one before, or restore the file"


def read_file(path: str, reader: Callable[[Any], Any], binary: bool = False, fix: str = RESUME_FIX) -> Any:
    """``reader`` applied to the open file ``path`` of a checkpoint; any failure is a
    CheckpointError naming the file and ``fix``."""
    try:
        with open(path, "rb" if binary else "r") as f:
            return reader(f)
    except Exception as e:  # torch, yaml and json each raise their own kinds on damaged files
        detail = " ".join(str(e).split())  # one line: torch's unpickling errors span several
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        raise CheckpointError(f"{path} could not be read ({type(e).__name__}: {detail}); the checkpoint "
                              f"{os.path.dirname(path)} is damaged: {fix}") from e


def saved_layout(directory: str, tag: str) -> Optional[Dict[str, Any]]:
    """The layout record of checkpoint ``tag`` (None if it has none: written before they were)."""
    path = os.path.join(directory, tag, LAYOUT)
    return read_file(path, json.load) if os.path.isfile(path) else None


def read_config_file(path: str, fix: str = RESUME_FIX, missing: Optional[str] = None) -> Dict[str, Any]:
    """The config values a checkpoint saved at ``path`` (its config.yml); CheckpointError naming
    the file and ``fix`` when it cannot be read or is not a mapping of config keys, and naming
    ``missing`` (why it must be there) when it is absent."""
    if missing is not None and not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; {missing}")
    values = read_file(path, yaml.safe_load, fix=fix)
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} is not a mapping of config keys; {fix}")
    return values


def saved_config(directory: str, tag: str) -> Dict[str, Any]:
    """The merged config values checkpoint ``tag`` was saved with ({} if it has no config.yml)."""
    path = os.path.join(directory, tag, "config.yml")
    return read_config_file(path) if os.path.isfile(path) else {}


def is_universal(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, UNIVERSAL_META))


def load(engine, directory: str, tag: str) -> Dict[str, Any]:
    """Load checkpoint ``tag`` of ``directory`` into ``engine``; return its client_state."""
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
        set_rng_state(read_file(rng_file, lambda f: torch.load(f, weights_only=True), binary=True))
    return client_state or {}

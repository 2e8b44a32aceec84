"""What every checkpoint format shares: the model's parameter names and files (from config.yml),
a shard (one pipeline stage on one TP rank), and cutting a flat partition into parameters."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch

from neox_sophia.convert.reader.files import load_file
from neox_sophia.training.checkpoint import CheckpointError


class ModelFiles:
    """What the config says about parameter names and the file layout."""

    def __init__(self, cfg, path: str):
        self.cfg = cfg
        self.path = path
        self.tp = cfg.parallel.model_parallel_size
        self.pipe = cfg.parallel.pipe_parallel_size
        self.stages = max(self.pipe, 1)
        self.num_layers = cfg.model.num_layers
        self.tied = not cfg.model.no_weight_tying

    def global_name(self, ds_name: str) -> str:
        """DeepSpeed's parameter name (the engine module's) -> our global name."""
        parts = ds_name.split(".")
        if self.pipe == 0:  # GPTNeoX: embedding.*, layers.N.*, final_norm.*, output.*
            return ds_name if parts[0] == "layers" else ".".join(parts[1:])
        if parts[0] == "tied_modules":  # tied_modules.<key>.<local>
            return ".".join(parts[2:])
        if not parts[0].isdigit():
            raise CheckpointError(f"{self.path}: parameter '{ds_name}' is not a PipelineModule layer's, but "
                                  f"config.yml sets pipe_parallel_size {self.pipe}; restore config.yml as the "
                                  f"trainer wrote it")
        return self.layer_prefix(int(parts[0])) + ".".join(parts[1:])

    def layer_prefix(self, index: int) -> str:
        return f"layers.{index - 1}." if 1 <= index <= self.num_layers else ""

    def layer_index(self, ds_name: str) -> Optional[int]:
        """The pipeline layer index a DeepSpeed name belongs to (None: a tied module)."""
        head = ds_name.split(".")[0]
        return None if head == "tied_modules" or not head.isdigit() else int(head)

    def stage_layers(self, ds_names: Iterable[str], stage: int) -> List[int]:
        """The pipeline layers a stage's parameter names come from. The tied embedding is layer 0
        on stage 0; on the last stage it is a copy held for the tied output layer."""
        if self.pipe == 0:
            return []
        found = {self.layer_index(n) for n in ds_names}
        if None in found:
            found.discard(None)
            if stage == 0:
                found.add(0)
        return sorted(found)

    def layer_file(self, index: int, tp_rank: int) -> str:
        return os.path.join(self.path, f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt")

    def mp_file(self, mp_rank: int) -> str:
        return os.path.join(self.path, f"mp_rank_{mp_rank:02d}_model_states.pt")

    def layer_params(self, index: int, t: int, buffers: set) -> List[Tuple[str, torch.Tensor]]:
        """(global name, TP-local tensor) of pipeline layer ``index``'s file on TP rank ``t``."""
        prefix = self.layer_prefix(index)
        return [(prefix + n, v) for n, v in tensors(load_file(self.layer_file(index, t))) if prefix + n not in buffers]


def tensors(state_dict: Dict[str, Any], skip: Iterable[str] = ()) -> List[Tuple[str, torch.Tensor]]:
    skip = set(skip)
    return [(k, v) for k, v in state_dict.items() if isinstance(v, torch.Tensor) and k not in skip]


def hyperparameters(groups: Sequence[dict]) -> List[Dict[str, Any]]:
    out = []
    for group in groups:
        out.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"})
    return out


class Format(NamedTuple):
    """One way DeepSpeed stores a rank's parameters and optimizer state (a module per format)."""

    kind: str
    """"plain", "unfused" (ZeRO 0, one entry per parameter) or "flat" (flat partitions)."""
    matches: Callable[[dict], bool]
    """Whether a model-states file (mp_rank_XX_model_states.pt) is in this format."""
    read: Callable[..., "Shard"]
    """read(reader, states, mp_rank, stage, tp_rank, cursor) -> the shard (reader: read.CheckpointReader)."""


@dataclass
class Shard:
    """One (pipeline stage, TP rank): its parameters in order, TP-local tensors."""

    names: List[str] = field(default_factory=list)
    weights: Dict[str, torch.Tensor] = field(default_factory=dict)
    state: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)
    layers: List[int] = field(default_factory=list)  # pipeline layer indices read (not tied ones)


def cut(flat: torch.Tensor, shapes: List[tuple], mismatch, where: str, what: str,
        paddings: Optional[Sequence[int]] = None, trailing: Optional[int] = None) -> List[torch.Tensor]:
    """Split a flat group into tensors of ``shapes`` (with ``paddings`` after each one);
    ``mismatch(where, what)`` makes the error when they do not fit."""
    out, offset = [], 0
    for i, shape in enumerate(shapes):
        n = math.prod(shape)
        if offset + n > flat.numel():
            raise mismatch(where, f"{what} holds {flat.numel()} values, fewer than its parameters need")
        out.append(flat[offset:offset + n].view(shape))
        offset += n + (int(paddings[i]) if paddings else 0)
    left = flat.numel() - offset
    if left < 0 or (trailing is not None and left not in (0, trailing)):
        raise mismatch(where, f"{what} holds {flat.numel()} values, its parameters {offset} (+ padding "
                              f"{trailing}): the parameter shapes do not fit the partitions")
    return out

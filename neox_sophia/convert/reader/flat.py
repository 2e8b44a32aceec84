"""Flat fp32 partitions over data parallelism: ZeRO 1/2 (DeepSpeed's stage_1_and_2).

Per param group, every data-parallel rank's file ([bf16_]zero_pp_rank_{d}_mp_rank_{m}_optim_states.pt)
holds one flat partition of the fp32 master weights and of each optimizer-state tensor (exp_avg,
hessian, ...); concatenated over ranks and cut by the parameter shapes in flat order (named by the
model file's 'param_shapes', with ZeRO's per-parameter alignment paddings), trailing group padding
dropped. The BF16_Optimizer (bf16.py) stores the same partitions.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch

from neox_sophia.convert.reader.files import load_file
from neox_sophia.convert.reader.layout import Format, Shard, cut


def zero_files(reader, mp_rank: int) -> List[str]:
    """The optimizer files of model-parallel rank ``mp_rank``, one per data-parallel rank."""
    prefixes = ("bf16_", "") if reader.precision == "bfloat16" else ("", "bf16_")
    name = "{prefix}zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt"
    for prefix in prefixes:
        files = [os.path.join(reader.path, name.format(prefix=prefix, d=d, m=mp_rank)) for d in range(reader.dp)]
        if os.path.isfile(files[0]):
            extra = os.path.join(reader.path, name.format(prefix=prefix, d=reader.dp, m=mp_rank))
            if os.path.isfile(extra):
                raise reader.mismatch(extra, f"a file for data-parallel rank {reader.dp}, but the checkpoint "
                                             f"was saved with {reader.dp} data-parallel ranks")
            return files
    return [os.path.join(reader.path, name.format(prefix=prefixes[0], d=d, m=mp_rank)) for d in range(reader.dp)]


def load_partitions(reader, mp_rank: int) -> Tuple[List[dict], List[str]]:
    files = zero_files(reader, mp_rank)
    parts = []
    for file in files:
        osd = load_file(file).get("optimizer_state_dict")
        if not isinstance(osd, dict) or "single_partition_of_fp32_groups" not in osd:
            raise reader.mismatch(file, "no flat optimizer partitions (optimizer_state_dict."
                                        "single_partition_of_fp32_groups)")
        parts.append(osd)
    return parts, files


def partition_state(osd: dict, g: int) -> Dict[str, torch.Tensor]:
    base = osd["base_optimizer_state"]
    if isinstance(base, dict) and "state" in base:  # the client optimizer's state_dict
        index = base["param_groups"][g]["params"][0]  # one flat fp32 partition per group
        state = base["state"].get(index) or {}
    else:  # elastic checkpoint: one dict of state per group
        state = base[g]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _group_states(reader, parts: List[dict], files: List[str], g: int, groups: int) -> Tuple[list, dict, int]:
    """(master pieces, state key -> pieces, trailing padding) of param group ``g`` over the ranks."""
    masters, states, padding = [], {}, 0
    for osd in parts:
        master = osd["single_partition_of_fp32_groups"][g]
        masters.append(master.view(-1))
        padding += int((osd.get("group_paddings") or [0] * groups)[g])
        if reader.optimizer_state:
            for key, value in partition_state(osd, g).items():
                if value.dim() != 1 or value.numel() not in (master.numel(),
                                                             master.numel() + int(osd["group_paddings"][g])):
                    continue  # a scalar (step, hessian_rejected)
                states.setdefault(key, []).append(value)
    for key, pieces in states.items():
        if len(pieces) != len(parts):
            raise reader.mismatch(files[0], f"optimizer state '{key}' of param group {g} is on "
                                            f"{len(pieces)} of {len(parts)} data-parallel ranks")
    return masters, states, padding


def read_flat(reader, shard: Shard, groups: List[List[Tuple[str, tuple]]], mp_rank: int,
              paddings_key: Optional[str], parts: Optional[List[dict]] = None,
              files: Optional[List[str]] = None) -> None:
    """Fill ``shard`` from the flat partitions of every data-parallel rank; ``groups``: the
    (global name, TP-local shape) of each param group in flat order."""
    if parts is None:
        parts, files = load_partitions(reader, mp_rank)
    base0 = parts[0]["base_optimizer_state"]
    reader.note_groups(base0["param_groups"] if isinstance(base0, dict) else [])
    where = f"{files[0]} (and the other data-parallel ranks' files)"
    for g, group in enumerate(groups):
        masters, states, padding = _group_states(reader, parts, files, g, len(groups))
        paddings = (parts[0].get(paddings_key) or [None] * len(groups))[g] if paddings_key else None
        shapes = [s for _, s in group]
        weights = cut(torch.cat(masters), shapes, reader.mismatch, where, f"param group {g}", paddings, padding)
        cut_states = {key: cut(torch.cat(pieces), shapes, reader.mismatch, where, f"'{key}' of param group {g}",
                               paddings, padding) for key, pieces in states.items()}
        for i, (name, _) in enumerate(group):
            shard.names.append(name)
            shard.weights[name] = weights[i]
            if reader.optimizer_state:
                shard.state[name] = {key: values[i] for key, values in cut_states.items()}


def read_zero(reader, states: dict, mp_rank: int, stage: int, t: int, cursor: int) -> Shard:
    m = reader.model
    groups = [[(m.global_name(n), tuple(s)) for n, s in g.items()] for g in states["param_shapes"]]
    shard = Shard()
    shard.layers = m.stage_layers([n for g in states["param_shapes"] for n in g], stage)
    read_flat(reader, shard, groups, mp_rank, paddings_key="param_alignment_paddings")
    for name, value in (states.get("frozen_param_fragments") or {}).items():
        shard.names.append(m.global_name(name))
        shard.weights[m.global_name(name)] = value
    return shard


ZERO = Format(kind="flat", matches=lambda states: states.get("param_shapes") is not None, read=read_zero)

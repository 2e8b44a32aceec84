"""Sophia's per-role view across ranks: statistics for the logs and the Hessian floors.

The optimizer keeps one param group per role (neox_sophia.optim.groups) and computes sums over
whatever tensors it holds; this module adds them up over every rank (TP shards, pipeline stages,
ZeRO partitions) in one all-reduce of a [roles x sums] tensor. Both are collectives: every rank
calls them at the same point.

Exactness: for the matrix roles (embedding, output, attention, mlp) every coordinate is held by
exactly one TP rank and one pipeline stage (a tied embedding by two, identically), and by one
ZeRO partition or by every data-parallel replica alike, so means and shares are the same at any
layout (ZeRO's alignment padding adds a few zero coordinates: a relative change below 1e-6).
The norms_biases role mixes TP-sharded biases with TP-replicated norms: at TP > 1 its figures
count the replicated ones once per TP rank; nothing in training depends on them.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from neox_sophia.optim.groups import MATRIX_ROLES, ROLES
from neox_sophia.optim.sophia import Sophia, SophiaStatistics
from neox_sophia.training.steps import for_collective


def role_sums(optimizer: Sophia) -> torch.Tensor:
    """[len(ROLES), len(SophiaStatistics.SUMS)] float64 sums over all ranks (zeros for a role no
    rank holds, or holds under AdamW)."""
    local = optimizer.statistics_sums()
    device = next(iter(local.values())).device if local else torch.device("cpu")
    sums = torch.zeros(len(ROLES), len(SophiaStatistics.SUMS), dtype=torch.float64, device=device)
    for name, values in local.items():
        if name in ROLES:
            sums[ROLES.index(name)] += values.to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        sums = for_collective(sums if dist.get_backend() == "nccl" else sums.cpu())  # offloaded state is on CPU
        dist.all_reduce(sums)
    return sums.cpu()


def statistics_record(optimizer: Optional[torch.optim.Optimizer]) -> Dict[str, Any]:
    """The metrics.jsonl fields: the global clip_frac / win_rate over every Sophia-updated
    coordinate, and per role {win_rate, clip_frac, hessian_mean, hessian_rms, hessian_zero_frac,
    hessian_floor}. None-valued for an optimizer that is not Sophia."""
    if not isinstance(optimizer, Sophia):
        return {"clip_frac": None, "win_rate": None}
    sums = role_sums(optimizer)
    total = SophiaStatistics.from_sums(sums.sum(0))
    # h changes only at a refresh, so the floor set then is ratio x the mean seen now (rank 0 may
    # hold no group of a role under pipeline parallelism, so it is not read from its groups)
    ratio = optimizer.defaults["hessian_floor_ratio"]
    groups = {}
    for i, role in enumerate(ROLES):
        if sums[i, 0] == 0:
            continue
        stats = SophiaStatistics.from_sums(sums[i])
        groups[role] = {"win_rate": stats.win_rate, "clip_frac": stats.clip_frac,
                        "hessian_mean": stats.hessian_mean, "hessian_rms": stats.hessian_rms,
                        "hessian_zero_frac": stats.hessian_zero_frac,
                        "hessian_floor": ratio * stats.hessian_mean if role in MATRIX_ROLES else 0.0}
    return {"clip_frac": total.clip_frac, "win_rate": total.win_rate, "groups": groups}


def uses_hessian_floor(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, Sophia) and any(
        g["update"] == "sophia" and g["hessian_floor_ratio"] > 0 for g in optimizer.param_groups)


def refresh_hessian_floors(optimizer: torch.optim.Optimizer) -> None:
    """Set each matrix role's floor from its mean h over the whole model (after a Hessian
    refresh, and after a resume). A no-op (and no collective) when no group asks for a floor:
    whether one does is the config's, the same on every rank."""
    if not uses_hessian_floor(optimizer):
        return
    sums = role_sums(optimizer)
    means = {role: float(sums[ROLES.index(role), 2] / sums[ROLES.index(role), 0])
             for role in MATRIX_ROLES if sums[ROLES.index(role), 0] > 0}
    optimizer.apply_hessian_floor(means)

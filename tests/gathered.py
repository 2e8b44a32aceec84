"""The optimizer state of a running engine by global parameter name, at full size.

An independent reference for layout tests (and for the checkpoint tools' readers): ZeRO-1/2 and
the bf16 optimizer keep each state tensor as slices of flat fp32 partitions, which DeepSpeed's
own fragment API reassembles over data parallelism; a plain fp32 engine keys the state by the
parameter. TP shards are then concatenated along the parameter's partition dim. Each pipeline
stage returns its own names (merge the dicts of all ranks).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch


def _keys_by_role(optimizer, keys: Optional[Sequence[str]]) -> Dict[str, Sequence[str]]:
    """Role -> the state keys to gather: ``keys``, else those of the role's update rule (Sophia:
    exp_avg, hessian; AdamW-updated roles and torch's AdamW: exp_avg, exp_avg_sq). Decided by
    name, the same on every rank: DeepSpeed's gather is a collective."""
    from neox_sophia.optim.groups import ROLES

    if keys is not None:
        return {role: keys for role in ROLES}
    rules = {g.get("name"): g.get("update", "adamw") for g in optimizer.param_groups}
    return {role: ("exp_avg", "hessian") if rules.get(role, "sophia") == "sophia" else ("exp_avg", "exp_avg_sq")
            for role in ROLES}


def optimizer_state_by_name(engine, optimizer, keys: Optional[Sequence[str]] = None
                            ) -> Dict[str, Dict[str, torch.Tensor]]:
    from deepspeed.utils import safe_get_full_optimizer_state

    from neox_sophia.model.gpt_neox import global_named_parameters
    from neox_sophia.parallel.topology import gather_tensor_parallel
    from neox_sophia.training.reshard import link_optimizer_state

    from neox_sophia.optim.groups import role_of

    link_optimizer_state(engine)  # every group has stepped by now
    by_role = _keys_by_role(optimizer, keys)
    out = {}
    for name, param in global_named_parameters(engine.module):
        entry = {}
        for key in by_role[role_of(name)]:
            value = safe_get_full_optimizer_state(param, key)
            if value is None:  # no ZeRO and no mixed-precision wrapper
                value = optimizer.state[param][key]
            value = value.detach().float().reshape(param.shape)
            if getattr(param, "tensor_model_parallel", False):
                value = gather_tensor_parallel(value, dim=param.partition_dim)
            entry[key] = value.clone()
        out[name] = entry
    return out

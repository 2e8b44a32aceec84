"""Resume from a universal (layout-free) checkpoint at any TP x PP x DP layout.

A universal checkpoint (`neox-sophia convert consolidate`) holds every parameter and every
per-parameter optimizer-state tensor (Sophia's exp_avg and hessian, AdamW's exp_avg and
exp_avg_sq) at full size under its global name. Each rank takes its own slices:

    weights      -> this rank's TP shard of each parameter its pipeline stage holds; under bf16
                    both the bf16 module weight and the fp32 master copy
    exp_avg ...  -> ZeRO-1/2 and the bf16 optimizer keep the state in flat fp32 partitions; each
                    rank writes the part of each parameter that falls in its partition (DeepSpeed's
                    fragment API); a plain fp32 engine keys the state by the parameter itself

Nothing is averaged or re-derived, so exp_avg and hessian continue exactly. What does not carry
over: the per-rank RNG states (the training stream, the sampled labels and the initialization do
not use them; dropout would) and Sophia's count of rejected Hessian coordinates (a statistic,
restarted at 0).
"""
from __future__ import annotations

import torch

from neox_sophia.training.checkpoint import CheckpointError


def tensor_parallel_slice(full: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """This TP rank's shard of ``full`` for ``param`` (the whole tensor when not TP-sharded)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    from megatron.core import parallel_state as ps

    size, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    return full.chunk(size, dim=param.partition_dim)[rank]


def _initialize_state(engine, optimizer) -> None:
    """Create every optimizer-state tensor now (optimizers create it lazily at their first step)
    and let DeepSpeed link each parameter to its slices of it."""
    if hasattr(optimizer, "initialize_state"):  # Sophia
        optimizer.initialize_state()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and not optimizer.state[p]:
                optimizer.state[p].update(step=torch.zeros((), dtype=torch.float32),
                                          exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    link_optimizer_state(engine)


def link_optimizer_state(engine) -> None:
    """Point every parameter at its slices of the optimizer state (DeepSpeed's fragment API) once
    every param group has state. ZeRO-1/2 and the bf16 optimizer link right after the FIRST
    group's first step, before an optimizer that creates state lazily (Sophia, torch Adam) has any
    for the other groups, so reading or writing their state by parameter would fail."""
    wrapper = engine.optimizer
    if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()


@torch.no_grad()
def load_universal_into(engine, optimizer, checkpoint, where: str) -> None:
    """Copy the weights and optimizer state of ``checkpoint`` (a FullCheckpoint) into a freshly
    built ``engine`` whose client optimizer is ``optimizer``. ``where`` names the source in errors."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from neox_sophia.model.gpt_neox import global_named_parameters

    _initialize_state(engine, optimizer)
    for name, param in global_named_parameters(engine.module):
        if name not in checkpoint.weights:
            raise CheckpointError(f"load: {where} has no weight '{name}'; it was written for a different model "
                                  f"(compare its config.yml with this run's)")
        full = checkpoint.weights[name]
        local = tensor_parallel_slice(full, param)
        if local.shape != param.shape:
            raise CheckpointError(f"load: {where}: '{name}' has shape {tuple(full.shape)}, which does not fit "
                                  f"this model's {tuple(param.shape)} shard; the model settings differ")
        param.copy_(local.to(param.dtype))
        if hasattr(param, "_hp_mapping"):
            safe_set_full_fp32_param(param, local.float())
        for key, value in checkpoint.optimizer.get(name, {}).items():
            value = tensor_parallel_slice(value, param).float()
            if hasattr(param, "_hp_mapping"):
                safe_set_full_optimizer_state(param, value, key)
            elif param in optimizer.state and key in optimizer.state[param]:
                optimizer.state[param][key].copy_(value)
            else:
                raise CheckpointError(f"load: {where}: optimizer state '{key}' of '{name}' has no place in this "
                                      f"run's optimizer ({type(optimizer).__name__}); was it saved by another "
                                      f"optimizer type?")
    _restore_group_state(optimizer, checkpoint.param_groups)
    applied = checkpoint.client_state.get("step", checkpoint.step) - checkpoint.client_state.get("nonfinite_steps", 0)
    for state in optimizer.state.values():
        if "step" in state and torch.is_tensor(state["step"]):
            state["step"].fill_(float(applied))


def _restore_group_state(optimizer, saved_groups) -> None:
    """Param-group entries the optimizer keeps as state (Sophia's refresh count), by group name."""
    from neox_sophia.optim.sophia import GROUP_STATE_KEYS

    saved = {g.get("name"): g for g in saved_groups or []}
    for group in optimizer.param_groups:
        for key in GROUP_STATE_KEYS:
            if key in group and key in saved.get(group.get("name"), {}):
                group[key] = saved[group["name"]][key]

"""ZeRO 0: the optimizer state is a torch optimizer state_dict with one entry per parameter.

    plain     fp32: the client optimizer's state_dict ('optimizer' holds 'state')
    unfused   bf16 without a pipeline: DeepSpeed's FP16_UnfusedOptimizer in bf16 wraps it, with
              fp32 master copies ('fp32_groups'; the fused FP16_Optimizer: one flat master per
              group, 'fp32_groups_flat')

The parameters come from the module's files in module order, split into the saved param groups by
each group's name (neox_sophia.optim.groups.GROUP_MEMBERS), and checked against every saved state
tensor's shape.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from neox_sophia.convert.reader.layout import Format, Shard, cut, tensors
from neox_sophia.optim.groups import GROUP_MEMBERS


def module_params(reader, states: dict, buffers: set, stage: int, t: int, cursor: int,
                  count: int) -> Tuple[List[Tuple[str, torch.Tensor]], List[int]]:
    """(global name, TP-local tensor) of the stage's parameters in module order, and the
    pipeline layers they came from. ``count``: how many parameters the optimizer holds, which
    is how a ZeRO-0 pipeline stage's layers are found (stages hold consecutive layers)."""
    m = reader.model
    if m.pipe == 0:
        return [(m.global_name(n), v) for n, v in tensors(states["module"]) if m.global_name(n) not in buffers], []
    last_stage = stage == m.stages - 1
    params: List[Tuple[str, torch.Tensor]] = []
    if m.tied and last_stage and stage > 0:  # the tied embedding: registered before the layers
        params += m.layer_params(0, t, buffers)
    layers, index = [], cursor
    while index <= m.num_layers + 2 and (last_stage or len(params) < count):
        if not (m.tied and index == m.num_layers + 2):  # the tied output layer has no file
            params += m.layer_params(index, t, buffers)
            layers.append(index)
        index += 1
    return params, layers


def _groups(reader, file: str, saved_groups: list, params: list) -> list:
    """The module's parameters split into the saved groups, by each group's name."""
    unknown = [saved.get("name") for saved in saved_groups if saved.get("name") not in GROUP_MEMBERS]
    if unknown:
        raise reader.mismatch(file, f"param groups named {unknown}: not groups this reader knows")
    groups = [[p for p in params if GROUP_MEMBERS[saved["name"]](p[0])] for saved in saved_groups]
    for g, (saved, group) in enumerate(zip(saved_groups, groups)):
        if len(group) != len(saved["params"]):
            raise reader.mismatch(file, f"param group {g} ({saved.get('name')}) holds {len(saved['params'])} "
                                        f"parameters; by its name it should hold {len(group)}")
    return groups


def read_per_param(reader, states: dict, optim_sd: dict, wrapper: Optional[dict], buffers: set, file: str,
                   stage: int, t: int, cursor: int) -> Shard:
    saved_groups = optim_sd["param_groups"]
    reader.note_groups(saved_groups)
    count = sum(len(g["params"]) for g in saved_groups)
    params, layers = module_params(reader, states, buffers, stage, t, cursor, count)
    if len(params) != count:
        raise reader.mismatch(file, f"the optimizer holds {count} parameters, the model files "
                                    f"{len(params)} for this stage")
    groups = _groups(reader, file, saved_groups, params)
    masters = None
    if wrapper is not None:
        masters = wrapper.get("fp32_groups")
        if masters is None:  # FP16_Optimizer (fused): one flat master per group
            masters = [cut(flat.view(-1), [tuple(v.shape) for _, v in group], reader.mismatch, file, f"group {g}")
                       for g, (flat, group) in enumerate(zip(wrapper["fp32_groups_flat"], groups))]
    shard = Shard(layers=layers)
    for g, (saved, group) in enumerate(zip(saved_groups, groups)):
        for i, ((name, module_value), index) in enumerate(zip(group, saved["params"])):
            shape = tuple(module_value.shape)
            weight = masters[g][i] if masters is not None else module_value
            if tuple(weight.shape) != shape:
                raise reader.mismatch(file, f"the master copy of {name} has shape {list(weight.shape)}, the "
                                            f"parameter {list(shape)}")
            shard.names.append(name)
            shard.weights[name] = weight
            if reader.optimizer_state:
                shard.state[name] = _state_of(reader, file, optim_sd["state"].get(index) or {}, index, name, shape)
    return shard


def _state_of(reader, file: str, saved: dict, index: int, name: str, shape: tuple) -> dict:
    """A parameter's state tensors (scalars such as step counts are left out), shape-checked."""
    entry = {}
    for key, value in saved.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if tuple(value.shape) != shape:
                raise reader.mismatch(file, f"optimizer state '{key}' #{index} has shape {list(value.shape)}, but "
                                            f"by module order it belongs to {name} of shape {list(shape)}")
            entry[key] = value
    return entry


def _buffers(reader, states: dict) -> set:
    return {reader.model.global_name(b) for b in states.get("buffer_names") or ()}


PLAIN = Format(
    kind="plain",
    matches=lambda states: "state" in (states.get("optimizer") or {}),
    read=lambda reader, states, mp_rank, stage, t, cursor: read_per_param(
        reader, states, states["optimizer"], None, _buffers(reader, states), reader.model.mp_file(mp_rank),
        stage, t, cursor))

UNFUSED = Format(
    kind="unfused",
    matches=lambda states: bool({"fp32_groups", "fp32_groups_flat"} & set(states.get("optimizer") or {})),
    read=lambda reader, states, mp_rank, stage, t, cursor: read_per_param(
        reader, states, states["optimizer"]["optimizer_state_dict"], states["optimizer"], _buffers(reader, states),
        reader.model.mp_file(mp_rank), stage, t, cursor))

"""DeepSpeed's BF16_Optimizer (bf16 with the PipelineModule at ZeRO 0): flat fp32 partitions over
data parallelism, as ZeRO's (flat.py), but the parameter order of each group is named in every
partition's slice mappings ('param_slice_mappings') and the shapes come from the layer files."""
from __future__ import annotations

from typing import Dict, List

from neox_sophia.convert.reader.flat import load_partitions, read_flat
from neox_sophia.convert.reader.layout import Format, Shard


def read_bf16_optimizer(reader, states: dict, mp_rank: int, stage: int, t: int, cursor: int) -> Shard:
    m = reader.model
    optim = states["optimizer"]
    buffers = {m.global_name(b) for b in states.get("buffer_names") or ()}
    parts, files = load_partitions(reader, mp_rank)
    groups: List[List[str]] = [[] for _ in optim["single_partition_of_fp32_groups"]]
    for osd in parts:
        for g, mapping in enumerate(osd.get("param_slice_mappings") or []):
            for name in mapping:
                if name not in groups[g]:
                    groups[g].append(name)
    shard = Shard()
    shard.layers = m.stage_layers([n for g in groups for n in g], stage)
    shapes: Dict[str, tuple] = {}
    for index in shard.layers + ([0] if any(m.layer_index(n) is None for g in groups for n in g) else []):
        for name, value in m.layer_params(index, t, buffers):
            shapes[name] = tuple(value.shape)
    named = []
    for names in groups:
        named.append([])
        for ds_name in names:
            name = m.global_name(ds_name)
            if name not in shapes:
                raise reader.mismatch(files[0], f"{ds_name} is in the optimizer but in no layer file")
            named[-1].append((name, shapes[name]))
    read_flat(reader, shard, named, mp_rank, None, parts, files)
    return shard


BF16_OPTIMIZER = Format(kind="flat", read=read_bf16_optimizer,
                        matches=lambda states: "single_partition_of_fp32_groups" in (states.get("optimizer") or {}))

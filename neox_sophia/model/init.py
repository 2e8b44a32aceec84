"""Layout-invariant weight initialization (docs/design.md, invariant 2).

Every weight is a function of (seed, its global name): the full tensor is drawn from a generator
keyed by both, initialized with NeoX's init method for that role, and this rank keeps its TP
shard. The same seed therefore gives the same full model at any TP and PP size, and the order in
which a pipeline stage builds its layers does not matter.
"""
from __future__ import annotations

import zlib

import torch

from neox_sophia.config.base import ConfigError
from neox_sophia.config.model import INIT_STDS, ModelConfig


def init_std(cfg: ModelConfig, method: str, key: str) -> float:
    try:
        return INIT_STDS[method](cfg)
    except KeyError:
        raise ConfigError(f"{key}: '{method}' is not implemented; choose one of "
                          f"{sorted(INIT_STDS)}") from None


def generator_for(seed: int, name: str) -> torch.Generator:
    """A CPU generator keyed by the seed and a parameter's global name."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2 ** 63)


@torch.no_grad()
def init_parameter(param: torch.Tensor, name: str, std: float, seed: int, tp_rank: int,
                   tp_size: int) -> None:
    """Fill ``param`` (this rank's shard) with its slice of N(0, std) drawn for the full tensor."""
    partition_dim = getattr(param, "partition_dim", -1) if getattr(param, "tensor_model_parallel", False) else -1
    full_shape = list(param.shape)
    if partition_dim >= 0:
        full_shape[partition_dim] *= tp_size
    full = torch.empty(full_shape, dtype=torch.float32).normal_(0.0, std, generator=generator_for(seed, name))
    if partition_dim >= 0:
        full = full.chunk(tp_size, dim=partition_dim)[tp_rank]
    param.copy_(full)

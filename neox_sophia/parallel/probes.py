"""Rademacher probes u for Sophia-H's Hutchinson estimate u * (H u), the same at any layout.

Every coordinate's sign is a function of (seed, refresh, the parameter's global name, the
coordinate's index in the full, unsharded tensor) only: a 32-bit hash of the index, keyed by the
other three. A tensor-parallel rank computes the signs of exactly the coordinates of its shard
(their global indices), never the full tensor, so a refresh costs O(local parameters) on the
device at any model size; every data-parallel rank and micro-batch split sees the same u.
"""
from __future__ import annotations

import math
import zlib
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch

_STREAM = zlib.crc32(b"neox-sophia/hutchinson-probes")
_LOW32 = 0xFFFFFFFF
_KEY2 = 0x9E3779B9  # a second, fixed key for the second hash round
# +-1 for bit j of each byte value: column 8k + j of a 32-column block takes bit j of byte k.
_SIGNS_OF_OCTET = (((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1) * 2 - 1).to(torch.int8)
# Coordinates hashed per chunk: bounds the int64 temporaries (a few per coordinate) for the
# largest tensors, e.g. a 50k x 4096 embedding.
CHUNK_NUMEL = 1 << 22


def probe_key(seed: int, refresh: int, name: str) -> int:
    """The 32-bit key of one parameter's probe at one refresh."""
    return zlib.crc32(f"{seed}/{refresh}/{name}".encode(), _STREAM)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2^32 for x in [0, 2^32), without overflowing int64 (16-bit halves)."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _LOW32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (Wellons' lowbias32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _signs(rows: torch.Tensor, first_col: int, width: int, words_per_row: int, key: int) -> torch.Tensor:
    """+-1 (int8) of the full tensor's columns [first_col, first_col + width) in global ``rows``.

    One 32-bit hash per block of 32 columns of a row, one bit of it per column: hashing is the
    costly part on a CPU, so it runs on 1/32 of the coordinates."""
    first_word, last_word = first_col // 32, (first_col + width - 1) // 32
    words = rows.unsqueeze(-1) * words_per_row + torch.arange(first_word, last_word + 1, device=rows.device)
    hashed = _mix32(_mix32(words ^ (key & _LOW32)) ^ _KEY2)
    octets = (hashed.unsqueeze(-1) >> torch.arange(0, 32, 8, device=rows.device)) & 0xFF
    signs = _SIGNS_OF_OCTET.to(rows.device)[octets]             # [rows, words, 4, 8]: bit j of octet k
    skip = first_col - 32 * first_word
    return signs.reshape(len(rows), -1)[:, skip:skip + width]


def probe(shard_shape: Sequence[int], key: int, partition_dim: Optional[int] = None, tp_rank: int = 0,
          tp_size: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
    """This rank's shard of the full tensor's Rademacher probe (int8 +-1). ``shard_shape`` is the
    local shape; a tensor-parallel parameter is split into tp_size equal parts along
    ``partition_dim`` (dim 0 or the last dim, as megatron-core splits), this rank holding part
    ``tp_rank``. A coordinate is addressed as (row, column) of the full tensor viewed as
    [numel / last dim, last dim]; each block of 32 columns of a row takes the bits of one hash of
    the block's index, keyed by ``key`` (probe_key)."""
    shape = list(shard_shape)
    cols = shape[-1] if shape else 1
    rows = math.prod(shape[:-1]) if cols else 0
    row_offset = col_offset = 0
    full_rows, full_cols = rows, cols
    if partition_dim is not None and partition_dim >= 0 and tp_size > 1:
        if partition_dim == len(shape) - 1:
            col_offset, full_cols = tp_rank * cols, cols * tp_size
        elif partition_dim == 0:
            row_offset, full_rows = tp_rank * rows, rows * tp_size
        else:
            raise ValueError(f"probe: a tensor split along dim {partition_dim} of {len(shape)} is not supported")
    words_per_row = -(-full_cols // 32)
    if full_rows * words_per_row > 1 << 32:  # the hash takes 32-bit block indices
        raise ValueError(f"probe: a tensor of {full_rows * full_cols} coordinates is too large (at most 2^37)")
    out = torch.empty(rows, cols, dtype=torch.int8, device=device)
    step = max(1, CHUNK_NUMEL // max(cols, 1))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        global_rows = torch.arange(start + row_offset, stop + row_offset, dtype=torch.int64, device=out.device)
        out[start:stop] = _signs(global_rows, col_offset, cols, words_per_row, key)
    return out.reshape(shard_shape)


def parameter_probes(named_parameters: Iterable[Tuple[str, torch.nn.Parameter]], seed: int, refresh: int,
                     tp_rank: int = 0, tp_size: int = 1) -> Dict[torch.nn.Parameter, torch.Tensor]:
    """Probe of refresh ``refresh`` for each (global name, local parameter), keyed by parameter.
    A TP-sharded parameter carries megatron-core's tensor_model_parallel and partition_dim."""
    out = {}
    for name, param in named_parameters:
        sharded = getattr(param, "tensor_model_parallel", False)
        out[param] = probe(param.shape, probe_key(seed, refresh, name),
                           getattr(param, "partition_dim", None) if sharded else None, tp_rank, tp_size,
                           param.device)
    return out

"""Labels for the GNB Hessian step, sampled from the model's own softmax, the same at any layout.

Each token's label is drawn by inverse CDF from one uniform number u, and u is a function of
(seed, Hessian step, global sample index, token position) only: a rank draws the uniforms of
exactly the samples it holds, so labels do not depend on the data-parallel size, the micro-batch
split or the rank that computes them.

Across tensor parallelism each rank holds the logits of one vocab shard. The draw never gathers
the full logits: with M the all-reduced max, every shard sums exp(logit - M) over its real
(unpadded) columns; the all-gathered shard totals give each shard's interval of the cumulative
distribution; the shard whose interval holds u * total finds the label in its local cumulative
sum, and an all-reduce hands it to every TP rank. Everything is float64, so the draw equals the
unsharded one except when u lands within ~1e-16 of a class boundary.

Cost: the float64 work runs in cache-sized row chunks, never on a float64 copy of all the logits.
One rank draws in one pass (exp and cumsum once per logit); under tensor parallelism the totals
must be exchanged before any rank can search, so its shard is passed over twice, recomputing
the cumulative sums bit for bit rather than holding them all in memory.
"""
from __future__ import annotations

import zlib
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

_STREAM = zlib.crc32(b"neox-sophia/gnb-labels")


def label_uniforms(seed: int, hessian_step: int, sample_indices: Sequence[int], seq_length: int) -> torch.Tensor:
    """[len(sample_indices), seq_length] float64 uniforms in [0, 1), one row per global sample."""
    rows = []
    for index in sample_indices:
        key = (((seed * 1_000_003 + _STREAM) * 1_000_033 + hessian_step) * 1_000_037 + int(index)) % 2 ** 63
        rows.append(torch.rand(seq_length, generator=torch.Generator().manual_seed(key), dtype=torch.float64))
    return torch.stack(rows) if rows else torch.empty(0, seq_length, dtype=torch.float64)


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


# Logit elements per chunk of the float64 work. CPU: 2 MiB of float64, so that a chunk's copy,
# exp and cumulative sum stay in cache instead of streaming several float64 copies of all the
# logits through memory (8 x 128 tokens x 8192 classes: ~110 ms whole, ~20 ms in chunks).
# GPU: one chunk in practice; it only caps the float64 temporaries at 512 MiB.
CPU_CHUNK_NUMEL = 1 << 18
GPU_CHUNK_NUMEL = 1 << 26


def _chunks(rows: int, width: int, device: torch.device) -> Iterator[slice]:
    """Row ranges of about CPU/GPU_CHUNK_NUMEL logit elements."""
    numel = CPU_CHUNK_NUMEL if device.type == "cpu" else GPU_CHUNK_NUMEL
    step = max(1, numel // max(width, 1))
    return (slice(i, min(i + step, rows)) for i in range(0, rows, step))


def _shard_cdf(rows: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """float64 running sum of exp(rows - top) along the last dim, in a fresh tensor.

    Every row is computed on its own (sub, exp, then a sequential cumsum), so a row's values do
    not depend on which chunk holds it; the copy keeps float64 callers' logits unchanged."""
    cdf = rows.to(torch.float64, copy=True)
    return cdf.sub_(top.unsqueeze(-1)).exp_().cumsum_(-1)


def _row_max(rows: torch.Tensor) -> torch.Tensor:
    """float64 max of each row, -inf for a row with no columns. The max is taken in the logits'
    own dtype, without a float64 copy: widening is exact and monotone, so it equals the float64
    max (amax, not max: max also finds the indices, ~5x slower on CPU)."""
    if rows.shape[-1] == 0:
        return torch.full(rows.shape[:-1], float("-inf"), dtype=torch.float64, device=rows.device)
    return rows.amax(dim=-1).to(torch.float64)


def _shard_totals(rows: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Each row's total exp(rows - top): the last entry of its _shard_cdf, bit for bit."""
    totals = torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device)
    if rows.shape[-1]:
        for c in _chunks(rows.shape[0], rows.shape[-1], rows.device):
            totals[c] = _shard_cdf(rows[c], top[c])[:, -1]
    return totals


def _search(rows: torch.Tensor, top: torch.Tensor, targets) -> torch.Tensor:
    """Per row, the number of cdf entries <= its target (searchsorted, right side).

    ``targets`` maps (row slice, the slice's shard totals) to the targets of those rows; the
    totals are handed over so that one rank (tp = 1) draws in a single pass over the logits."""
    found = torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
    if rows.shape[-1]:
        for c in _chunks(rows.shape[0], rows.shape[-1], rows.device):
            cdf = _shard_cdf(rows[c], top[c])
            found[c] = torch.searchsorted(cdf, targets(c, cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return found


def _owners(totals_all: torch.Tensor, uniforms: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(owner shard, target, lower end of the owner's interval) per row, from the shard totals
    [rows, tp]. The owner is the first shard whose upper end exceeds the target (the last one
    with mass if rounding put the target at the very end)."""
    bounds = totals_all.cumsum(dim=-1)                 # upper end of each shard's interval
    target = uniforms * bounds[..., -1]
    owner = (bounds <= target.unsqueeze(-1)).sum(dim=-1)
    last_with_mass = (totals_all > 0).long().cumsum(dim=-1).argmax(dim=-1)
    owner = torch.minimum(owner, last_with_mass)
    lower = bounds.gather(-1, owner.unsqueeze(-1)).squeeze(-1) - totals_all.gather(-1, owner.unsqueeze(-1)).squeeze(-1)
    return owner, target, lower


@torch.no_grad()
def sample_vocab_parallel(logits: torch.Tensor, uniforms: torch.Tensor, vocab_size: Optional[int] = None,
                          group=None) -> torch.Tensor:
    """Labels y ~ softmax(full logits) for this rank's vocab shard ``logits`` [..., V/tp] (the
    whole vocabulary when ``group`` is None or has one rank); identical on every rank of the
    tensor-parallel ``group``. Columns at or beyond ``vocab_size`` are never drawn.

    Only the real (unpadded) columns are read, and the float64 work runs in row chunks (see
    CPU_CHUNK_NUMEL); per row it is the same arithmetic as on the whole tensor, so the labels
    do not depend on the chunking."""
    if uniforms.shape != logits.shape[:-1]:
        raise ValueError(f"sample_vocab_parallel: uniforms of shape {tuple(uniforms.shape)} do not match "
                         f"logits of shape {tuple(logits.shape)} (one uniform per token)")
    tp = _group_size(group)
    rank = dist.get_rank(group) if tp > 1 else 0
    width = logits.shape[-1]
    start = rank * width
    real = width if vocab_size is None else min(max(vocab_size - start, 0), width)
    rows = logits.detach().reshape(-1, width)[:, :real]
    u = uniforms.to(logits.device, torch.float64).reshape(-1)
    top = _row_max(rows)
    if tp > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        totals = _shard_totals(rows, top)
        gathered = [torch.empty_like(totals) for _ in range(tp)]
        dist.all_gather(gathered, totals, group=group)
        owner, target, lower = _owners(torch.stack(gathered, dim=-1), u)
        local = _search(rows, top, lambda c, _: target[c] - lower[c])
    else:  # one shard: it owns every row, its interval starts at 0 and the target is u * total
        owner = torch.zeros_like(u, dtype=torch.long)
        local = _search(rows, top, lambda c, totals: u[c] * totals)
    local = local.clamp(max=max(real - 1, 0))
    labels = torch.where(owner == rank, start + local, torch.zeros_like(local))
    if tp > 1:
        dist.all_reduce(labels, group=group)
    return labels.reshape(logits.shape[:-1])


def sampled_label_loss(logits: torch.Tensor, uniforms: torch.Tensor, loss_mask: torch.Tensor,
                       vocab_size: int, group=None) -> torch.Tensor:
    """The mean cross entropy of this rank's vocab-parallel ``logits`` against labels drawn from
    softmax(full logits) with ``uniforms``; positions where loss_mask is 0 do not count. Labels
    are drawn before megatron-core's vocab-parallel cross entropy, which works on the logits in
    place."""
    from neox_sophia.model.layers import lm_loss

    labels = sample_vocab_parallel(logits, uniforms.to(logits.device), vocab_size, group)
    return lm_loss(logits, labels, loss_mask)

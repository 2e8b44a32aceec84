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
"""
from __future__ import annotations

import zlib
from typing import Optional, Sequence

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


@torch.no_grad()
def sample_vocab_parallel(logits: torch.Tensor, uniforms: torch.Tensor, vocab_size: Optional[int] = None,
                          group=None) -> torch.Tensor:
    """Labels y ~ softmax(full logits) for this rank's vocab shard ``logits`` [..., V/tp] (the
    whole vocabulary when ``group`` is None or has one rank); identical on every rank of the
    tensor-parallel ``group``. Columns at or beyond ``vocab_size`` are never drawn."""
    if uniforms.shape != logits.shape[:-1]:
        raise ValueError(f"sample_vocab_parallel: uniforms of shape {tuple(uniforms.shape)} do not match "
                         f"logits of shape {tuple(logits.shape)} (one uniform per token)")
    tp = _group_size(group)
    rank = dist.get_rank(group) if tp > 1 else 0
    width = logits.shape[-1]
    start = rank * width
    x = logits.detach().to(torch.float64)
    if vocab_size is not None and start + width > vocab_size:
        x = x.clone()
        x[..., max(vocab_size - start, 0):] = float("-inf")
    top = x.max(dim=-1).values
    if tp > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    cdf = torch.exp(x - top.unsqueeze(-1)).cumsum(dim=-1)
    totals = cdf[..., -1].contiguous()
    if tp > 1:
        gathered = [torch.empty_like(totals) for _ in range(tp)]
        dist.all_gather(gathered, totals, group=group)
        totals_all = torch.stack(gathered, dim=-1)
    else:
        totals_all = totals.unsqueeze(-1)
    bounds = totals_all.cumsum(dim=-1)                 # upper end of each shard's interval
    target = uniforms.to(x.device, torch.float64) * bounds[..., -1]
    # The owner is the first shard whose upper end exceeds the target (the last one with mass
    # if rounding put the target at the very end).
    owner = (bounds <= target.unsqueeze(-1)).sum(dim=-1)
    last_with_mass = (totals_all > 0).long().cumsum(dim=-1).argmax(dim=-1)
    owner = torch.minimum(owner, last_with_mass)
    lower = bounds.gather(-1, owner.unsqueeze(-1)).squeeze(-1) - totals_all.gather(-1, owner.unsqueeze(-1)).squeeze(-1)
    local = torch.searchsorted(cdf, (target - lower).unsqueeze(-1), right=True).squeeze(-1)
    last_real = (min(vocab_size, start + width) - start - 1) if vocab_size is not None else width - 1
    local = local.clamp(max=max(last_real, 0))
    labels = torch.where(owner == rank, start + local, torch.zeros_like(local))
    if tp > 1:
        dist.all_reduce(labels, group=group)
    return labels


def sampled_label_loss(logits: torch.Tensor, uniforms: torch.Tensor, loss_mask: torch.Tensor,
                       vocab_size: int, group=None) -> torch.Tensor:
    """The mean cross entropy of this rank's vocab-parallel ``logits`` against labels drawn from
    softmax(full logits) with ``uniforms``; positions where loss_mask is 0 do not count. Labels
    are drawn before megatron-core's vocab-parallel cross entropy, which works on the logits in
    place."""
    from neox_sophia.model.layers import lm_loss

    labels = sample_vocab_parallel(logits, uniforms.to(logits.device), vocab_size, group)
    return lm_loss(logits, labels, loss_mask)

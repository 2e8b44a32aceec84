"""Labels for the GNB Hessian step, sampled from the model's own softmax, the same at any layout.

Each token's label is drawn by inverse CDF from one uniform number, and that number is a function
of (seed, Hessian step, global sample index, token position) only: a rank draws the uniforms of
exactly the samples it holds, so the labels do not depend on the data-parallel size, the
micro-batch split or the rank that computes them.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import torch

from neox_sophia.optim.hessian import sample_labels

_STREAM = zlib.crc32(b"neox-sophia/gnb-labels")


def label_uniforms(seed: int, hessian_step: int, sample_indices: Sequence[int], seq_length: int) -> torch.Tensor:
    """[len(sample_indices), seq_length] float64 uniforms in [0, 1), one row per global sample."""
    rows = []
    for index in sample_indices:
        key = (((seed * 1_000_003 + _STREAM) * 1_000_033 + hessian_step) * 1_000_037 + int(index)) % 2 ** 63
        rows.append(torch.rand(seq_length, generator=torch.Generator().manual_seed(key), dtype=torch.float64))
    return torch.stack(rows) if rows else torch.empty(0, seq_length, dtype=torch.float64)


def sampled_label_loss(logits: torch.Tensor, uniforms: torch.Tensor, loss_mask: torch.Tensor,
                       vocab_size: int, tp_size: int = 1) -> torch.Tensor:
    """The mean cross entropy of ``logits`` against labels y ~ softmax(logits) drawn with
    ``uniforms``; positions where loss_mask is 0 do not count. Padded vocab columns are never
    drawn."""
    from neox_sophia.model.layers import lm_loss

    if tp_size != 1:
        raise NotImplementedError("sampling labels from vocab-parallel logits (model_parallel_size > 1) "
                                  "arrives with the TP/PP Sophia issue")
    labels = sample_labels(logits.detach(), uniforms.to(logits.device), vocab_size)
    return lm_loss(logits, labels, loss_mask)

"""Hessian-diagonal estimators for Sophia, apart from the update (levanter's split).

GNB (Gauss-Newton-Bartlett, Sophia-G): sample labels y ~ softmax(logits) from the model's own
output, take the mean cross entropy against y; the gradient g_s of that loss gives
E[B * g_s*g_s] = diag of the Gauss-Newton matrix of the mean loss over B tokens. The optimizer's
update_hessian() then folds g_s*g_s into the EMA, and bs=B in the update supplies the factor B.

Hutchinson (Sophia-H): u*(H u) with Rademacher u; E[u*(Hu)] = diag(H). Needs a double
backward, so single process without activation checkpointing only.

Labels are drawn by inverse CDF from one uniform number per token. The uniforms are an input,
so a caller that owns them (the vocab-parallel sampler, keyed by seed, step and global token
position) gets the same labels at any tensor-parallel size.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


class GNBLoss(NamedTuple):
    loss: Tensor        # mean CE of the logits against the sampled labels (differentiable)
    labels: Tensor      # the sampled labels, [*logits.shape[:-1]], -100 where masked
    num_tokens: int     # tokens that count; the `bs` of this estimate on one process


def sample_labels(logits: Tensor, uniforms: Tensor, vocab_size: Optional[int] = None) -> Tensor:
    """y ~ softmax(logits) by inverse CDF: the first class whose cumulative probability > u.

    ``uniforms`` has shape logits.shape[:-1] with values in [0, 1). Columns at or beyond
    ``vocab_size`` (vocabulary padding) get probability zero and are never drawn. This is the
    one-shard case of the vocab-parallel sampler, so both draw the same labels.
    """
    from neox_sophia.parallel.sampling import sample_vocab_parallel

    return sample_vocab_parallel(logits, uniforms, vocab_size)


def gnb_loss(logits: Tensor, loss_mask: Optional[Tensor] = None,
             generator: Optional[torch.Generator] = None,
             vocab_size: Optional[int] = None) -> GNBLoss:
    """The Gauss-Newton-Bartlett sampled-label loss for unsharded logits [..., V].

    ``loss_mask`` (same shape as logits[..., 0], 1 = counts) excludes positions from the loss;
    ``generator`` makes the draw reproducible (it must live on the logits' device).
    """
    uniforms = torch.rand(logits.shape[:-1], generator=generator, device=logits.device,
                          dtype=torch.float64)
    labels = sample_labels(logits, uniforms, vocab_size)
    if loss_mask is not None:
        if loss_mask.shape != labels.shape:
            raise ValueError(f"gnb_loss: loss_mask of shape {tuple(loss_mask.shape)} does not "
                             f"match logits of shape {tuple(logits.shape)}")
        labels = labels.masked_fill(loss_mask == 0, -100)
    num_tokens = int((labels != -100).sum())
    if num_tokens == 0:
        raise ValueError("gnb_loss: every position is masked; the Hessian batch has no tokens")
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100, reduction="mean")
    return GNBLoss(loss, labels, num_tokens)


def hutchinson(loss: Tensor, params: Sequence[Tensor],
               generator: Optional[torch.Generator] = None) -> List[Tensor]:
    """One Hutchinson estimate u*(H u) per parameter, u Rademacher (E = diag of the Hessian).

    ``loss`` must still have its graph (it is differentiated twice). Parameters that do not
    influence the loss get a zero estimate.
    """
    params = list(params)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    used = [(p, g) for p, g in zip(params, grads) if g is not None]
    probes = [torch.randint(0, 2, p.shape, generator=generator, device=p.device).to(p.dtype) * 2 - 1
              for p, _ in used]
    hvps = torch.autograd.grad([g for _, g in used], [p for p, _ in used], grad_outputs=probes,
                               allow_unused=True)
    by_param = {id(p): (u * hv if hv is not None else torch.zeros_like(p)).detach()
                for (p, _), u, hv in zip(used, probes, hvps)}
    return [by_param.get(id(p), torch.zeros_like(p)) for p in params]


# The YAML names optimizer.params.estimator accepts -> their functions. The trainer runs "gnb"
# (through the vocab-parallel sampler) and refuses the others at setup.
ESTIMATORS = {"gnb": gnb_loss, "hutchinson": hutchinson}

"""Hessian-diagonal estimators for Sophia, apart from the update (levanter's split).

GNB (Gauss-Newton-Bartlett, Sophia-G): sample labels y ~ softmax(logits) from the model's own
output, take the mean cross entropy against y; the gradient g_s of that loss gives
E[B * g_s*g_s] = diag of the Gauss-Newton matrix of the mean loss over B tokens. The optimizer's
update_hessian() then folds g_s*g_s into the EMA, and bs=B in the update supplies the factor B.

Hutchinson (Sophia-H): u*(H u) with Rademacher u; E[u*(Hu)] = diag(H) of the loss itself (the
mean loss: no batch factor, so the update's bs is 1). Two ways to get H u:
- ``hutchinson``: the exact product by double backward (a single process, every op twice
  differentiable);
- ``hutchinson_fd``: central differences of the gradient, (g(theta + e*u) - g(theta - e*u)) / (2e),
  first-order backward only. This is what the trainer runs: megatron-core's tensor-parallel
  functions all-reduce outside autograd and its vocab-parallel cross entropy has a backward
  that builds no graph, so a double backward through them would be wrong or would silently drop
  the cross entropy's own curvature; a first-order backward is exact through every layer,
  tensor parallelism, ZeRO and activation checkpointing. Error: O(e^2) from third derivatives
  plus fp32 rounding ~ eps_mach * |g| / e (tests/test_hessian_estimators.py checks the sum against an
  exact double backward).

Labels are drawn by inverse CDF from one uniform number per token. The uniforms are an input,
so a caller that owns them (the vocab-parallel sampler, keyed by seed, step and global token
position) gets the same labels at any tensor-parallel size.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence

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



# ------------------------------------------------------------------ Hutchinson by central differences
@contextmanager
def central_differences(params: Sequence[Tensor], probes: Sequence[Tensor], fd_eps: float
                        ) -> Iterator[Callable[[int], None]]:
    """Within the block, ``shift(sign)`` sets every parameter to theta + sign*fd_eps*u in place
    (theta: its value on entry, u: its probe) and puts the random number generators back where
    they were on entry, so that both evaluations draw the same dropout masks; on exit the
    parameters are theta again, bit for bit (restored from a copy, not by subtracting)."""
    params = list(params)
    saved = [p.detach().clone() for p in params]
    rng = _rng_state()

    @torch.no_grad()
    def shift(sign: int) -> None:
        for p, theta, u in zip(params, saved, probes):
            p.copy_(theta).add_(u, alpha=sign * fd_eps)
        _set_rng_state(rng)

    try:
        yield shift
    finally:
        with torch.no_grad():
            for p, theta in zip(params, saved):
                p.copy_(theta)


def _rng_state() -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state() if torch.cuda.is_available() else None)


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def hutchinson_fd(loss_fn: Callable[[], Tensor], params: Sequence[Tensor], probes: Sequence[Tensor],
                  fd_eps: float) -> List[Tensor]:
    """u*(H u) per parameter with Hu from central differences of the gradient (first-order
    backward only): Hu ~ (g(theta + e*u) - g(theta - e*u)) / (2e), e = ``fd_eps``.

    ``loss_fn()`` computes the loss at the current parameters (called twice, with the same random
    state); ``probes`` holds one +-1 tensor per parameter. The parameters end bit for bit as they
    began. Parameters that do not influence the loss get a zero estimate."""
    params, probes = list(params), list(probes)
    grads = []
    with central_differences(params, probes, fd_eps) as shift:
        for sign in (1, -1):
            shift(sign)
            grads.append(torch.autograd.grad(loss_fn(), params, allow_unused=True))
    return [torch.zeros_like(p) if plus is None else u * (plus - minus) / (2 * fd_eps)
            for p, u, plus, minus in zip(params, probes, *grads)]


class Estimator(NamedTuple):
    function: Callable
    batch_factor: bool
    """Whether the estimate folded into h lacks the Hessian batch's token count B, which the
    update's ``bs`` then supplies: GNB folds g_s*g_s with E[B*g_s*g_s] = the Gauss-Newton diagonal
    of the mean loss; Hutchinson folds u*Hu, the diagonal itself (bs = 1)."""
    pipeline: bool
    """Whether the trainer runs it under the PipelineEngine (pipe_parallel_size >= 1)."""
    precisions: tuple
    """The precisions the trainer runs it in."""


# The YAML names optimizer.params.estimator accepts. The trainer runs "gnb" (labels from the
# vocab-parallel sampler) and "hutchinson" (central differences: a perturbation of 1e-4 would
# drown in bf16/fp16 rounding, and the PipelineEngine owns its forward/backward schedule).
ESTIMATORS = {"gnb": Estimator(gnb_loss, batch_factor=True, pipeline=True, precisions=("fp32", "bfloat16", "fp16")),
              "hutchinson": Estimator(hutchinson_fd, batch_factor=False, pipeline=False, precisions=("fp32",))}

"""Elementwise Sophia kernels on lists of tensors.

Everything here is per coordinate, so the result for a coordinate does not depend on which
tensor holds it, how tensors are split or flattened (ZeRO hands over one flat fp32 partition),
or how many processes share the model. That is what lets the optimizer stay blind to TP, PP
and ZeRO (DESIGN.md, invariant 1).

Speed. Each ``torch._foreach_*`` call is one pass over memory. Sophia needs ~7 such passes,
which over a whole model is bandwidth-bound and slower than AdamW. Instead the tensors are cut
into contiguous chunk views and processed in *waves* of about ``wave_numel`` elements, so that
all passes of a wave hit data that is still in cache: memory traffic falls to what the update
really needs (read p, g, m, h; write p, m). On CUDA a wave is much larger: there the only point
of waves is to bound the temporaries.
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

# Elements per wave. CPU: ~1 MiB per tensor, so a wave's ~6 tensors fit the last-level cache
# (measured on a 2-core EPYC with 1 MiB L2/core, 32 MiB L3: 2^18 was best among 2^14..2^20).
# GPU: foreach kernels already fuse launches; waves only cap temporary memory at 2 x 128 MiB.
CPU_WAVE_NUMEL = 1 << 18
GPU_WAVE_NUMEL = 1 << 25


def default_wave_numel(device: torch.device) -> int:
    return CPU_WAVE_NUMEL if device.type == "cpu" else GPU_WAVE_NUMEL


def waves(tensor_lists: Sequence[Sequence[Tensor]], wave_numel: int
          ) -> Iterator[Tuple[List[int], List[List[Tensor]]]]:
    """Cut aligned tensor lists into waves of ~wave_numel elements.

    All lists hold same-shaped tensors in the same order (params, grads, states...). Yields
    ``(owners, lists)``: ``lists`` are aligned sub-lists of chunk views, ``owners[i]`` the index
    of the tensor the i-th view belongs to. Tensors larger than a wave are split into contiguous
    1-D views; in-place ops on the views write through. A tensor that is not contiguous in every
    list is kept whole (correct, only less cache-friendly).
    """
    owners: List[int] = []
    current: List[List[Tensor]] = [[] for _ in tensor_lists]
    filled = 0
    for index, aligned in enumerate(zip(*tensor_lists)):
        if aligned[0].numel() > wave_numel and all(t.is_contiguous() for t in aligned):
            pieces = zip(*(t.view(-1).split(wave_numel) for t in aligned))
        else:
            pieces = iter([aligned])
        for piece in pieces:
            owners.append(index)
            for out, t in zip(current, piece):
                out.append(t)
            filled += piece[0].numel()
            if filled >= wave_numel:
                yield owners, current
                owners, current, filled = [], [[] for _ in tensor_lists], 0
    if owners:
        yield owners, current


def _foreach_update(params, grads, exp_avgs, hessians, *, lr, beta1, rho_bs, eps, weight_decay):
    """One Sophia update on aligned lists of chunk views.

    sign(m) * min(|m| / max(rho*bs*h, eps), 1) is computed as m / max(rho*bs*h, eps, |m|):
    equal coordinate for coordinate (|m| > d gives m/|m| = +-1 exactly, m = 0 gives 0), one
    pass fewer than abs/div/clamp/sign, and no NaN when a Hutchinson estimate makes h < 0
    (the paper's max{rho*h, eps} then floors the denominator at eps, its Algorithm 3).
    """
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    denom = torch._foreach_mul(hessians, rho_bs)
    torch._foreach_clamp_min_(denom, eps)
    torch._foreach_maximum_(denom, torch._foreach_abs(exp_avgs))
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr)


def _single_tensor_update(param, grad, exp_avg, hessian, *, lr, beta1, rho_bs, eps, weight_decay):
    """The same op sequence as _foreach_update for one tensor (devices without foreach)."""
    if weight_decay != 0.0:
        param.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(grad, 1.0 - beta1)
    denom = torch.mul(hessian, rho_bs).clamp_min_(eps)
    torch.maximum(denom, exp_avg.abs(), out=denom)
    param.addcdiv_(exp_avg, denom, value=-lr)


def sophia_update(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                  hessians: List[Tensor], *, lr: float, beta1: float, rho: float, bs: float,
                  eps: float, weight_decay: float, maximize: bool = False, foreach: bool = True,
                  wave_numel: Optional[int] = None) -> None:
    """Functional Sophia step on same-device, same-dtype lists (updates params and exp_avgs)."""
    if not params:
        return
    if maximize:
        grads = [torch.neg(g) for g in grads]
    hyper = dict(lr=lr, beta1=beta1, rho_bs=rho * bs, eps=eps, weight_decay=weight_decay)
    if not foreach:
        for p, g, m, h in zip(params, grads, exp_avgs, hessians):
            _single_tensor_update(p, g, m, h, **hyper)
        return
    wave_numel = wave_numel or default_wave_numel(params[0].device)
    for _, (p, g, m, h) in waves([params, grads, exp_avgs, hessians], wave_numel):
        _foreach_update(p, g, m, h, **hyper)


def hessian_ema(hessians: List[Tensor], estimates: List[Tensor], rejected: List[Tensor], *,
                beta2: float, square: bool, wave_numel: Optional[int] = None) -> None:
    """h <- b2*h + (1-b2)*e, with e = g*g (``square``, GNB) or e as given (Hutchinson's u*Hu).

    A coordinate whose new value is not finite keeps its old h, and the count of such
    coordinates accumulates in ``rejected`` (one scalar tensor per hessian tensor). The guard is
    per coordinate, like everything here, so it means the same at any sharding; a whole-step
    skip would depend on how the model is sharded.

    Non-finite estimates are rare, so each wave is checked with one reduction (a chunk's L1 norm
    is finite if all its coordinates are; a finite chunk whose norm overflows only takes the
    exact path below) and only chunks that fail it pay for the per-coordinate repair. That check reads one flag per wave on the host: this runs every k
    steps, not in step().
    """
    if not hessians:
        return
    wave_numel = wave_numel or default_wave_numel(hessians[0].device)
    for owners, (hs, es) in waves([hessians, estimates], wave_numel):
        updated = torch._foreach_mul(hs, beta2)
        if square:
            torch._foreach_addcmul_(updated, es, es, value=1.0 - beta2)
        else:
            torch._foreach_add_(updated, es, alpha=1.0 - beta2)
        finite = torch.stack(torch._foreach_norm(updated, ord=1)).isfinite().tolist()
        if any(finite):
            torch._foreach_copy_([h for h, ok in zip(hs, finite) if ok],
                                 [n for n, ok in zip(updated, finite) if ok])
        for owner, hessian, new, ok in zip(owners, hs, updated, finite):
            if not ok:
                keep = torch.isfinite(new)
                torch.where(keep, new, hessian, out=hessian)
                rejected[owner].add_(keep.logical_not_().sum())

"""Elementwise Sophia kernels on lists of tensors.

Everything here is per coordinate, so the result for a coordinate does not depend on which
tensor holds it, how tensors are split or flattened (ZeRO hands over one flat fp32 partition),
or how many processes share the model. That is what lets the optimizer stay blind to TP, PP
and ZeRO (docs/design.md, invariant 1).

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
                  eps: float, weight_decay: float, hessian_scale: float = 1.0,
                  hessian_floor: float = 0.0, maximize: bool = False, foreach: bool = True,
                  wave_numel: Optional[int] = None) -> None:
    """Functional Sophia step on same-device, same-dtype lists (updates params and exp_avgs).

    The Hessian enters as max(hessian_scale * h, hessian_floor): ``hessian_scale`` is the EMA's
    bias correction 1/(1 - b2^n) when enabled, ``hessian_floor`` a lower bound on the curvature
    (both options beyond the paper; the defaults 1 and 0 leave the paper's rule, bit for bit).
    Folded into the two scalars the kernels already take: d = max(rho*bs*scale*h, max(rho*bs*floor,
    eps)), so no option costs a pass over memory.
    """
    if not params:
        return
    if maximize:
        grads = [torch.neg(g) for g in grads]
    hyper = dict(lr=lr, beta1=beta1, rho_bs=rho * bs * hessian_scale,
                 eps=max(rho * bs * hessian_floor, eps), weight_decay=weight_decay)
    if not foreach:
        for p, g, m, h in zip(params, grads, exp_avgs, hessians):
            _single_tensor_update(p, g, m, h, **hyper)
        return
    wave_numel = wave_numel or default_wave_numel(params[0].device)
    for _, (p, g, m, h) in waves([params, grads, exp_avgs, hessians], wave_numel):
        _foreach_update(p, g, m, h, **hyper)


def _surely_finite(hessians: List[Tensor], estimates: List[Tensor], *, beta2: float,
                   square: bool) -> List[bool]:
    """Per chunk, whether b2*h + (1-b2)*e (e*e with ``square``) is finite at every coordinate,
    decided before anything is written, from the largest |h| and |e| (one reduction each).

    The bound b2*M_h + (1-b2)*M_e (M_e^2 with ``square``), M = |min| + |max| >= max|x|, is
    taken in float64 on the host and must stay under half the dtype's largest value: the few
    roundings of the real update (each < 0.4% even in bf16) then cannot reach it. A NaN or inf
    anywhere makes the bound NaN or inf, never "finite". False only sends a chunk down the exact
    per-coordinate path, so the bound may be loose.
    """
    ends = [end for t in (*hessians, *estimates)
            for end in (torch.aminmax(t) if t.numel() else (t.new_zeros(()), t.new_zeros(())))]
    ends = torch.stack(ends).tolist()  # one host read per wave; Python floats are float64
    # |min| + |max| >= max|x|, and unlike max() it cannot drop a NaN.
    largest = [abs(low) + abs(high) for low, high in zip(ends[::2], ends[1::2])]
    n = len(hessians)
    out = []
    for h, top_h, top_e in zip(hessians, largest[:n], largest[n:]):
        bound = beta2 * top_h + (1.0 - beta2) * (top_e * top_e if square else top_e)
        out.append(bound <= torch.finfo(h.dtype).max / 2)
    return out


def _ema_(hessians: List[Tensor], estimates: List[Tensor], *, beta2: float, beta2_tensor: Tensor,
          square: bool) -> None:
    """h <- b2*h + (1-b2)*e(*e) in place, no guard.

    The scaling by b2 takes it as a 0-dim float64 tensor (``beta2_tensor``, made once per call):
    in-place foreach mul_ with a Python number rounds the number to the tensors' dtype first
    (torch 2.13, CPU: b2 = 0.99 becomes 0.98828125 in bf16), unlike torch.mul, which the guarded
    path uses; with a tensor both give the same bits.
    """
    torch._foreach_mul_(hessians, beta2_tensor)
    if square:
        torch._foreach_addcmul_(hessians, estimates, estimates, value=1.0 - beta2)
    else:
        torch._foreach_add_(hessians, estimates, alpha=1.0 - beta2)


def _guarded_ema_(hessian: Tensor, estimate: Tensor, rejected: Tensor, *, beta2: float, square: bool) -> None:
    """The same update computed aside; coordinates whose new value is not finite keep their
    old h and are counted in ``rejected``."""
    new = torch.mul(hessian, beta2)
    if square:
        new.addcmul_(estimate, estimate, value=1.0 - beta2)
    else:
        new.add_(estimate, alpha=1.0 - beta2)
    keep = torch.isfinite(new)
    torch.where(keep, new, hessian, out=hessian)
    rejected.add_(keep.logical_not_().sum())


def hessian_ema(hessians: List[Tensor], estimates: List[Tensor], rejected: List[Tensor], *,
                beta2: float, square: bool, wave_numel: Optional[int] = None) -> None:
    """h <- b2*h + (1-b2)*e, with e = g*g (``square``, GNB) or e as given (Hutchinson's u*Hu).

    A coordinate whose new value is not finite keeps its old h, and the count of such
    coordinates accumulates in ``rejected`` (one scalar tensor per hessian tensor). The guard is
    per coordinate, like everything here, so it means the same at any sharding; a whole-step
    skip would depend on how the model is sharded.

    Non-finite estimates are rare, so the guard must cost little on the common path: per wave,
    one min/max reduction of h and of e proves most chunks cannot overflow (_surely_finite);
    those are updated in place exactly as without a guard, and only the rest pay for computing
    the update aside and repairing it coordinate by coordinate (_guarded_ema_). A coordinate
    gets the same bits on either path. On 125M-model shapes on CPU (162M parameters) the guarded
    update takes ~1.6x an unguarded one, where an L1-norm check of the computed update took ~3x.
    The check reads one list of flags per wave on the host: this runs every k steps, not in
    step().
    """
    if not hessians:
        return
    wave_numel = wave_numel or default_wave_numel(hessians[0].device)
    beta2_tensor = torch.tensor(beta2, dtype=torch.float64, device=hessians[0].device)
    for owners, (hs, es) in waves([hessians, estimates], wave_numel):
        safe = _surely_finite(hs, es, beta2=beta2, square=square)
        if any(safe):
            _ema_([h for h, ok in zip(hs, safe) if ok], [e for e, ok in zip(es, safe) if ok],
                  beta2=beta2, beta2_tensor=beta2_tensor, square=square)
        for owner, h, e, ok in zip(owners, hs, es, safe):
            if not ok:
                _guarded_ema_(h, e, rejected[owner], beta2=beta2, square=square)

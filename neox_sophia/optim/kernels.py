"""Elementwise Sophia kernels on lists of tensors.

Everything here is per coordinate, so the result for a coordinate does not depend on which
tensor holds it, how tensors are split or flattened (ZeRO hands over one flat fp32 partition),
or how many processes share the model. That is what lets the optimizer stay blind to TP, PP
and ZeRO (docs/design.md, invariant 1).

Speed. Each ``torch._foreach_*`` call is one pass over memory. Sophia needs ~11 such passes,
which over a whole model is bandwidth-bound and slower than AdamW. Instead the tensors are cut
into contiguous chunk views and processed in *waves* of about ``wave_numel`` elements, so that
all passes of a wave hit data that is still in cache: memory traffic falls to what the update
really needs (read p, g, m, h; write p, m). On CUDA a wave is much larger: there the only point
of waves is to bound the temporaries.

These are the eager kernels. sophia_update and hessian_ema hand the tensors that fused.py
applies to (and ``fused`` asks for) to its compiled single-pass kernels, which compute the same
arithmetic with the same bits; the rest runs here.
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from neox_sophia.optim import fused as fused_kernels

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


# The arithmetic, one rounding per operation. Every step below is one IEEE operation (mul, sub,
# add, div, max), never a fused multiply-add: eager kernels fuse some ops (lerp, addcmul and
# addcdiv use an FMA, on CPU and CUDA alike), torch.compile's CPU code has no FMA at all and its
# CUDA code contracts a*b + c unless told not to. Written this way the eager path here and the
# compiled one (fused.py) give the same bits on every device. Scalars come from sophia_scalars.
#
#   momentum:  m + (g - m) * c          with c = 1 - b1   (b1 > 0.5, the usual case)
#              g - (g - m) * c          with c = b1       (b1 <= 0.5), torch.lerp's two forms,
#                                       so that b1 = 0 gives m = g exactly
#   step:      p * decay + (m * -lr) / max(max(h * rho_bs, floor), |m|)
#   EMA:       h * b2 + t * (1 - b2)    t = e * e (GNB) or e (Hutchinson)


def sophia_scalars(*, lr: float, beta1: float, rho: float, bs: float, eps: float,
                   weight_decay: float, hessian_scale: float = 1.0, hessian_floor: float = 0.0,
                   maximize: bool = False) -> dict:
    """The per-step scalars of the update, in float64 on the host (each op rounds them to the
    tensors' dtype). hessian_scale and hessian_floor fold into rho_bs and floor:
    d = max(rho*bs*scale*h, max(rho*bs*floor, eps)), so neither costs a pass over memory."""
    return dict(decay=1.0 - lr * weight_decay, sign=-1.0 if maximize else 1.0,
                momentum_coef=1.0 - beta1 if beta1 > 0.5 else beta1, from_m=beta1 > 0.5,
                rho_bs=rho * bs * hessian_scale, floor=max(rho * bs * hessian_floor, eps), neg_lr=-lr)


def _foreach_momentum_(exp_avgs, grads, *, momentum_coef, from_m, **_):
    diff = torch._foreach_sub(grads, exp_avgs)
    torch._foreach_mul_(diff, momentum_coef)
    if from_m:
        torch._foreach_add_(exp_avgs, diff)
    else:
        torch._foreach_copy_(exp_avgs, torch._foreach_sub(grads, diff))


def _foreach_update(params, grads, exp_avgs, hessians, *, decay, rho_bs, floor, neg_lr, **hyper):
    """One Sophia update on aligned lists of chunk views.

    sign(m) * min(|m| / max(rho*bs*h, eps), 1) is computed as m / max(rho*bs*h, eps, |m|):
    equal coordinate for coordinate (|m| > d gives m/|m| = +-1 exactly, m = 0 gives 0), one
    pass fewer than abs/div/clamp/sign, and no NaN when a Hutchinson estimate makes h < 0
    (the paper's max{rho*h, eps} then floors the denominator at eps, its Algorithm 3).
    """
    if decay != 1.0:
        torch._foreach_mul_(params, decay)
    _foreach_momentum_(exp_avgs, grads, **hyper)
    denom = torch._foreach_mul(hessians, rho_bs)
    torch._foreach_clamp_min_(denom, floor)
    torch._foreach_maximum_(denom, torch._foreach_abs(exp_avgs))
    step = torch._foreach_mul(exp_avgs, neg_lr)
    torch._foreach_div_(step, denom)
    torch._foreach_add_(params, step)


def _single_tensor_update(param, grad, exp_avg, hessian, *, decay, momentum_coef, from_m, rho_bs,
                          floor, neg_lr, **_):
    """The same arithmetic for one tensor (devices without foreach)."""
    if decay != 1.0:
        param.mul_(decay)
    diff = torch.sub(grad, exp_avg).mul_(momentum_coef)
    exp_avg.add_(diff) if from_m else exp_avg.copy_(torch.sub(grad, diff))
    denom = torch.mul(hessian, rho_bs).clamp_min_(floor)
    torch.maximum(denom, exp_avg.abs(), out=denom)
    param.add_(torch.mul(exp_avg, neg_lr).div_(denom))


def sophia_update(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                  hessians: List[Tensor], *, lr: float, beta1: float, rho: float, bs: float,
                  eps: float, weight_decay: float, hessian_scale: float = 1.0,
                  hessian_floor: float = 0.0, maximize: bool = False, foreach: bool = True,
                  fused: Optional[bool] = None, wave_numel: Optional[int] = None) -> None:
    """Functional Sophia step on same-device, same-dtype lists (updates params and exp_avgs).

    The Hessian enters as max(hessian_scale * h, hessian_floor): ``hessian_scale`` is the EMA's
    bias correction 1/(1 - b2^n) when enabled, ``hessian_floor`` a lower bound on the curvature
    (both options beyond the paper; the defaults 1 and 0 leave the paper's rule, bit for bit).

    ``fused``: True runs the compiled single-pass kernel (neox_sophia.optim.fused) on the
    tensors it applies to, False the eager kernels here, None picks (fused.use_fused). Both give
    the same bits.
    """
    if not params:
        return
    scalars = sophia_scalars(lr=lr, beta1=beta1, rho=rho, bs=bs, eps=eps, weight_decay=weight_decay,
                             hessian_scale=hessian_scale, hessian_floor=hessian_floor, maximize=maximize)
    if fused_kernels.use_fused(fused, params):
        params, grads, exp_avgs, hessians = fused_kernels.sophia_step(params, grads, exp_avgs, hessians, scalars)
        if not params:
            return
    if maximize:
        grads = [torch.neg(g) for g in grads]
    if not foreach:
        for p, g, m, h in zip(params, grads, exp_avgs, hessians):
            _single_tensor_update(p, g, m, h, **scalars)
        return
    wave_numel = wave_numel or default_wave_numel(params[0].device)
    for _, (p, g, m, h) in waves([params, grads, exp_avgs, hessians], wave_numel):
        _foreach_update(p, g, m, h, **scalars)


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


def _ema_(hessians: List[Tensor], estimates: List[Tensor], *, factors: Tuple[Tensor, Tensor],
          square: bool) -> None:
    """h <- h*b2 + t*(1-b2) in place (t = e*e or e), no guard.

    ``factors`` are (b2, 1 - b2) as 0-dim float64 tensors: in-place foreach mul_ with a Python
    number rounds the number to the tensors' dtype first (torch 2.13, CPU: b2 = 0.99 becomes
    0.98828125 in bf16), unlike torch.mul, which the guarded path uses; with a tensor both give
    the same bits.
    """
    beta2, weight = factors
    torch._foreach_mul_(hessians, beta2)
    terms = torch._foreach_mul(estimates, estimates) if square else list(estimates)
    terms = torch._foreach_mul(terms, weight)
    torch._foreach_add_(hessians, terms)


def _guarded_ema_(hessian: Tensor, estimate: Tensor, rejected: Tensor, *, factors: Tuple[Tensor, Tensor],
                  square: bool) -> None:
    """The same update computed aside; coordinates whose new value is not finite keep their
    old h and are counted in ``rejected``."""
    beta2, weight = factors
    term = torch.mul(estimate, estimate) if square else estimate
    new = torch.mul(hessian, beta2).add_(torch.mul(term, weight))
    keep = torch.isfinite(new)
    torch.where(keep, new, hessian, out=hessian)
    rejected.add_(keep.logical_not_().sum())


def ema_factors(beta2: float, device: torch.device) -> Tuple[Tensor, Tensor]:
    """(b2, 1 - b2) as 0-dim float64 tensors on ``device`` (see _ema_)."""
    values = torch.tensor([beta2, 1.0 - beta2], dtype=torch.float64, device=device)
    return values[0], values[1]


def hessian_ema(hessians: List[Tensor], estimates: List[Tensor], rejected: List[Tensor], *,
                beta2: float, square: bool, fused: Optional[bool] = None,
                wave_numel: Optional[int] = None) -> None:
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
    if fused_kernels.use_fused(fused, hessians):
        hessians, estimates, rejected = fused_kernels.hessian_ema(hessians, estimates, rejected,
                                                                  beta2=beta2, square=square)
        if not hessians:
            return
    wave_numel = wave_numel or default_wave_numel(hessians[0].device)
    factors = ema_factors(beta2, hessians[0].device)
    for owners, (hs, es) in waves([hessians, estimates], wave_numel):
        safe = _surely_finite(hs, es, beta2=beta2, square=square)
        if any(safe):
            _ema_([h for h, ok in zip(hs, safe) if ok], [e for e, ok in zip(es, safe) if ok],
                  factors=factors, square=square)
        for owner, h, e, ok in zip(owners, hs, es, safe):
            if not ok:
                _guarded_ema_(h, e, rejected[owner], factors=factors, square=square)

"""Sophia's rule written out plainly: the specification the fast path is tested against.

This is the algorithm of the paper (Liu et al. 2023, Algorithm 3, with the official code's lr
convention) in the form it is written there, one tensor at a time, for reading and for tests;
training runs neox_sophia.optim.sophia.Sophia, whose kernels (kernels.py) compute the same per
coordinate in fewer passes over memory (tests/test_sophia_update.py checks them against this).

Every step, for each parameter p with gradient g:

    p <- p * (1 - lr * weight_decay)                      decoupled weight decay
    m <- beta1 * m + (1 - beta1) * g                      momentum (no bias correction)
    p <- p - lr * sign(m) * min(|m| / max(rho * bs * h, eps), 1)

Every k steps, after that step's update (Sophia-G: labels sampled from the model's softmax):

    h <- beta2 * h + (1 - beta2) * g_s * g_s              g_s: gradient of the sampled-label loss
    (Sophia-H:  h <- beta2 * h + (1 - beta2) * u * (H u),  u Rademacher)

h starts at 0, so until the first refresh every coordinate takes the clipped step lr * sign(m).
Options beyond the paper replace h in the update by max(h / (1 - beta2^n), floor): bias
correction after n refreshes, and a floor; and a group may be updated by AdamW instead.
"""
from __future__ import annotations

import torch
from torch import Tensor


def sophia_step(p: Tensor, m: Tensor, h: Tensor, g: Tensor, *, lr: float, beta1: float, rho: float,
                bs: float, eps: float, weight_decay: float, hessian_scale: float = 1.0,
                hessian_floor: float = 0.0) -> tuple:
    """One Sophia step; returns the new (p, m). h is read, not changed."""
    p = p * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    h_seen = torch.clamp(hessian_scale * h, min=hessian_floor)  # = h with the options off (h >= 0)
    ratio = torch.clamp(m.abs() / torch.clamp(rho * bs * h_seen, min=eps), max=1)
    return p - lr * torch.sign(m) * ratio, m


def hessian_refresh(h: Tensor, estimate: Tensor, *, beta2: float) -> Tensor:
    """The Hessian EMA: estimate = g_s * g_s (Sophia-G) or u * Hu (Sophia-H)."""
    return beta2 * h + (1 - beta2) * estimate


def bias_correction(beta2: float, refreshes: int) -> float:
    """The scale h gets with hessian_bias_correction after ``refreshes`` refreshes."""
    return 1.0 if refreshes == 0 else 1.0 / (1.0 - beta2 ** refreshes)


def adamw_step(p: Tensor, m: Tensor, v: Tensor, g: Tensor, step: int, *, lr: float, beta1: float,
               beta2: float, eps: float, weight_decay: float) -> tuple:
    """AdamW (Loshchilov & Hutter), as a split optimizer's AdamW groups take it; returns (p, m, v)."""
    p = p * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat, v_hat = m / (1 - beta1 ** step), v / (1 - beta2 ** step)
    return p - lr * m_hat / (v_hat.sqrt() + eps), m, v

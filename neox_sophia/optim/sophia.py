"""Sophia (Liu, Li, Hall, Liang, Ma 2023, arXiv 2305.14342) as a torch optimizer.

Per coordinate, with the official code's learning-rate convention (DESIGN.md):

    step():            p <- p * (1 - lr*wd)
                       m <- b1*m + (1-b1)*g
                       p <- p - lr * sign(m) * min(|m| / max(rho*bs*h, eps), 1)
    update_hessian():  h <- b2*h + (1-b2) * g*g        (g = gradient of the sampled-label loss)
    update_hessian(e): h <- b2*h + (1-b2) * e          (e = u*Hu, Hutchinson / Sophia-H)

The optimizer only ever sees tensors: whole parameters, tensor-parallel shards or ZeRO's flat
fp32 partitions. It knows nothing about process groups; the code that does (label sampling,
the training loop's Hessian step, checkpoint tools) lives elsewhere.
"""
from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from neox_sophia.optim.kernels import hessian_ema, sophia_update

# Keys of per-parameter state. All are created on the first call of step() or update_hessian():
# DeepSpeed ZeRO links optimizer state to its partitions lazily after the first step.
STATE_KEYS = ("step", "exp_avg", "hessian", "hessian_rejected")


def _check(name: str, value, ok: bool, need: str) -> None:
    if not ok:
        raise ValueError(f"Sophia: invalid {name}={value!r}; {need}")


def _is_finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_hyperparameters(group: dict) -> None:
    """Raise ValueError naming the first bad hyperparameter of a param group."""
    lr, rho, bs, eps, wd = (group[k] for k in ("lr", "rho", "bs", "eps", "weight_decay"))
    _check("lr", lr, _is_finite_number(lr) and lr >= 0, "lr must be a finite number >= 0")
    betas = group["betas"]
    _check("betas", betas, isinstance(betas, (tuple, list)) and len(betas) == 2,
           "betas must be a pair (beta1, beta2)")
    for i, beta in enumerate(betas):
        _check(f"betas[{i}]", beta, _is_finite_number(beta) and 0.0 <= beta < 1.0,
               "each beta must be in [0, 1)")
    _check("rho", rho, _is_finite_number(rho) and rho > 0,
           "rho must be > 0 (rho = 0 would turn Sophia into sign momentum)")
    _check("bs", bs, _is_finite_number(bs) and bs > 0,
           "bs is the number of tokens behind the Hessian estimate and must be > 0")
    _check("eps", eps, _is_finite_number(eps) and eps > 0, "eps must be > 0")
    _check("weight_decay", wd, _is_finite_number(wd) and wd >= 0, "weight_decay must be >= 0")


@dataclass(frozen=True)
class SophiaStatistics:
    """What to watch while training Sophia (see README: "What to watch").

    clip_frac: fraction of coordinates whose update is at the +-lr bound (|m| >= rho*bs*h).
    win_rate: 1 - clip_frac, the official code's name; its README advises 0.1-0.5.
    hessian_mean / hessian_rms: of the Hessian EMA h.
    hessian_rejected: total coordinates whose Hessian update was non-finite and skipped.
    """

    numel: int
    clip_frac: float
    win_rate: float
    hessian_mean: float
    hessian_rms: float
    hessian_rejected: int

    # Order of the raw sums returned by Sophia.statistics_sums(); all are sum-reducible.
    SUMS = ("numel", "unclipped", "hessian_sum", "hessian_sq_sum", "hessian_rejected")

    @classmethod
    def from_sums(cls, sums: Tensor) -> "SophiaStatistics":
        numel, unclipped, h_sum, h_sq, rejected = sums.double().tolist()
        n = max(numel, 1.0)
        return cls(numel=int(numel), clip_frac=1.0 - unclipped / n, win_rate=unclipped / n,
                   hessian_mean=h_sum / n, hessian_rms=math.sqrt(h_sq / n),
                   hessian_rejected=int(rejected))


class Sophia(torch.optim.Optimizer):
    """Sophia-G / Sophia-H. See the module docstring for the update.

    Args:
        params: parameters or param groups. Every hyperparameter can differ per group.
        lr: learning rate; the largest per-coordinate step is lr (the official code's
            convention: rho and bs scale the Hessian, not the step).
        betas: (beta1, beta2): EMA factors of the gradient and of the Hessian diagonal.
        rho: clipping threshold: a coordinate moves lr * |m| / (rho*bs*h), at most lr.
        weight_decay: decoupled, p <- p*(1 - lr*weight_decay) every step.
        bs: number of tokens behind one Hessian estimate (B in the paper's B*g*g); kept per
            group because ZeRO calls step() with no arguments.
        eps: floor of the denominator rho*bs*h.
        foreach: multi-tensor kernels (default on CPU and CUDA); False: one tensor at a time.
        maximize: maximize the objective instead of minimizing it.
        fused: single-pass compiled kernels (neox_sophia.optim.fused): True always, False
            never, None where they pay off (CUDA; large models on CPU). Same results either way.
    """

    def __init__(self, params, lr: float = 1e-4, betas: Tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, weight_decay: float = 0.1, *, bs: float = 5120,
                 eps: float = 1e-15, foreach: Optional[bool] = None, maximize: bool = False,
                 fused: Optional[bool] = None):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas,
                        rho=rho, weight_decay=weight_decay, bs=bs, eps=eps, foreach=foreach,
                        maximize=maximize, fused=fused)
        validate_hyperparameters(defaults)
        super().__init__(params, defaults)
        self._hessian_mode = False

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        validate_hyperparameters(self.param_groups[-1])

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_hessian_mode", False)

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every state tensor but `step` to the parameter's dtype; a count of
        # rejected coordinates must stay an exact fp32 count even for bf16 parameters.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        counters = {p: state_dict["state"][i]["hessian_rejected"]
                    for i, p in zip(saved_ids, params)
                    if "hessian_rejected" in state_dict["state"].get(i, {})}
        super().load_state_dict(state_dict)
        for p, count in counters.items():
            self.state[p]["hessian_rejected"] = count.to(device=p.device, dtype=torch.float32)

    # ----------------------------------------------------------------------------- state
    def _state_for(self, p: Tensor) -> dict:
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian_rejected"] = torch.zeros((), dtype=torch.float32, device=p.device)
        return state

    def _params_with_grad(self, group: dict) -> List[Tensor]:
        out = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"Sophia does not support sparse gradients (parameter of shape "
                    f"{tuple(p.shape)}); use a dense embedding (sparse=False).")
            out.append(p)
        return out

    @staticmethod
    def _by_device_and_dtype(params: Sequence[Tensor]) -> Dict[tuple, List[Tensor]]:
        buckets: Dict[tuple, List[Tensor]] = defaultdict(list)
        for p in params:
            buckets[(p.device, p.dtype)].append(p)
        return buckets

    @staticmethod
    def _use_foreach(group: dict, device: torch.device) -> bool:
        if group["foreach"] is not None:
            return bool(group["foreach"])
        return device.type in ("cpu", "cuda")

    # ----------------------------------------------------------------------------- update
    @contextmanager
    def hessian_mode(self, enabled: bool = True) -> Iterator["Sophia"]:
        """Within this block step() calls update_hessian() instead of updating parameters.

        DeepSpeed ZeRO only ever calls step() on the optimizer it wraps (on its flat fp32
        partitions, after reducing and clipping gradients), so this is how a Hessian step
        reaches the sharded state through an unmodified engine.
        """
        previous, self._hessian_mode = self._hessian_mode, enabled
        try:
            yield self
        finally:
            self._hessian_mode = previous

    @property
    def in_hessian_mode(self) -> bool:
        return self._hessian_mode

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._hessian_mode:
            self.update_hessian()
            return loss
        for group in self.param_groups:
            params = self._params_with_grad(group)
            beta1 = group["betas"][0]
            lr = group["lr"]
            for (device, _), ps in self._by_device_and_dtype(params).items():
                states = [self._state_for(p) for p in ps]
                torch._foreach_add_([s["step"] for s in states], 1.0)
                sophia_update(ps, [p.grad for p in ps], [s["exp_avg"] for s in states],
                              [s["hessian"] for s in states], lr=lr, beta1=beta1,
                              rho=group["rho"], bs=group["bs"], eps=group["eps"],
                              weight_decay=group["weight_decay"], maximize=group["maximize"],
                              foreach=self._use_foreach(group, device), fused=group.get("fused"))
        return loss

    @torch.no_grad()
    def update_hessian(self, estimates: Optional[Sequence[Optional[Tensor]]] = None) -> None:
        """Fold a Hessian-diagonal estimate into the EMA; parameters are never touched.

        Without ``estimates`` (Sophia-G, GNB): uses each parameter's current ``.grad``, the
        gradient of the sampled-label loss, as g*g. With ``estimates`` (Sophia-H): one tensor
        (or None to skip) per parameter, in param_groups order, used as given (u*Hu).
        Non-finite coordinates are rejected, never folded in (SophiaStatistics.hessian_rejected).
        """
        groups = self.param_groups
        if estimates is not None:
            per_group = self._split_estimates(estimates)
        for gi, group in enumerate(groups):
            if estimates is None:
                pairs = [(p, p.grad) for p in self._params_with_grad(group)]
            else:
                pairs = [(p, e) for p, e in zip(group["params"], per_group[gi]) if e is not None]
            beta2 = group["betas"][1]
            for _, ps in self._by_device_and_dtype([p for p, _ in pairs]).items():
                chosen = set(map(id, ps))
                es = [e for p, e in pairs if id(p) in chosen]
                states = [self._state_for(p) for p in ps]
                hessian_ema([s["hessian"] for s in states], es,
                            [s["hessian_rejected"] for s in states],
                            beta2=beta2, square=estimates is None, fused=group.get("fused"))

    def _split_estimates(self, estimates: Sequence[Optional[Tensor]]) -> List[List[Optional[Tensor]]]:
        estimates = list(estimates)
        sizes = [len(g["params"]) for g in self.param_groups]
        if len(estimates) != sum(sizes):
            raise ValueError(f"update_hessian: got {len(estimates)} estimates for {sum(sizes)} "
                             f"parameters; pass one tensor (or None) per parameter, in "
                             f"param_groups order")
        out, start = [], 0
        for gi, size in enumerate(sizes):
            chunk = estimates[start:start + size]
            for p, e in zip(self.param_groups[gi]["params"], chunk):
                if e is not None and (e.shape != p.shape or e.device != p.device):
                    raise ValueError(f"update_hessian: estimate of shape {tuple(e.shape)} on "
                                     f"{e.device} for a parameter of shape {tuple(p.shape)} "
                                     f"on {p.device}")
            out.append([None if e is None else e.to(p.dtype)
                        for p, e in zip(self.param_groups[gi]["params"], chunk)])
            start += size
        return out

    # ------------------------------------------------------------------------- statistics
    @torch.no_grad()
    def statistics_sums(self) -> Tensor:
        """Raw, sum-reducible statistics of the local state (SophiaStatistics.SUMS order).

        Computed only when called (for logging); one float64 tensor, so a distributed caller
        all-reduces it once and calls SophiaStatistics.from_sums. Parameters without state yet
        count as having m = h = 0.
        """
        parts: List[Tensor] = []
        for group in self.param_groups:
            rho_bs = group["rho"] * group["bs"]
            for p in group["params"]:
                state = self.state.get(p)
                if not state or "exp_avg" not in state:
                    parts.append(torch.tensor([p.numel(), 0.0, 0.0, 0.0, 0.0], dtype=torch.float64,
                                              device=p.device))
                    continue
                m, h = state["exp_avg"], state["hessian"]
                hd = h.double()
                parts.append(torch.stack([
                    torch.tensor(float(p.numel()), dtype=torch.float64, device=p.device),
                    (m.abs() < rho_bs * h).sum().double(),
                    hd.sum(), hd.square().sum(),
                    state["hessian_rejected"].double(),
                ]))
        if not parts:
            return torch.zeros(len(SophiaStatistics.SUMS), dtype=torch.float64)
        device = parts[0].device
        return torch.stack([t.to(device) for t in parts]).sum(0)

    def statistics(self) -> SophiaStatistics:
        """Clip fraction, win rate and Hessian statistics of this process's state."""
        return SophiaStatistics.from_sums(self.statistics_sums())

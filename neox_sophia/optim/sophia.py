"""Sophia (Liu, Li, Hall, Liang, Ma 2023, arXiv 2305.14342) as a torch optimizer.

Per coordinate, with the official code's learning-rate convention (docs/design.md; written out
plainly in neox_sophia/optim/reference.py):

    step():            p <- p * (1 - lr*wd)
                       m <- b1*m + (1-b1)*g
                       p <- p - lr * sign(m) * min(|m| / max(rho*bs*h, eps), 1)
    update_hessian():  h <- b2*h + (1-b2) * g*g        (g = gradient of the sampled-label loss)
    update_hessian(e): h <- b2*h + (1-b2) * e          (e = u*Hu, Hutchinson / Sophia-H)

Options beyond the paper, per param group, each off by default (the paper's rule, bit for bit):
    hessian_bias_correction   h enters as h / (1 - b2^n) after n refreshes (h starts at 0)
    hessian_floor             h enters as max(h, floor); the training loop sets the floor to
                              hessian_floor_ratio x the group's mean h (apply_hessian_floor)
    update = "adamw"          the group is updated by AdamW instead (a split optimizer: Sophia on
                              the hidden matrices, AdamW on embeddings, norms and biases)

The optimizer only ever sees tensors: whole parameters, tensor-parallel shards or ZeRO's flat
fp32 partitions. It knows nothing about process groups; the code that does (label sampling,
the training loop's Hessian step, checkpoint tools) lives elsewhere.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from neox_sophia.optim.kernels import hessian_ema, sophia_update

# Keys of per-parameter state, by the group's update rule. All are created on the first call of
# step() or update_hessian(): DeepSpeed ZeRO links optimizer state to its partitions lazily after
# the first step.
STATE_KEYS = {"sophia": ("step", "exp_avg", "hessian", "hessian_rejected"),
              "adamw": ("step", "exp_avg", "exp_avg_sq")}
UPDATE_RULES = tuple(STATE_KEYS)
GROUP_STATE_KEYS = ("hessian_updates", "hessian_floor")
"""Param-group entries the optimizer keeps as state, not hyperparameters: the number of Hessian
refreshes folded into the group (bias correction), and the floor the training loop derived from
the group's Hessian. A resume keeps them from the checkpoint; every other entry follows the
config."""


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
    _check("update", group["update"], group["update"] in UPDATE_RULES, f"update must be one of {UPDATE_RULES}")
    ratio = group["hessian_floor_ratio"]
    _check("hessian_floor_ratio", ratio, _is_finite_number(ratio) and ratio >= 0,
           "hessian_floor_ratio must be a finite number >= 0")
    _check("lr_scale", group["lr_scale"], _is_finite_number(group["lr_scale"]) and group["lr_scale"] > 0,
           "lr_scale must be > 0")


@dataclass(frozen=True)
class SophiaStatistics:
    """What to watch while training Sophia (see README: "What to watch").

    clip_frac: fraction of coordinates whose update is at the +-lr bound (|m| >= rho*bs*h, with
        h as the update sees it: bias-corrected and floored when those options are on).
    win_rate: 1 - clip_frac, the official code's name; its README advises 0.1-0.5.
    hessian_mean / hessian_rms: of the Hessian EMA h (as stored).
    hessian_zero_frac: fraction of coordinates whose h is exactly 0: no Hessian batch has
        touched them yet (e.g. embedding rows of tokens absent from every Hessian batch so far);
        the paper's rule moves them by lr*sign(m) every step while m decays.
    hessian_rejected: total coordinates whose Hessian update was non-finite and skipped.
    """

    numel: int
    clip_frac: float
    win_rate: float
    hessian_mean: float
    hessian_rms: float
    hessian_zero_frac: float
    hessian_rejected: int

    # Order of the raw sums returned by Sophia.statistics_sums(); all are sum-reducible.
    SUMS = ("numel", "unclipped", "hessian_sum", "hessian_sq_sum", "hessian_zero", "hessian_rejected")

    @classmethod
    def from_sums(cls, sums: Tensor) -> "SophiaStatistics":
        numel, unclipped, h_sum, h_sq, zero, rejected = sums.double().tolist()
        n = max(numel, 1.0)
        return cls(numel=int(numel), clip_frac=1.0 - unclipped / n, win_rate=unclipped / n,
                   hessian_mean=h_sum / n, hessian_rms=math.sqrt(h_sq / n), hessian_zero_frac=zero / n,
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
        eps: floor of the denominator rho*bs*h (AdamW groups: Adam's eps).
        hessian_bias_correction: divide h by (1 - b2^n) after n refreshes (beyond the paper).
        hessian_floor_ratio: floor h at this fraction of the group's mean h, as set by
            apply_hessian_floor (beyond the paper; 0: no floor).
        update: "sophia", or "adamw" for a group updated by AdamW (betas and eps are then
            Adam's; per group, for a split optimizer).
        lr_scale: a group's lr relative to the schedule's (the LR schedule multiplies by it).
        foreach: multi-tensor kernels (default on CPU and CUDA); False: one tensor at a time.
        maximize: maximize the objective instead of minimizing it.
        fused: single-pass compiled kernels (neox_sophia.optim.fused): True always, False
            never, None where they pay off (CUDA; large models on CPU). Same results either way.
    """

    def __init__(self, params, lr: float = 1e-4, betas: Tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, weight_decay: float = 0.1, *, bs: float = 5120,
                 eps: float = 1e-15, hessian_bias_correction: bool = False,
                 hessian_floor_ratio: float = 0.0, update: str = "sophia", lr_scale: float = 1.0,
                 foreach: Optional[bool] = None, maximize: bool = False, fused: Optional[bool] = None):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas,
                        rho=rho, weight_decay=weight_decay, bs=bs, eps=eps,
                        hessian_bias_correction=hessian_bias_correction,
                        hessian_floor_ratio=hessian_floor_ratio, update=update, lr_scale=lr_scale,
                        foreach=foreach, maximize=maximize, fused=fused)
        validate_hyperparameters(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group.get("betas"), list):
            param_group["betas"] = tuple(param_group["betas"])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("hessian_updates", 0)
        group.setdefault("hessian_floor", 0.0)
        validate_hyperparameters(group)

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every state tensor but `step` to the parameter's dtype; a count of
        # rejected coordinates must stay an exact fp32 count even for bf16 parameters.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        counters = {p: state_dict["state"][i]["hessian_rejected"]
                    for i, p in zip(saved_ids, params)
                    if "hessian_rejected" in state_dict["state"].get(i, {})}
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # entries a checkpoint of an older version lacks
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            group.setdefault("hessian_updates", 0)
            group.setdefault("hessian_floor", 0.0)
        for p, count in counters.items():
            self.state[p]["hessian_rejected"] = count.to(device=p.device, dtype=torch.float32)

    # ----------------------------------------------------------------------------- state
    def _state_for(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["update"] == "adamw":
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["hessian_rejected"] = torch.zeros((), dtype=torch.float32, device=p.device)
        return state

    def initialize_state(self) -> None:
        """Create every state tensor now (normally the first step does), e.g. to load into it."""
        for group in self.param_groups:
            for p in group["params"]:
                self._state_for(p, group)

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
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = self._params_with_grad(group)
            for (device, _), ps in self._by_device_and_dtype(params).items():
                states = [self._state_for(p, group) for p in ps]
                if group["update"] == "adamw":
                    self._adamw_step(group, ps, states, device)
                    continue
                torch._foreach_add_([s["step"] for s in states], 1.0)
                sophia_update(ps, [p.grad for p in ps], [s["exp_avg"] for s in states],
                              [s["hessian"] for s in states], lr=group["lr"], beta1=group["betas"][0],
                              rho=group["rho"], bs=group["bs"], eps=group["eps"],
                              weight_decay=group["weight_decay"], hessian_scale=self.hessian_scale(group),
                              hessian_floor=group["hessian_floor"], maximize=group["maximize"],
                              foreach=self._use_foreach(group, device), fused=group.get("fused"))
        return loss

    def _adamw_step(self, group: dict, params: List[Tensor], states: List[dict], device: torch.device) -> None:
        """torch's own AdamW (fused kernel where it has one) on a group with update = "adamw"."""
        from torch.optim.adamw import adamw

        fused = device.type in ("cpu", "cuda") and group["foreach"] is not False
        steps = [s["step"] for s in states]
        if fused and steps[0].device != device:  # the fused kernel wants its step counts on device
            for s in states:
                s["step"] = s["step"].to(device)
            steps = [s["step"] for s in states]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states],
              [s["exp_avg_sq"] for s in states], [], steps, foreach=None if fused else group["foreach"],
              fused=fused or None, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])

    @staticmethod
    def hessian_scale(group: dict) -> float:
        """1 / (1 - b2^n) after n refreshes with hessian_bias_correction, else 1 (also before the
        first refresh, when h is still 0)."""
        n = group["hessian_updates"]
        if not group["hessian_bias_correction"] or n == 0:
            return 1.0
        return 1.0 / (1.0 - group["betas"][1] ** n)

    def apply_hessian_floor(self, means: Optional[Dict[str, float]] = None) -> None:
        """Set each group's floor to its hessian_floor_ratio x the mean of its h.

        ``means``: group name -> mean h over the whole group (all ranks and shards together; the
        training loop all-reduces them); a group not named keeps floor 0. None: this process's
        own state (single process only). The floor is a group hyperparameter the update reads,
        so the update itself stays per coordinate.
        """
        if means is None:
            means = {}
            for name, sums in self.statistics_sums().items():
                numel, h_sum = float(sums[0]), float(sums[2])
                means[name] = h_sum / max(numel, 1.0)
        for i, group in enumerate(self.param_groups):
            mean = means.get(group_name(group, i))
            ratio = group["hessian_floor_ratio"]
            group["hessian_floor"] = ratio * mean if (mean is not None and ratio > 0) else 0.0

    @torch.no_grad()
    def update_hessian(self, estimates: Optional[Sequence[Optional[Tensor]]] = None,
                       square: bool = True) -> None:
        """Fold a Hessian-diagonal estimate into the EMA; parameters are never touched.

        Without ``estimates``: each parameter's current ``.grad`` is the estimate: squared
        (``square``, Sophia-G: the gradient of the sampled-label loss, g*g) or as it is
        (square=False: a gradient slot that already holds u*Hu, as the trainer's Sophia-H step
        delivers it through the engine). With ``estimates`` (Sophia-H, single process): one tensor
        (or None to skip) per parameter, in param_groups order, used as given (u*Hu).
        Non-finite coordinates are rejected, never folded in (SophiaStatistics.hessian_rejected).
        Groups updated by AdamW have no Hessian and are skipped. Each Sophia group counts its
        refreshes (``hessian_updates``, for the bias correction).
        """
        groups = self.param_groups
        if estimates is not None:
            per_group = self._split_estimates(estimates)
        for gi, group in enumerate(groups):
            if group["update"] != "sophia":
                continue
            if estimates is None:
                pairs = [(p, p.grad) for p in self._params_with_grad(group)]
            else:
                pairs = [(p, e) for p, e in zip(group["params"], per_group[gi]) if e is not None]
            beta2 = group["betas"][1]
            for _, ps in self._by_device_and_dtype([p for p, _ in pairs]).items():
                chosen = set(map(id, ps))
                es = [e for p, e in pairs if id(p) in chosen]
                states = [self._state_for(p, group) for p in ps]
                hessian_ema([s["hessian"] for s in states], es,
                            [s["hessian_rejected"] for s in states],
                            beta2=beta2, square=square and estimates is None, fused=group.get("fused"))
            group["hessian_updates"] += 1

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
    def statistics_sums(self) -> Dict[str, Tensor]:
        """Raw, sum-reducible statistics of the local state, per Sophia param group (by group
        name; AdamW groups have none): float64 tensors in SophiaStatistics.SUMS order.

        Computed only when called (for logging); a distributed caller all-reduces them and calls
        SophiaStatistics.from_sums. Parameters without state yet count as having m = h = 0. A
        coordinate is unclipped when |m| < rho*bs*max(scale*h, floor), the denominator the update
        uses (below eps, a coordinate always counts as clipped).
        """
        out: Dict[str, Tensor] = {}
        for i, group in enumerate(self.param_groups):
            if group["update"] != "sophia":
                continue
            coef = group["rho"] * group["bs"] * self.hessian_scale(group)
            floor = group["rho"] * group["bs"] * group["hessian_floor"]
            parts: List[Tensor] = []
            for p in group["params"]:
                state = self.state.get(p)
                if not state or "exp_avg" not in state:
                    parts.append(torch.tensor([p.numel(), 0.0, 0.0, 0.0, p.numel(), 0.0],
                                              dtype=torch.float64, device=p.device))
                    continue
                m, h = state["exp_avg"], state["hessian"]
                hd = h.double()
                denom = coef * h if floor <= 0 else torch.clamp_min(coef * h, floor)
                parts.append(torch.stack([
                    torch.tensor(float(p.numel()), dtype=torch.float64, device=p.device),
                    (m.abs() < denom).sum().double(),
                    hd.sum(), hd.square().sum(), (h == 0).sum().double(),
                    state["hessian_rejected"].double(),
                ]))
            if parts:
                device = parts[0].device
                out[group_name(group, i)] = torch.stack([t.to(device) for t in parts]).sum(0)
        return out

    def statistics(self) -> SophiaStatistics:
        """Clip fraction, win rate and Hessian statistics of this process's whole state."""
        sums = list(self.statistics_sums().values())
        total = torch.stack(sums).sum(0) if sums else torch.zeros(len(SophiaStatistics.SUMS), dtype=torch.float64)
        return SophiaStatistics.from_sums(total)


def group_name(group: dict, index: int) -> str:
    """A param group's name: its "name" entry (the trainer names groups by role), else its index."""
    return group.get("name") or f"group{index}"

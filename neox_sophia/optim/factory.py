"""Optimizers by the YAML ``optimizer.type``: a registry of typed parameter sections, so Sophia
and its AdamW baseline go through the same machinery and a comparison differs only in this block.

    "optimizer": {"type": "sophia", "params": {"lr": 6.0e-4, "rho": 0.05, "hessian_interval": 10}}
    "optimizer": {"type": "adamw",  "params": {"lr": 6.0e-4, "betas": [0.9, 0.95]}}

Each type's ``params`` is a dataclass (SophiaParams, AdamWParams): one table of defaults with a
docstring per field, coerced and validated once when the config is loaded (every command, `plan`
and `launch --dry-run` included, accepts exactly what `train` accepts), read by attribute.
"adam" is GPT-NeoX's name for the same decoupled-weight-decay Adam (its FusedAdam runs in AdamW
mode), so upstream NeoX configs get exactly the AdamW baseline. Weight decay is the top-level
``weight_decay`` key (NeoX), applied per parameter role (neox_sophia.optim.groups).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from neox_sophia.config.base import ConfigError, build_section
from neox_sophia.optim.groups import ROLES, unknown_roles
from neox_sophia.optim.hessian import ESTIMATORS


def _bad(key: str, value, need: str) -> ConfigError:
    return ConfigError(f"optimizer.params.{key}: {need} (got {value!r})", "optimizer")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_betas(key: str, betas) -> None:
    if len(betas) != 2 or not all(_finite(b) and 0 <= b < 1 for b in betas):
        raise _bad(key, betas, "must be two numbers in [0, 1)")


def _check_positive(key: str, value, allow_zero: bool = False) -> None:
    if not (_finite(value) and (value >= 0 if allow_zero else value > 0)):
        raise _bad(key, value, "must be a finite number " + (">= 0" if allow_zero else "> 0"))


@dataclass
class SophiaParams:
    """optimizer.params of type sophia: Sophia-G (or -H) with the official code's lr convention."""

    lr: float = 1e-4
    """Peak learning rate: the largest step any coordinate takes (rho and bs scale the Hessian)."""
    betas: List[float] = field(default_factory=lambda: [0.965, 0.99])
    """(beta1, beta2): EMA factors of the gradient and of the Hessian diagonal (paper: 0.965, 0.99)."""
    rho: float = 0.04
    """Clipping threshold: a coordinate moves lr * |m| / (rho*bs*h), at most lr. Sophia-H: rho is
    the paper's gamma (bs = 1); levanter's default gamma for Sophia-H is 0.01."""
    eps: float = 1e-15
    """Floor of the denominator rho*bs*h."""
    hessian_interval: int = 10
    """k: steps between Hessian refreshes (on steps where step % k == k-1)."""
    estimator: str = "gnb"
    """Hessian-diagonal estimator: "gnb" (Gauss-Newton-Bartlett, Sophia-G) or "hutchinson"
    (u * Hu, Sophia-H: the training loss's own Hessian on the Hessian batch, true labels; the
    plain engine in fp32 only)."""
    hutchinson_fd_eps: float = 1e-4
    """Sophia-H: the step e of the central difference H u ~ (g(theta + e*u) - g(theta - e*u)) / (2e),
    u = +-1 per coordinate. Measured in fp32 against an exact double backward on GPT-NeoX models of
    width 64 and 256: relative error ~1e-4 at e = 1e-4, the optimum of both; a larger e adds
    third-derivative error (~e^2, growing with the width), a smaller one fp32 rounding (~1/e)."""
    hessian_batch_size: Optional[int] = None
    """Sequences in the global Hessian batch (default: half a training batch, as the paper)."""
    bs: Optional[int] = None
    """Tokens behind one Hessian estimate (the paper's B); default: the Hessian batch's tokens.
    Sophia-H estimates the Hessian diagonal of the mean loss itself, with no batch factor: its bs
    is 1 and cannot be set."""
    hessian_bias_correction: bool = False
    """(beyond the paper) Divide h by 1 - beta2^n after n refreshes, as Adam corrects its moments:
    without it h holds (1 - beta2^n) of its level, so early steps are clipped more."""
    hessian_floor: float = 0.0
    """(beyond the paper) Floor h at this fraction of its parameter group's mean h (per role, over
    the whole model), so that coordinates no Hessian batch has touched (h = 0) step in proportion
    to |m| instead of by lr*sign(m). Applies to the matrix roles (embedding, output, attention,
    mlp); 0: off."""
    adamw_groups: List[str] = field(default_factory=list)
    """(beyond the paper) Parameter roles updated by AdamW instead of Sophia, e.g. [embedding,
    output, norms_biases]: a split optimizer, Sophia on the hidden matrices only. Roles:
    embedding, output, attention, mlp, norms_biases (neox_sophia.optim.groups)."""
    adamw_lr: Optional[float] = None
    """Peak lr of the AdamW groups (default: lr); it follows the same schedule, scaled."""
    adamw_betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    """(beta1, beta2) of the AdamW groups."""
    adamw_eps: float = 1e-8
    """eps of the AdamW groups."""
    fused: Optional[bool] = None
    """Single-pass compiled kernels for the step and the Hessian EMA (neox_sophia.optim.fused):
    true, false, or null (default: on CUDA, and on CPU for 16M+ parameters). Same results either
    way; see docs/performance.md."""

    def validate(self) -> None:
        _check_positive("lr", self.lr)
        _check_betas("betas", self.betas)
        _check_positive("rho", self.rho)
        _check_positive("eps", self.eps)
        if self.hessian_interval < 1:
            raise _bad("hessian_interval", self.hessian_interval, "must be >= 1 (k: steps between Hessian refreshes)")
        if self.estimator not in ESTIMATORS:
            raise _bad("estimator", self.estimator, f"must be one of {sorted(ESTIMATORS)}")
        for key in ("bs", "hessian_batch_size"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise _bad(key, getattr(self, key), "must be positive")
        if self.bs is not None and not ESTIMATORS[self.estimator].batch_factor:
            raise _bad("bs", self.bs, f"estimator {self.estimator} estimates the Hessian diagonal of the mean "
                                      f"loss itself, with no batch factor (bs is 1; rho is the paper's gamma): "
                                      f"remove bs")
        _check_positive("hutchinson_fd_eps", self.hutchinson_fd_eps)
        _check_positive("hessian_floor", self.hessian_floor, allow_zero=True)
        if unknown_roles(self.adamw_groups):
            raise _bad("adamw_groups", self.adamw_groups, f"roles are {list(ROLES)}")
        if self.adamw_lr is not None:
            _check_positive("adamw_lr", self.adamw_lr)
        _check_betas("adamw_betas", self.adamw_betas)
        _check_positive("adamw_eps", self.adamw_eps)

    def group_overrides(self) -> Dict[str, dict]:
        """Per-role param-group entries: the AdamW groups of a split optimizer."""
        scale = (self.adamw_lr or self.lr) / self.lr
        adamw = {"update": "adamw", "betas": tuple(self.adamw_betas), "eps": self.adamw_eps, "lr_scale": scale}
        return {role: dict(adamw) for role in self.adamw_groups}

    def check_engine(self, *, pipeline: bool, precision: str) -> None:
        """Raise ConfigError if the trainer cannot run this estimator on the engine (the
        PipelineEngine when ``pipeline``) in ``precision``."""
        estimator, name = ESTIMATORS[self.estimator], self.estimator
        if pipeline and not estimator.pipeline:
            raise ConfigError(f"optimizer.params.estimator: {name} runs on the plain engine only, not under the "
                              f"PipelineEngine (pipe_parallel_size >= 1); set pipe_parallel_size to 0 (tensor and "
                              f"data parallelism and ZeRO-1/2 work with it), or use estimator gnb", "optimizer")
        if precision not in estimator.precisions:
            needed = " or ".join(estimator.precisions)
            raise ConfigError(f"optimizer.params.estimator: {name} needs precision {needed}, not {precision} (its "
                              f"finite-difference Hessian-vector product would drown in the rounding); set precision "
                              f"to fp32, or use estimator gnb", "optimizer")

    def resolved_bs(self, hessian_tokens: Callable[[], Optional[int]]) -> Optional[int]:
        """The update's bs: optimizer.params.bs, else the tokens of the Hessian batch
        (``hessian_tokens()``) for an estimator whose estimate lacks that factor (GNB), else 1."""
        if self.bs is not None:
            return self.bs
        return hessian_tokens() if ESTIMATORS[self.estimator].batch_factor else 1

    def build(self, groups: List[dict], bs: Optional[int]) -> torch.optim.Optimizer:
        from neox_sophia.optim.sophia import Sophia

        bs = self.resolved_bs(lambda: bs)
        if bs is None:
            raise ConfigError("optimizer.params.bs: tokens per Hessian batch is derived by the trainer; "
                              "pass it to build_optimizer or set it", "optimizer")
        return Sophia(groups, lr=self.lr, betas=tuple(self.betas), rho=self.rho, eps=self.eps, bs=bs,
                      hessian_bias_correction=self.hessian_bias_correction,
                      hessian_floor_ratio=self.hessian_floor, fused=self.fused)


@dataclass
class AdamWParams:
    """optimizer.params of type adamw (or NeoX's adam): torch's AdamW, decoupled weight decay."""

    lr: float = 1e-3
    """Peak learning rate."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    """(beta1, beta2)."""
    eps: float = 1e-8
    """Denominator epsilon."""

    def validate(self) -> None:
        _check_positive("lr", self.lr)
        _check_betas("betas", self.betas)
        _check_positive("eps", self.eps, allow_zero=True)

    def group_overrides(self) -> Dict[str, dict]:
        return {}

    def check_engine(self, *, pipeline: bool, precision: str) -> None:
        """AdamW runs on every engine in every precision."""

    def build(self, groups: List[dict], bs: Optional[int]) -> torch.optim.Optimizer:
        fused = torch.cuda.is_available() and all(t.is_cuda for g in groups for t in g["params"])
        return torch.optim.AdamW(groups, lr=self.lr, betas=tuple(self.betas), eps=self.eps,
                                 fused=fused or None, foreach=None if fused else True)


OPTIMIZERS: Dict[str, type] = {"sophia": SophiaParams, "adamw": AdamWParams}
ALIASES = {"adam": "adamw"}

# NeoX's default when a config has no optimizer block (neox_args.py).
NEOX_DEFAULT_OPTIMIZER = {"type": "adam", "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8}}


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(sorted(choices))}"


def parse_optimizer_block(block: Optional[dict]) -> Tuple[str, object]:
    """(registry name, its typed params, validated) from the YAML ``optimizer`` block."""
    block = NEOX_DEFAULT_OPTIMIZER if block is None else block
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise ConfigError('optimizer: expected {"type": NAME, "params": {...}}', "optimizer")
    extra = set(block) - {"type", "params"}
    if extra:
        raise ConfigError(f"optimizer: unexpected entries {sorted(extra)}; only type and params", "optimizer")
    name = block["type"].lower()
    name = ALIASES.get(name, name)
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.type: '{block['type']}' is not implemented"
                          f"{_suggest(name, list(OPTIMIZERS) + list(ALIASES))}", "optimizer")
    cls = OPTIMIZERS[name]
    given = block.get("params") or {}
    if not isinstance(given, dict):
        raise ConfigError("optimizer.params: expected a mapping", "optimizer")
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in given:
        if key not in fields:
            hint = ("; weight decay is the top-level key weight_decay" if key == "weight_decay"
                    else _suggest(key, fields))
            raise ConfigError(f"optimizer.params.{key}: not a parameter of {name}{hint}", "optimizer")
    try:
        params = build_section(cls, given)
    except ConfigError as e:
        raise ConfigError(f"optimizer.params.{e}", "optimizer") from None
    params.validate()
    return name, params


def accepted_parameters(name: str) -> Dict[str, object]:
    """Every entry optimizer.params of type ``name`` accepts, with its default."""
    cls = OPTIMIZERS[ALIASES.get(name, name)]
    return {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}


def build_optimizer(block: Optional[dict], groups: List[dict], *, bs: Optional[int] = None) -> torch.optim.Optimizer:
    """The optimizer named by ``block`` over ``groups``; ``bs`` is Sophia's tokens per Hessian
    batch when the block does not set it."""
    _, params = parse_optimizer_block(block)
    return params.build(groups, bs)


__all__ = ["SophiaParams", "AdamWParams", "OPTIMIZERS", "ALIASES", "parse_optimizer_block", "build_optimizer",
           "accepted_parameters"]

"""Optimizers by the YAML ``optimizer.type``: a registry, so Sophia and its AdamW baseline go
through the same machinery and a comparison differs only in this block.

    "optimizer": {"type": "sophia", "params": {"lr": 6.0e-4, "rho": 0.05, "hessian_interval": 10}}
    "optimizer": {"type": "adamw",  "params": {"lr": 6.0e-4, "betas": [0.9, 0.95]}}

"adam" is GPT-NeoX's name for the same decoupled-weight-decay Adam (its FusedAdam runs in AdamW
mode), so upstream NeoX configs get exactly the AdamW baseline. Weight decay is the top-level
``weight_decay`` key (NeoX), applied to weights but not to biases and norms.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from neox_sophia.config.base import ConfigError, coerce


@dataclass(frozen=True)
class OptimizerSpec:
    defaults: Dict[str, Any]
    """Every accepted entry of optimizer.params with its default (None: derived at build time)."""
    build: Callable[[List[dict], Dict[str, Any]], torch.optim.Optimizer]
    """(param groups with their weight_decay, params) -> optimizer."""
    hessian_interval_key: Optional[str] = None
    """The params entry giving the Hessian refresh interval k (second-order optimizers)."""


def _build_sophia(groups: List[dict], p: Dict[str, Any]) -> torch.optim.Optimizer:
    from neox_sophia.optim.sophia import Sophia

    if p["bs"] is None:
        raise ConfigError("optimizer.params.bs: tokens per Hessian batch is derived by the trainer; "
                          "pass it to build_optimizer or set it")
    return Sophia(groups, lr=p["lr"], betas=tuple(p["betas"]), rho=p["rho"], eps=p["eps"], bs=p["bs"],
                  fused=p["fused"])


def _build_adamw(groups: List[dict], p: Dict[str, Any]) -> torch.optim.Optimizer:
    fused = torch.cuda.is_available() and all(t.is_cuda for g in groups for t in g["params"])
    return torch.optim.AdamW(groups, lr=p["lr"], betas=tuple(p["betas"]), eps=p["eps"],
                             fused=fused or None, foreach=None if fused else True)


OPTIMIZERS: Dict[str, OptimizerSpec] = {
    "sophia": OptimizerSpec(
        defaults={"lr": 1e-4, "betas": [0.965, 0.99], "rho": 0.04, "eps": 1e-15, "hessian_interval": 10,
                  "estimator": "gnb", "hessian_batch_size": None, "bs": None, "fused": None},
        build=_build_sophia, hessian_interval_key="hessian_interval"),
    "adamw": OptimizerSpec(defaults={"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8}, build=_build_adamw),
}
ALIASES = {"adam": "adamw"}

# NeoX's default when a config has no optimizer block (neox_args.py).
NEOX_DEFAULT_OPTIMIZER = {"type": "adam", "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8}}

_PARAM_TYPES = {"lr": float, "rho": float, "eps": float, "hessian_interval": int, "estimator": str,
                "hessian_batch_size": int, "bs": int, "betas": list, "fused": bool}


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(sorted(choices))}"


def parse_optimizer_block(block: Optional[dict]) -> Tuple[str, Dict[str, Any]]:
    """(registry name, params with defaults filled) from the YAML ``optimizer`` block."""
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
    spec = OPTIMIZERS[name]
    given = block.get("params") or {}
    if not isinstance(given, dict):
        raise ConfigError("optimizer.params: expected a mapping", "optimizer")
    params = dict(spec.defaults)
    for key, value in given.items():
        if key not in spec.defaults:
            hint = ("; weight decay is the top-level key weight_decay" if key == "weight_decay"
                    else _suggest(key, spec.defaults))
            raise ConfigError(f"optimizer.params.{key}: not a parameter of {name}{hint}", "optimizer")
        params[key] = coerce(f"optimizer.params.{key}", value, _PARAM_TYPES[key])
    _validate_params(name, params)
    return name, params


def _validate_params(name: str, p: Dict[str, Any]) -> None:
    def bad(key: str, need: str) -> ConfigError:
        return ConfigError(f"optimizer.params.{key}: {need} (got {p[key]!r})", "optimizer")

    if not p["lr"] > 0:
        raise bad("lr", "must be positive")
    betas = p["betas"]
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise bad("betas", "must be two numbers in [0, 1)")
    if not p["eps"] >= 0:
        raise bad("eps", "must be >= 0")
    if name == "sophia":
        from neox_sophia.optim.hessian import ESTIMATORS

        if not p["rho"] > 0:
            raise bad("rho", "must be positive")
        if not p["hessian_interval"] >= 1:
            raise bad("hessian_interval", "must be >= 1 (k: steps between Hessian refreshes)")
        if p["estimator"] not in ESTIMATORS:
            raise bad("estimator", f"must be one of {sorted(ESTIMATORS)}")
        for key in ("bs", "hessian_batch_size"):
            if p[key] is not None and not p[key] > 0:
                raise bad(key, "must be positive")


def weight_decay_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """NeoX's split: biases and norm parameters get no weight decay, everything else does."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_norm = isinstance(module, (nn.LayerNorm,)) or "norm" in type(module).__name__.lower()
            (no_decay if is_norm or name == "bias" else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "weight_decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_weight_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(block: Optional[dict], groups: List[dict], *, bs: Optional[int] = None) -> torch.optim.Optimizer:
    """The optimizer named by ``block`` over ``groups``; ``bs`` is Sophia's tokens per Hessian
    batch when the block does not set it."""
    name, params = parse_optimizer_block(block)
    if "bs" in params and params["bs"] is None:
        params["bs"] = bs
    return OPTIMIZERS[name].build(groups, params)

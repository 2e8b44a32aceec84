"""`neox-sophia inspect`: what a checkpoint holds, without a model or a GPU.

    summary = summarize("runs/x/checkpoints")          # a `save` dir (latest complete step) ...
    summary = summarize("runs/x/universal")            # ... or a universal checkpoint
    print(render(summary))

The summary (a JSON-able dict): where it came from (layout, step, tag), the config essentials
(model shape, optimizer type and parameters, schedule), one row per parameter (name, shape,
dtype, numel), the optimizer state per state key (global norm, min, max, mean), the Hessian EMA
(fraction of exact zeros, mean, rms, quantiles) and Sophia's clip fraction computed from the saved
state as SophiaStatistics defines it (a coordinate is clipped when |exp_avg| >= rho*bs*hessian;
win_rate = 1 - clip_frac, the official code's health signal, advised between 0.1 and 0.5), plus
the run's count of skipped non-finite steps.

A universal checkpoint's parameter table comes from its safetensors headers, and its statistics
are computed one parameter at a time; a `save` directory is read whole (neox_sophia.convert.reader).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from neox_sophia.training.checkpoint import CheckpointError, is_universal

QUANTILES = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
EXACT_QUANTILE_LIMIT = 1 << 24  # torch.quantile's largest input
SAMPLE = 1 << 22  # values sampled (evenly strided) for quantiles beyond that


class _Moments:
    def __init__(self):
        self.numel, self.total, self.squares = 0, 0.0, 0.0
        self.min, self.max = math.inf, -math.inf

    def add(self, t: torch.Tensor) -> None:
        if t.numel() == 0:
            return
        d = t.detach().double()
        self.numel += t.numel()
        self.total += float(d.sum())
        self.squares += float(d.square().sum())
        self.min = min(self.min, float(t.min()))
        self.max = max(self.max, float(t.max()))

    def result(self) -> Dict[str, Any]:
        n = max(self.numel, 1)
        return {"numel": self.numel, "norm": math.sqrt(self.squares), "min": self.min if self.numel else None,
                "max": self.max if self.numel else None, "mean": self.total / n, "rms": math.sqrt(self.squares / n)}


def _sophia_constants(cfg, layout: Dict[str, Any]) -> Tuple[Optional[float], Optional[int]]:
    """(rho, bs) as the trainer built Sophia (SophiaParams.resolved_bs): optimizer.params.bs, else
    the tokens of the global Hessian batch at the run's world size (NeoXConfig.hessian_tokens) for
    Sophia-G, 1 for Sophia-H."""
    from neox_sophia.config import ConfigError

    if cfg.optimizer.type != "sophia":
        return None, None

    def hessian_tokens() -> Optional[int]:
        world = layout.get("world_size")
        if world is None and all(k in layout for k in ("tp", "dp")):
            world = layout["tp"] * max(layout.get("pp", 0), 1) * layout["dp"]
        try:
            return cfg.hessian_tokens(world)
        except ConfigError:
            return None

    params = cfg.optimizer.params
    return params.rho, params.resolved_bs(hessian_tokens)


def _essentials(cfg, padded_vocab: Optional[int], parameters: int) -> Dict[str, Any]:
    m, t = cfg.model, cfg.training
    return {
        "model": {"num_layers": m.num_layers, "hidden_size": m.hidden_size,
                  "num_attention_heads": m.num_attention_heads,
                  "ffn_hidden_size": m.ffn_hidden_size, "seq_length": m.seq_length,
                  "max_position_embeddings": m.max_position_embeddings, "padded_vocab_size": padded_vocab,
                  "no_weight_tying": m.no_weight_tying, "gpt_j_residual": m.gpt_j_residual,
                  "rotary_pct": m.rotary_pct, "norm": m.norm, "activation": m.activation, "kv_heads": m.kv_heads,
                  "parameters": parameters},
        "optimizer": {"type": cfg.optimizer.type, "params": dataclasses.asdict(cfg.optimizer.params),
                      "weight_decay": cfg.optimizer.weight_decay},
        "schedule": {"train_iters": t.train_iters, "lr_decay_iters": t.decay_iters, "lr_decay_style": t.lr_decay_style,
                     "warmup": t.warmup, "min_lr": t.min_lr},
    }


def _quantiles(samples: List[torch.Tensor], total: int) -> Tuple[Dict[str, float], bool]:
    if not samples or total == 0:
        return {}, True
    values = torch.cat([s.reshape(-1).float() for s in samples])
    q = torch.quantile(values, torch.tensor(QUANTILES, dtype=torch.float32))
    return {f"{p:g}": float(v) for p, v in zip(QUANTILES, q)}, total <= EXACT_QUANTILE_LIMIT


def _as_the_update_sees_it(saved_groups: List[Dict[str, Any]]) -> Dict[str, Tuple[float, float]]:
    """Group name -> (scale, floor) of h in the update (bias correction, floor; 1 and 0 unless
    those options were on), from the saved param groups."""
    from neox_sophia.optim.sophia import Sophia

    out = {}
    for group in saved_groups:
        try:
            out[group.get("name")] = (Sophia.hessian_scale(group), float(group.get("hessian_floor", 0.0)))
        except (KeyError, TypeError, IndexError):  # a checkpoint from before these options
            out[group.get("name")] = (1.0, 0.0)
    return out


def _statistics(entries: Iterator[Tuple[str, Dict[str, torch.Tensor]]], total_hessian: int,
                rho: Optional[float], bs: Optional[int],
                saved_groups: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Optimizer-state statistics from (name, {state key: full tensor}) one parameter at a time,
    in all and per parameter role (neox_sophia.optim.groups)."""
    from neox_sophia.optim.groups import role_of

    moments: Dict[str, _Moments] = {}
    zeros = clipped = counted = 0
    roles: Dict[str, Dict[str, float]] = {}
    update = _as_the_update_sees_it(saved_groups or [])
    samples: List[torch.Tensor] = []
    stride = 1 if total_hessian <= EXACT_QUANTILE_LIMIT else -(-total_hessian // SAMPLE)
    for name, entry in entries:
        for key, value in entry.items():
            moments.setdefault(key, _Moments()).add(value)
        h = entry.get("hessian")
        if h is None:
            continue
        zeros += int((h == 0).sum())
        samples.append(h.reshape(-1)[::stride].clone())
        role = role_of(name)
        r = roles.setdefault(role, {"numel": 0, "zeros": 0, "sum": 0.0, "squares": 0.0, "unclipped": 0})
        hd = h.double()
        r["numel"] += h.numel()
        r["zeros"] += int((h == 0).sum())
        r["sum"] += float(hd.sum())
        r["squares"] += float(hd.square().sum())
        m = entry.get("exp_avg")
        if m is not None and rho is not None and bs is not None:
            scale, floor = update.get(role, (1.0, 0.0))
            denom = torch.clamp_min(rho * bs * scale * h, rho * bs * floor)  # as Sophia.statistics_sums
            unclipped = int((m.abs() < denom).sum())
            r["unclipped"] += unclipped
            clipped += int(m.numel() - unclipped)
            counted += m.numel()
    out: Dict[str, Any] = {"state": {key: mom.result() for key, mom in moments.items()}}
    if roles:
        out["groups"] = {role: {"numel": r["numel"], "hessian_zero_frac": r["zeros"] / max(r["numel"], 1),
                                "hessian_mean": r["sum"] / max(r["numel"], 1),
                                "hessian_rms": math.sqrt(r["squares"] / max(r["numel"], 1)),
                                **({"win_rate": r["unclipped"] / max(r["numel"], 1),
                                    "clip_frac": 1 - r["unclipped"] / max(r["numel"], 1)} if counted else {})}
                         for role, r in roles.items()}
    if "hessian" in moments:
        n = moments["hessian"].numel
        quantiles, exact = _quantiles(samples, n)
        out["hessian"] = {"numel": n, "zero_fraction": zeros / max(n, 1), "mean": moments["hessian"].result()["mean"],
                          "rms": moments["hessian"].result()["rms"], "quantiles": quantiles,
                          "quantiles_exact": exact}
    if counted:
        out["sophia"] = {"rho": rho, "bs": bs, "clip_frac": clipped / counted, "win_rate": 1 - clipped / counted,
                         "numel": counted}
    elif rho is not None:
        out["sophia"] = {"rho": rho, "bs": bs, "clip_frac": None, "win_rate": None, "numel": 0}
    return out


def _summarize_save_dir(path: str, step: Optional[int], statistics: bool) -> Dict[str, Any]:
    from neox_sophia.convert.reader import neox_config, read_checkpoint

    ckpt = read_checkpoint(path, step=step, optimizer_state=statistics)
    where = os.path.join(path, ckpt.tag, "config.yml")
    cfg = neox_config(ckpt.config, where)
    tensors = [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "numel": t.numel()}
               for n, t in ckpt.weights.items()]
    embed = ckpt.weights.get("embed_in.weight")
    summary = {"path": os.path.abspath(path), "kind": "checkpoint", "tag": ckpt.tag, "step": ckpt.step,
               "layout": ckpt.layout, "client_state": ckpt.client_state,
               "nonfinite_steps": ckpt.client_state.get("nonfinite_steps"), "saved_param_groups": ckpt.param_groups,
               **_essentials(cfg, embed.shape[0] if embed is not None else None, sum(r["numel"] for r in tensors)),
               "tensors": tensors}
    if statistics:
        rho, bs = _sophia_constants(cfg, ckpt.layout)
        total = sum(e["hessian"].numel() for e in ckpt.optimizer.values() if "hessian" in e)
        summary.update(_statistics(iter(ckpt.optimizer.items()), total, rho, bs, ckpt.param_groups))
    return summary


def _summarize_universal(path: str, statistics: bool) -> Dict[str, Any]:
    from safetensors import safe_open

    from neox_sophia.convert.reader import neox_config
    from neox_sophia.convert.universal import (AGAIN, CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE, SEP, read_config,
                                               read_meta)

    meta = read_meta(path)
    cfg = neox_config(read_config(path), os.path.join(path, CONFIG_FILE))
    tensors = []
    try:
        with safe_open(os.path.join(path, MODEL_FILE), framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                shape = list(piece.get_shape())
                tensors.append({"name": name, "shape": shape, "dtype": {"F32": "float32", "BF16": "bfloat16",
                                                                        "F16": "float16"}.get(piece.get_dtype(),
                                                                                              piece.get_dtype()),
                                "numel": math.prod(shape)})
    except Exception as e:
        raise CheckpointError(f"{os.path.join(path, MODEL_FILE)}: could not be read ({type(e).__name__}: {e}); "
                              f"{AGAIN}") from e
    order = {name: i for i, name in enumerate(meta.get("parameters") or [])}
    tensors.sort(key=lambda r: (order.get(r["name"], len(order)), r["name"]))
    client = meta.get("client_state") or {}
    summary = {"path": os.path.abspath(path), "kind": "universal", "tag": meta.get("tag"), "step": meta["step"],
               "layout": meta.get("source_layout") or {}, "client_state": client,
               "nonfinite_steps": client.get("nonfinite_steps"),
               "saved_param_groups": (meta.get("optimizer") or {}).get("param_groups") or [],
               **_essentials(cfg, meta.get("padded_vocab_size"), sum(r["numel"] for r in tensors)),
               "tensors": tensors}
    if statistics:
        rho, bs = _sophia_constants(cfg, summary["layout"])
        file = os.path.join(path, OPTIMIZER_FILE)
        with safe_open(file, framework="pt") as f:
            keys: Dict[str, List[str]] = {}
            for key in f.keys():
                name, _, state_key = key.rpartition(SEP)
                keys.setdefault(name, []).append(state_key)
            total = sum(math.prod(f.get_slice(f"{n}{SEP}hessian").get_shape()) for n, ks in keys.items()
                        if "hessian" in ks)

            def entries():  # in model order, as for a `save` directory (the same sums, bit for bit)
                for name in sorted(keys, key=lambda n: (order.get(n, len(order)), n)):
                    state_keys = keys[name]
                    yield name, {k: f.get_tensor(f"{name}{SEP}{k}") for k in state_keys}

            summary.update(_statistics(entries(), total, rho, bs, summary["saved_param_groups"]))
    return summary


def summarize(path: str, step: Optional[int] = None, statistics: bool = True) -> Dict[str, Any]:
    """Summary of a `save` directory (checkpoint ``step``, default the latest complete one) or a
    universal checkpoint; statistics=False skips the optimizer state."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory; pass a `save` directory or a universal checkpoint")
    if is_universal(path):
        return _summarize_universal(path, statistics)
    return _summarize_save_dir(path, step, statistics)


# ------------------------------------------------------------------------------------ rendering
def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def render(summary: Dict[str, Any]) -> str:
    """The summary as text for a terminal."""
    s, lines = summary, []
    lay = s.get("layout") or {}
    lines.append(f"{s['kind']} {s['path']}  (tag {s.get('tag')}, step {s['step']})")
    if lay:
        lines.append("layout: " + ", ".join(f"{k} {v}" for k, v in lay.items()))
    m = s["model"]
    heads = m["num_attention_heads"]
    kv = f" ({m['kv_heads']} key/value)" if m.get("kv_heads", heads) != heads else ""
    lines.append(f"model: {m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_attention_heads']} heads{kv}, "
                 f"{m.get('norm', 'layernorm')}, {m.get('activation', 'gelu')}, ffn {m['ffn_hidden_size']}, "
                 f"seq {m['seq_length']}, vocab {m['padded_vocab_size']} (padded), "
                 f"{'untied' if m['no_weight_tying'] else 'tied'} embeddings, {m['parameters']:,} parameters")
    o = s["optimizer"]
    lines.append(f"optimizer: {o['type']} " + ", ".join(f"{k}={v}" for k, v in o["params"].items())
                 + f", weight_decay={o['weight_decay']}")
    groups = s.get("saved_param_groups") or []
    if groups:
        lines.append("saved lr: " + ", ".join(f"{g.get('name', i)} {_num(g.get('lr'))}" for i, g in enumerate(groups)))
    sched = s["schedule"]
    lines.append("schedule: " + ", ".join(f"{k} {v}" for k, v in sched.items()))
    lines.append(f"client state: {s.get('client_state')}  (non-finite steps skipped: {_num(s.get('nonfinite_steps'))})")
    lines.append("")
    width = max([len(r["name"]) for r in s["tensors"]] + [4])
    lines.append(f"{'name':<{width}}  {'shape':<16} {'dtype':<9} {'numel':>12}")
    for r in s["tensors"]:
        lines.append(f"{r['name']:<{width}}  {str(r['shape']):<16} {r['dtype']:<9} {r['numel']:>12,}")
    if "state" in s:
        lines.append("")
        lines.append(f"{'state':<12} {'numel':>12} {'norm':>11} {'min':>11} {'max':>11} {'mean':>11}")
        for key, st in s["state"].items():
            lines.append(f"{key:<12} {st['numel']:>12,} {_num(st['norm']):>11} {_num(st['min']):>11} "
                         f"{_num(st['max']):>11} {_num(st['mean']):>11}")
    h = s.get("hessian")
    if h:
        lines.append("")
        lines.append(f"hessian: {h['zero_fraction']:.2%} zeros, mean {_num(h['mean'])}, rms {_num(h['rms'])}; "
                     f"quantiles{'' if h['quantiles_exact'] else ' (sampled)'}: "
                     + ", ".join(f"q{k} {_num(v)}" for k, v in h["quantiles"].items()))
    so = s.get("sophia")
    if so:
        if so["clip_frac"] is None:
            lines.append(f"sophia: rho {so['rho']}, bs {so['bs']}; no saved state to compute the clip fraction from")
        else:
            lines.append(f"sophia: rho {so['rho']}, bs {so['bs']}: clip_frac {so['clip_frac']:.4f}, win_rate "
                         f"{so['win_rate']:.4f} (advised 0.1-0.5; with h = 0 before the first refresh every "
                         f"coordinate clips)")
    groups = s.get("groups")
    if groups:
        lines.append("")
        lines.append(f"{'role':<13} {'numel':>12} {'win_rate':>9} {'h mean':>11} {'h rms':>11} {'h == 0':>8}")
        for role, g in groups.items():
            lines.append(f"{role:<13} {g['numel']:>12,} {_num(g.get('win_rate')):>9} {_num(g['hessian_mean']):>11} "
                         f"{_num(g['hessian_rms']):>11} {g['hessian_zero_frac']:>8.2%}")
    return "\n".join(lines)


__all__ = ["summarize", "render", "QUANTILES"]

"""Arithmetic on the benchmark's curves and grids (pure: no torch, unit-tested on synthetic data).

A curve is a dict of equal-length lists: step, seconds (training seconds), val_loss (None where
not finite). A grid point is a dict with at least lr (rho for Sophia), curve and diverged.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

GROUP_STATISTICS = ("win_rate", "clip_frac", "hessian_mean", "hessian_rms", "hessian_zero_frac", "hessian_floor")
"""Per-group statistics of a train record's "groups" entry (the trainer's metrics.jsonl)."""


def first_step_reaching(steps: Sequence[int], losses: Sequence[float], target: float) -> Optional[int]:
    """Index of the first evaluation whose loss is <= target, or None if none is."""
    for i, loss in enumerate(losses):
        if loss is not None and math.isfinite(loss) and loss <= target:
            return i
    return None


def steps_to_reach_ratio(reference: Dict[str, list], candidate: Dict[str, list]) -> Dict[str, Optional[float]]:
    """How soon `candidate` reaches `reference`'s final validation loss, as fractions of the
    reference run: steps (first eval step at which candidate's loss <= reference's final loss,
    over the reference's last step) and seconds (the same in training seconds). None where the
    candidate never reaches it."""
    target = reference["val_loss"][-1]
    finite = target is not None and math.isfinite(target)
    i = first_step_reaching(candidate["step"], candidate["val_loss"], target) if finite else None
    if i is None:
        return {"target_val_loss": target, "step": None, "steps_ratio": None, "seconds": None, "seconds_ratio": None}
    step, seconds = candidate["step"][i], candidate["seconds"][i]
    return {"target_val_loss": target, "step": step, "steps_ratio": step / reference["step"][-1],
            "seconds": seconds, "seconds_ratio": seconds / reference["seconds"][-1]}


def comparison(a_best: dict, s_best: dict) -> dict:
    """The headline figures from the two best curves: how soon Sophia reaches AdamW's final
    validation loss and, the other way round, how soon AdamW reaches Sophia's (whichever ends
    lower, one of the two is informative)."""
    ratio = steps_to_reach_ratio(a_best["curve"], s_best["curve"])
    reverse = steps_to_reach_ratio(s_best["curve"], a_best["curve"])
    return {"steps_to_adamw_final_loss_ratio": ratio["steps_ratio"],
            "seconds_to_adamw_final_loss_ratio": ratio["seconds_ratio"],
            "sophia_reaches_adamw_final": ratio,
            "adamw_steps_to_sophia_final_loss_ratio": reverse["steps_ratio"],
            "adamw_reaches_sophia_final": reverse}


def edges(points: List[dict], best: dict, key: str) -> Optional[str]:
    """'lower' / 'upper' when best[key] is the smallest / largest value of key in the grid (among
    points sharing best's other knobs), None inside it or when the grid has one value."""
    values = sorted({p[key] for p in points})
    if len(values) < 2:
        return "single value" if values else None
    if best[key] == values[0]:
        return "lower"
    if best[key] == values[-1]:
        return "upper"
    return None


def final_loss(point: dict) -> float:
    losses = point["curve"]["val_loss"]
    loss = losses[-1] if losses else None
    return loss if loss is not None and math.isfinite(loss) else math.inf


def extension(points: List[dict]) -> Optional[tuple]:
    """The edge rule: (lr, rho, side) of one more lr beyond the grid edge that holds the best
    point (at the best rho), a factor further out (the outer lr ratio); None when the best is
    inside its grid, the grid has one lr, or every point diverged."""
    best = min(points, key=final_loss)
    same = [p for p in points if p.get("rho") == best.get("rho")]
    lrs = sorted({p["lr"] for p in same})
    if final_loss(best) == math.inf or len(lrs) < 2:
        return None
    side = edges(same, best, "lr")
    if side == "upper":
        lr = lrs[-1] * (lrs[-1] / lrs[-2])
    elif side == "lower":
        lr = lrs[0] / (lrs[1] / lrs[0])
    else:
        return None
    return float(f"{lr:.4g}"), best.get("rho"), side


def is_diverged(curve: dict, failed: bool, initial_loss: Optional[float]) -> bool:
    """A run diverged when training stopped on non-finite losses, or its final validation loss
    is not finite or above its initial model's (it ended worse than it started)."""
    final = final_loss({"curve": curve})
    above = initial_loss is not None and math.isfinite(initial_loss) and final > initial_loss
    return failed or final == math.inf or above


RISE = 0.1
"""Nats above its best validation loss at which a run's end counts as a rise (unstable, short of
diverged): a cosine schedule otherwise ends at or near its best."""


def stability(points: List[dict]) -> dict:
    """How many grid points diverged, how many had skipped (non-finite) steps, and how many ended
    more than RISE above their own best validation loss."""
    diverged = [p for p in points if p["diverged"]]
    nonfinite = [p for p in points if p.get("nonfinite_steps")]
    rose = [p for p in points if not p["diverged"] and final_loss(p) > _best_loss(p) + RISE]
    return {"grid_points": len(points), "diverged": len(diverged), "with_nonfinite_steps": len(nonfinite),
            "rose_at_end": len(rose), "diverged_points": [_knobs(p) for p in diverged],
            "nonfinite_points": [{**_knobs(p), "nonfinite_steps": p["nonfinite_steps"]} for p in nonfinite],
            "rose_points": [_knobs(p) for p in rose]}


def _best_loss(point: dict) -> float:
    return min((v for v in point["curve"]["val_loss"] if v is not None and math.isfinite(v)), default=math.inf)


def _knobs(point: dict) -> dict:
    return {"lr": point["lr"], **({"rho": point["rho"]} if point.get("rho") is not None else {})}


def metric_curves(path: str) -> dict:
    """From the trainer's metrics.jsonl: the global win rate (Sophia's share of coordinates not
    clipped; the authors' health band is 0.1-0.5) and, when the records carry them, the
    per-group statistics, each over the logged steps. {} for AdamW or without records.

    {"win_rate": {"step": [...], "value": [...]},
     "groups": {role: {"step": [...], "win_rate": [...], "hessian_zero_frac": [...], ...}}}
    """
    try:
        records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError:
        return {}
    records = [r for r in records if "loss" in r]  # train records (eval records hold val_loss)
    out: dict = {}
    rates = [(r["step"], r["win_rate"]) for r in records if r.get("win_rate") is not None]
    if rates:
        out["win_rate"] = {"step": [s for s, _ in rates], "value": [w for _, w in rates]}
    groups: Dict[str, dict] = {}
    for record in records:
        for role, stats in (record.get("groups") or {}).items():
            curve = groups.setdefault(role, {"step": [], **{k: [] for k in GROUP_STATISTICS}})
            curve["step"].append(record["step"])
            for key in GROUP_STATISTICS:
                curve[key].append(stats.get(key))
    if groups:
        out["groups"] = groups
    return out


def finite(value):
    """The value with every non-finite float as null (JSON has no inf / nan)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value

"""The figure of one result: validation loss of the best AdamW and the best Sophia against step
and against training seconds; below, the best Sophia run's win rate per parameter group and its
share of coordinates with h == 0 per group, over the steps (the trainer's per-group statistics;
the global win rate when the run has none). And the figure of --seeds: Sophia's lead per seed."""
from __future__ import annotations

import os
import sys

from neox_sophia.bench.report import ROLES, column_means, variant_label

PLOT_INSTALL = "pip install matplotlib   # or: pip install -e '.[bench]'"


def _pyplot(path: str):
    """matplotlib.pyplot (Agg), or None with one line on how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"bench_convergence: matplotlib is not installed; not writing {path}. Install it with:\n"
              f"  {PLOT_INSTALL}", file=sys.stderr)
        return None
    return plt


def _save(plt, fig, path: str) -> None:
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _labels(result: dict, name: str, best: dict) -> str:
    if name == "adamw":
        return f"AdamW lr {best['lr']:g}"
    return f"Sophia ({variant_label(result)}) lr {best['lr']:g} rho {best['rho']:g}"


def _headline(result: dict) -> str:
    m = result["model"]
    ratio, reverse = result["steps_to_adamw_final_loss_ratio"], result.get("adamw_steps_to_sophia_final_loss_ratio")
    headline = (f"Sophia reaches AdamW's final loss in {ratio:.2f}x its steps" if ratio is not None
                else "Sophia does not reach AdamW's final loss" + (
                    f" (AdamW reaches Sophia's in {reverse:.2f}x the steps)" if reverse is not None else ""))
    source = result["corpus"].get("source")
    return (f"{source + ': ' if source else ''}{m['parameters'] / 1e6:.2f}M params, "
            f"{result['tokens_per_step']:,} tokens/step, {result['train_iters']} steps: {headline}")


def _loss_panels(result: dict, by_step, by_time) -> None:
    for name, color in (("adamw", "tab:blue"), ("sophia", "tab:red")):
        best = result["best"][name]["best"]
        c = best["curve"]
        by_step.plot(c["step"], c["val_loss"], color=color, label=_labels(result, name, best))
        by_time.plot(c["seconds"], c["val_loss"], color=color, label=_labels(result, name, best))
    target = result["final_val_loss"]["adamw"]
    for ax, xlabel in ((by_step, "step"), (by_time, "training seconds (each run as timed; shared machines vary)")):
        if target is not None:
            ax.axhline(target, color="gray", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def _group_panels(best: dict, win_ax, zero_ax) -> None:
    groups = best.get("groups") or {}
    for role in ROLES:
        if role in groups:
            g = groups[role]
            win_ax.plot(g["step"], g["win_rate"], label=role)
            zero_ax.plot(g["step"], g["hessian_zero_frac"], label=role)
    if not groups and best.get("win_rate"):
        win_ax.plot(best["win_rate"]["step"], best["win_rate"]["value"], color="black", label="all groups")
        zero_ax.text(0.5, 0.5, "no per-group statistics in this run's metrics", ha="center", va="center",
                     transform=zero_ax.transAxes, fontsize=9)
    win_ax.axhspan(0.1, 0.5, color="green", alpha=0.08, label="authors' healthy band")
    win_ax.set_ylabel("win rate (share not clipped)")
    zero_ax.set_ylabel("share of coordinates with h == 0")
    for ax in (win_ax, zero_ax):
        ax.set_xlabel("step (best Sophia run)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)


def plot(result: dict, path: str) -> bool:
    plt = _pyplot(path)
    if plt is None:
        return False
    fig, ((by_step, by_time), (win_ax, zero_ax)) = plt.subplots(2, 2, figsize=(11, 8))
    _loss_panels(result, by_step, by_time)
    _group_panels(result["best"]["sophia"]["best"], win_ax, zero_ax)
    fig.suptitle(_headline(result), fontsize=10)
    _save(plt, fig, path)
    return True


def plot_seeds(rows: list, path: str) -> bool:
    """One panel per setting of --seeds: Sophia's validation loss minus AdamW's of the same seed,
    at the steps both evaluated (all of them, or Sophia's with --sophia-steps), one line per seed
    and their mean (below 0: Sophia is ahead)."""
    plt = _pyplot(path)
    if plt is None:
        return False
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 3.2 * len(rows)), squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        gaps = []
        for seed in row["seeds"]:
            adamw = dict(zip(seed["curves"]["adamw"]["step"], seed["curves"]["adamw"]["val_loss"]))
            sophia = dict(zip(seed["curves"]["sophia"]["step"], seed["curves"]["sophia"]["val_loss"]))
            gap = {k: None if adamw[k] is None or v is None else v - adamw[k] for k, v in sophia.items() if k in adamw}
            gaps.append(gap)
            ratio = seed["steps_to_adamw_final_loss_ratio"]
            ax.plot(list(gap), list(gap.values()), lw=1, alpha=0.7,
                    label=f"seed {seed['seed']}{' (its grid chose the setting)' if seed['grid_here'] else ''}: "
                          + (f"ratio {ratio:.3f}" if ratio is not None else "never reaches AdamW's final"))
        shared = sorted(set.intersection(*(set(g) for g in gaps)))
        ax.plot(shared, column_means(zip(*([g[k] for k in shared] for g in gaps))), color="black", lw=2,
                label="mean over seeds")
        ax.axhline(0, color="gray", lw=0.8, ls="--")
        ax.set_ylim(-0.25, 0.25)
        ax.set_title(f"{row['corpus']}: Sophia ({row['variant']}) lr {row['sophia_lr']:g} rho {row['rho']:g} "
                     f"vs AdamW lr {row['adamw_lr']:g}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("Sophia - AdamW val loss\n(axis cut at +-0.25)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(plt, fig, path)
    return True

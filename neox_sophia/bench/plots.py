"""The figure of one result: validation loss of the best AdamW and the best Sophia against step
and against training seconds; below, the best Sophia run's win rate per parameter group and its
share of coordinates with h == 0 per group, over the steps (the trainer's per-group statistics;
the global win rate when the run has none)."""
from __future__ import annotations

import os
import sys

from neox_sophia.bench.report import ROLES

PLOT_INSTALL = "pip install matplotlib   # or: pip install -e '.[bench]'"


def _labels(result: dict, name: str, best: dict) -> str:
    if name == "adamw":
        return f"AdamW lr {best['lr']:g}"
    variant = (result.get("variant") or {}).get("name", "paper")
    return f"Sophia ({variant}) lr {best['lr']:g} rho {best['rho']:g}"


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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"bench_convergence: matplotlib is not installed; not writing {path}. Install it with:\n"
              f"  {PLOT_INSTALL}", file=sys.stderr)
        return False
    fig, ((by_step, by_time), (win_ax, zero_ax)) = plt.subplots(2, 2, figsize=(11, 8))
    _loss_panels(result, by_step, by_time)
    _group_panels(result["best"]["sophia"]["best"], win_ax, zero_ax)
    fig.suptitle(_headline(result), fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

"""The benchmark's result: one JSON per corpus x variant (AdamW's grid, the variant's Sophia grid,
the best of each, the headline ratios, stability), reuse of an earlier AdamW grid
(--adamw-from), and the markdown tables over result files (--summarize, --seeds)."""
from __future__ import annotations

import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from neox_sophia.bench.curves import RISE, comparison, edges, final_loss, finite, stability

REGIME = ("a tiny model on CPU cores: well under 10M parameters and a few thousand tokens per step; the "
          "paper's regime is ~0.5M tokens per step at 125M+ parameters for 100k steps, which a CPU cannot "
          "reach. This measures the small-scale regime only.")
PATH_KEYS = ("data_path", "vocab_file", "log_dir", "save", "load", "train_data_paths", "valid_data_paths",
             "test_data_paths")
"""Config keys that name files: left out of the AdamW fingerprint (the corpus is compared by its
manifest instead, so a corpus moved to another folder still matches)."""


def best_of(optimizer: str, points: List[dict]) -> dict:
    best = min(points, key=final_loss)
    same_rho = [p for p in points if p.get("rho") == best.get("rho")]
    at_edge = {"lr": edges(same_rho, best, "lr")}
    if optimizer == "sophia":
        at_edge["rho"] = edges([p for p in points if p["lr"] == best["lr"]], best, "rho")
    return {"best": best, "at_edge": at_edge, "runs": len(points),
            "diverged": [{"lr": p["lr"], **({"rho": p["rho"]} if "rho" in p else {})} for p in points if p["diverged"]]}


def adamw_fingerprint(config_values: Dict, corpus: Optional[dict]) -> dict:
    """What AdamW's grid is a function of besides its lrs: the whole config of an AdamW point at a
    reference lr (files left out) and the corpus's recipe and size."""
    config = {k: v for k, v in sorted(config_values.items()) if k not in PATH_KEYS}
    corpus = corpus or {}
    corpus_key = {k: corpus.get(k) for k in ("source", "recipe", "tokens", "documents")}
    if corpus.get("recipe") is None:  # data from the config files: its path is all that names it
        corpus_key["data_path"] = corpus.get("data_path")
    return json.loads(json.dumps({"config": config, "corpus": corpus_key}, default=str))


def check_adamw_from(path: str, fingerprint: dict) -> List[dict]:
    """AdamW's points from an earlier result file, if it was made with the same corpus and
    config; ValueError (one line naming what differs) otherwise."""
    try:
        earlier = json.loads(Path(path).read_text("utf-8"))
        theirs, points = earlier["adamw_fingerprint"], earlier["runs"]["adamw"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--adamw-from {path}: not a result file of this benchmark with an AdamW grid "
                         f"({type(err).__name__}: {err})") from None
    differ = [f"corpus.{k}" for k in fingerprint["corpus"] if theirs["corpus"].get(k) != fingerprint["corpus"][k]]
    keys = sorted(set(theirs["config"]) | set(fingerprint["config"]))
    differ += [k for k in keys if theirs["config"].get(k) != fingerprint["config"].get(k)]
    if differ:
        raise ValueError(f"--adamw-from {path}: made with another corpus or config (differs in: "
                         f"{', '.join(differ[:8])}{' ...' if len(differ) > 8 else ''}); run AdamW here "
                         f"(drop --adamw-from) or pass a result file of the same corpus and config")
    return points


def machine() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception:  # noqa: BLE001 - informational only
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        info["load_average_at_end"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def notes_for(a: dict, s: dict, ratio: Optional[float], adamw_from: Optional[str]) -> List[str]:
    notes = []
    for name, summary in (("AdamW", a), ("Sophia", s)):
        for knob, side in summary["at_edge"].items():
            if side in ("lower", "upper"):
                notes.append(f"{name}'s best {knob} ({summary['best'][knob]:g}) is at the {side} edge of its grid: "
                             f"the optimum may lie beyond it")
    if ratio is None:
        notes.append("Sophia never reached AdamW's final validation loss within the run: the ratios are null")
    if adamw_from:
        notes.append(f"AdamW's grid was reused from {adamw_from} (same corpus and config), not re-trained")
    return notes


def result_of(context: dict, adamw: List[dict], variant: dict, sophia: List[dict]) -> dict:
    """The result JSON of one corpus x variant. `context`: what every result of the invocation
    shares (corpus, model, layout, schedule, grids, fingerprint, machine, ...)."""
    a, s = best_of("adamw", adamw), best_of("sophia", sophia)
    headline = comparison(a["best"], s["best"])
    return {
        "benchmark": "convergence: AdamW vs Sophia, each tuned on a grid by validation loss",
        **context,
        "variant": variant,
        "runs": {"adamw": adamw, "sophia": sophia},
        "best": {"adamw": a, "sophia": s},
        "final_val_loss": {"adamw": final_loss(a["best"]), "sophia": final_loss(s["best"])},
        **headline,
        "stability": {"adamw": stability(adamw), "sophia": stability(sophia),
                      "diverged_means": "training stopped on non-finite losses, or the final validation loss "
                                        "is not finite or above the initial model's",
                      "rose_at_end_means": "not diverged, but the final validation loss is more than "
                                           f"{RISE} above the run's best"},
        "train_seconds": {"adamw": a["best"]["train_seconds"], "sophia": s["best"]["train_seconds"]},
        "notes": notes_for(a, s, headline["steps_to_adamw_final_loss_ratio"], context.get("adamw_from")),
    }


def sophia_steps(result: dict) -> int:
    """The steps of the result's Sophia runs (--sophia-steps; files made before it: train_iters)."""
    return result.get("sophia_train_iters", result.get("train_iters"))


def variant_label(result: dict) -> str:
    """The variant's name, with Sophia's schedule when it is its own (--sophia-steps)."""
    name = (result.get("variant") or {}).get("name", "paper")
    steps = sophia_steps(result)
    return name if steps == result.get("train_iters") else f"{name} ({steps} steps)"


def read_results(paths: Sequence[str], option: str) -> List[dict]:
    """The result files ``paths``; ValueError naming ``option`` and the file that cannot be read."""
    results = []
    for path in paths:
        try:
            results.append(json.loads(Path(path).read_text("utf-8")))
        except (OSError, ValueError) as err:
            raise ValueError(f"{option}: cannot read {path} ({err})") from None
    return results


def merge_files(paths: Sequence[str]) -> dict:
    """One result from several of the same corpus, config and variant (grid points added by hand,
    e.g. the edge rule along rho): the first file's context, every file's Sophia points, and the
    AdamW points of every file that trained its own (a file made with --adamw-from adds none: its
    AdamW grid belongs to the file it came from). ValueError naming the file that does not fit."""
    results = read_results(paths, "--merge")
    base = results[0]
    points: Dict[str, List[dict]] = {"adamw": [], "sophia": []}
    for path, result in zip(paths, results):
        for key, of in (("adamw_fingerprint", lambda r: r.get("adamw_fingerprint")),
                        ("variant", lambda r: r.get("variant")), ("Sophia's steps (--sophia-steps)", sophia_steps)):
            if of(result) != of(base):
                raise ValueError(f"--merge: {path} differs from {paths[0]} in {key}; only points of the same "
                                 f"corpus, config, variant and Sophia schedule make one grid")
        for name in ("adamw", "sophia"):
            if name == "adamw" and result.get("adamw_from") and result is not base:
                continue
            for point in result["runs"][name]:
                if any(p["lr"] == point["lr"] and p.get("rho") == point.get("rho") for p in points[name]):
                    raise ValueError(f"--merge: {path} repeats the {name} point lr {point['lr']:g}"
                                     + (f" rho {point['rho']:g}" if "rho" in point else "") + "; merge each point once")
                points[name].append(point)
    merged_from = [{"file": path, "command": r.get("command"), "adamw_from": r.get("adamw_from")}
                   for path, r in zip(paths, results)]
    # the first file as context: result_of writes every key it computes after the context's
    return result_of({**base, "merged_from": merged_from}, points["adamw"], base["variant"], points["sophia"])


def write_json(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    Path(tmp).write_text(json.dumps(finite(result), indent=1, allow_nan=False) + "\n", "utf-8")
    os.replace(tmp, path)


def print_summary(result: dict, path: str, png: Optional[str]) -> None:
    best_a, best_s = result["best"]["adamw"]["best"], result["best"]["sophia"]["best"]
    st = result.get("stability", {})
    print(f"\nbench_convergence ({result['corpus']['name']}; variant {variant_label(result)}; "
          f"{result['model']['parameters'] / 1e6:.2f}M params, {result['tokens_per_step']:,} tokens/step, "
          f"{result['train_iters']} steps)")
    for name, best in (("AdamW", best_a), ("Sophia", best_s)):
        knobs = f"lr {best['lr']:g}" + (f" rho {best['rho']:g}" if best.get("rho") is not None else "")
        s = st.get(name.lower(), {})
        print(f"  {name:7s} best {knobs}: final val_loss {final_loss(best):.4f}; diverged "
              f"{s.get('diverged', '?')}/{s.get('grid_points', '?')} grid points")
    r = result["sophia_reaches_adamw_final"]
    if r["steps_ratio"] is None:
        reverse = result["adamw_reaches_sophia_final"]
        print("  Sophia never reached AdamW's final validation loss: steps/seconds ratios are null" + (
            f"; AdamW reached Sophia's final loss at step {reverse['step']} (ratio {reverse['steps_ratio']:.3f})"
            if reverse["steps_ratio"] is not None else ""))
    else:
        print(f"  Sophia reached AdamW's final val_loss at step {r['step']}: steps ratio {r['steps_ratio']:.3f}, "
              f"seconds ratio {r['seconds_ratio']:.3f}")
    for note in result["notes"]:
        print(f"  note: {note}")
    print(f"  wrote {path}" + (f" and {png}" if png else ""), flush=True)


# ---------------------------------------------------------------------------------------------
# --summarize: one markdown table over result files

ROLES = ("embedding", "output", "attention", "mlp", "norms_biases")


def _num(value, fmt: str = ".4f", missing: str = "n/a") -> str:
    return missing if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, fmt)


def end_win_rates(point: dict) -> str:
    """The last logged win rate of each group ("embedding 0.02, mlp 0.31, ..."), or the global
    one when the run has no per-group statistics."""
    groups = point.get("groups") or {}
    rates = [f"{role} {_num(groups[role]['win_rate'][-1], '.2f')}" for role in ROLES
             if role in groups and groups[role]["win_rate"]]
    if rates:
        return ", ".join(rates)
    win = point.get("win_rate")
    return f"all {_num(win['value'][-1], '.2f')}" if win and win["value"] else "n/a"


def summary_table(results: Sequence[dict]) -> str:
    header = ("| corpus | variant | steps | AdamW lr | AdamW final | Sophia lr | rho | Sophia final | "
              "steps to AdamW's final (ratio) | AdamW's steps to Sophia's final (ratio) | "
              "diverged AdamW | diverged Sophia | win rate at the end, per group |")
    rows = [header, "|" + "---|" * 13]
    for r in results:
        a, s = r["best"]["adamw"]["best"], r["best"]["sophia"]["best"]
        st = r.get("stability") or {k: stability(r["runs"][k]) for k in ("adamw", "sophia")}  # older files
        count = {k: f"{st[k]['diverged']}/{st[k]['grid_points']}" for k in ("adamw", "sophia")}
        corpus = r["corpus"].get("source") or r["corpus"]["name"]
        variant = variant_label(r)
        rows.append(f"| {corpus} | {variant} | {r['train_iters']} | {a['lr']:g} | "
                    f"{_num(final_loss(a))} | {s['lr']:g} | {s.get('rho', 0):g} | {_num(final_loss(s))} | "
                    f"{_num(r['steps_to_adamw_final_loss_ratio'], '.2f')} | "
                    f"{_num(r.get('adamw_steps_to_sophia_final_loss_ratio'), '.2f')} | {count['adamw']} | "
                    f"{count['sophia']} | {end_win_rates(s)} |")
    return "\n".join(rows) + "\n"


def write_markdown(table: str, path: Optional[str]) -> str:
    """The table, also written to ``path`` when one is given (--markdown)."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        Path(path).write_text(table, "utf-8")
    return table


def summarize_files(paths: Sequence[str], markdown: Optional[str]) -> str:
    return write_markdown(summary_table(read_results(paths, "--summarize")), markdown)


# ---------------------------------------------------------------------------------------------
# --seeds: one setting at several seeds, each Sophia run against the AdamW run of its own seed

def seed_of(path: str, result: dict) -> int:
    """The seed a result file trained with (its config's, recorded in the AdamW fingerprint);
    ValueError naming the file when it records none."""
    seed = (result.get("adamw_fingerprint") or {}).get("config", {}).get("seed")
    if not isinstance(seed, int):
        raise ValueError(f"--seeds: {path} records no seed (no adamw_fingerprint: a result of an older version "
                         f"of the tool); run that point again, or leave the file out")
    return seed


def column_means(columns) -> list:
    """The mean of each column of values; None where any value of the column is missing or not finite."""
    return [None if any(v is None or not math.isfinite(v) for v in col) else sum(col) / len(col)
            for col in columns]


def mean_curve(curves: Sequence[dict]) -> Optional[dict]:
    """The step-wise mean of curves evaluated at the same steps; None when their steps differ."""
    steps = curves[0]["step"]
    if any(c["step"] != steps for c in curves):
        return None
    return {"step": list(steps), **{k: column_means(zip(*(c[k] for c in curves))) for k in ("seconds", "val_loss")}}


def over_seeds(paths: Sequence[str]) -> List[dict]:
    """Result files grouped by corpus, variant, Sophia's and AdamW's steps and both best settings
    (AdamW lr, Sophia lr and rho), each group over its seeds: per seed, the steps Sophia takes to
    reach the same seed's AdamW final loss (the validation sequences depend on the seed, so only
    same-seed pairs compare), and the same ratio on the seed-mean curves. Groups of one seed are
    left out. ValueError when one group holds a seed twice (two sample orders of one seed: pass
    one) or a file records no seed."""
    groups: Dict[tuple, Dict[int, tuple]] = {}
    for path, r in zip(paths, read_results(paths, "--seeds")):
        a, s = r["best"]["adamw"]["best"], r["best"]["sophia"]["best"]
        key = (r["corpus"].get("source") or r["corpus"]["name"], variant_label(r), r["train_iters"], a["lr"], s["lr"],
               s.get("rho"))
        seed = seed_of(path, r)
        if seed in groups.get(key, {}):
            raise ValueError(f"--seeds: {path} and {groups[key][seed][0]} are both seed {seed} of {key[0]} "
                             f"{key[1]} (AdamW lr {key[3]:g}, Sophia lr {key[4]:g} rho {key[5]:g}); pass one")
        groups.setdefault(key, {})[seed] = (path, r, a, s)
    rows = []
    for (corpus, variant, _, a_lr, s_lr, rho), by_seed in groups.items():
        if len(by_seed) < 2:
            continue
        seeds = sorted(by_seed)
        per_seed = []
        for seed in seeds:
            path, r, a, s = by_seed[seed]
            per_seed.append({"seed": seed, "file": path, "grid_here": len(r["runs"]["sophia"]) > 1,
                             "adamw_final": final_loss(a), "sophia_final": final_loss(s),
                             **{k: v for k, v in comparison(a, s).items() if k.endswith("ratio")},
                             "curves": {"adamw": a["curve"], "sophia": s["curve"]}})
        ratios = [p["steps_to_adamw_final_loss_ratio"] for p in per_seed]
        mean_a, mean_s = (mean_curve([p["curves"][name] for p in per_seed]) for name in ("adamw", "sophia"))
        rows.append({"corpus": corpus, "variant": variant, "adamw_lr": a_lr, "sophia_lr": s_lr, "rho": rho,
                     "seeds": per_seed,
                     "mean_steps_ratio": None if None in ratios else sum(ratios) / len(ratios),
                     "worst_steps_ratio": None if None in ratios else max(ratios),
                     "sophia_lower_at_end": sum(p["sophia_final"] < p["adamw_final"] for p in per_seed),
                     "seed_mean_curves": comparison({"curve": mean_a}, {"curve": mean_s})
                     if mean_a and mean_s else None})
    return rows


def seed_table(rows: Sequence[dict]) -> str:
    header = ("| corpus | variant | AdamW lr | Sophia lr | rho | seeds | steps to AdamW's final, per seed "
              "(ratio) | mean | worst | on the seed-mean curves | Sophia ends lower |")
    lines = [header, "|" + "---|" * 11]
    for row in rows:
        per_seed = ", ".join(f"{p['seed']}{'*' if p['grid_here'] else ''}: "
                             f"{_num(p['steps_to_adamw_final_loss_ratio'], '.3f', 'never')}" for p in row["seeds"])
        curves = row["seed_mean_curves"]
        on_means = ("n/a (the seeds' eval steps differ)" if curves is None
                    else _num(curves["steps_to_adamw_final_loss_ratio"], ".3f", "never"))
        lines.append(f"| {row['corpus']} | {row['variant']} | {row['adamw_lr']:g} | {row['sophia_lr']:g} | "
                     f"{row['rho']:g} | {len(row['seeds'])} | {per_seed} | "
                     f"{_num(row['mean_steps_ratio'], '.3f', 'n/a (a seed never)')} | "
                     f"{_num(row['worst_steps_ratio'], '.3f', 'never')} | {on_means} | "
                     f"{row['sophia_lower_at_end']}/{len(row['seeds'])} |")
    marked = any(p["grid_here"] for row in rows for p in row["seeds"])
    return "\n".join(lines) + "\n" + ("\n\\* this seed's file holds the Sophia grid the setting is the best of (the "
                                     "other seeds are held out)\n" if marked else "")


def seeds_files(paths: Sequence[str], markdown: Optional[str], png: Optional[str] = None) -> str:
    """The --seeds table (also written to ``markdown``) and, with ``png``, its figure."""
    rows = over_seeds(paths)
    if not rows:
        raise ValueError("--seeds: no setting is in these files at two or more seeds (files group by corpus, "
                         "variant, AdamW lr, Sophia lr and rho)")
    if png and png != "none":
        from neox_sophia.bench.plots import plot_seeds

        if plot_seeds(rows, png):
            print(f"bench_convergence: wrote {png}", file=sys.stderr)
    return write_markdown(seed_table(rows), markdown)

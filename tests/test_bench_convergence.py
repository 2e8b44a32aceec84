"""tools/bench_convergence.py (neox_sophia/bench): the ratio, edge, stability and metrics arithmetic
on synthetic data; the grid search's rounds with a fake trainer; the variant registry; the AdamW
reuse check; the summary table and the plot; then a tiny end-to-end grid (AdamW x 2 lr, Sophia x
1 lr x 2 rho, a few steps) that writes the JSON, is repeated with --jobs 2 (bit for bit the same),
tunes a variant against the first file's AdamW grid (--adamw-from) and summarizes both."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from neox_sophia.bench import curves, report, runs, variants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "bench_convergence.py")


def _curve(losses, seconds_per_step=2.0, interval=10):
    steps = [interval * (i + 1) for i in range(len(losses))]
    return {"step": steps, "seconds": [s * seconds_per_step for s in steps], "val_loss": losses}


def test_ratio_when_sophia_reaches_adamw_final_loss():
    adamw = _curve([5.0, 4.5, 4.2, 4.0])               # final 4.0 at step 40, 80 s
    sophia = _curve([4.8, 4.0, 3.9, 3.8], seconds_per_step=2.5)
    r = curves.steps_to_reach_ratio(adamw, sophia)
    assert r["target_val_loss"] == 4.0
    assert r["step"] == 20 and r["steps_ratio"] == pytest.approx(0.5)   # <= counts, not only <
    assert r["seconds"] == 50.0 and r["seconds_ratio"] == pytest.approx(50.0 / 80.0)


def test_ratio_is_null_when_never_reached():
    adamw = _curve([5.0, 4.5, 4.2, 4.0])
    never = _curve([5.1, 4.6, None, 4.01])               # a non-finite eval (None) never counts
    r = curves.steps_to_reach_ratio(adamw, never)
    assert r["step"] is None and r["steps_ratio"] is None and r["seconds_ratio"] is None
    for end in (math.inf, None):                          # a reference that ended non-finite: no target
        assert curves.steps_to_reach_ratio(_curve([5.0, end]), adamw)["steps_ratio"] is None


def test_comparison_reports_both_directions():
    adamw = {"curve": _curve([5.0, 4.5, 4.2, 4.0])}
    sophia = {"curve": _curve([5.2, 4.9, 4.6, 4.4])}     # ends above AdamW: AdamW got there at step 30
    c = curves.comparison(adamw, sophia)
    assert c["steps_to_adamw_final_loss_ratio"] is None and c["seconds_to_adamw_final_loss_ratio"] is None
    assert c["adamw_reaches_sophia_final"]["step"] == 30 and c["adamw_steps_to_sophia_final_loss_ratio"] == 0.75
    c = curves.comparison(sophia, adamw)                  # the other way round: the roles swap
    assert c["steps_to_adamw_final_loss_ratio"] == 0.75 and c["adamw_steps_to_sophia_final_loss_ratio"] is None


def test_first_step_edges_and_the_extension_rule():
    assert curves.first_step_reaching([10, 20, 30], [3.0, 2.0, 1.0], 2.5) == 1
    assert curves.first_step_reaching([10, 20], [3.0, 2.9], 2.5) is None
    points = [{"lr": lr} for lr in (1e-3, 2e-3, 4e-3)]
    assert curves.edges(points, {"lr": 4e-3}, "lr") == "upper"
    assert curves.edges(points, {"lr": 1e-3}, "lr") == "lower"
    assert curves.edges(points, {"lr": 2e-3}, "lr") is None
    assert curves.edges(points[:1], {"lr": 1e-3}, "lr") == "single value"

    def grid(finals, rho=None):
        return [{"lr": lr, "rho": rho, "curve": _curve([9.0, f])} for lr, f in zip((1e-3, 2e-3, 4e-3), finals)]
    assert curves.extension(grid([3.0, 2.0, 1.0])) == (8e-3, None, "upper")
    assert curves.extension(grid([1.0, 2.0, 3.0], rho=0.1)) == (5e-4, 0.1, "lower")
    assert curves.extension(grid([2.0, 1.0, 3.0])) is None
    assert curves.extension(grid([None, None, None])) is None  # every point diverged: nothing to extend


def test_divergence_and_stability_counts():
    assert not curves.is_diverged(_curve([6.0, 5.0]), False, initial_loss=7.6)
    assert curves.is_diverged(_curve([6.0, 5.0]), True, initial_loss=7.6)         # stopped on non-finite
    assert curves.is_diverged(_curve([6.0, None]), False, initial_loss=7.6)        # final not finite
    assert curves.is_diverged(_curve([6.0, 7.9]), False, initial_loss=7.6)         # worse than it started
    points = [{"lr": 1e-3, "curve": _curve([6.0, 5.0]), "diverged": False, "nonfinite_steps": 0},
              {"lr": 2e-3, "curve": _curve([5.0, 5.3]), "diverged": False, "nonfinite_steps": 3},
              {"lr": 4e-3, "rho": 0.1, "curve": _curve([6.0, None]), "diverged": True}]
    s = curves.stability(points)
    assert (s["grid_points"], s["diverged"], s["with_nonfinite_steps"], s["rose_at_end"]) == (3, 1, 1, 1)
    assert s["diverged_points"] == [{"lr": 4e-3, "rho": 0.1}] and s["rose_points"] == [{"lr": 2e-3}]


def test_metric_curves_read_global_and_per_group_statistics(tmp_path):
    def group(w):
        return {"win_rate": w, "clip_frac": 1 - w, "hessian_mean": 1e-4, "hessian_rms": 2e-4,
                "hessian_zero_frac": w / 10, "hessian_floor": 0.0}
    records = [{"step": 50, "loss": 6.0, "win_rate": 0.1, "groups": {"embedding": group(0.01), "mlp": group(0.3)}},
               {"step": 50, "val_loss": 6.1},
               {"step": 100, "loss": 5.0, "win_rate": 0.2, "groups": {"embedding": group(0.02), "mlp": group(0.4)}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    got = curves.metric_curves(str(tmp_path / "metrics.jsonl"))
    assert got["win_rate"] == {"step": [50, 100], "value": [0.1, 0.2]}
    assert set(got["groups"]) == {"embedding", "mlp"}
    assert got["groups"]["mlp"]["step"] == [50, 100] and got["groups"]["mlp"]["win_rate"] == [0.3, 0.4]
    assert got["groups"]["embedding"]["hessian_zero_frac"] == [0.001, 0.002]
    adamw = [{"step": 50, "loss": 6.0, "win_rate": None}]            # AdamW's records: nothing to keep
    (tmp_path / "adamw.jsonl").write_text(json.dumps(adamw[0]) + "\n")
    assert curves.metric_curves(str(tmp_path / "adamw.jsonl")) == {}
    assert curves.metric_curves(str(tmp_path / "missing.jsonl")) == {}


def test_variant_registry():
    assert [v.name for v in variants.parse_variants([])] == ["paper"]
    chosen = variants.parse_variants(["paper,beta1_0.9", "split", "paper"])
    assert [v.name for v in chosen] == ["paper", "beta1_0.9", "split"]    # order kept, once each
    assert variants.VARIANTS["paper"].overrides == ()
    assert variants.VARIANTS["beta1_0.9"].resolved() == ["optimizer.params.betas=[0.9, 0.99]"]
    split = variants.VARIANTS["split"]
    assert split.needs_adamw and not variants.VARIANTS["hessian_floor"].needs_adamw
    assert "optimizer.params.adamw_lr=4.000000e-03" in split.resolved(4e-3)
    with pytest.raises(ValueError, match="needs the best AdamW lr"):
        split.resolved()
    with pytest.raises(ValueError, match="unknown nope; known: paper"):
        variants.parse_variants(["paper,nope"])


class FakeRunner:
    """Records the rounds; a point's final loss is |log2(lr / best)| (+ rho), best lr per optimizer."""

    def __init__(self):
        self.rounds = []

    def run(self, specs):
        self.rounds.append([(s.optimizer, s.variant, s.lr, s.rho, s.overrides[3:]) for s in specs])
        best = {"adamw": 8e-3, "sophia": 1e-3}
        return [{"lr": s.lr, "rho": s.rho, "diverged": False,
                 "curve": _curve([9.0, abs(math.log2(s.lr / best[s.optimizer])) + (s.rho or 0)])} for s in specs]


def test_searches_run_in_rounds_and_a_split_variant_waits_for_adamw():
    args = SimpleNamespace(adamw_lr="2e-3,4e-3", sophia_lr="1e-3,2e-3", sophia_rho="0.1,0.2", extend_edges=1,
                           adamw_wd=0.1, sophia_wd=0.2, min_lr_ratio=0.05, sophia_steps=None)
    runner = FakeRunner()
    chosen = variants.parse_variants(["paper,split"])
    adamw, found = runs.search_all(runner, args, dict(runs.SOPHIA_DEFAULTS), chosen, None)
    first, second = runner.rounds[0], runner.rounds[1]
    # Sophia's points first (a variant the trainer refuses fails before AdamW trains), then AdamW's
    assert [p[0] for p in first] == ["sophia"] * 4 + ["adamw"] * 2 and {p[1] for p in first[:4]} == {"paper"}
    # AdamW's best (4e-3) is at the upper edge: one more lr (8e-3) in the next round
    assert ("adamw", None, 8e-3, None, ()) in second and [p["lr"] for p in adamw] == [2e-3, 4e-3, 8e-3]
    assert adamw[-1]["extension"] == "upper"
    split_rounds = [r for r in runner.rounds if any(p[1] == "split" for p in r)]
    assert runner.rounds.index(split_rounds[0]) >= 2  # after AdamW's search ended
    assert all("optimizer.params.adamw_lr=8.000000e-03" in p[4] for r in split_rounds for p in r)
    assert [p["lr"] for p in found["paper"]] == [1e-3, 2e-3, 1e-3, 2e-3, 5e-4]  # lower edge extended once
    # with AdamW's points given (--adamw-from), no AdamW point is trained and split starts at once
    runner = FakeRunner()
    runs.search_all(runner, args, dict(runs.SOPHIA_DEFAULTS), chosen[1:], adamw)
    assert all(p[0] == "sophia" for r in runner.rounds for p in r) and len(runner.rounds[0]) == 4
    assert not any("train_iters" in o for r in runner.rounds for p in r for o in p[4])
    # --sophia-steps: Sophia's points on their own schedule, AdamW's on the config's
    runner, args.sophia_steps = FakeRunner(), 8
    runs.search_all(runner, args, dict(runs.SOPHIA_DEFAULTS), chosen[:1], None)
    points = [p for r in runner.rounds for p in r]
    assert all({"train_iters=8", "lr_decay_iters=8"} <= set(p[4]) for p in points if p[0] == "sophia")
    assert not any("train_iters=8" in p[4] for p in points if p[0] == "adamw")


def _result(tmp_path, name, fingerprint, groups=None):
    adamw = [{"lr": 4e-3, "curve": _curve([6.0, 5.0]), "diverged": False, "train_seconds": 1.0}]
    sophia = [{"lr": 1e-3, "rho": 0.1, "curve": _curve([6.2, 4.9]), "diverged": False, "train_seconds": 1.0,
               "win_rate": {"step": [10, 20], "value": [0.2, 0.3]}, **({"groups": groups} if groups else {})},
              {"lr": 2e-3, "rho": 0.1, "curve": _curve([6.2, None]), "diverged": True, "train_seconds": 1.0}]
    context = {"corpus": {"name": "x", "source": "gcide"}, "model": {"parameters": 1e5}, "tokens_per_step": 1024,
               "train_iters": 20, "adamw_fingerprint": fingerprint}
    result = report.result_of(context, adamw, variants.VARIANTS[name].record(4e-3), sophia)
    path = str(tmp_path / f"{name}.json")
    report.write_json(result, path)
    return result, path


def test_adamw_reuse_is_checked_and_the_summary_table(tmp_path):
    fingerprint = report.adamw_fingerprint({"train_iters": 20, "seq_length": 64, "data_path": "/a/b"},
                                           {"source": "gcide", "recipe": {"vocab_size": 2048}, "tokens": 10})
    groups = {"embedding": {"step": [20], "win_rate": [0.02]}, "mlp": {"step": [20], "win_rate": [0.35]}}
    result, path = _result(tmp_path, "split", fingerprint, groups)
    assert result["stability"]["sophia"]["diverged"] == 1 and result["stability"]["adamw"]["diverged"] == 0
    assert result["steps_to_adamw_final_loss_ratio"] == 1.0 and result["variant"]["name"] == "split"
    moved = report.adamw_fingerprint({"train_iters": 20, "seq_length": 64, "data_path": "/elsewhere"},
                                     {"source": "gcide", "recipe": {"vocab_size": 2048}, "tokens": 10})
    assert report.check_adamw_from(path, moved)[0]["lr"] == 4e-3      # file paths do not count
    other = report.adamw_fingerprint({"train_iters": 40, "seq_length": 64},
                                     {"source": "stdlib", "recipe": {"vocab_size": 2048}, "tokens": 10})
    with pytest.raises(ValueError, match=r"another corpus or config \(differs in: corpus.source, train_iters\)"):
        report.check_adamw_from(path, other)
    _, paper = _result(tmp_path, "paper", fingerprint)
    table = report.summarize_files([paper, path], str(tmp_path / "out" / "summary.md"))
    rows = table.splitlines()
    assert len(rows) == 4 and (tmp_path / "out" / "summary.md").read_text() == table
    assert rows[2].startswith("| gcide | paper | 20 | 0.004 | 5.0000 | 0.001 | 0.1 | 4.9000 | 1.00 | n/a | 0/1 | 1/2 "
                              "| all 0.30 |")
    assert rows[3].endswith("| embedding 0.02, mlp 0.35 |")


def test_merge_joins_grid_points_of_one_grid_and_recomputes_the_best(tmp_path):
    fingerprint = {"config": {"train_iters": 20}, "corpus": {"source": "gcide"}}
    base, base_path = _result(tmp_path, "sophia_h", fingerprint)
    extra = dict(base, adamw_from="elsewhere.json", command="the rho edge by hand")  # its AdamW is another file's
    extra["runs"] = {"adamw": base["runs"]["adamw"],
                     "sophia": [{"lr": 1e-3, "rho": 0.05, "curve": _curve([6.1, 4.7]), "diverged": False,
                                 "train_seconds": 1.0}]}
    extra_path = str(tmp_path / "extra.json")
    report.write_json(extra, extra_path)
    merged = report.merge_files([base_path, extra_path])
    assert [(p["lr"], p["rho"]) for p in merged["runs"]["sophia"]] == [(1e-3, 0.1), (2e-3, 0.1), (1e-3, 0.05)]
    assert len(merged["runs"]["adamw"]) == 1 and merged["stability"]["sophia"]["grid_points"] == 3
    assert merged["best"]["sophia"]["best"]["rho"] == 0.05 and merged["final_val_loss"]["sophia"] == 4.7
    assert merged["best"]["sophia"]["at_edge"]["rho"] == "lower"
    assert [m["command"] for m in merged["merged_from"]] == [None, "the rho edge by hand"]
    with pytest.raises(ValueError, match="repeats the adamw point lr 0.004; merge each point once"):
        report.merge_files([base_path, base_path])
    # a file that records Sophia's steps (train_iters: the same schedule) joins one made before the key existed
    same_schedule = str(tmp_path / "same.json")
    report.write_json(dict(extra, sophia_train_iters=20), same_schedule)
    assert len(report.merge_files([base_path, same_schedule])["runs"]["sophia"]) == 3
    report.write_json(dict(extra, sophia_train_iters=10), same_schedule)  # --sophia-steps 10: another schedule
    with pytest.raises(ValueError, match=r"same.json differs from .* in Sophia's steps \(--sophia-steps\)"):
        report.merge_files([base_path, same_schedule])
    _, other = _result(tmp_path, "paper", fingerprint)
    with pytest.raises(ValueError, match=r"paper.json differs from .*sophia_h.json in variant"):
        report.merge_files([base_path, other])
    out = tmp_path / "merged.json"
    done = subprocess.run([sys.executable, TOOL, "--merge", base_path, extra_path, "--output", str(out), "--plot",
                           "none"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and json.loads(out.read_text())["final_val_loss"]["sophia"] == 4.7, done.stderr
    refused = subprocess.run([sys.executable, TOOL, "--merge", base_path, extra_path], capture_output=True,
                             text=True, cwd=ROOT)
    assert refused.returncode == 2 and "name a new result file with --output" in refused.stderr


def _seed_result(tmp_path, seed, adamw_losses, sophia_losses, *more_sophia, variant="paper"):
    point = {"diverged": False, "train_seconds": 1.0}
    adamw = [{"lr": 4e-3, "curve": _curve(adamw_losses), **point}]
    sophia = [{"lr": 1e-3, "rho": 0.1, "curve": _curve(losses), **point} for losses in (sophia_losses, *more_sophia)]
    context = {"corpus": {"name": "x", "source": "gcide"}, "model": {"parameters": 1e5}, "tokens_per_step": 1024,
               "train_iters": 40, "adamw_fingerprint": {"config": {"seed": seed}, "corpus": {"source": "gcide"}}}
    for i, p in enumerate(sophia[1:]):  # the worse grid points of a tuned seed
        p["lr"] = 2e-3 * (i + 1)
    path = str(tmp_path / f"{variant}-{seed}-{len(sophia)}.json")
    report.write_json(report.result_of(context, adamw, variants.VARIANTS[variant].record(), sophia), path)
    return path


def test_seeds_pair_each_sophia_run_with_its_own_seeds_adamw(tmp_path):
    files = [_seed_result(tmp_path, 1, [6, 5, 4, 3], [5, 4, 3, 2.5]),            # AdamW's 3 at step 30: 0.75
             _seed_result(tmp_path, 2, [6, 5, 4, 3.5], [6, 3.5, 3, 3]),          # 3.5 at step 20: 0.5
             _seed_result(tmp_path, 3, [6, 5, 4, 3], [6, 5, 4, 2.9], [6, 6, 6, 6]),  # tuned here: 1.0
             _seed_result(tmp_path, 1, [6, 5, 4, 3], [5, 4, 3, 2.5], variant="sophia_h")]  # one seed: left out
    (row,) = report.over_seeds(files)
    assert (row["corpus"], row["variant"], row["adamw_lr"], row["sophia_lr"], row["rho"]) == ("gcide", "paper",
                                                                                            4e-3, 1e-3, 0.1)
    assert [(p["seed"], p["grid_here"], p["steps_to_adamw_final_loss_ratio"]) for p in row["seeds"]] == [
        (1, False, 0.75), (2, False, 0.5), (3, True, 1.0)]
    assert row["mean_steps_ratio"] == pytest.approx(0.75) and row["worst_steps_ratio"] == 1.0
    # the seed-mean curves: AdamW ends at 3.1667, Sophia's mean (.., 3.33, 2.8) first reaches it at step 40
    assert row["seed_mean_curves"]["steps_to_adamw_final_loss_ratio"] == 1.0 and row["sophia_lower_at_end"] == 3
    table = report.seeds_files(files, str(tmp_path / "md" / "seeds.md")).splitlines()
    assert table[2] == ("| gcide | paper | 0.004 | 0.001 | 0.1 | 3 | 1: 0.750, 2: 0.500, 3*: 1.000 | 0.750 | 1.000 | "
                        "1.000 | 3/3 |") and (tmp_path / "md" / "seeds.md").exists()
    never = _seed_result(tmp_path, 4, [6, 5, 4, 3], [6, 5, 4, 3.1])  # a seed where Sophia ends above AdamW
    (row,) = report.over_seeds([*files[:2], never])
    assert row["mean_steps_ratio"] is None and row["worst_steps_ratio"] is None
    table = report.seed_table([row])
    assert table.splitlines()[2] == (
        "| gcide | paper | 0.004 | 0.001 | 0.1 | 3 | 1: 0.750, 2: 0.500, 4: never | n/a (a seed never) | never | "
        "1.000 | 2/3 |") and "*" not in table  # no seed holds a grid: no mark, no footnote
    again = _seed_result(tmp_path, 2, [6, 5, 4, 3.4], [6, 3.5, 3, 3], [7, 7, 7, 7])  # seed 2 once more
    with pytest.raises(ValueError, match=r"paper-2-2.json and .*paper-2-1.json are both seed 2 of gcide paper"):
        report.over_seeds([*files, again])
    unseeded = json.loads(Path(files[0]).read_text())
    del unseeded["adamw_fingerprint"]
    (tmp_path / "old.json").write_text(json.dumps(unseeded))
    with pytest.raises(ValueError, match=r"old.json records no seed"):
        report.over_seeds([files[1], str(tmp_path / "old.json")])
    # the seed-mean curves need the same eval steps: otherwise no mean, and the table says why
    assert report.mean_curve([_curve([2.0, 1.0]), _curve([2.0, 1.0], interval=5)]) is None
    assert report.mean_curve([_curve([2.0, None]), _curve([4.0, 1.0])])["val_loss"] == [3.0, None]
    row["seed_mean_curves"] = None
    assert "| n/a (the seeds' eval steps differ) |" in report.seed_table([row])
    done = subprocess.run([sys.executable, TOOL, "--seeds", files[0], files[3]], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 2 and "no setting is in these files at two or more seeds" in done.stderr
    both = subprocess.run([sys.executable, TOOL, "--seeds", *files, "--summarize", *files], capture_output=True,
                          text=True, cwd=ROOT)
    assert both.returncode == 2 and "--summarize and --seeds: one table per invocation" in both.stderr


def test_plot_has_loss_and_per_group_panels(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from neox_sophia.bench import plots

    groups = {role: {"step": [10, 20], "win_rate": [0.1, 0.2], "hessian_zero_frac": [0.5, 0.4]}
              for role in ("embedding", "mlp")}
    result, _ = _result(tmp_path, "paper", {}, groups)
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at it
    assert plots.plot(result, str(tmp_path / "p.png")) and (tmp_path / "p.png").stat().st_size > 10_000
    loss, _, win, zero = figures[0].axes
    assert [line.get_label() for line in loss.lines[:2]] == ["AdamW lr 0.004", "Sophia (paper) lr 0.001 rho 0.1"]
    assert [line.get_label() for line in win.lines] == ["embedding", "mlp"]
    assert list(zero.lines[0].get_ydata()) == [0.5, 0.4]
    figures.clear()  # --seeds: Sophia minus the same seed's AdamW, one line per seed and their mean
    rows = report.over_seeds([_seed_result(tmp_path, 1, [6, 5, 4, 3], [5, 4, 3, 2.5]),
                              _seed_result(tmp_path, 2, [6, 5, 4, 3.5], [6, 3.5, 3, 3])])
    assert plots.plot_seeds(rows, str(tmp_path / "s.png")) and (tmp_path / "s.png").stat().st_size > 10_000
    (ax,) = figures[0].axes
    assert [line.get_label() for line in ax.lines[:3]] == ["seed 1: ratio 0.750", "seed 2: ratio 0.500",
                                                           "mean over seeds"]
    assert list(ax.lines[2].get_ydata()) == [-0.5, -1.25, -1.0, -0.5]
    figures.clear()  # Sophia on a shorter schedule (--sophia-steps): the gaps at the steps both evaluated
    for row in rows:
        for seed in row["seeds"]:
            seed["curves"]["sophia"] = _curve(seed["curves"]["sophia"]["val_loss"][:2])
    assert plots.plot_seeds(rows, str(tmp_path / "short.png"))
    (ax,) = figures[0].axes
    assert list(ax.lines[0].get_xdata()) == [10, 20] and list(ax.lines[2].get_ydata()) == [-0.5, -1.25]


# ---------------------------------------------------------------------------------------------
# End to end on a tiny corpus and model

SETS = ["num_layers=1", "hidden_size=32", "num_attention_heads=2", "seq_length=32", "max_position_embeddings=32",
        "train_micro_batch_size_per_gpu=2", "gradient_accumulation_steps=2", "eval_iters=1",
        "optimizer.params.hessian_interval=2"]


def _bench(corpus, out, *extra, expect=0):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    done = subprocess.run(
        [sys.executable, TOOL, "--steps", "4", "--eval-interval", "2", "--adamw-lr", "1e-3,3e-3", "--sophia-lr", "1e-3",
         "--sophia-rho", "0.03,0.1", "--extend-edges", "0", "--corpus-dir", str(corpus), "--split", "90,10,0",
         "--device", "cpu", "--label", "test", "--threads", "1", "--output", str(out), *extra]
        + [a for s in SETS for a in ("--set", s)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**env, "DS_ACCELERATOR": "cpu"},
        stdin=subprocess.DEVNULL)
    assert done.returncode == expect, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny stdlib corpus and the tiny grid's result, sequential, one thread per run."""
    from neox_sophia.data.corpus import prepare_builtin_corpus

    tmp = tmp_path_factory.mktemp("bench")
    prepare_builtin_corpus(tmp / "corpus", max_bytes=300_000, vocab_size=512, log=None)
    out = tmp / "convergence.json"
    done = _bench(tmp / "corpus", out)
    return SimpleNamespace(dir=tmp, corpus=tmp / "corpus", out=out, result=json.loads(out.read_text()), done=done)


@pytest.mark.distributed
def test_tiny_grid_writes_the_json(tiny):
    result, out = tiny.result, tiny.out
    assert result["label"] == "test" and "Python standard library" in result["corpus"]["name"]
    assert result["corpus"]["source"] == "stdlib" and result["variant"]["name"] == "paper"
    assert result["tokens_per_step"] == 4 * 32 and result["train_iters"] == 4 and result["threads_per_run"] == 1
    assert result["model"]["parameters"] > result["model"]["non_embedding_parameters"] > 0
    assert len(result["runs"]["adamw"]) == 2 and len(result["runs"]["sophia"]) == 2
    for name in ("adamw", "sophia"):
        best = result["best"][name]["best"]
        assert best["curve"]["step"] == [2, 4] and len(best["curve"]["seconds"]) == 2
        assert result["final_val_loss"][name] == best["curve"]["val_loss"][-1]
        assert result["final_val_loss"][name] == min(p["curve"]["val_loss"][-1] for p in result["runs"][name])
        assert result["stability"][name]["grid_points"] == 2
        assert result["stability"][name]["diverged"] == sum(p["diverged"] for p in result["runs"][name])
    initial = {p["initial_val_loss"] for name in ("adamw", "sophia") for p in result["runs"][name]}
    assert len(initial) == 1 and initial.pop() > result["final_val_loss"]["adamw"]  # one init, and it learned
    assert result["runs"]["sophia"][0]["hessian_updates"] == 2
    win = result["runs"]["sophia"][0]["win_rate"]  # from the trainer's metrics, logged every eval_interval
    assert win["step"] == [2, 4] and all(0 <= w <= 1 for w in win["value"])
    assert "win_rate" not in result["runs"]["adamw"][0]
    r = result["sophia_reaches_adamw_final"]
    expected = curves.steps_to_reach_ratio(result["best"]["adamw"]["best"]["curve"],
                                           result["best"]["sophia"]["best"]["curve"])
    assert result["steps_to_adamw_final_loss_ratio"] == expected["steps_ratio"] == r["steps_ratio"]
    assert result["seconds_to_adamw_final_loss_ratio"] == expected["seconds_ratio"]
    assert {"cpu", "cpu_cores", "torch"} <= set(result["machine"])
    assert result["best"]["adamw"]["at_edge"]["lr"] in ("lower", "upper", None)
    assert result["adamw_steps_to_sophia_final_loss_ratio"] == _reverse(result)
    try:
        import matplotlib  # noqa: F401
        assert out.with_suffix(".png").exists()
    except ImportError:
        assert "pip install matplotlib" in tiny.done.stderr and not out.with_suffix(".png").exists()
    # --replot recomputes the comparison of a result file without training
    copy = tiny.dir / "replot.json"
    copy.write_text(json.dumps({k: v for k, v in result.items() if k != "adamw_steps_to_sophia_final_loss_ratio"}))
    again = subprocess.run([sys.executable, TOOL, "--replot", str(copy), "--plot", "none"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    replotted = json.loads(copy.read_text())
    assert replotted["adamw_steps_to_sophia_final_loss_ratio"] == _reverse(result)


def _reverse(result):
    return curves.steps_to_reach_ratio(result["best"]["sophia"]["best"]["curve"],
                                       result["best"]["adamw"]["best"]["curve"])["steps_ratio"]


def _trajectories(result):
    keys = ("lr", "rho", "curve", "initial_val_loss", "win_rate", "nonfinite_steps")
    return {name: [{k: p.get(k) for k in keys if k != "curve"} | {"val_loss": p["curve"]["val_loss"]}
                   for p in result["runs"][name]] for name in ("adamw", "sophia")}


@pytest.mark.distributed
def test_jobs_give_the_sequential_results_bit_for_bit(tiny):
    out = tiny.dir / "jobs.json"
    _bench(tiny.corpus, out, "--jobs", "2", "--plot", "none")
    parallel = json.loads(out.read_text())
    assert parallel["jobs"] == 2 and parallel["threads_per_run"] == 1
    assert _trajectories(parallel) == _trajectories(tiny.result)


@pytest.mark.distributed
def test_a_variant_against_an_earlier_adamw_grid_and_the_summary(tiny):
    out = tiny.dir / "{corpus}-{variant}.json"
    done = _bench(tiny.corpus, out, "--variant", "beta1_0.9", "--adamw-from", str(tiny.out), "--plot", "none")
    assert "bench_convergence: adamw" not in done.stdout  # no AdamW point was trained
    result = json.loads((tiny.dir / "stdlib-beta1_0.9.json").read_text())
    assert result["runs"]["adamw"] == tiny.result["runs"]["adamw"] and result["adamw_from"] == str(tiny.out)
    assert result["variant"]["overrides"] == ["optimizer.params.betas=[0.9, 0.99]"]
    assert all(p["betas"] == [0.9, 0.99] and p["variant"] == "beta1_0.9" for p in result["runs"]["sophia"])
    assert _trajectories(result)["sophia"] != _trajectories(tiny.result)["sophia"]  # the override took effect
    # another config: the earlier AdamW grid is refused in one line (exit 2), nothing is trained
    refused = _bench(tiny.corpus, tiny.dir / "x.json", "--adamw-from", str(tiny.out), "--set", "seed=7", expect=2)
    assert refused.stderr.strip().splitlines()[-1].startswith("bench_convergence: error: --adamw-from")
    assert "differs in: seed" in refused.stderr and not (tiny.dir / "x.json").exists()
    summary = subprocess.run([sys.executable, TOOL, "--summarize", str(tiny.out),
                              str(tiny.dir / "stdlib-beta1_0.9.json")],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
    rows = summary.stdout.splitlines()
    assert summary.returncode == 0 and [r.split(" | ")[1] for r in rows[2:]] == ["paper", "beta1_0.9"]


@pytest.mark.distributed
def test_sophia_on_its_own_shorter_schedule(tiny):
    """--sophia-steps (the paper's protocol): Sophia trains 2 of the 4 steps on a schedule of its
    own and is measured against AdamW's full run (that the first steps read the same samples is
    the sample stream's property, tested with the data pipeline)."""
    out = tiny.dir / "short.json"
    _bench(tiny.corpus, out, "--sophia-steps", "2", "--adamw-from", str(tiny.out), "--plot", "none")
    result = json.loads(out.read_text())
    assert result["sophia_train_iters"] == 2 and result["train_iters"] == 4
    assert all(p["curve"]["step"] == [2] for p in result["runs"]["sophia"])
    assert result["best"]["adamw"]["best"]["curve"]["step"] == [2, 4]  # AdamW's full run, reused
    a, s = result["best"]["adamw"]["best"], result["best"]["sophia"]["best"]
    reached = s["curve"]["val_loss"][-1] <= a["curve"]["val_loss"][-1]
    assert result["steps_to_adamw_final_loss_ratio"] == (0.5 if reached else None)
    assert report.variant_label(result) == "paper (2 steps)"
    full = tiny.result["runs"]["sophia"][0]  # the same point on the full schedule differs from step 1
    assert full["curve"]["val_loss"][0] != result["runs"]["sophia"][0]["curve"]["val_loss"][0]
    refused = _bench(tiny.corpus, tiny.dir / "y.json", "--sophia-steps", "3", expect=2)
    assert "--sophia-steps 3: must be a multiple of eval_interval (2)" in refused.stderr

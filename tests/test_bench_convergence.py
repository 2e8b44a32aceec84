"""tools/bench_convergence.py: the ratio arithmetic on synthetic curves, and a tiny end-to-end
grid (AdamW x 2 lr, Sophia x 1 lr x 2 rho, a few steps) that writes the JSON."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
    spec = importlib.util.spec_from_file_location("bench_convergence", os.path.join(ROOT, "tools", "bench_convergence.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _curve(losses, seconds_per_step=2.0, interval=10):
    steps = [interval * (i + 1) for i in range(len(losses))]
    return {"step": steps, "seconds": [s * seconds_per_step for s in steps], "val_loss": losses}


def test_ratio_when_sophia_reaches_adamw_final_loss():
    bench = _tool()
    adamw = _curve([5.0, 4.5, 4.2, 4.0])               # final 4.0 at step 40, 80 s
    sophia = _curve([4.8, 4.0, 3.9, 3.8], seconds_per_step=2.5)
    r = bench.steps_to_reach_ratio(adamw, sophia)
    assert r["target_val_loss"] == 4.0
    assert r["step"] == 20 and r["steps_ratio"] == pytest.approx(0.5)   # <= counts, not only <
    assert r["seconds"] == 50.0 and r["seconds_ratio"] == pytest.approx(50.0 / 80.0)


def test_ratio_is_null_when_never_reached():
    bench = _tool()
    adamw = _curve([5.0, 4.5, 4.2, 4.0])
    never = _curve([5.1, 4.6, None, 4.01])               # a non-finite eval (None) never counts
    r = bench.steps_to_reach_ratio(adamw, never)
    assert r["step"] is None and r["steps_ratio"] is None and r["seconds_ratio"] is None
    diverged_reference = _curve([5.0, None])             # a reference that ended non-finite: no target
    assert bench.steps_to_reach_ratio({**diverged_reference, "val_loss": [5.0, math.inf]}, adamw)["steps_ratio"] is None


def test_comparison_reports_both_directions():
    bench = _tool()
    adamw = {"curve": _curve([5.0, 4.5, 4.2, 4.0])}
    sophia = {"curve": _curve([5.2, 4.9, 4.6, 4.4])}     # ends above AdamW: AdamW got there at step 30
    c = bench.comparison(adamw, sophia)
    assert c["steps_to_adamw_final_loss_ratio"] is None and c["seconds_to_adamw_final_loss_ratio"] is None
    assert c["adamw_reaches_sophia_final"]["step"] == 30 and c["adamw_steps_to_sophia_final_loss_ratio"] == 0.75
    c = bench.comparison(sophia, adamw)                  # the other way round: the roles swap
    assert c["steps_to_adamw_final_loss_ratio"] == 0.75 and c["adamw_steps_to_sophia_final_loss_ratio"] is None


def test_first_step_and_edges():
    bench = _tool()
    assert bench.first_step_reaching([10, 20, 30], [3.0, 2.0, 1.0], 2.5) == 1
    assert bench.first_step_reaching([10, 20], [3.0, 2.9], 2.5) is None
    points = [{"lr": lr} for lr in (1e-3, 2e-3, 4e-3)]
    assert bench.edges(points, {"lr": 4e-3}, "lr") == "upper"
    assert bench.edges(points, {"lr": 1e-3}, "lr") == "lower"
    assert bench.edges(points, {"lr": 2e-3}, "lr") is None
    assert bench.edges(points[:1], {"lr": 1e-3}, "lr") == "single value"


@pytest.mark.distributed
def test_tiny_grid_writes_the_json(tmp_path):
    from neox_sophia.data.corpus import prepare_builtin_corpus

    corpus = tmp_path / "corpus"
    prepare_builtin_corpus(corpus, max_bytes=300_000, vocab_size=512, log=None)
    out = tmp_path / "convergence.json"
    sets = ["num_layers=1", "hidden_size=32", "num_attention_heads=2", "seq_length=32", "max_position_embeddings=32",
            "train_micro_batch_size_per_gpu=2", "gradient_accumulation_steps=2", "eval_iters=1",
            "optimizer.params.hessian_interval=2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "bench_convergence.py"), "--steps", "4", "--eval-interval", "2",
         "--adamw-lr", "1e-3,3e-3", "--sophia-lr", "1e-3", "--sophia-rho", "0.03,0.1", "--extend-edges", "0",
         "--corpus-dir", str(corpus), "--split", "90,10,0", "--device", "cpu", "--label", "test",
         "--output", str(out)] + [a for s in sets for a in ("--set", s)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**env, "DS_ACCELERATOR": "cpu"},
        stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["label"] == "test" and "Python standard library" in result["corpus"]["name"]
    assert result["tokens_per_step"] == 4 * 32 and result["train_iters"] == 4
    assert result["model"]["parameters"] > result["model"]["non_embedding_parameters"] > 0
    assert len(result["runs"]["adamw"]) == 2 and len(result["runs"]["sophia"]) == 2
    for name in ("adamw", "sophia"):
        best = result["best"][name]["best"]
        assert best["curve"]["step"] == [2, 4] and len(best["curve"]["seconds"]) == 2
        assert result["final_val_loss"][name] == best["curve"]["val_loss"][-1]
        assert result["final_val_loss"][name] == min(p["curve"]["val_loss"][-1] for p in result["runs"][name])
    assert result["runs"]["sophia"][0]["hessian_updates"] == 2
    win = result["runs"]["sophia"][0]["win_rate"]  # from the trainer's metrics, logged every eval_interval
    assert win["step"] == [2, 4] and all(0 <= w <= 1 for w in win["value"])
    assert "win_rate" not in result["runs"]["adamw"][0]
    r = result["sophia_reaches_adamw_final"]
    expected = _tool().steps_to_reach_ratio(result["best"]["adamw"]["best"]["curve"],
                                            result["best"]["sophia"]["best"]["curve"])
    assert result["steps_to_adamw_final_loss_ratio"] == expected["steps_ratio"] == r["steps_ratio"]
    assert result["seconds_to_adamw_final_loss_ratio"] == expected["seconds_ratio"]
    assert {"cpu", "cpu_cores", "torch"} <= set(result["machine"])
    assert result["best"]["adamw"]["at_edge"]["lr"] in ("lower", "upper", None)
    assert result["adamw_steps_to_sophia_final_loss_ratio"] == expected_reverse_ratio(result)
    try:
        import matplotlib  # noqa: F401
        assert out.with_suffix(".png").exists()
    except ImportError:
        assert "pip install matplotlib" in done.stderr and not out.with_suffix(".png").exists()
    # --replot recomputes the comparison of a result file without training
    del result["adamw_steps_to_sophia_final_loss_ratio"]
    out.write_text(json.dumps(result))
    again = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_convergence.py"), "--replot", str(out),
                            "--plot", "none"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    replotted = json.loads(out.read_text())
    assert replotted["adamw_steps_to_sophia_final_loss_ratio"] == expected_reverse_ratio(replotted)
    assert replotted["steps_to_adamw_final_loss_ratio"] == result["steps_to_adamw_final_loss_ratio"]


def expected_reverse_ratio(result):
    return _tool().steps_to_reach_ratio(result["best"]["sophia"]["best"]["curve"],
                                        result["best"]["adamw"]["best"]["curve"])["steps_ratio"]

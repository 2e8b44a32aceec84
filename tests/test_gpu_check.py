"""`make gpu-check`'s reduced run on the CPU: every step succeeds and reports what the GPU run
will, and each tool's figures are computed the way its documentation says.

One reduced run (module fixture: ~6 subprocesses, quickstart model on 32-token sequences, 2 gloo
ranks for the multi-rank step) serves every test here; the benchmark tools have no other tests.
Timings are only checked to be positive and consistent, never against a target: machines are
noisy and unit tests do not assert on speed.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.distributed

STEPS = ["gpu_tests", "optimizer", "training", "compile", "startup", "multi_rank"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from neox_sophia.data.corpus import prepare_builtin_corpus

    corpus = prepare_builtin_corpus(tmp_path_factory.mktemp("corpus"), max_bytes=500_000, vocab_size=512, log=None)
    output = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--output", str(output),
                           "--reduced", "--data-path", corpus.data_prefix, "--vocab-file", corpus.tokenizer],
                          capture_output=True, text=True, timeout=1800, cwd=ROOT, env={**env, "DS_ACCELERATOR": "cpu"},
                          stdin=subprocess.DEVNULL)
    result = json.loads((output / "gpu_check.json").read_text())
    failed = {name: step.get("stderr_tail") for name, step in result["steps"].items() if not step["ok"]}
    assert done.returncode == 0 and not failed, (done.stdout[-2000:], failed)
    return result, (output / "gpu_check.md").read_text()


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_every_step_ran_and_the_table_names_them(report):
    result, table = report
    assert list(result["steps"]) == STEPS and result["ok"] and result["mode"].startswith("reduced")
    for figure in ("Sophia step / fused AdamW step", "Hessian EMA / fused AdamW step", "copy bandwidth",
                   "tokens/s AdamW / Sophia", "MFU", "Hessian overhead", "peak resident memory", "time to first step",
                   "compiled / eager layers speedup", "2 ranks data parallel", "gpu tests passed"):
        assert figure in table, figure
    counts = result["steps"]["gpu_tests"]["result"]
    assert counts["failed"] == counts["errors"] == 0 and counts["skipped"] >= 4  # CPU: every gpu test skips


def test_optimizer_ratios_and_bandwidths(report):
    r = report[0]["steps"]["optimizer"]["result"]
    assert r["fused_kernels"]["status"] == "on"  # a C++ compiler is there: the fused path ran
    assert r["parameters"] == 2 * 8192 * 256 + 12 * 256 ** 2 + 13 * 256 + 2 * 256
    state = r["state_bytes_per_param"]
    assert 8.0 <= state["sophia"] <= 8.01 and abs(state["adamw_foreach"] - 8.0) < 0.01  # exp_avg + hessian (+ counters)
    # effective bandwidth = words moved per parameter x 4 bytes x parameters / time
    n, gbps = r["parameters"], r["bandwidth_gbps"]
    for key, words in (("sophia", 6), ("sophia_eager", 6), ("adamw_foreach", 7), ("sophia_hessian_update", 3),
                       ("copy", 2)):
        assert positive(r[f"{key}_ms"]), key
        assert gbps[key] == pytest.approx(words * 4 * n / (r[f"{key}_ms"] / 1e3) / 1e9)
        assert r["bandwidth_fraction_of_copy"][key] == pytest.approx(gbps[key] / gbps["copy"])
    if r["adamw_fused_ms"] is None:
        assert r["sophia_over_fused_adamw"] is None and r["hessian_ema_over_fused_adamw"] is None
    else:
        assert r["sophia_over_fused_adamw"] == pytest.approx(r["sophia_ms"] / r["adamw_fused_ms"])
        assert r["hessian_ema_over_fused_adamw"] == pytest.approx(r["sophia_hessian_update_ms"] / r["adamw_fused_ms"])


def test_training_overhead_against_its_bound_and_memory(report):
    r = report[0]["steps"]["training"]["result"]
    assert r["k"] == 2 and r["layout"]["hessian_batch_size"] == 2 and r["layout"]["train_batch_size"] == 4
    assert positive(r["adamw_ms_per_iteration"]) and positive(r["sophia_ms_per_iteration"])
    assert r["overhead_pct"] == pytest.approx(100 * (r["sophia_ms_per_iteration"] / r["adamw_ms_per_iteration"] - 1))
    # bound: (Hessian batch / training batch) / k = (2 / 4) / 2; the label draw and the EMA ran once per block
    assert r["bound_pct"] == pytest.approx(25.0) and r["gap_to_bound_pct"] == pytest.approx(r["overhead_pct"] - 25.0)
    for piece in ("label_sampling", "hessian_ema"):
        assert positive(r[f"{piece}_ms"])
        assert r[f"{piece}_pct"] == pytest.approx(100 * r[f"{piece}_ms"] / r["k"] / r["adamw_ms_per_iteration"])
    memory = r["memory"]
    runs = memory["runs"]["sophia"] + memory["runs"]["adamw"]
    assert [m["optimizer"] for m in runs] == ["sophia"] * 2 + ["adamw"] * 2
    for run in memory["runs"]["sophia"] + memory["runs"]["adamw"]:
        assert run["peak_rss_bytes"] >= run["rss_after_setup_bytes"] > 0
    peak = memory["peak_rss_bytes"]
    assert peak["ratio"] == pytest.approx(peak["sophia"] / peak["adamw"])
    # two state tensors per parameter for both (exp_avg + hessian vs exp_avg + exp_avg_sq), plus step counters
    state = memory["optimizer_state_bytes"]
    assert state["sophia"] > 0 and state["adamw"] == pytest.approx(state["sophia"], rel=0.01)


def test_compile_startup_and_multi_rank(report):
    steps = report[0]["steps"]
    c = steps["compile"]["result"]
    assert positive(c["compiled_speedup"]) and c["max_relative_loss_difference"] <= 1e-5
    assert c["compiled_speedup"] == pytest.approx(c["eager_ms_per_iteration"] / c["compiled_ms_per_iteration"])
    [run] = steps["startup"]["result"]["runs"]
    assert list(run["phases_s"]) == ["imports and config", "distributed", "tokenizer", "datasets", "model", "engine",
                                     "first step"]
    assert run["total_s"] == pytest.approx(sum(run["phases_s"].values()))
    assert 0 < run["total_s"] <= run["process_wall_s"] + 1.0  # the process started just before the tool's clock
    m = steps["multi_rank"]["result"]
    assert m["layout"]["world_size"] == 2 and m["layout"]["dp"] == 2 and positive(m["tokens_per_s"]["sophia"])

"""tools/bench_overhead.py runs Sophia and AdamW side by side and reports the Hessian overhead."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.distributed


def test_bench_overhead_reports_both_optimizers_time_and_memory(tmp_path):
    from neox_sophia.data.corpus import prepare_builtin_corpus

    corpus = prepare_builtin_corpus(tmp_path / "corpus", max_bytes=500_000, vocab_size=512, log=None)
    sets = [f"data_path={corpus.data_prefix}", f"vocab_file={corpus.tokenizer}", "seq_length=32",
            "max_position_embeddings=32", "train_micro_batch_size_per_gpu=2", "gradient_accumulation_steps=2",
            "eval_iters=0"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_overhead.py"),
                           os.path.join(ROOT, "configs", "quickstart.yml"), "--blocks", "1", "--k", "2", "--json", "--memory"]
                          + [a for s in sets for a in ("--set", s)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env={**env, "DS_ACCELERATOR": "cpu"}, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["k"] == 2 and result["layout"]["hessian_batch_size"] == 2
    assert result["adamw_ms_per_iteration"] > 0 and result["sophia_ms_per_iteration"] > 0
    assert result["overhead_pct"] == pytest.approx(
        100 * (result["sophia_ms_per_iteration"] / result["adamw_ms_per_iteration"] - 1))
    # bound: (Hessian batch / training batch) / k = (2 / 4) / 2; the label draw and the EMA ran once per block
    assert result["bound_pct"] == pytest.approx(25.0)
    assert result["gap_to_bound_pct"] == pytest.approx(result["overhead_pct"] - 25.0)
    for piece in ("label_sampling", "hessian_ema"):
        assert result[f"{piece}_ms"] > 0
        assert result[f"{piece}_pct"] == pytest.approx(
            100 * result[f"{piece}_ms"] / result["k"] / result["adamw_ms_per_iteration"])
    memory = result["memory"]
    assert [r["optimizer"] for r in memory["runs"]["sophia"] + memory["runs"]["adamw"]] == ["sophia"] * 2 + ["adamw"] * 2
    for run in memory["runs"]["sophia"] + memory["runs"]["adamw"]:
        assert run["peak_rss_bytes"] >= run["rss_after_setup_bytes"] > 0
    peak = memory["peak_rss_bytes"]
    assert peak["ratio"] == pytest.approx(peak["sophia"] / peak["adamw"])
    # two state tensors per parameter for both (exp_avg + hessian vs exp_avg + exp_avg_sq), plus
    # AdamW's per-parameter step counters
    state = memory["optimizer_state_bytes"]
    assert state["sophia"] > 0 and state["adamw"] == pytest.approx(state["sophia"], rel=0.01)

"""tools/bench_optimizer.py runs end to end, reports 8 bytes/param of optimizer state and the
bandwidth bookkeeping its ratios rest on.

Timing ratios are only checked to be positive finite numbers, never compared with a target:
machines are noisy and unit tests do not assert on speed.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "bench_optimizer.py"

KEYS = ("sophia_over_fused_adamw", "hessian_ema_over_fused_adamw", "sophia_eager_over_fused_adamw",
        "sophia_over_adamw", "sophia_ms", "sophia_eager_ms", "adamw_foreach_ms", "adamw_fused_ms",
        "sophia_hessian_update_ms", "sophia_eager_hessian_update_ms", "copy_ms", "bandwidth_gbps",
        "bandwidth_fraction_of_copy", "fused_kernels", "parameters", "device", "dtype", "torch_version",
        "threads", "state_bytes_per_param", "peak_transient_bytes")


def run_small_benchmark():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--repeats", "1", "--warmup", "0", "--json", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # the whole of stdout must be one JSON object


def is_positive_finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_small_benchmark_reports_state_bytes_and_ratios():
    result = run_small_benchmark()
    for key in KEYS:
        assert key in result, key
    assert result["device"] == "cpu" and result["dtype"] == "fp32"
    assert result["peak_transient_bytes"] is None  # measured on CUDA only
    # --small: 2 layers, vocab 8192, hidden 768.
    assert result["parameters"] == 2 * 8192 * 768 + 2 * (12 * 768 ** 2 + 13 * 768) + 2 * 768

    state = result["state_bytes_per_param"]
    assert 8.0 <= state["sophia"] <= 8.01  # exp_avg + hessian in fp32, plus scalar counters
    assert abs(state["adamw_foreach"] - 8.0) < 0.01
    if "adamw_fused" in state:
        assert abs(state["adamw_fused"] - 8.0) < 0.01

    assert result["fused_kernels"]["status"] == "on"  # a C++ compiler is there: the fused path ran
    for key in ("sophia_ms", "sophia_eager_ms", "adamw_foreach_ms", "sophia_hessian_update_ms", "copy_ms",
                "sophia_over_adamw", "sophia_fused_over_eager"):
        assert is_positive_finite(result[key]), key
    # Effective bandwidth = words moved per parameter x 4 bytes x parameters / time.
    n, gbps = result["parameters"], result["bandwidth_gbps"]
    for key, words in (("sophia", 6), ("adamw_foreach", 7), ("sophia_hessian_update", 3), ("copy", 2)):
        assert abs(gbps[key] - words * 4 * n / (result[f"{key}_ms"] / 1e3) / 1e9) < 1e-9 * gbps[key]
        assert abs(result["bandwidth_fraction_of_copy"][key] - gbps[key] / gbps["copy"]) < 1e-12
    if result["adamw_fused_ms"] is None:
        assert result["sophia_over_fused_adamw"] is None and result["hessian_ema_over_fused_adamw"] is None
    else:
        assert abs(result["sophia_over_fused_adamw"] - result["sophia_ms"] / result["adamw_fused_ms"]) < 1e-12
        assert abs(result["hessian_ema_over_fused_adamw"]
                   - result["sophia_hessian_update_ms"] / result["adamw_fused_ms"]) < 1e-12

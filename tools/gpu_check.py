"""Everything a GPU must show, in one command: `make gpu-check OUT=DIR` (at most 8 minutes on one GPU).

Steps, each in its own process, each a tool of tools/ (their --json output is kept whole):

    gpu_tests   the tests marked `gpu` (pytest -m gpu): fused kernels == eager on CUDA, compiled
                layers, the fp16 Hessian step
    optimizer   bench_optimizer.py: Sophia's step, its Hessian EMA and fused AdamW against a copy
                of the same bytes (the device's measured bandwidth), 125M shapes, fp32 master
                weights as bf16 training hands them to the optimizer
    training    bench_overhead.py --memory: GPT-NeoX 125M in bf16, Sophia-G and AdamW side by side
                in one run: tokens/s, MFU, Hessian overhead against its bound, label sampling's
                share, peak memory of each alone
    compile     bench_compile.py: compiled vs eager layers, tokens/s and loss difference
    startup     bench_startup.py: time from `neox-sophia train` to the first step, by phase
    multi_rank  with 2+ GPUs: bench_overhead.py over NCCL, data parallel across all of them

Writes DIR/gpu_check.json (every step's command, exit code, seconds and full result) and
DIR/gpu_check.md (the headline figures as a table). Exit code 0 when every step succeeded.

Without CUDA (or with --reduced) the same steps run at small sizes on the CPU, 2 gloo ranks
standing in for NCCL: the same code and the same outputs, so it cannot rot while no GPU is
there (tests/test_gpu_check.py runs it in CI).

    python tools/gpu_check.py --output results/h100        # data: data/stdlib (neox-sophia corpus)
    python tools/gpu_check.py --output /tmp/check --reduced --data-path P --vocab-file T
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 8 * 60
LAUNCHER_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def data_sets(args: argparse.Namespace) -> List[str]:
    return ["--set", f"data_path={args.data_path}", "--set", f"vocab_file={args.vocab_file}",
            "--set", "tokenizer_type=HFTokenizer"]


def sets(*pairs: str) -> List[str]:
    return [a for pair in pairs for a in ("--set", pair)]


def tool(name: str) -> List[str]:
    return [sys.executable, str(ROOT / "tools" / name)]


def full_steps(args: argparse.Namespace, gpus: int) -> Dict[str, List[str]]:
    """The commands on a GPU machine: 125M shapes, bf16."""
    model = ["configs/125M.yml", "configs/sophia.yml", *data_sets(args), *sets("precision=bfloat16")]
    batch = sets("train_batch_size=32", "train_micro_batch_size_per_gpu=16", "gradient_accumulation_steps=2")
    steps = {
        "gpu_tests": gpu_tests(args),
        "optimizer": tool("bench_optimizer.py") + ["--device", "cuda", "--json"],
        "training": tool("bench_overhead.py") + model + batch + ["--blocks", "3", "--k", "10", "--memory", "--json"],
        "compile": tool("bench_compile.py") + model + batch + ["--blocks", "2", "--k", "5", "--json"],
        "startup": tool("bench_startup.py") + model + batch + ["--runs", "1", "--json"],
    }
    if gpus >= 2:
        steps["multi_rank"] = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                f"--nproc_per_node={gpus}"] + tool("bench_overhead.py")[1:] + model
                               + sets(f"train_batch_size={16 * gpus}", "train_micro_batch_size_per_gpu=16",
                                      "gradient_accumulation_steps=1") + ["--blocks", "2", "--k", "10", "--json"])
    return steps


def reduced_steps(args: argparse.Namespace) -> Dict[str, List[str]]:
    """The same commands at CPU sizes: the quickstart model on 32-token sequences, 2 gloo ranks."""
    model = ["configs/quickstart.yml", *data_sets(args),
             *sets("seq_length=32", "max_position_embeddings=32", "eval_iters=0")]
    batch = sets("train_micro_batch_size_per_gpu=2", "gradient_accumulation_steps=2")
    return {
        "gpu_tests": gpu_tests(args),
        "optimizer": tool("bench_optimizer.py") + ["--device", "cpu", "--hidden", "256", "--layers", "1", "--vocab",
                                                   "8192", "--repeats", "1", "--warmup", "0", "--json"],
        "training": tool("bench_overhead.py") + model + batch + ["--blocks", "1", "--k", "2", "--memory", "--json"],
        "compile": tool("bench_compile.py") + model + batch + ["--blocks", "1", "--k", "2", "--json"],
        "startup": tool("bench_startup.py") + model + batch + ["--runs", "1", "--json"],
        "multi_rank": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
                       + tool("bench_overhead.py")[1:] + model + batch + ["--blocks", "1", "--k", "2", "--json"]),
    }


def gpu_tests(args: argparse.Namespace) -> List[str]:
    return [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
            f"--junitxml={Path(args.output) / 'gpu_tests.xml'}", str(ROOT / "tests")]


def test_counts(junit: Path) -> Dict[str, int]:
    """passed / failed / skipped / errors from pytest's junit XML."""
    suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed, errors, skipped = (int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped"))
    return {"passed": total - failed - errors - skipped, "failed": failed, "errors": errors, "skipped": skipped}


def run_step(name: str, command: List[str], timeout: float, env: Dict[str, str], output: Path) -> Dict:
    start = time.time()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        code, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:
        code, stdout, stderr = "timeout", expired.stdout or "", f"timed out after {timeout:.0f} s"
        stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
    record = {"command": command, "exit_code": code, "seconds": time.time() - start}
    if name == "gpu_tests":
        junit = output / "gpu_tests.xml"
        record["result"] = test_counts(junit) if junit.exists() else None
        # pytest exits 5 when every collected test was deselected or skipped: not a failure here
        record["ok"] = code in (0, 5) and record["result"] is not None and not record["result"]["failed"] \
            and not record["result"]["errors"]
    else:
        lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
        record["result"] = json.loads(lines[-1]) if lines else None
        record["ok"] = code == 0 and record["result"] is not None
    if not record["ok"]:
        record["stderr_tail"] = stderr[-4000:]
    return record


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _rows_optimizer(r: Dict) -> List[List[str]]:
    gbps, frac = r["bandwidth_gbps"], r["bandwidth_fraction_of_copy"]
    return [["Sophia step / fused AdamW step", _fmt(r["sophia_over_fused_adamw"]), "goal <= 0.86"],
            ["Hessian EMA / fused AdamW step", _fmt(r["hessian_ema_over_fused_adamw"]), "goal <= 0.45"],
            ["copy bandwidth (GB/s)", _fmt(gbps["copy"]), "the physical limit"],
            *[[f"{label} bandwidth (GB/s, fraction of copy)", f"{_fmt(gbps[key])} ({_fmt(frac[key], 2)})", ""]
              for key, label in (("sophia", "Sophia step"), ("sophia_hessian_update", "Hessian EMA"),
                                 ("adamw_fused", "fused AdamW"))
              if gbps.get(key) is not None],
            ["fused kernels", r["fused_kernels"]["status"], ""]]


def _rows_training(r: Dict) -> List[List[str]]:
    rows = [["tokens/s AdamW / Sophia", f"{_fmt(r['tokens_per_s']['adamw'])} / {_fmt(r['tokens_per_s']['sophia'])}",
             f"{r['layout']['precision']}, batch {r['layout']['train_batch_size']}"],
            ["MFU AdamW / Sophia", "n/a" if not r["mfu"] else f"{r['mfu']['adamw']:.1%} / {r['mfu']['sophia']:.1%}",
             f"peak {_fmt(r['peak_tflops'])} TFLOP/s"],
            ["Hessian overhead (% of an AdamW iteration)", f"{r['overhead_pct']:+.2f}",
             f"bound {r['bound_pct']:.2f}, gap {r['gap_to_bound_pct']:+.2f} points (goal within 0.5)"],
            ["label sampling / Hessian EMA (points)",
             f"{r['label_sampling_pct']:.2f} / {r['hessian_ema_pct']:.2f}", ""]]
    memory = r.get("memory") or {}
    for key, label in (("cuda_peak_allocated_bytes", "peak CUDA memory"), ("peak_rss_bytes", "peak resident memory")):
        if key in memory:
            m = memory[key]
            rows.append([f"{label} AdamW / Sophia (MiB)", f"{m['adamw'] / 2**20:.0f} / {m['sophia'] / 2**20:.0f}",
                         f"ratio {m['ratio']:.3f}"])
    return rows


def _rows_compile(r: Dict) -> List[List[str]]:
    return [["compiled / eager layers speedup", _fmt(r["compiled_speedup"]),
             f"tokens/s {_fmt(r['tokens_per_s']['eager'])} -> {_fmt(r['tokens_per_s']['compiled'])}"],
            ["compiled vs eager loss (largest relative difference)", _fmt(r["max_relative_loss_difference"]), ""]]


def _rows_startup(r: Dict) -> List[List[str]]:
    run = r["runs"][0]
    phases = ", ".join(f"{name} {seconds:.1f}" for name, seconds in run["phases_s"].items())
    return [["time to first step (s)", f"{run['total_s']:.1f}", phases]]


def _rows_multi_rank(r: Dict) -> List[List[str]]:
    lay = r["layout"]
    return [[f"{lay['world_size']} ranks data parallel: tokens/s AdamW / Sophia",
             f"{_fmt(r['tokens_per_s']['adamw'])} / {_fmt(r['tokens_per_s']['sophia'])}",
             f"Hessian overhead {r['overhead_pct']:+.2f}%"]]


def _rows_gpu_tests(r: Dict) -> List[List[str]]:
    failed = r["failed"] + r["errors"]
    return [["gpu tests passed / failed / skipped", f"{r['passed']} / {failed} / {r['skipped']}", ""]]


ROWS: Dict[str, Callable[[Dict], List[List[str]]]] = {
    "gpu_tests": _rows_gpu_tests, "optimizer": _rows_optimizer, "training": _rows_training,
    "compile": _rows_compile, "startup": _rows_startup, "multi_rank": _rows_multi_rank}


def markdown(report: Dict) -> str:
    lines = [f"# gpu-check: {report['device']}", "",
             f"{report['mode']} run, {report['total_seconds']:.0f} s in all (budget {BUDGET_S} s), "
             f"torch {report['torch_version']}, {'all steps passed' if report['ok'] else 'SOME STEPS FAILED'}", "",
             "| figure | value | note | step |", "|---|---|---|---|"]
    for name, step in report["steps"].items():
        if not step["ok"]:
            lines.append(f"| {name} | **failed** (exit {step['exit_code']}) | see gpu_check.json | {name} |")
            continue
        lines += [f"| {figure} | {value} | {note} | {name} |" for figure, value, note in ROWS[name](step["result"])]
    lines += ["", "| step | seconds |", "|---|---|"]
    lines += [f"| {name} | {step['seconds']:.0f} |" for name, step in report["steps"].items()]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--reduced", action="store_true", help="CPU sizes even where CUDA is available")
    parser.add_argument("--data-path", default="data/stdlib/stdlib_text_document")
    parser.add_argument("--vocab-file", default="data/stdlib/tokenizer.json")
    parser.add_argument("--only", action="append", choices=tuple(ROWS), help="run only these steps")
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    reduced = args.reduced or gpus == 0
    steps = reduced_steps(args) if reduced else full_steps(args, gpus)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_KEYS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    start, records = time.time(), {}
    for name, command in steps.items():
        if args.only and name not in args.only:
            continue
        remaining = BUDGET_S - (time.time() - start) if not reduced else 1800
        records[name] = run_step(name, command, max(remaining, 30), env, output)
        print(f"gpu-check: {name} {'ok' if records[name]['ok'] else 'FAILED'} ({records[name]['seconds']:.0f} s)",
              flush=True)
    report = {"mode": "reduced (CPU sizes)" if reduced else f"full ({gpus} GPU{'s' if gpus > 1 else ''})",
              "device": torch.cuda.get_device_name(0) if gpus and not reduced else "cpu",
              "torch_version": torch.__version__, "total_seconds": time.time() - start, "budget_seconds": BUDGET_S,
              "ok": all(r["ok"] for r in records.values()), "steps": records}
    (output / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (output / "gpu_check.md").write_text(markdown(report))
    print(f"gpu-check: wrote {output / 'gpu_check.json'} and {output / 'gpu_check.md'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

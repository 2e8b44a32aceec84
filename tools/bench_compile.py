"""Tokens/s of the compiled model path (compile_model: true) against eager, side by side.

Both runs are built in one process from the same config (only compile_model differs: same
weights, data and optimizer) and alternate in blocks of k iterations (k: the Sophia Hessian
interval, so every block holds one Hessian step), so drift in the machine hits both alike;
medians over the blocks. The first block of each is timed apart: the compiled run's includes
compiling the layers (or loading them from torch's on-disk cache). The losses of both runs are
compared step by step.

    .venv/bin/python tools/bench_compile.py configs/quickstart.yml                 # CPU, quickstart shape
    .venv/bin/python tools/bench_compile.py configs/125M.yml configs/sophia.yml $STDLIB \\
        --set train_batch_size=1 --set train_micro_batch_size_per_gpu=1 --set gradient_accumulation_steps=1 \\
        --set optimizer.params.hessian_batch_size=1 --blocks 2 --k 2          # a 125M-shape micro-batch
    .venv/bin/python tools/bench_compile.py ... --json

($STDLIB: the built-in corpus, see benchmarks/README.md.)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_overhead import _block  # noqa: E402  (tools/ is on the path when a tool runs)


def measure(configs: List[str], overrides: List[str], blocks: int, k: int) -> Dict:
    from neox_sophia.config import load_config
    from neox_sophia.training.loop import RunResult, setup

    common = overrides + [f"train_iters={(blocks + 1) * k}", "save=null", "load=null", "log_dir=null",
                          f"optimizer.params.hessian_interval={k}"]
    runs = {flag: setup(load_config(configs, common + [f"compile_model={flag}"], warn=False))
            for flag in ("false", "true")}
    results = {flag: RunResult(0) for flag in runs}
    first = {flag: _block(run, 0, k, results[flag]) for flag, run in runs.items()}
    per_iteration: Dict[str, List[float]] = {flag: [] for flag in runs}
    for b in range(1, blocks + 1):
        for flag, run in runs.items():
            per_iteration[flag].append(sum(_block(run, b * k, k, results[flag])) / k)
    eager_ms, compiled_ms = (1e3 * statistics.median(per_iteration[f]) for f in ("false", "true"))
    run = runs["false"]
    tokens = run.layout.train_batch_size * run.cfg.model.seq_length
    eager_loss, compiled_loss = results["false"].train_loss, results["true"].train_loss
    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "precision": run.cfg.engine.resolved_precision,
        "model": {"num_layers": run.cfg.model.num_layers, "hidden_size": run.cfg.model.hidden_size,
                  "seq_length": run.cfg.model.seq_length},
        "tokens_per_iteration": tokens, "k": k, "blocks": blocks,
        "eager_ms_per_iteration": eager_ms, "compiled_ms_per_iteration": compiled_ms,
        "compiled_speedup": eager_ms / compiled_ms,
        "tokens_per_s": {"eager": tokens / (eager_ms / 1e3), "compiled": tokens / (compiled_ms / 1e3)},
        "first_block_s": {"eager": sum(first["false"]), "compiled": sum(first["true"])},
        "max_relative_loss_difference": max(abs(compiled_loss[s] - eager_loss[s]) / abs(eager_loss[s])
                                            for s in eager_loss),
        "threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # deepspeed's launcher adds it
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks of k iterations per run")
    parser.add_argument("--k", type=int, default=5, help="iterations per block (the Hessian interval)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = measure(args.configs, args.overrides, args.blocks, args.k)
    import torch.distributed as dist

    if dist.get_rank() != 0:
        return 0
    if args.json:
        print(json.dumps(result))
        return 0
    m = result["model"]
    print(f"{m['num_layers']} layers x {m['hidden_size']}, seq {m['seq_length']}, "
          f"{result['tokens_per_iteration']} tokens per iteration, {result['precision']}, {result['device']}, "
          f"{result['threads']} threads")
    for flag in ("eager", "compiled"):
        print(f"{flag:<9} {result[f'{flag}_ms_per_iteration']:9.1f} ms/iteration {result['tokens_per_s'][flag]:10.0f} "
              f"tok/s   first block {result['first_block_s'][flag]:.1f} s")
    print(f"compiled / eager speedup {result['compiled_speedup']:.3f}; largest relative loss difference "
          f"{result['max_relative_loss_difference']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-iteration wall clock of Sophia-G (Hessian step every k iterations) against AdamW on the same
model, data and layout, interleaved in one run; the Hessian overhead in percent of an AdamW
iteration.

Both runs are built in one process (two DeepSpeed engines from the same config, only the
optimizer block differs) and alternate in blocks of k iterations, so every Sophia block holds
exactly one Hessian step and drift in the machine hits both alike. Medians over the blocks.

    .venv/bin/python tools/bench_overhead.py configs/quickstart.yml                 # CPU, one rank
    .venv/bin/python tools/bench_overhead.py configs/quickstart.yml --json
    deepspeed --num_gpus 2 tools/bench_overhead.py configs/quickstart.yml --set model_parallel_size=2

Sophia's k comes from the config (optimizer.params.hessian_interval, or --k); the AdamW run uses
the same lr. The paper reports a few percent with k=10 and a Hessian batch of half the training
batch; the goal here is at most 5%.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _block(run, start: int, k: int) -> List[float]:
    """Seconds of each of the iterations start .. start + k - 1."""
    from neox_sophia.training.loop import RunResult, _one_step

    result, times = RunResult(start), []
    for step in range(start, start + k):
        _sync()
        t0 = time.perf_counter()
        _one_step(run, step, result)
        _sync()
        times.append(time.perf_counter() - t0)
    return times


def measure(configs: List[str], overrides: List[str], blocks: int, k: int) -> Dict:
    import torch.distributed as dist

    from neox_sophia.config import load_config
    from neox_sophia.training.loop import setup

    common = overrides + [f"train_iters={(blocks + 2) * k}", "save=null", "load=null", "log_dir=null"]
    sophia_cfg = load_config(configs, common + [f"optimizer.params.hessian_interval={k}"], warn=False)
    if sophia_cfg.optimizer.type != "sophia":
        raise SystemExit("bench_overhead: the config's optimizer must be sophia (the AdamW twin is derived)")
    lr = sophia_cfg.optimizer.params["lr"]
    adamw_cfg = load_config(configs, common + [f"optimizer={{type: adamw, params: {{lr: {lr}}}}}"], warn=False)
    sophia, adamw = setup(sophia_cfg), setup(adamw_cfg)
    _block(sophia, 0, k), _block(adamw, 0, k)  # warm-up block each (allocations, first Hessian step)
    sophia_blocks, adamw_blocks, hessian = [], [], []
    for b in range(1, blocks + 1):
        s = _block(sophia, b * k, k)
        a = _block(adamw, b * k, k)
        sophia_blocks.append(sum(s) / k)
        adamw_blocks.append(sum(a) / k)
        hessian.append(s[-1] - statistics.median(s[:-1]))  # the last iteration of a block refreshes h
    lay = sophia.layout
    sophia_ms, adamw_ms = 1e3 * statistics.median(sophia_blocks), 1e3 * statistics.median(adamw_blocks)
    result = {
        "layout": {"world_size": lay.world_size, "tp": lay.tp, "pp": lay.pp, "dp": lay.dp,
                   "train_batch_size": lay.train_batch_size, "micro_batch_size": lay.micro_batch_size,
                   "gradient_accumulation_steps": lay.gradient_accumulation_steps,
                   "hessian_batch_size": sophia_cfg.hessian_batch(lay.world_size)[0],
                   "precision": sophia_cfg.engine.resolved_precision, "zero_stage": sophia_cfg.engine.zero_stage},
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "k": k, "blocks": blocks,
        "adamw_ms_per_iteration": adamw_ms,
        "sophia_ms_per_iteration": sophia_ms,
        "hessian_step_ms": 1e3 * statistics.median(hessian),
        "overhead_pct": 100.0 * (sophia_ms / adamw_ms - 1.0),
        "tokens_per_s": {"adamw": lay.train_batch_size * sophia_cfg.model.seq_length / (adamw_ms / 1e3),
                         "sophia": lay.train_batch_size * sophia_cfg.model.seq_length / (sophia_ms / 1e3)},
    }
    result["rank"] = dist.get_rank()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks of k iterations per optimizer")
    parser.add_argument("--k", type=int, default=10, help="Hessian interval of the Sophia run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = measure(args.configs, args.overrides, args.blocks, args.k)
    if result.pop("rank") != 0:
        return 0
    if args.json:
        print(json.dumps(result))
        return 0
    lay = result["layout"]
    print(f"layout: {lay['world_size']} ranks = TP {lay['tp']} x PP {lay['pp']} x DP {lay['dp']}, batch "
          f"{lay['train_batch_size']} ({lay['micro_batch_size']} x {lay['gradient_accumulation_steps']} per rank), "
          f"Hessian batch {lay['hessian_batch_size']}, {lay['precision']}, ZeRO-{lay['zero_stage']}, {result['device']}")
    print(f"AdamW   {result['adamw_ms_per_iteration']:9.1f} ms/iteration  {result['tokens_per_s']['adamw']:10.0f} tok/s")
    print(f"Sophia  {result['sophia_ms_per_iteration']:9.1f} ms/iteration  {result['tokens_per_s']['sophia']:10.0f} tok/s"
          f"  (k={result['k']}; Hessian step {result['hessian_step_ms']:.1f} ms)")
    print(f"overhead {result['overhead_pct']:+.1f}% of an AdamW iteration (goal: <= 5%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
batch. The compute bound of the Hessian step is (Hessian batch / training batch) / k of an
iteration (its forward and backward on fewer sequences, every k steps): 5% at the paper's half
batch and k = 10. The report sets the measured overhead next to that bound (goal: within 0.5
points) and splits off the two pieces the bound does not count: the label sampling (drawing
labels from the model's softmax) and the optimizer's Hessian EMA, each in points of an AdamW
iteration.

--memory (one process only) adds peak memory: each optimizer runs alone in a fresh child process
(setup, then 2k iterations, so two Hessian steps), in the order Sophia, AdamW, AdamW, Sophia.
A child reports its resident set after setup, the peak resident set during the iterations
(Linux: the high-water mark is reset after setup through /proc/self/clear_refs, so setup's own
peak does not count), the bytes of optimizer state, and on CUDA the peak allocated memory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _block(run, start: int, k: int, result=None) -> List[float]:
    """Seconds of each of the iterations start .. start + k - 1 (their losses go into ``result``,
    a RunResult, when given)."""
    from neox_sophia.training.loop import RunResult, train_step

    result, times = result or RunResult(start), []
    for step in range(start, start + k):
        _sync()
        t0 = time.perf_counter()
        train_step(run, step, result)
        _sync()
        times.append(time.perf_counter() - t0)
    return times


def twin_configs(configs: List[str], overrides: List[str], iterations: int, k: int) -> Tuple:
    """(Sophia config with hessian_interval k, the same config with AdamW at Sophia's lr)."""
    from neox_sophia.config import load_config

    common = overrides + [f"train_iters={iterations}", "save=null", "load=null", "log_dir=null"]
    sophia_cfg = load_config(configs, common + [f"optimizer.params.hessian_interval={k}"], warn=False)
    if sophia_cfg.optimizer.type != "sophia":
        raise SystemExit("bench_overhead: the config's optimizer must be sophia (the AdamW twin is derived)")
    lr = sophia_cfg.optimizer.params.lr
    adamw_cfg = load_config(configs, common + [f"optimizer={{type: adamw, params: {{lr: {lr}}}}}"], warn=False)
    return sophia_cfg, adamw_cfg


@contextmanager
def timing(owner, name: str, seconds: List[float]) -> Iterator[None]:
    """Within the block, every call of ``owner.name`` appends its duration to ``seconds``."""
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        _sync()
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _sync()
            seconds.append(time.perf_counter() - start)

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, original)


def measure(configs: List[str], overrides: List[str], blocks: int, k: int,
            peak: Optional[float] = None) -> Dict:
    """``peak``: the device's peak TFLOP/s for MFU (default: peak_tflops' table)."""
    import torch.distributed as dist

    from neox_sophia.parallel import sampling
    from neox_sophia.plan import model_flops_per_token
    from neox_sophia.training.loop import setup

    sophia_cfg, adamw_cfg = twin_configs(configs, overrides, (blocks + 2) * k, k)
    sophia, adamw = setup(sophia_cfg), setup(adamw_cfg)
    _block(sophia, 0, k), _block(adamw, 0, k)  # warm-up block each (allocations, first Hessian step)
    sophia_blocks, adamw_blocks, hessian, labels, ema = [], [], [], [], []
    with timing(sampling, "sample_vocab_parallel", labels), timing(sophia.optimizer, "update_hessian", ema):
        for b in range(1, blocks + 1):
            s = _block(sophia, b * k, k)
            a = _block(adamw, b * k, k)
            sophia_blocks.append(sum(s) / k)
            adamw_blocks.append(sum(a) / k)
            hessian.append(s[-1] - statistics.median(s[:-1]))  # the last iteration of a block refreshes h
    lay = sophia.layout
    sophia_ms, adamw_ms = 1e3 * statistics.median(sophia_blocks), 1e3 * statistics.median(adamw_blocks)
    hessian_sequences = sophia_cfg.hessian_batch(lay.world_size)[0]
    # Labels are drawn on the last pipeline stage only: the slowest rank's totals.
    totals = torch.tensor([sum(labels), sum(ema)], dtype=torch.float64, device=sophia.device)
    dist.all_reduce(totals, op=dist.ReduceOp.MAX)
    label_s, ema_s = (float(t) / blocks for t in totals)  # per Hessian step: one per block

    def points(seconds: float) -> float:
        return 100.0 * 1e3 * seconds / k / adamw_ms
    result = {
        "layout": {"world_size": lay.world_size, "tp": lay.tp, "pp": lay.pp, "dp": lay.dp,
                   "train_batch_size": lay.train_batch_size, "micro_batch_size": lay.micro_batch_size,
                   "gradient_accumulation_steps": lay.gradient_accumulation_steps,
                   "hessian_batch_size": hessian_sequences,
                   "precision": sophia_cfg.engine.resolved_precision, "zero_stage": sophia_cfg.engine.zero_stage},
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "k": k, "blocks": blocks,
        "adamw_ms_per_iteration": adamw_ms,
        "sophia_ms_per_iteration": sophia_ms,
        "hessian_step_ms": 1e3 * statistics.median(hessian),
        "overhead_pct": 100.0 * (sophia_ms / adamw_ms - 1.0),
        "bound_pct": 100.0 * hessian_sequences / lay.train_batch_size / k,
        "label_sampling_ms": 1e3 * label_s, "label_sampling_pct": points(label_s),
        "hessian_ema_ms": 1e3 * ema_s, "hessian_ema_pct": points(ema_s),
        "tokens_per_s": {"adamw": lay.train_batch_size * sophia_cfg.model.seq_length / (adamw_ms / 1e3),
                         "sophia": lay.train_batch_size * sophia_cfg.model.seq_length / (sophia_ms / 1e3)},
    }
    flops = model_flops_per_token(sophia_cfg.model, sophia_cfg.padded_vocab_size(sophia.vocab_size))
    result["model_flops_per_token"] = flops
    result["tflops_per_rank"] = {name: tps * flops / lay.world_size / 1e12
                                 for name, tps in result["tokens_per_s"].items()}
    peak = peak or peak_tflops(result["device"], sophia_cfg.engine.resolved_precision)
    result["peak_tflops"] = peak
    result["mfu"] = {name: t / peak for name, t in result["tflops_per_rank"].items()} if peak else None
    result["gap_to_bound_pct"] = result["overhead_pct"] - result["bound_pct"]
    result["rank"] = dist.get_rank()
    return result


# Dense bf16/fp16 tensor-core peaks (TFLOP/s) of the GPUs this project is run on, by the name
# torch reports; other devices and precisions: pass --peak-tflops.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))


def peak_tflops(device: str, precision: str) -> Optional[float]:
    if precision not in ("bfloat16", "fp16"):
        return None
    return next((peak for name, peak in PEAK_TFLOPS if name in device), None)


# ---------------------------------------------------------------------------------------------
# Peak memory: one optimizer per fresh process

def _status_kib(field: str) -> Optional[int]:
    """A 'VmRSS'/'VmHWM' line of /proc/self/status in KiB (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the tensors in the optimizer's per-parameter state (both optimizers keep two)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if torch.is_tensor(v))


def memory_child(configs: List[str], overrides: List[str], which: str, k: int) -> Dict:
    """Set up one optimizer's run, then 2k iterations (two Hessian steps for Sophia)."""
    from neox_sophia.training.loop import setup

    sophia_cfg, adamw_cfg = twin_configs(configs, overrides, 2 * k, k)
    run = setup(sophia_cfg if which == "sophia" else adamw_cfg)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    after_setup = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    _block(run, 0, k)
    _block(run, k, k)
    _sync()
    peak_kib = _status_kib("VmHWM") if reset else None
    if peak_kib is None:  # the process's lifetime peak, setup included
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"optimizer": which,
            "rss_after_setup_bytes": None if after_setup is None else after_setup * 1024,
            "peak_rss_bytes": peak_kib * 1024, "peak_includes_setup": not reset,
            "optimizer_state_bytes": optimizer_state_bytes(run.optimizer),
            "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}


def measure_memory(configs: List[str], overrides: List[str], k: int) -> Dict:
    """Each optimizer alone in a fresh process, twice, in the order S, A, A, S; the lower of each
    pair's peaks (a peak can only be inflated by the machine, not lowered)."""
    runs: Dict[str, List[Dict]] = {"sophia": [], "adamw": []}
    base = [sys.executable, os.path.abspath(__file__), *configs, "--k", str(k)]
    for override in overrides:
        base += ["--set", override]
    env = {key: v for key, v in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    for which in ("sophia", "adamw", "adamw", "sophia"):
        done = subprocess.run(base + ["--memory-child", which], capture_output=True, text=True, env=env,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise SystemExit(f"bench_overhead --memory: the {which} child failed:\n{done.stderr[-3000:]}")
        runs[which].append(json.loads(done.stdout.strip().splitlines()[-1]))
    result: Dict[str, object] = {"runs": runs}
    for key in ("peak_rss_bytes", "cuda_peak_allocated_bytes"):
        if runs["sophia"][0][key] is None:
            continue
        s, a = min(r[key] for r in runs["sophia"]), min(r[key] for r in runs["adamw"])
        result[key] = {"sophia": s, "adamw": a, "ratio": s / a}
    result["optimizer_state_bytes"] = {w: runs[w][0]["optimizer_state_bytes"] for w in runs}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # deepspeed's launcher adds it; LOCAL_RANK is what is read
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks of k iterations per optimizer")
    parser.add_argument("--k", type=int, default=10, help="Hessian interval of the Sophia run")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--memory", action="store_true", help="also peak memory, each optimizer in a fresh "
                                                              "process (one process only, not under a launcher)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU (default: known "
                                                               "bf16/fp16 peaks of H100, H200, A100)")
    parser.add_argument("--memory-child", choices=("sophia", "adamw"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.configs, args.overrides, args.memory_child, args.k)))
        return 0
    if args.memory and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("bench_overhead: --memory runs each optimizer in a child process of one rank; "
                         "run it without a launcher")
    result = measure(args.configs, args.overrides, args.blocks, args.k, args.peak_tflops)
    if result.pop("rank") != 0:
        return 0
    if args.memory:
        result["memory"] = measure_memory(args.configs, args.overrides, args.k)
    if args.json:
        print(json.dumps(result))
        return 0
    lay = result["layout"]
    print(f"layout: {lay['world_size']} ranks = TP {lay['tp']} x PP {lay['pp']} x DP {lay['dp']}, batch "
          f"{lay['train_batch_size']} ({lay['micro_batch_size']} x {lay['gradient_accumulation_steps']} per rank), "
          f"Hessian batch {lay['hessian_batch_size']}, {lay['precision']}, ZeRO-{lay['zero_stage']}, "
          f"{result['device']}")
    tokens_per_s = result["tokens_per_s"]
    print(f"AdamW   {result['adamw_ms_per_iteration']:9.1f} ms/iteration  {tokens_per_s['adamw']:10.0f} tok/s")
    print(f"Sophia  {result['sophia_ms_per_iteration']:9.1f} ms/iteration  {tokens_per_s['sophia']:10.0f} tok/s"
          f"  (k={result['k']}; Hessian step {result['hessian_step_ms']:.1f} ms)")
    print(f"overhead {result['overhead_pct']:+.1f}% of an AdamW iteration; bound (Hessian batch / batch) / k = "
          f"{result['bound_pct']:.1f}%, gap {result['gap_to_bound_pct']:+.1f} points (goal: within 0.5)")
    print(f"  of which label sampling {result['label_sampling_pct']:.2f} points ({result['label_sampling_ms']:.1f} ms "
          f"per Hessian step), Hessian EMA {result['hessian_ema_pct']:.2f} points ({result['hessian_ema_ms']:.1f} ms)")
    t = result["tflops_per_rank"]
    mfu = result["mfu"]
    print(f"model FLOPs per token {result['model_flops_per_token']:.3e}: AdamW {t['adamw']:.3f}, Sophia "
          f"{t['sophia']:.3f} TFLOP/s per rank" + (f"; MFU AdamW {mfu['adamw']:.1%}, Sophia {mfu['sophia']:.1%} "
                                                    f"of {result['peak_tflops']:g}" if mfu else ""))
    memory = result.get("memory")
    if memory:
        mib = lambda b: b / 2**20  # noqa: E731
        state = memory["optimizer_state_bytes"]
        print(f"optimizer state: AdamW {mib(state['adamw']):.1f} MiB, Sophia {mib(state['sophia']):.1f} MiB")
        for key, name in (("peak_rss_bytes", "peak resident set during training"),
                          ("cuda_peak_allocated_bytes", "peak CUDA memory allocated")):
            if key in memory:
                m = memory[key]
                print(f"{name}: AdamW {mib(m['adamw']):.1f} MiB, Sophia {mib(m['sophia']):.1f} MiB "
                      f"(Sophia / AdamW = {m['ratio']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

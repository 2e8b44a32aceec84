"""Optimizer-step benchmark: Sophia against torch AdamW on GPT-NeoX 125M parameter shapes,
and every step against the machine's memory bandwidth.

Times, in one process and interleaved (every round runs each call once in turn, so drift in
clock speed or memory bandwidth hits all of them alike; medians over the timed rounds):

    sophia                 Sophia.step() on the fused kernels (neox_sophia.optim.fused)
    sophia_eager           the same optimizer with fused=False (the eager kernels)
    adamw_foreach          torch.optim.AdamW(foreach=True)
    adamw_fused            torch.optim.AdamW(fused=True), where the device supports it
    sophia_hessian_update  Sophia.update_hessian() (every k steps), fused; and _eager
    copy                   dst.copy_(src) of one tensor with as many float32 elements as there
                           are parameters: the memory bandwidth this machine really delivers

Each optimizer step is bound by memory traffic. Per parameter it must move: Sophia's step 6
words (read p, g, m, h; write p, m), AdamW's 7 (p, g, m, v; p, m, v), the Hessian EMA 3 (h, g;
h), a copy 2. The effective bandwidth of a call is words x bytes x parameters / time; set against
the copy's it says how far each kernel is from the physical limit. If both run at the copy's
bandwidth, Sophia / fused AdamW = 6/7 = 0.86 and the EMA / fused AdamW = 3/7 = 0.43: the goals.

Each optimizer owns its copy of the parameters (same init); all of them share one set of fixed
gradients, set once before timing. One update_hessian() runs before timing so that h != 0 and
the timed Sophia step takes the real preconditioned path; the first fused calls (which compile
the kernels, or load them from torch's cache) are timed apart as ``first_call_s``.

Run (from the repository root):

    .venv/bin/python tools/bench_optimizer.py                    # full 125M shapes, table
    .venv/bin/python tools/bench_optimizer.py --json             # one JSON object on stdout
    .venv/bin/python tools/bench_optimizer.py --small --repeats 1 --json   # quick (the test)
    .venv/bin/python tools/bench_optimizer.py --device cuda --dtype bf16

Other flags: ``--hidden/--layers/--vocab`` change the model shape, ``--warmup`` the number of
untimed rounds (default 2), ``--repeats`` the number of timed rounds (default 7),
``--skip adamw_foreach`` leaves a baseline out (memory).

Memory: full shapes are ~162M parameters; fp32 needs ~8 GB (3 parameter copies and their
states, one shared gradient, the copy's two buffers) plus AdamW's foreach temporaries.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from neox_sophia.optim import Sophia, fused  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SMALL = dict(layers=2, vocab=8192)
GOALS = {"sophia_over_fused_adamw": 6 / 7, "hessian_ema_over_fused_adamw": 0.45}
TARGET = "goals (CPU): sophia_over_fused_adamw <= 0.86, hessian_ema_over_fused_adamw <= 0.45"
# Words of memory traffic per parameter (read + write) each call must move.
WORDS = {"sophia": 6, "sophia_eager": 6, "adamw_fused": 7, "adamw_foreach": 7,
         "sophia_hessian_update": 3, "sophia_eager_hessian_update": 3, "copy": 2}
# Hyperparameters of a 125M run; they do not change the cost of a step.
SOPHIA_HYPER = dict(lr=6e-4, betas=(0.965, 0.99), rho=0.05, bs=480 * 2048)
ADAMW_HYPER = dict(lr=6e-4, betas=(0.9, 0.95), eps=1e-8)
WEIGHT_DECAY = 0.1
NAMES = {"sophia": "Sophia step (fused)", "sophia_eager": "Sophia step (eager)", "adamw_foreach": "AdamW foreach",
         "adamw_fused": "AdamW fused", "sophia_hessian_update": "Sophia update_hessian (fused)",
         "sophia_eager_hessian_update": "Sophia update_hessian (eager)", "copy": "copy (same elements)"}

Shape = Tuple[int, ...]


def neox_125m_shapes(hidden: int = 768, layers: int = 12, vocab: int = 50304
                     ) -> List[Tuple[str, Shape]]:
    """(name, shape) of every parameter of GPT-NeoX 125M (configs/125M.yml of GPT-NeoX).

    Untied embed_out, LayerNorm with bias, gpt_j_residual false, 4x MLP, fused QKV. The vocab
    is 50257 padded to a multiple of 128.
    """
    shapes: List[Tuple[str, Shape]] = [("embed_in.weight", (vocab, hidden))]
    per_layer = [
        ("input_layernorm.weight", (hidden,)), ("input_layernorm.bias", (hidden,)),
        ("attention.query_key_value.weight", (3 * hidden, hidden)),
        ("attention.query_key_value.bias", (3 * hidden,)),
        ("attention.dense.weight", (hidden, hidden)), ("attention.dense.bias", (hidden,)),
        ("post_attention_layernorm.weight", (hidden,)),
        ("post_attention_layernorm.bias", (hidden,)),
        ("mlp.dense_h_to_4h.weight", (4 * hidden, hidden)), ("mlp.dense_h_to_4h.bias", (4 * hidden,)),
        ("mlp.dense_4h_to_h.weight", (hidden, 4 * hidden)), ("mlp.dense_4h_to_h.bias", (hidden,)),
    ]
    for layer in range(layers):
        shapes += [(f"layers.{layer}.{name}", shape) for name, shape in per_layer]
    shapes += [("final_layer_norm.weight", (hidden,)), ("final_layer_norm.bias", (hidden,)),
               ("embed_out.weight", (vocab, hidden))]
    return shapes


def make_tensors(shapes: Sequence[Shape], device: torch.device, dtype: torch.dtype,
                 scale: float, seed: int) -> List[torch.Tensor]:
    """Deterministic normal tensors, generated directly on the device (no host copy)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(shape, generator=generator, device=device, dtype=dtype).mul_(scale)
            for shape in shapes]


def param_groups(params: Sequence[torch.nn.Parameter]) -> List[dict]:
    """Two groups like a real run: matrices decay, biases and norm weights (1-D) do not."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [dict(params=decay, weight_decay=WEIGHT_DECAY), dict(params=no_decay, weight_decay=0.0)]


def fused_adamw_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.optim.AdamW(fused=True) steps on this device and dtype."""
    try:
        probe = torch.nn.Parameter(torch.zeros(4, device=device, dtype=dtype))
        probe.grad = torch.ones_like(probe)
        torch.optim.AdamW([probe], fused=True).step()
        return True
    except (RuntimeError, ValueError, NotImplementedError):
        return False


def build_optimizers(shapes: Sequence[Shape], device: torch.device, dtype: torch.dtype,
                     skip: Sequence[str] = ()) -> Tuple[Dict[str, torch.optim.Optimizer], int]:
    """One parameter copy per optimizer (same init), all sharing one fixed gradient per shape.

    Returns the optimizers by key and the parameter count. Sophia's fused and eager calls run on
    one optimizer (its groups' ``fused`` switched per call): same tensors, half the memory.
    """
    init = make_tensors(shapes, device, dtype, scale=0.02, seed=0)
    grads = make_tensors(shapes, device, dtype, scale=1e-2, seed=1)
    kinds: List[Tuple[str, Callable]] = [
        ("sophia", lambda groups: Sophia(groups, **SOPHIA_HYPER)),
        ("adamw_foreach", lambda groups: torch.optim.AdamW(groups, foreach=True, **ADAMW_HYPER)),
    ]
    if fused_adamw_supported(device, dtype):
        kinds.append(("adamw_fused",
                      lambda groups: torch.optim.AdamW(groups, fused=True, **ADAMW_HYPER)))
    kinds = [(key, make) for key, make in kinds if key not in skip]
    optimizers = {}
    for index, (key, make) in enumerate(kinds):
        # The last optimizer takes the init tensors themselves: no spare copy stays alive.
        data = init if index == len(kinds) - 1 else [t.clone() for t in init]
        params = [torch.nn.Parameter(t) for t in data]
        for p, g in zip(params, grads):
            p.grad = g  # shared and read-only: no optimizer here writes to .grad
        optimizers[key] = make(param_groups(params))
    del init, data
    return optimizers, sum(math.prod(s) for s in shapes)


def sophia_path(sophia: Sophia, fused_on: bool) -> Sophia:
    """The optimizer, its groups set to the fused or the eager kernels."""
    for group in sophia.param_groups:
        group["fused"] = fused_on
    return sophia


def first_calls(sophia: Sophia, device: torch.device, use_fused: bool) -> Dict[str, float]:
    """Seconds of the first update_hessian() and step() on the fused path (compiling the kernels
    or loading them from torch's cache); the EMA first, so that the timed step sees h != 0."""
    times = {}
    for key, call in (("sophia_hessian_update", sophia.update_hessian), ("sophia", sophia.step)):
        sophia_path(sophia, use_fused)
        times[key] = timed(call, device) / 1e3
    return times


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of fn() in milliseconds, synchronizing the device around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def benchmark_calls(optimizers: Dict[str, torch.optim.Optimizer], copy_buffers: Tuple[torch.Tensor, torch.Tensor],
                    use_fused: bool) -> Dict[str, Callable]:
    """The timed calls, in round order: every step, Sophia's Hessian update, the copy."""
    sophia = optimizers["sophia"]
    calls: Dict[str, Callable] = {"sophia": lambda: sophia_path(sophia, use_fused).step(),
                                  "sophia_eager": lambda: sophia_path(sophia, False).step()}
    calls.update({key: opt.step for key, opt in optimizers.items() if key != "sophia"})
    calls["sophia_hessian_update"] = lambda: sophia_path(sophia, use_fused).update_hessian()
    calls["sophia_eager_hessian_update"] = lambda: sophia_path(sophia, False).update_hessian()
    source, target = copy_buffers
    calls["copy"] = lambda: target.copy_(source)
    return calls


def run_rounds(calls: Dict[str, Callable], device: torch.device, warmup: int, repeats: int
               ) -> Dict[str, List[float]]:
    """Interleaved rounds (A, B, C, D, A, B, C, D, ...); returns the timed samples per call."""
    samples: Dict[str, List[float]] = {key: [] for key in calls}
    for round_index in range(warmup + repeats):
        for key, call in calls.items():
            elapsed = timed(call, device)
            if round_index >= warmup:
                samples[key].append(elapsed)
    return samples


def state_bytes_per_param(optimizer: torch.optim.Optimizer, parameters: int) -> float:
    """Sum of nbytes of every tensor in optimizer.state, per parameter."""
    total = sum(value.nbytes for state in optimizer.state.values() for value in state.values()
                if torch.is_tensor(value))
    return total / parameters


def peak_transient_bytes(calls: Dict[str, Callable], device: torch.device
                         ) -> Optional[Dict[str, int]]:
    """CUDA only: peak memory allocated during one call, above what was allocated before it."""
    if device.type != "cuda":
        return None
    peaks = {}
    for key, call in calls.items():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        peaks[key] = torch.cuda.max_memory_allocated(device) - before
    return peaks


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    return None if numerator is None or denominator is None else numerator / denominator


def bandwidths(medians: Dict[str, float], parameters: int, element_size: int) -> Dict[str, float]:
    """Effective GB/s of each call: its words of traffic x bytes x parameters / median time.
    The copy moves float32 elements whatever the benchmark's dtype."""
    return {key: WORDS[key] * (4 if key == "copy" else element_size) * parameters / (ms / 1e3) / 1e9
            for key, ms in medians.items()}


def summarize(samples: Dict[str, List[float]], optimizers: Dict[str, torch.optim.Optimizer],
              peaks: Optional[Dict[str, int]], parameters: int, tensors: int,
              args: argparse.Namespace, device: torch.device, fused_state: dict) -> dict:
    """The result as one JSON-ready dict (times in ms; null where a baseline is unavailable)."""
    medians = {key: statistics.median(values) for key, values in samples.items()}
    fused_adamw, foreach = medians.get("adamw_fused"), medians.get("adamw_foreach")
    gbps = bandwidths(medians, parameters, DTYPES[args.dtype].itemsize)
    return {
        "sophia_over_fused_adamw": ratio(medians["sophia"], fused_adamw),
        "hessian_ema_over_fused_adamw": ratio(medians["sophia_hessian_update"], fused_adamw),
        "sophia_eager_over_fused_adamw": ratio(medians["sophia_eager"], fused_adamw),
        "hessian_ema_eager_over_fused_adamw": ratio(medians["sophia_eager_hessian_update"], fused_adamw),
        "sophia_fused_over_eager": medians["sophia"] / medians["sophia_eager"],
        "sophia_over_adamw": ratio(medians["sophia"], foreach),
        **{f"{key}_ms": medians.get(key) for key in WORDS},
        "bandwidth_gbps": gbps,
        "bandwidth_fraction_of_copy": {key: value / gbps["copy"] for key, value in gbps.items()},
        "words_per_param": WORDS,
        "goals": GOALS,
        "fused_kernels": fused_state,
        "samples_ms": samples,
        "state_bytes_per_param": {key: state_bytes_per_param(opt, parameters)
                                  for key, opt in optimizers.items()},
        "peak_transient_bytes": peaks,
        "parameters": parameters,
        "tensors": tensors,
        "shape": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab},
        "device": str(device),
        "dtype": args.dtype,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "warmup_rounds": args.warmup,
        "timed_rounds": args.repeats,
        "target": TARGET,
    }


def format_table(result: dict) -> str:
    """The human-readable report."""
    shape, fused_state = result["shape"], result["fused_kernels"]
    base = result["adamw_fused_ms"]
    lines = [
        f"Optimizer step on GPT-NeoX shapes (hidden {shape['hidden']}, {shape['layers']} layers, "
        f"vocab {shape['vocab']}): {result['parameters']:,} parameters in "
        f"{result['tensors']} tensors",
        f"device {result['device']}, dtype {result['dtype']}, torch {result['torch_version']}, "
        f"{result['threads']} threads; median of {result['timed_rounds']} interleaved rounds "
        f"after {result['warmup_rounds']} warm-up rounds",
        f"fused kernels: {fused_state['status']}; first calls (compile or cache load): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in fused_state["first_call_s"].items()),
        "",
        f"{'call':<32}{'median ms':>11}{'vs AdamW fused':>16}{'GB/s':>9}{'of copy':>9}{'words':>7}",
    ]
    for key, name in NAMES.items():
        ms = result.get(f"{key}_ms")
        if ms is None:
            lines.append(f"{name:<32}{'n/a':>11}")
            continue
        versus = f"{ms / base:>15.3f}x" if base else f"{'':>16}"
        lines.append(f"{name:<32}{ms:>11.2f}{versus}{result['bandwidth_gbps'][key]:>9.1f}"
                     f"{result['bandwidth_fraction_of_copy'][key]:>9.2f}{WORDS[key]:>7}")
    if result["peak_transient_bytes"] is not None:
        lines.append("")
        lines += [f"peak transient {NAMES[key]}: {value / 2**20:.1f} MiB"
                  for key, value in result["peak_transient_bytes"].items()]
    lines.append("")
    for key in ("sophia_over_fused_adamw", "hessian_ema_over_fused_adamw", "sophia_eager_over_fused_adamw"):
        value = result[key]
        lines.append(f"{key} = {'n/a' if value is None else f'{value:.3f}'}")
    lines.append(TARGET)
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds (default 2)")
    parser.add_argument("--hidden", type=int, default=None, help="default 768")
    parser.add_argument("--layers", type=int, default=None, help="default 12 (2 with --small)")
    parser.add_argument("--vocab", type=int, default=None, help="default 50304 (8192 with --small)")
    parser.add_argument("--small", action="store_true",
                        help=f"quick run: {SMALL} unless given explicitly")
    parser.add_argument("--skip", action="append", default=[], choices=("adamw_foreach",),
                        help="leave a baseline out (saves its memory)")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    args = parser.parse_args(argv)
    defaults = {**dict(hidden=768, layers=12, vocab=50304), **(SMALL if args.small else {})}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def measure(args: argparse.Namespace) -> dict:
    """The whole benchmark for parsed ``args``; the result dict (see summarize)."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_optimizer: --device cuda but CUDA is not available")
    shapes = [shape for _, shape in neox_125m_shapes(args.hidden, args.layers, args.vocab)]
    optimizers, parameters = build_optimizers(shapes, device, DTYPES[args.dtype], args.skip)
    reason = fused.unavailable_reason(device)
    use_fused = reason is None
    first = first_calls(optimizers["sophia"], device, use_fused)
    reason = reason or fused.unavailable_reason(device)  # a failed first-use check turns it off
    fused_state = {"status": "on" if reason is None else f"off: {reason}", "first_call_s": first,
                   "applies_to": f"contiguous {[str(d) for d in fused.FUSED_DTYPES]} tensors of >= "
                                 f"{fused.MIN_NUMEL} elements"}
    copy_buffers = (torch.zeros(parameters, device=device), torch.zeros(parameters, device=device))
    calls = benchmark_calls(optimizers, copy_buffers, use_fused)
    samples = run_rounds(calls, device, args.warmup, args.repeats)
    peaks = peak_transient_bytes(calls, device)
    result = summarize(samples, optimizers, peaks, parameters, len(shapes), args, device, fused_state)
    del calls, optimizers, copy_buffers
    gc.collect()
    return result


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    result = measure(args)
    print(json.dumps(result) if args.json else format_table(result))
    return result


if __name__ == "__main__":
    main()

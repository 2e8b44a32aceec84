"""Optimizer-step benchmark: Sophia against torch AdamW on GPT-NeoX 125M parameter shapes.

Times ``Sophia.step()`` against ``torch.optim.AdamW(foreach=True)`` and, where the device
supports it, ``torch.optim.AdamW(fused=True)``, plus ``Sophia.update_hessian()`` (which runs
every k steps). All optimizers live in one process and are interleaved: every round runs each
of them once in turn, so drift in clock speed or memory bandwidth hits all of them alike.
Medians over the timed rounds are reported.

Each optimizer owns its copy of the parameters (same init); all of them share one set of fixed
gradients, set once before timing. One ``update_hessian()`` runs before timing so that h != 0
and the timed Sophia step takes the real preconditioned path.

Run (from the repository root):

    .venv/bin/python tools/bench_optimizer.py                    # full 125M shapes, table
    .venv/bin/python tools/bench_optimizer.py --json             # one JSON object on stdout
    .venv/bin/python tools/bench_optimizer.py --small --repeats 1 --json   # quick (the test)
    .venv/bin/python tools/bench_optimizer.py --device cuda --dtype bf16

Other flags: ``--hidden/--layers/--vocab`` change the model shape, ``--warmup`` the number of
untimed rounds (default 2), ``--repeats`` the number of timed rounds (default 7).

Target: sophia_over_adamw <= 1.0 on CPU (Sophia's step no slower than AdamW foreach).
Memory: full shapes are ~162M parameters; fp32 needs ~6.5 GB (3 parameter copies, one shared
gradient, 2 states per optimizer) plus AdamW's foreach temporaries.
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
from neox_sophia.optim import Sophia  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SMALL = dict(layers=2, vocab=8192)
TARGET = "target: sophia_over_adamw <= 1.0 on CPU"
# Hyperparameters of a 125M run; they do not change the cost of a step.
SOPHIA_HYPER = dict(lr=6e-4, betas=(0.965, 0.99), rho=0.05, bs=480 * 2048)
ADAMW_HYPER = dict(lr=6e-4, betas=(0.9, 0.95), eps=1e-8)
WEIGHT_DECAY = 0.1
NAMES = {"sophia": "Sophia step", "adamw_foreach": "AdamW foreach",
         "adamw_fused": "AdamW fused", "sophia_hessian_update": "Sophia update_hessian"}

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


def build_optimizers(shapes: Sequence[Shape], device: torch.device, dtype: torch.dtype
                     ) -> Tuple[Dict[str, torch.optim.Optimizer], int]:
    """One parameter copy per optimizer (same init), all sharing one fixed gradient per shape.

    Returns the optimizers by key and the parameter count. Sophia's Hessian EMA is filled once
    from the gradients so the timed step is the preconditioned path (h != 0).
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
    optimizers = {}
    for index, (key, make) in enumerate(kinds):
        # The last optimizer takes the init tensors themselves: no spare copy stays alive.
        data = init if index == len(kinds) - 1 else [t.clone() for t in init]
        params = [torch.nn.Parameter(t) for t in data]
        for p, g in zip(params, grads):
            p.grad = g  # shared and read-only: no optimizer here writes to .grad
        optimizers[key] = make(param_groups(params))
    del init, data
    optimizers["sophia"].update_hessian()
    return optimizers, sum(math.prod(s) for s in shapes)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of fn() in milliseconds, synchronizing the device around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def benchmark_calls(optimizers: Dict[str, torch.optim.Optimizer]) -> Dict[str, Callable]:
    """The timed calls, in round order: every step, then Sophia's Hessian update."""
    calls: Dict[str, Callable] = {key: opt.step for key, opt in optimizers.items()}
    calls["sophia_hessian_update"] = optimizers["sophia"].update_hessian
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


def ratio(numerator: float, denominator: Optional[float]) -> Optional[float]:
    return None if denominator is None else numerator / denominator


def summarize(samples: Dict[str, List[float]], optimizers: Dict[str, torch.optim.Optimizer],
              peaks: Optional[Dict[str, int]], parameters: int, tensors: int,
              args: argparse.Namespace, device: torch.device) -> dict:
    """The result as one JSON-ready dict (times in ms; null where fused AdamW is unavailable)."""
    medians = {key: statistics.median(values) for key, values in samples.items()}
    fused = medians.get("adamw_fused")
    return {
        "sophia_over_adamw": medians["sophia"] / medians["adamw_foreach"],
        "sophia_over_adamw_fused": ratio(medians["sophia"], fused),
        "sophia_ms": medians["sophia"],
        "adamw_foreach_ms": medians["adamw_foreach"],
        "adamw_fused_ms": fused,
        "sophia_hessian_update_ms": medians["sophia_hessian_update"],
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
    shape = result["shape"]
    lines = [
        f"Optimizer step on GPT-NeoX shapes (hidden {shape['hidden']}, {shape['layers']} layers, "
        f"vocab {shape['vocab']}): {result['parameters']:,} parameters in "
        f"{result['tensors']} tensors",
        f"device {result['device']}, dtype {result['dtype']}, torch {result['torch_version']}, "
        f"{result['threads']} threads; median of {result['timed_rounds']} interleaved rounds "
        f"after {result['warmup_rounds']} warm-up rounds",
        "",
        f"{'optimizer':<24}{'median ms':>11}{'vs AdamW foreach':>18}{'state B/param':>15}",
    ]
    base = result["adamw_foreach_ms"]
    for key, name in NAMES.items():
        ms = result.get(f"{key}_ms")
        if ms is None:
            lines.append(f"{name:<24}{'n/a':>11}{'':>18}{'':>15}")
            continue
        state = result["state_bytes_per_param"].get(key)
        state_text = "-" if state is None else f"{state:.3f}"
        lines.append(f"{name:<24}{ms:>11.2f}{ms / base:>17.3f}x{state_text:>15}")
    if result["peak_transient_bytes"] is not None:
        lines.append("")
        lines += [f"peak transient {NAMES[key]}: {value / 2**20:.1f} MiB"
                  for key, value in result["peak_transient_bytes"].items()]
    lines += ["", f"sophia_over_adamw = {result['sophia_over_adamw']:.3f}", TARGET]
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
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    args = parser.parse_args(argv)
    defaults = {**dict(hidden=768, layers=12, vocab=50304), **(SMALL if args.small else {})}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_optimizer: --device cuda but CUDA is not available")
    shapes = [shape for _, shape in neox_125m_shapes(args.hidden, args.layers, args.vocab)]
    optimizers, parameters = build_optimizers(shapes, device, DTYPES[args.dtype])
    calls = benchmark_calls(optimizers)
    samples = run_rounds(calls, device, args.warmup, args.repeats)
    peaks = peak_transient_bytes(calls, device)
    result = summarize(samples, optimizers, peaks, parameters, len(shapes), args, device)
    del calls, optimizers
    gc.collect()
    print(json.dumps(result) if args.json else format_table(result))
    return result


if __name__ == "__main__":
    main()

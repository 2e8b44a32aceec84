"""The compiled model path: each transformer layer through torch.compile, applied from outside.

    apply_compile(model, cfg.performance.compile_model, device)   # before deepspeed.initialize

Works on the model's modules wherever they sit (a GPTNeoX, a DeepSpeed PipelineModule's stage):
every TransformerLayer's math (its ``_forward``: LayerNorms, QKV projection, rotary, attention,
bias adds, GELU, residuals) is replaced in place by a compiled version, so parameter names, state
dicts and checkpoints are the same as an eager run's, and the layer code (model/layers.py) knows
nothing about it. Inductor fuses the elementwise work that GPT-NeoX fuses by hand (bias + GELU,
bias + dropout + residual, LayerNorm, rotary). The layer's ``forward`` stays eager: activation
checkpointing wraps the compiled math and recomputes it compiled. Under tensor parallelism
megatron-core's linears run their collectives (an asynchronous all-reduce in backward, which
torch.compile cannot trace) between compiled pieces of the layer.

Numerics: the loss equals the eager model's within float rounding (fused reductions sum in
another order); tests/test_model_compile.py bounds the difference.

Compile time: every layer has the same code and shapes, so one graph serves them all (per
training/eval mode and grad mode): tens of seconds on CPU, cached on disk by torch for later runs
(TORCHINDUCTOR_CACHE_DIR).
"""
from __future__ import annotations

import logging
import warnings
from typing import Optional

import torch
from torch import nn

log = logging.getLogger(__name__)


# compile_model: null follows the measurements of tools/bench_compile.py (benchmarks/README.md):
# on by default only where compiled layers were measured faster. CPU: no clear win (1.04x at a
# 125M micro-batch, noise at the quickstart shape); CUDA: not measured yet (make gpu-check
# reports compiled_speedup), so off until it is.
COMPILE_BY_DEFAULT = {"cpu": False, "cuda": False}


def compile_default(device: torch.device) -> bool:
    """What compile_model: null means on ``device``."""
    return COMPILE_BY_DEFAULT.get(device.type, False)


def apply_compile(model: nn.Module, enabled: Optional[bool], device: torch.device) -> int:
    """Compile every TransformerLayer of ``model`` in place when ``enabled`` (None: the
    device's default); returns how many layers were compiled."""
    from neox_sophia.model.layers import TransformerLayer

    if not (compile_default(device) if enabled is None else enabled):
        return 0
    import torch._dynamo

    # megatron-core 0.16's RowParallelLinear warns on every forward (it does not hand its tp_group
    # on) with a warning Dynamo cannot trace, which would split the layer's graph: inside compiled
    # code warnings.warn is a no-op (it is a deprecation notice about megatron-core's own API).
    torch._dynamo.config.ignore_logging_functions.add(warnings.warn)
    layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
    for layer in layers:
        layer._forward = torch.compile(layer._forward, dynamic=False)
    log.info("compiled %d transformer layers (torch.compile)", len(layers))
    return len(layers)

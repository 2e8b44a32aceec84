"""The choices a GPT-NeoX config makes inside a block, as registries keyed by the YAML value.

    NORMS[cfg.norm](cfg)                  -> the norm module ("layernorm", "rmsnorm")
    ACTIVATIONS[cfg.activation](cfg)      -> the MLP activation of a plain (two-matrix) MLP
    GATED_ACTIVATIONS[cfg.activation]     -> the gate activation of a gated (three-matrix) MLP

Formulas are GPT-NeoX's (megatron/model/norms.py, activations.py, transformer.py at ea7aefd8):
- RMSNorm works in fp32, x * rsqrt(mean(x^2) + eps), then multiplies by its weight and casts
  back (HF's LlamaRMSNorm does the same in fp32; in bf16 HF casts before the multiply).
- NeoX's gated MLP computes act(gate) * up, its linear1 rows being [up | gate] on every TP rank;
  swiglu's act is swish = x * sigmoid(x) = SiLU (HF "silu"), geglu's exact GELU, reglu's ReLU.
- bias_gelu_fusion selects the tanh approximation of GELU (Pythia was trained with it).
No module here knows about tensor parallelism.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """GPT-NeoX's RMSNorm without bias (NeoX never gives it one): weight * x / rms(x)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed).to(x.dtype)


NORMS: Dict[str, Callable] = {
    "layernorm": lambda cfg: nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon),
    "rmsnorm": lambda cfg: RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_epsilon),
}


def make_norm(cfg) -> nn.Module:
    return NORMS[cfg.norm](cfg)


def _gelu(cfg) -> Callable[[torch.Tensor], torch.Tensor]:
    approximate = "tanh" if cfg.bias_gelu_fusion else "none"
    return lambda x: F.gelu(x, approximate=approximate)


# activation name -> (config -> function): the plain MLP, dense_4h_to_h(act(dense_h_to_4h(x)))
ACTIVATIONS: Dict[str, Callable] = {"gelu": _gelu}

# activation name -> gate function: the gated MLP, down_proj(act(gate_proj(x)) * up_proj(x)),
# (config.model.GATED_HF_ACT names the Hugging Face hidden_act of each)
GATED_ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "swiglu": F.silu,
    "geglu": lambda x: F.gelu(x, approximate="none"),
    "reglu": F.relu,
}


__all__ = ["RMSNorm", "NORMS", "make_norm", "ACTIVATIONS", "GATED_ACTIVATIONS"]

"""GPT-NeoX blocks on megatron-core tensor-parallel layers, read top to bottom.

Activations are [batch, seq, hidden] and replicated across TP ranks between blocks; the QKV and
MLP-in projections are column-parallel (each rank holds whole heads / a slice of the MLP), the
attention-out and MLP-out projections row-parallel (their output is all-reduced, then the bias
is added once). The LLaMA-family choices of NeoX configs (RMSNorm, a gated MLP, grouped-query
attention, sliding windows) are options of the same blocks (model/components.py). Module and
parameter names follow Hugging Face's GPTNeoX (LlamaMLP's for the gated MLP), so a parameter's
global name ("layers.3.attention.query_key_value.weight") is both its init key and its export
name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neox_sophia.config.model import ModelConfig
from neox_sophia.model.components import ACTIVATIONS, GATED_ACTIVATIONS, make_norm


def _no_init(_weight):  # weights are initialized by neox_sophia.model.init, layout-invariantly
    return None


def tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def megatron_config(tp_size: int, dtype: torch.dtype):
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(tensor_model_parallel_size=tp_size, params_dtype=dtype,
                               use_cpu_initialization=True, perform_initialization=False,
                               gradient_accumulation_fusion=False, sequence_parallel=False)


class RotaryEmbedding(nn.Module):
    """GPT-NeoX rotary embedding on the first ``dim`` dims of each head (rotate-half form)."""

    def __init__(self, dim: int, base: int):
        super().__init__()
        self.dim = dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        first, second = x.chunk(2, dim=-1)
        return torch.cat((-second, first), dim=-1)

    def forward(self, q: torch.Tensor, k: torch.Tensor):
        """q, k: [batch, heads, seq, head_dim]."""
        if self.dim == 0:
            return q, k
        positions = torch.arange(q.shape[-2], device=q.device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq.to(q.device))
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)

        def rotate(x):
            rot, rest = x[..., :self.dim], x[..., self.dim:]
            return torch.cat((rot * cos + self._rotate_half(rot) * sin, rest), dim=-1)

        return rotate(q), rotate(k)


class ParallelAttention(nn.Module):
    """Causal self-attention with num_kv_heads key/value heads (grouped-query when fewer than the
    query heads; each group of heads // num_kv_heads consecutive query heads shares one, as in NeoX
    and HF). QKV rows are grouped per key/value head, [kv_heads, heads/kv_heads + 2, head_dim]:
    the group's query heads, then its key, then its value. With one query head per group (MHA)
    that is NeoX's and HF GPTNeoX's [heads, 3, head_dim]; for any grouping a contiguous
    column-parallel shard holds whole groups, so the global tensor is the same at every TP size
    (NeoX's own GQA rows are [q | k | v] per TP rank, which the checkpoint converters reorder)."""

    def __init__(self, cfg: ModelConfig, mp_config, tp_size: int, window: int | None = None):
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        for key, heads in (("num_attention_heads", cfg.num_attention_heads), ("num_kv_heads", cfg.kv_heads)):
            if heads % tp_size:
                raise ValueError(f"{key} {heads} is not divisible by model_parallel_size {tp_size}")
        self.kv_heads = cfg.kv_heads // tp_size
        self.group = cfg.num_attention_heads // cfg.kv_heads  # query heads per key/value head
        self.head_dim = cfg.head_dim
        self.dropout = cfg.attention_dropout
        self.window = window
        h = cfg.hidden_size
        qkv_width = (cfg.num_attention_heads + 2 * cfg.kv_heads) * cfg.head_dim
        self.query_key_value = ColumnParallelLinear(
            h, qkv_width, config=mp_config, init_method=_no_init, bias=cfg.use_bias_in_attn_linear,
            gather_output=False, tp_group=tp_group())
        self.dense = RowParallelLinear(
            h, h, config=mp_config, init_method=_no_init, bias=cfg.use_bias_in_attn_linear,
            input_is_parallel=True, skip_bias_add=False, tp_group=tp_group())
        self.rotary = RotaryEmbedding(cfg.rotary_ndims, cfg.rotary_emb_base)

    def _window_mask(self, s: int, device) -> torch.Tensor | None:
        """NeoX's sliding window (flash-attn window_size=(w, -1) with causal=True): a query at i
        sees keys i - w .. i. None when the window covers the whole sequence (plain causal)."""
        if self.window is None or self.window >= s - 1:
            return None
        i = torch.arange(s, device=device)
        distance = i[:, None] - i[None, :]
        return (distance >= 0) & (distance <= self.window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.query_key_value(x)
        b, s, _ = qkv.shape
        qkv = qkv.view(b, s, self.kv_heads, self.group + 2, self.head_dim)
        q = qkv[:, :, :, :self.group].reshape(b, s, self.kv_heads * self.group, self.head_dim).transpose(1, 2)
        k, v = qkv[:, :, :, self.group].transpose(1, 2), qkv[:, :, :, self.group + 1].transpose(1, 2)
        q, k = self.rotary(q, k)
        mask = self._window_mask(s, x.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             dropout_p=self.dropout if self.training else 0.0,
                                             enable_gqa=self.group > 1)
        out, _ = self.dense(out.transpose(1, 2).reshape(b, s, self.kv_heads * self.group * self.head_dim))
        return out


class ParallelMLP(nn.Module):
    """dense_4h_to_h(act(dense_h_to_4h(x))): GPT-NeoX's MLP (HF GPTNeoX's names)."""

    def __init__(self, cfg: ModelConfig, mp_config):
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(
            cfg.hidden_size, cfg.ffn_hidden_size, config=mp_config, init_method=_no_init,
            bias=cfg.use_bias_in_mlp, gather_output=False, tp_group=tp_group())
        self.dense_4h_to_h = RowParallelLinear(
            cfg.ffn_hidden_size, cfg.hidden_size, config=mp_config, init_method=_no_init,
            bias=cfg.use_bias_in_mlp, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group())
        self.activation = ACTIVATIONS[cfg.activation](cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.dense_h_to_4h(x)
        out, _ = self.dense_4h_to_h(self.activation(out))
        return out


class ParallelGatedMLP(nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)): the gated MLP of NeoX's swiglu/geglu/reglu
    activations and of HF's LlamaMLP (whose names these are). NeoX fuses gate and up into one
    linear1 whose rows are [up | gate] on each TP rank; two column-parallel matrices hold the
    same weights with a layout that does not depend on the TP size."""

    def __init__(self, cfg: ModelConfig, mp_config):
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        h, width = cfg.hidden_size, cfg.ffn_hidden_size
        for name in ("gate_proj", "up_proj"):
            setattr(self, name, ColumnParallelLinear(h, width, config=mp_config, init_method=_no_init,
                                                     bias=cfg.use_bias_in_mlp, gather_output=False,
                                                     tp_group=tp_group()))
        self.down_proj = RowParallelLinear(width, h, config=mp_config, init_method=_no_init, bias=cfg.use_bias_in_mlp,
                                           input_is_parallel=True, skip_bias_add=False, tp_group=tp_group())
        self.activation = GATED_ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, _ = self.gate_proj(x)
        up, _ = self.up_proj(x)
        out, _ = self.down_proj(self.activation(gate) * up)
        return out


class TransformerLayer(nn.Module):
    """One GPT-NeoX layer; ``layer_number`` is global (the same at any pipeline split)."""

    def __init__(self, cfg: ModelConfig, mp_config, tp_size: int, layer_number: int):
        super().__init__()
        self.layer_number = layer_number
        self.param_prefix = f"layers.{layer_number}."
        self.gpt_j_residual = cfg.gpt_j_residual
        self.checkpoint = cfg.checkpoint_activations
        self.input_layernorm = make_norm(cfg)
        self.post_attention_layernorm = make_norm(cfg)
        self.attention = ParallelAttention(cfg, mp_config, tp_size, window=cfg.sliding_window(layer_number))
        self.mlp = ParallelGatedMLP(cfg, mp_config) if cfg.gated else ParallelMLP(cfg, mp_config)
        self.hidden_dropout = nn.Dropout(cfg.hidden_dropout)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.hidden_dropout(self.attention(self.input_layernorm(x)))
        if self.gpt_j_residual:  # x + attn(ln1(x)) + mlp(ln2(x))
            return x + attn + self.hidden_dropout(self.mlp(self.post_attention_layernorm(x)))
        x = x + attn
        return x + self.hidden_dropout(self.mlp(self.post_attention_layernorm(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class Embedding(nn.Module):
    """Token ids [b, s] -> hidden [b, s, h] (vocab-parallel table, replicated output)."""

    param_prefix = ""

    def __init__(self, cfg: ModelConfig, mp_config, padded_vocab_size: int):
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        super().__init__()
        self.embed_in = VocabParallelEmbedding(padded_vocab_size, cfg.hidden_size,
                                               init_method=_no_init, config=mp_config,
                                               tp_group=tp_group())
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.embed_in(tokens))


class FinalNorm(nn.Module):
    param_prefix = ""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.final_layer_norm = make_norm(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_layer_norm(x)


class OutputLayer(nn.Module):
    """Hidden [b, s, h] -> this rank's vocab shard of the logits [b, s, V/tp]."""

    param_prefix = ""

    def __init__(self, cfg: ModelConfig, mp_config, padded_vocab_size: int):
        from megatron.core.tensor_parallel import ColumnParallelLinear

        super().__init__()
        self.embed_out = ColumnParallelLinear(cfg.hidden_size, padded_vocab_size, config=mp_config,
                                              init_method=_no_init, bias=False, gather_output=False,
                                              tp_group=tp_group())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _ = self.embed_out(x)
        return logits


def tied_output(x: torch.Tensor, embedding: Embedding) -> torch.Tensor:
    """Logits through the (vocab-parallel) input embedding, for no_weight_tying: false."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    return F.linear(copy_to_tensor_model_parallel_region(x, group=tp_group()), embedding.embed_in.weight)


def mark_tensor_parallel(block: nn.Module) -> None:
    """Tag every TP-sharded parameter with megatron's attributes (tensor_model_parallel,
    partition_dim, partition_stride). megatron-core sets them only when it initializes the
    weights itself; the layout-invariant init, checkpoint merging and grad-norm clipping (which
    must count replicated parameters once) all read them."""
    from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                               VocabParallelEmbedding)

    sharded = {ColumnParallelLinear: {"weight": 0, "bias": 0}, RowParallelLinear: {"weight": 1},
               VocabParallelEmbedding: {"weight": 0}}
    for module in block.modules():
        for name, dim in sharded.get(type(module), {}).items():
            param = getattr(module, name, None)
            if param is not None:
                param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, dim, 1


# Which global parameters are split across TP ranks, and along which dim: the megatron-core layer
# each one lives in (mark_tensor_parallel's table, by layer type) said by name, for code that sees
# names but no modules (the checkpoint reader, a universal checkpoint's loader). A test checks
# that both agree on a real model.
TENSOR_PARALLEL_DIMS = (
    ("embed_in.weight", 0),                     # VocabParallelEmbedding
    ("embed_out.weight", 0),                    # ColumnParallelLinear (the output layer)
    ("attention.query_key_value.weight", 0),    # ColumnParallelLinear
    ("attention.query_key_value.bias", 0),
    ("mlp.dense_h_to_4h.weight", 0),            # ColumnParallelLinear
    ("mlp.dense_h_to_4h.bias", 0),
    ("mlp.gate_proj.weight", 0),                # ColumnParallelLinear (gated MLP)
    ("mlp.gate_proj.bias", 0),
    ("mlp.up_proj.weight", 0),                  # ColumnParallelLinear (gated MLP)
    ("mlp.up_proj.bias", 0),
    ("attention.dense.weight", 1),              # RowParallelLinear (its bias is replicated)
    ("mlp.dense_4h_to_h.weight", 1),            # RowParallelLinear (its bias is replicated)
    ("mlp.down_proj.weight", 1),                # RowParallelLinear (its bias is replicated)
)


def tensor_parallel_dim(name: str) -> int | None:
    """The dim along which the parameter with global ``name`` ("layers.3.mlp.dense_4h_to_h.weight")
    is split across tensor-parallel ranks; None when every TP rank holds all of it (norms,
    row-parallel biases). Agrees with the ``partition_dim`` that mark_tensor_parallel sets."""
    for suffix, dim in TENSOR_PARALLEL_DIMS:
        if name == suffix or name.endswith("." + suffix):
            return dim
    return None


def init_std_for(name: str, cfg: ModelConfig) -> float | None:
    """NeoX's init roles by parameter name; None: biases zero, norm weights one."""
    from neox_sophia.model.init import init_std

    if name.endswith("bias"):
        return None
    if "layernorm" in name or "layer_norm" in name:
        return None
    if name.endswith(("attention.dense.weight", "mlp.dense_4h_to_h.weight", "mlp.down_proj.weight")):
        return init_std(cfg, cfg.output_layer_init_method, "output_layer_init_method")
    return init_std(cfg, cfg.init_method, "init_method")


@torch.no_grad()
def initialize_block(block: nn.Module, cfg: ModelConfig, seed: int, tp_rank: int, tp_size: int) -> None:
    """Initialize every parameter of a block by its global name (see neox_sophia.model.init)."""
    from neox_sophia.model.init import init_parameter

    for local_name, param in block.named_parameters():
        name = block.param_prefix + local_name
        std = init_std_for(name, cfg)
        if std is not None:
            init_parameter(param, name, std, seed, tp_rank, tp_size)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.fill_(1.0)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross entropy over unmasked tokens from vocab-parallel logits.

    megatron-core's vocab_parallel_cross_entropy works in place on fp32 logits: callers that
    still need the logits must pass a copy.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    losses = vocab_parallel_cross_entropy(logits.float(), labels)
    if loss_mask is None:
        return losses.mean()
    mask = loss_mask.to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


__all__ = ["Embedding", "TransformerLayer", "FinalNorm", "OutputLayer", "ParallelAttention",
           "ParallelMLP", "ParallelGatedMLP", "RotaryEmbedding", "initialize_block", "mark_tensor_parallel", "lm_loss",
           "tied_output",
           "megatron_config", "tensor_parallel_dim", "TENSOR_PARALLEL_DIMS"]

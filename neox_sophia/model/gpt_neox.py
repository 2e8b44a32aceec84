"""The GPT-NeoX model: one list of blocks, run as a plain module (pipe_parallel_size 0).

    blocks = [Embedding, TransformerLayer x num_layers, FinalNorm, OutputLayer]

The pipeline issue wraps the same blocks as DeepSpeed LayerSpecs, so both paths share one
definition of the model.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from neox_sophia.config.model import ModelConfig
from neox_sophia.model.layers import (Embedding, FinalNorm, OutputLayer, TransformerLayer,
                                      initialize_block, mark_tensor_parallel, megatron_config,
                                      tied_output)
from neox_sophia.parallel.topology import Grid, gather_tensor_parallel


def build_blocks(cfg: ModelConfig, padded_vocab_size: int, tp_size: int,
                 dtype: torch.dtype = torch.float32) -> List[nn.Module]:
    cfg.validate()
    if padded_vocab_size % tp_size:
        raise ValueError(f"padded vocab size {padded_vocab_size} is not divisible by "
                         f"model_parallel_size {tp_size}")
    mp = megatron_config(tp_size, dtype)
    blocks: List[nn.Module] = [Embedding(cfg, mp, padded_vocab_size)]
    blocks += [TransformerLayer(cfg, mp, tp_size, i) for i in range(cfg.num_layers)]
    blocks.append(FinalNorm(cfg))
    if cfg.no_weight_tying:
        blocks.append(OutputLayer(cfg, mp, padded_vocab_size))
    for block in blocks:
        mark_tensor_parallel(block)
    return blocks


class GPTNeoX(nn.Module):
    """tokens [b, s] -> this rank's vocab shard of the logits [b, s, padded_vocab / tp]."""

    def __init__(self, cfg: ModelConfig, padded_vocab_size: int, grid: Grid, seed: int,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = cfg
        self.padded_vocab_size = padded_vocab_size
        blocks = build_blocks(cfg, padded_vocab_size, grid.tp_size, dtype)
        self.embedding = blocks[0]
        self.layers = nn.ModuleList(blocks[1:1 + cfg.num_layers])
        self.final_norm = blocks[1 + cfg.num_layers]
        self.output = blocks[2 + cfg.num_layers] if cfg.no_weight_tying else None
        for block in blocks:
            initialize_block(block, cfg, seed, grid.tp_rank, grid.tp_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        for layer in self.layers:
            x = layer(x)
        x = self.final_norm(x)
        return self.output(x) if self.output is not None else tied_output(x, self.embedding)

    @torch.no_grad()
    def full_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits over the whole padded vocabulary on every TP rank (for tests and inference)."""
        return gather_tensor_parallel(self(tokens), dim=-1)

    def global_named_parameters(self):
        return global_named_parameters(self)

    def full_state_dict(self) -> dict:
        return full_state_dict(self)


def global_named_parameters(module: nn.Module):
    """(global name, parameter) of every block inside ``module`` (a GPTNeoX, a pipeline stage).

    Names are Hugging Face GPTNeoX's without the 'gpt_neox.' prefix; a tied embedding held by
    two blocks is listed once.
    """
    seen = set()
    for block in module.modules():
        if hasattr(block, "param_prefix"):
            for local, param in block.named_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield block.param_prefix + local, param


@torch.no_grad()
def full_state_dict(module: nn.Module) -> dict:
    """Every parameter of ``module``'s blocks at full size (TP shards concatenated)."""
    out = {}
    for name, param in global_named_parameters(module):
        if getattr(param, "tensor_model_parallel", False):
            full = gather_tensor_parallel(param.detach(), dim=param.partition_dim)
            out[name] = full.clone() if full.data_ptr() == param.data_ptr() else full  # TP=1: the parameter
        else:
            out[name] = param.detach().clone()
    return out


def parameter_shapes(cfg: ModelConfig, vocab_size: int) -> Dict[str, Tuple[int, ...]]:
    """Every global parameter name of the model ``cfg`` describes, with its full shape, in model
    order (what build_blocks makes; tests check the two agree)."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    norm = ("weight",) if cfg.norm == "rmsnorm" else ("weight", "bias")
    shapes: Dict[str, Tuple[int, ...]] = {"embed_in.weight": (vocab_size, h)}
    qkv = (cfg.num_attention_heads + 2 * cfg.kv_heads) * cfg.head_dim
    mlp = ([("gate_proj", (f, h)), ("up_proj", (f, h)), ("down_proj", (h, f))] if cfg.gated
           else [("dense_h_to_4h", (f, h)), ("dense_4h_to_h", (h, f))])
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for layer_norm in ("input_layernorm", "post_attention_layernorm"):
            shapes.update({f"{p}{layer_norm}.{kind}": (h,) for kind in norm})
        linears = [("attention.query_key_value", (qkv, h), cfg.use_bias_in_attn_linear),
                   ("attention.dense", (h, h), cfg.use_bias_in_attn_linear)]
        linears += [(f"mlp.{name}", shape, cfg.use_bias_in_mlp) for name, shape in mlp]
        for name, shape, bias in linears:
            shapes[f"{p}{name}.weight"] = shape
            if bias:
                shapes[f"{p}{name}.bias"] = shape[:1]
    shapes.update({f"final_layer_norm.{kind}": (h,) for kind in norm})
    if cfg.no_weight_tying:
        shapes["embed_out.weight"] = (vocab_size, h)
    return shapes

"""The same GPT-NeoX blocks as a DeepSpeed PipelineModule (pipe_parallel_size >= 1, as NeoX).

Stages exchange hidden states [b, s, h]; the last stage returns vocab-parallel logits and the
engine applies ``loss_fn(logits, (labels, loss_mask))``. With tied embeddings the first and the
last stage each hold the embedding (a TiedLayerSpec) and DeepSpeed all-reduces its gradient.
Each block is initialized by its global parameter names, so a stage's weights do not depend on
how the layers were split.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from neox_sophia.config.model import ModelConfig, ParallelConfig
from neox_sophia.model.layers import (Embedding, FinalNorm, OutputLayer, TransformerLayer,
                                      initialize_block, lm_loss, mark_tensor_parallel,
                                      megatron_config, tied_output)
from neox_sophia.parallel.topology import Grid


def _tied_logits(embedding: Embedding, x: torch.Tensor) -> torch.Tensor:
    return tied_output(x, embedding)


def pipeline_loss(logits: torch.Tensor, labels_and_mask) -> torch.Tensor:
    labels, loss_mask = labels_and_mask
    return lm_loss(logits, labels, loss_mask)


def build_pipeline(cfg: ModelConfig, parallel: ParallelConfig, padded_vocab_size: int, grid: Grid,
                   seed: int, dtype: torch.dtype = torch.float32,
                   loss_fn: Optional[Callable] = pipeline_loss) -> nn.Module:
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    cfg.validate()
    mp = megatron_config(grid.tp_size, dtype)
    embed = (LayerSpec(Embedding, cfg, mp, padded_vocab_size) if cfg.no_weight_tying else
             TiedLayerSpec("embed", Embedding, cfg, mp, padded_vocab_size,
                           tied_weight_attr="embed_in.weight"))
    specs = [embed]
    specs += [LayerSpec(TransformerLayer, cfg, mp, grid.tp_size, i) for i in range(cfg.num_layers)]
    specs.append(LayerSpec(FinalNorm, cfg))
    specs.append(LayerSpec(OutputLayer, cfg, mp, padded_vocab_size) if cfg.no_weight_tying else
                 TiedLayerSpec("embed", Embedding, cfg, mp, padded_vocab_size,
                               forward_fn=_tied_logits, tied_weight_attr="embed_in.weight"))
    topology = PipeModelDataParallelTopology(num_pp=grid.pp_size, num_mp=grid.tp_size,
                                             num_dp=grid.dp_size)
    # Activation checkpointing is done by each TransformerLayer itself (one mechanism for both
    # the plain and the pipelined model), so DeepSpeed's interval stays 0.
    pipe = PipelineModule(layers=specs, topology=topology, loss_fn=loss_fn,
                          partition_method=parallel.pipe_partition_method,
                          activation_checkpoint_interval=0)
    for block in pipe.modules():
        if hasattr(block, "param_prefix"):
            mark_tensor_parallel(block)
            initialize_block(block, cfg, seed, grid.tp_rank, grid.tp_size)
    return pipe

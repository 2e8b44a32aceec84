"""GPT-NeoX on megatron-core tensor-parallel layers, with layout-invariant initialization."""
import torch
from torch import nn

from neox_sophia.config.model import ModelConfig, ParallelConfig
from neox_sophia.model.gpt_neox import GPTNeoX, build_blocks
from neox_sophia.parallel.topology import Grid


def build_model(cfg: ModelConfig, parallel: ParallelConfig, padded_vocab_size: int, grid: Grid, seed: int,
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """As GPT-NeoX: pipe_parallel_size 0 gives a plain module, >= 1 a DeepSpeed PipelineModule
    (so 1 still runs under the PipelineEngine). Same blocks, same weights either way."""
    if parallel.pipe_parallel_size == 0:
        return GPTNeoX(cfg, padded_vocab_size, grid, seed, dtype)
    from neox_sophia.model.pipeline import build_pipeline

    return build_pipeline(cfg, parallel, padded_vocab_size, grid, seed, dtype)


__all__ = ["GPTNeoX", "build_blocks", "build_model"]

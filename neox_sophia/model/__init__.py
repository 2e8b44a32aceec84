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


def load_for_inference(save_dir: str, step=None, dtype: torch.dtype = torch.float32, device="cpu") -> nn.Module:
    """A checkpoint saved at any TP x PP x ZeRO layout (or a universal one) as a single-process
    module: token ids [B, S] -> logits [B, S, padded vocab]. See neox_sophia.model.inference."""
    from neox_sophia.model.inference import load_for_inference as load

    return load(save_dir, step, dtype, device)


__all__ = ["GPTNeoX", "build_blocks", "build_model", "load_for_inference"]

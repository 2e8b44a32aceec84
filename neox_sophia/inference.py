"""`load_for_inference(SAVE_DIR)`: a checkpoint saved at any layout as one single-process module.

    from neox_sophia.inference import load_for_inference
    model = load_for_inference("runs/125M/ckpt")          # or a universal checkpoint directory
    logits = model(tokens)                                # [B, S] ids -> [B, S, padded vocab]

The checkpoint is read offline (neox_sophia.convert.reader: TP shards merged, pipeline stages
joined, ZeRO partitions ignored since only weights are needed), and the weights go into the same
GPT-NeoX module training uses, at TP = PP = 1. The logits cover the padded vocabulary, as in
training and in the Hugging Face export; columns past the tokenizer's vocabulary are padding.
For a process that is not already one rank of a larger group (megatron-core's layers need a
process group; a single process gets an in-memory one).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class InferenceModel(nn.Module):
    """GPT-NeoX at TP = PP = 1 in eval mode; ``config`` is the run's NeoXConfig, ``step`` the
    checkpoint's step."""

    def __init__(self, model: nn.Module, config, step: int):
        super().__init__()
        self.model = model
        self.config = config
        self.step = step

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)


def load_for_inference(save_dir: str, step: Optional[int] = None, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> InferenceModel:
    from neox_sophia.convert.reader import neox_config
    from neox_sophia.convert.universal import read_any
    from neox_sophia.model.gpt_neox import GPTNeoX, global_named_parameters
    from neox_sophia.parallel.topology import initialize_model_parallel
    from neox_sophia.training.checkpoint import CheckpointError

    checkpoint = read_any(save_dir, step, optimizer_state=False)
    cfg = neox_config(checkpoint.config, f"{save_dir} (config.yml)")
    padded = checkpoint.weights["embed_in.weight"].shape[0]
    grid = initialize_model_parallel(1, 1)
    model = GPTNeoX(cfg.model, padded, grid, seed=cfg.training.seed, dtype=dtype)
    with torch.no_grad():
        for name, param in global_named_parameters(model):
            if name not in checkpoint.weights or checkpoint.weights[name].shape != param.shape:
                raise CheckpointError(f"load_for_inference: {save_dir}: weight '{name}' is missing or has another "
                                      f"shape than its config.yml describes; the checkpoint is damaged")
            param.copy_(checkpoint.weights[name].to(dtype))
    return InferenceModel(model.to(device).eval(), cfg, checkpoint.step)

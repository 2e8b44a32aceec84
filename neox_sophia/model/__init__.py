"""GPT-NeoX on megatron-core tensor-parallel layers, with layout-invariant initialization."""
from neox_sophia.model.gpt_neox import GPTNeoX, build_blocks

__all__ = ["GPTNeoX", "build_blocks"]

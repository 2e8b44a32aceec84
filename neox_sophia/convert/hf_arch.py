"""What a Hugging Face architecture needs to say to convert (neox_sophia.convert.hf drives it).

Each architecture (hf_gpt_neox.py, hf_llama.py) is one HFArchitecture: how our model config
becomes its config.json and back, and how our tensors (global names, full size) become its
state dict and back. The shared machinery (files, dtypes, vocabulary padding, error messages)
lives in hf.py, so an architecture is only its facts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch

from neox_sophia.config.model import ModelConfig

Tensors = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class HFArchitecture:
    model_type: str
    """config.json's model_type."""
    hf_class: str
    """The transformers class written into config.json's architectures."""
    problems: Callable[[ModelConfig], Dict[str, str]]
    """NeoX key -> why the HF class cannot compute what ``model`` computes (empty: it can)."""
    config: Callable[[ModelConfig, int], dict]
    """config.json fields for ``model`` with the padded vocabulary (no dtype, bos or eos ids)."""
    read_config: Callable[[dict, str], dict]
    """A raw config.json -> the same with every compared key filled (HF's defaults)."""
    compared: Dict[str, str]
    """HF config key -> the NeoX key behind it (named in mismatch errors)."""
    to_hf: Callable[[Tensors, ModelConfig], Tensors]
    """Our full weights -> HF's state dict (model order)."""
    canonical: Callable[[Tensors, dict, str], Tensors]
    """An HF file's tensors -> the names to_hf writes (buffers dropped, aliases and a tied head
    resolved)."""
    to_ours: Callable[[Tensors, ModelConfig], Tensors]
    """HF's state dict (canonical names, checked shapes) -> our full weights."""
    model_keys: Callable[[dict], dict]
    """A filled config.json -> the NeoX model keys (ModelConfig fields) that describe it."""
    warn_only: Dict[str, str] = field(default_factory=dict)
    """Compared keys whose mismatch is a warning (why it is harmless), not an error."""


def same(a, b) -> bool:
    """Config values equal (floats to 1e-9 relative; bools never equal numbers)."""
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) \
            or not isinstance(b, (int, float)):
        return a == b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def plain_rope(raw: dict, path: str) -> dict:
    """The rope_parameters (transformers 5) or rope_scaling (4.x) of a config.json; refuses any
    RoPE scaling (its positions would differ from NeoX's plain rotary embedding)."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{path}: rope_parameters: rope type {rope_type!r} (RoPE scaling) is not implemented; "
                         f"only plain rotary embeddings")
    return rope


def integral(value):
    """A config float that is a whole number as an int (YAML keys read best as ints)."""
    return int(value) if float(value).is_integer() else value


def untie(tensors: Tensors, head: str, embedding: str, tied: bool, where: str) -> Tensors:
    """Drop a tied output head a file stored anyway; it must then be the embedding."""
    if tied and head in tensors:
        if not torch.equal(tensors[head], tensors.get(embedding, torch.empty(0))):
            raise ValueError(f"{where}: tie_word_embeddings is true but {head} differs from {embedding}")
        tensors = {name: t for name, t in tensors.items() if name != head}
    return tensors


def listing(names: List[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


__all__ = ["HFArchitecture", "Tensors", "same", "plain_rope", "integral", "untie", "listing"]

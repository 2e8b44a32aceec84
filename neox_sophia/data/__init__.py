"""Data: tokenizers (and later preprocessing and datasets)."""
from neox_sophia.data.tokenizers import Tokenizer, build_tokenizer

__all__ = ["Tokenizer", "build_tokenizer"]

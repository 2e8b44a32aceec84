"""Typed config sections for the model's shape and its parallel layout (GPT-NeoX key names).

Each field is a GPT-NeoX YAML key with NeoX's default. Values NeoX accepts but this project
cannot honour raise ConfigError naming the key and what to set instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from neox_sophia.config.base import ConfigError


@dataclass
class ModelConfig:
    num_layers: int = None  # type: ignore[assignment]
    """Transformer layers. Required."""
    hidden_size: int = None  # type: ignore[assignment]
    """Model width. Required; divisible by num_attention_heads."""
    num_attention_heads: int = None  # type: ignore[assignment]
    """Attention heads. Required; divisible by model_parallel_size."""
    intermediate_size: Optional[int] = None
    """MLP width; None means 4 * hidden_size (NeoX). Must be even."""
    seq_length: int = None  # type: ignore[assignment]
    """Training sequence length. Required."""
    max_position_embeddings: int = None  # type: ignore[assignment]
    """Longest sequence the model supports; >= seq_length. Required."""
    norm: str = "layernorm"
    """Normalization. Only "layernorm" (HF GPTNeoX has no other)."""
    layernorm_epsilon: float = 1.0e-5
    """LayerNorm epsilon."""
    pos_emb: str = "learned"
    """Position embedding. NeoX's default is "learned"; only "rotary" is implemented (as in every
    upstream NeoX and Pythia config)."""
    rotary_pct: float = 1.0
    """Fraction of each head's dimensions that get rotary embedding (Pythia: 0.25)."""
    rotary_emb_base: int = 10000
    """Rotary base (theta)."""
    gpt_j_residual: bool = False
    """Parallel attention and MLP: x + attn(ln1(x)) + mlp(ln2(x)) (Pythia) instead of sequential."""
    gpt_j_tied: bool = False
    """Share ln1 and ln2 in the parallel residual. Not supported (HF GPTNeoX cannot express it)."""
    no_weight_tying: bool = False
    """Untied output layer (NeoX configs set true). False ties embed_out to embed_in."""
    make_vocab_size_divisible_by: int = 128
    """The vocab is padded to a multiple of this times model_parallel_size."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP outputs and on the embedding."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    init_method: str = "normal"
    """Init of embeddings and input-side weights: normal, scaled_normal, small_init, wang_init, ..."""
    output_layer_init_method: str = "scaled_normal"
    """Init of the residual-output weights (attention dense, MLP 4h->h)."""
    init_method_std: float = 0.02
    """Std of "normal" and the base of "scaled_normal"."""
    activation: str = "gelu"
    """MLP activation: "gelu" (exact erf) or "gelu_tanh"-style fusion through bias_gelu_fusion."""
    bias_gelu_fusion: bool = False
    """NeoX: use the tanh approximation of GELU (Pythia was trained with it)."""
    use_bias_in_attn_linear: bool = True
    """Bias on the QKV and attention output projections."""
    attention_config: Optional[list] = None
    """NeoX per-layer attention types, e.g. [[["flash"], 12]] or [[["global"], "all"]]. Only
    "global" and "flash" (the same causal softmax attention; torch SDPA picks the kernel) exist."""
    checkpoint_activations: bool = False
    """Recompute each layer's activations in backward (saves memory, costs ~1/3 more compute)."""

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}: must be a positive integer (got {value!r})")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size: {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.max_position_embeddings < self.seq_length:
            raise ConfigError(f"max_position_embeddings: {self.max_position_embeddings} is smaller "
                              f"than seq_length {self.seq_length}")
        if self.intermediate_size is not None and (self.intermediate_size <= 0 or self.intermediate_size % 2):
            raise ConfigError(f"intermediate_size: must be a positive even integer (got "
                              f"{self.intermediate_size})")
        unsupported = {
            "norm": (self.norm != "layernorm", "only 'layernorm' is implemented"),
            "pos_emb": (self.pos_emb != "rotary",
                        f"'{self.pos_emb}' is not implemented; set pos_emb: rotary"),
            "gpt_j_tied": (self.gpt_j_tied, "tied parallel-residual norms are not supported"),
            "activation": (self.activation != "gelu", f"'{self.activation}' is not implemented; "
                                                      f"only 'gelu' (GPT-NeoX)"),
        }
        for key, (bad, why) in unsupported.items():
            if bad:
                raise ConfigError(f"{key}: {why}")
        self._validate_attention_config()
        from neox_sophia.model.init import INIT_STDS  # the registry of init methods

        for key in ("init_method", "output_layer_init_method"):
            if getattr(self, key) not in INIT_STDS:
                raise ConfigError(f"{key}: '{getattr(self, key)}' is not implemented; choose one of "
                                  f"{sorted(INIT_STDS)}")
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ConfigError(f"rotary_pct: must be in [0, 1] (got {self.rotary_pct})")
        for key in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{key}: must be in [0, 1) (got {getattr(self, key)})")

    def _validate_attention_config(self) -> None:
        if self.attention_config is None:
            return
        layers = 0
        for entry in self.attention_config:
            ok = (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], (list, tuple))
                  and (entry[1] == "all" or (isinstance(entry[1], int) and entry[1] > 0)))
            if not ok:
                raise ConfigError(f"attention_config: entries are [[types], count] or [[types], \"all\"] "
                                  f"(got {entry!r})")
            unsupported = sorted(set(entry[0]) - {"global", "flash"})
            if unsupported:
                raise ConfigError(f"attention_config: attention type(s) {unsupported} are not implemented; "
                                  f"only 'global' and 'flash' (causal softmax attention)")
            layers += self.num_layers if entry[1] == "all" else entry[1] * len(entry[0])
        if layers != self.num_layers:
            raise ConfigError(f"attention_config: covers {layers} layers, the model has {self.num_layers}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_hidden_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_dim * self.rotary_pct)


@dataclass
class ParallelConfig:
    pipe_parallel_size: int = 0
    """Pipeline stages. 0: a plain module; >= 1: a DeepSpeed PipelineModule (1 = one stage)."""
    model_parallel_size: int = 1
    """Tensor-parallel size (megatron-core TP layers)."""
    pipe_partition_method: str = "type:transformer|mlp"
    """How layers are split across stages: "uniform", "parameters" or "type:REGEX" (DeepSpeed)."""

    @property
    def pipeline_stages(self) -> int:
        return max(self.pipe_parallel_size, 1)

    def validate(self) -> None:
        if self.pipe_parallel_size < 0:
            raise ConfigError(f"pipe_parallel_size: must be >= 0 (got {self.pipe_parallel_size})")
        if self.model_parallel_size < 1:
            raise ConfigError(f"model_parallel_size: must be >= 1 (got {self.model_parallel_size})")

    def data_parallel_size(self, world_size: int) -> int:
        grid = self.pipeline_stages * self.model_parallel_size
        if world_size % grid:
            raise ConfigError(f"world size {world_size} is not divisible by pipe_parallel_size x "
                              f"model_parallel_size = {self.pipeline_stages} x "
                              f"{self.model_parallel_size}; change the number of processes or the "
                              f"parallel sizes")
        return world_size // grid



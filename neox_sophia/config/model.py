"""Typed config sections for the model's shape and its parallel layout (GPT-NeoX key names).

Each field is a GPT-NeoX YAML key with NeoX's default. Values NeoX accepts but this project
cannot honour raise ConfigError naming the key and what to set instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from neox_sophia.config.base import ConfigError

# What the model keys may name. The model implements each (neox_sophia.model.components keys its
# modules and functions by these names; a test checks that every name has one).
NORM_CHOICES = ("layernorm", "rmsnorm")
ACTIVATION_CHOICES = ("gelu",)
GATED_HF_ACT = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}
"""Gated activations (down_proj(act(gate_proj(x)) * up_proj(x))) -> the Hugging Face hidden_act
that names the same gate function."""

INIT_STDS: Dict[str, Callable[["ModelConfig"], float]] = {
    "normal": lambda c: c.init_method_std,
    "scaled_normal": lambda c: c.init_method_std / math.sqrt(2.0 * c.num_layers),
    "small_init": lambda c: math.sqrt(2.0 / (5.0 * c.hidden_size)),
    "wang_init": lambda c: 2.0 / c.num_layers / math.sqrt(c.hidden_size),
}
"""init_method / output_layer_init_method -> std(config): NeoX's init functions
(megatron/model/init_functions.py), normal family."""


@dataclass
class ModelConfig:
    num_layers: int = None  # type: ignore[assignment]
    """Transformer layers. Required."""
    hidden_size: int = None  # type: ignore[assignment]
    """Model width. Required; divisible by num_attention_heads."""
    num_attention_heads: int = None  # type: ignore[assignment]
    """Attention (query) heads. Required; divisible by model_parallel_size."""
    num_kv_heads: Optional[int] = None
    """Key/value heads (grouped-query attention, as LLaMA-2 70B and Mistral); None: one per query
    head. Divides num_attention_heads; divisible by model_parallel_size."""
    intermediate_size: Optional[int] = None
    """MLP width as NeoX counts it; None means 4 * hidden_size. A gated activation (swiglu) uses
    2/3 of it per branch, rounded up to mlp_multiple_of (NeoX: 32768 -> 11008 for LLaMA-7B)."""
    mlp_multiple_of: int = 1
    """Round the MLP width up to a multiple of this (NeoX's LLaMA configs: 256)."""
    use_bias_in_mlp: bool = True
    """Biases on the MLP projections."""
    seq_length: int = None  # type: ignore[assignment]
    """Training sequence length. Required."""
    max_position_embeddings: int = None  # type: ignore[assignment]
    """Longest sequence the model supports; >= seq_length. Required."""
    norm: str = "layernorm"
    """Normalization: "layernorm" or "rmsnorm" (LLaMA, Mistral)."""
    layernorm_epsilon: float = 1.0e-5
    """LayerNorm epsilon."""
    rms_norm_epsilon: float = 1.0e-8
    """RMSNorm epsilon (NeoX's default; the LLaMA configs set 1e-6 or 1e-5)."""
    use_bias_in_norms: bool = True
    """Accepted as NeoX accepts it: NeoX's model code never reads it (its LayerNorm always has a
    bias, its RMSNorm never), and neither does this model."""
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
    """MLP activation: "gelu" (exact erf; tanh approximation with bias_gelu_fusion), or a gated
    one: "swiglu" (LLaMA, Mistral), "geglu", "reglu"."""
    bias_gelu_fusion: bool = False
    """NeoX: use the tanh approximation of GELU (Pythia was trained with it)."""
    use_bias_in_attn_linear: bool = True
    """Bias on the QKV and attention output projections."""
    attention_config: Optional[list] = None
    """NeoX per-layer attention types, e.g. [[["flash"], 12]] or [[["global"], "all"]]. Only
    "global" and "flash" (the same causal softmax attention; torch SDPA picks the kernel) exist."""
    sliding_window_width: Optional[int] = None
    """Sliding-window attention (Mistral): a token attends to itself and the previous
    sliding_window_width tokens. As in NeoX it applies to "flash" layers only (NeoX's other
    attention ignores it)."""
    checkpoint_activations: bool = False
    """Recompute each layer's activations in backward (saves memory, costs ~1/3 more compute)."""

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}: must be a positive integer (got {value!r})")
        self._validate_layer_types()  # first: a Mamba or RWKV file is refused as such
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size: {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.max_position_embeddings < self.seq_length:
            raise ConfigError(f"max_position_embeddings: {self.max_position_embeddings} is smaller "
                              f"than seq_length {self.seq_length}")
        self._validate_choices()
        self._validate_attention_config()
        self._validate_heads()
        self._validate_mlp()
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ConfigError(f"rotary_pct: must be in [0, 1] (got {self.rotary_pct})")
        for key in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{key}: must be in [0, 1) (got {getattr(self, key)})")

    def _validate_choices(self) -> None:
        activations = sorted(ACTIVATION_CHOICES) + sorted(GATED_HF_ACT)
        unsupported = {
            "norm": (self.norm not in NORM_CHOICES,
                     f"'{self.norm}' is not implemented; choose one of {sorted(NORM_CHOICES)}"),
            "pos_emb": (self.pos_emb != "rotary",
                        f"'{self.pos_emb}' is not implemented; set pos_emb: rotary"),
            "gpt_j_tied": (self.gpt_j_tied, "tied parallel-residual norms are not supported"),
            "activation": (self.activation not in activations,
                           f"'{self.activation}' is not implemented; choose one of {activations}"),
        }
        for key in ("init_method", "output_layer_init_method"):
            unsupported[key] = (getattr(self, key) not in INIT_STDS, f"'{getattr(self, key)}' is not "
                                                                     f"implemented; choose one of {sorted(INIT_STDS)}")
        for key, (bad, why) in unsupported.items():
            if bad:
                raise ConfigError(f"{key}: {why}")

    def _validate_heads(self) -> None:
        kv = self.num_kv_heads
        if kv is not None and (not isinstance(kv, int) or kv <= 0 or self.num_attention_heads % kv):
            raise ConfigError(f"num_kv_heads: {kv!r} must be a positive divisor of num_attention_heads "
                              f"{self.num_attention_heads}")
        window = self.sliding_window_width
        if window is not None and (not isinstance(window, int) or window <= 0):
            raise ConfigError(f"sliding_window_width: must be a positive integer (got {window!r})")

    def _validate_mlp(self) -> None:
        if self.mlp_multiple_of < 1:
            raise ConfigError(f"mlp_multiple_of: must be >= 1 (got {self.mlp_multiple_of})")
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise ConfigError(f"intermediate_size: must be positive (got {self.intermediate_size})")
        linear1, linear2 = self.mlp_widths
        if linear1 == (2 * linear2 if self.gated else linear2):
            return
        # NeoX builds these two matrices and fails in its forward pass; say how to fix it.
        size = self.intermediate_size or 4 * self.hidden_size
        if self.gated:  # NeoX keeps 2/3 of intermediate_size and halves it: 3 W gives W per branch
            fix = (f"NeoX counts it before its 2/3 scaling: for a {size}-wide gated MLP (as Hugging Face "
                   f"counts it) set intermediate_size: {3 * size}")
        else:
            multiple = 2 * self.mlp_multiple_of
            fix = f"set intermediate_size to a multiple of {multiple}, e.g. {multiple * -(-size // multiple)}"
        raise ConfigError(f"intermediate_size: {size} with activation {self.activation} and mlp_multiple_of "
                          f"{self.mlp_multiple_of} gives NeoX's MLP an input projection of width {linear1} but an "
                          f"output projection taking {linear2}{' per gate branch' if self.gated else ''}, which "
                          f"NeoX cannot run either; {fix}")

    def _validate_layer_types(self) -> None:
        """Refuse a file of Mamba, RWKV or gMLP layers (or sparse attention) by its layer types."""
        for entry in self.attention_config or ():
            ok = (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], (list, tuple))
                  and (entry[1] == "all" or (isinstance(entry[1], int) and entry[1] > 0)))
            if not ok:
                raise ConfigError(f"attention_config: entries are [[types], count] or [[types], \"all\"] "
                                  f"(got {entry!r})")
            unsupported = sorted(set(entry[0]) - {"global", "flash"})
            if unsupported:
                raise ConfigError(f"attention_config: layer type(s) {unsupported} are not implemented; "
                                  f"only 'global' and 'flash' (causal softmax attention)")

    def _validate_attention_config(self) -> None:
        if self.attention_config is None:
            return
        layers = sum(self.num_layers if count == "all" else count * len(types)
                     for types, count in self.attention_config)
        if layers != self.num_layers:
            raise ConfigError(f"attention_config: covers {layers} layers, the model has {self.num_layers}")

    def attention_types(self) -> List[str]:
        """Each layer's NeoX attention type (NeoX's expand_attention_types: a pattern repeated)."""
        if self.attention_config is None:
            return ["global"] * self.num_layers
        types: List[str] = []
        for pattern, count in self.attention_config:
            repeats = self.num_layers // len(pattern) if count == "all" else count
            types += list(pattern) * repeats
        return types

    def sliding_window(self, layer_number: int) -> Optional[int]:
        """Layer ``layer_number``'s attention window (NeoX applies it in flash layers only)."""
        if self.sliding_window_width is None or self.attention_types()[layer_number] != "flash":
            return None
        return self.sliding_window_width

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_attention_heads

    @property
    def gated(self) -> bool:
        return self.activation in GATED_HF_ACT

    @property
    def mlp_widths(self) -> Tuple[int, int]:
        """(width NeoX's linear1 produces, width its linear2 takes), by NeoX's ParallelMLP: base
        intermediate_size or 4h; a gated activation keeps int(2/3) of it and halves it for the
        second matrix; both rounded up (linear1 to 2 x mlp_multiple_of, linear2 to mlp_multiple_of)."""
        width = self.intermediate_size or 4 * self.hidden_size
        width_in = width
        if self.gated:
            width = int(width * 2 / 3)
            width_in = width // 2
        m = self.mlp_multiple_of
        return 2 * m * -(-width // (2 * m)), m * -(-width_in // m)

    @property
    def ffn_hidden_size(self) -> int:
        """The MLP's hidden width (per branch for a gated MLP; HF's intermediate_size)."""
        return self.mlp_widths[1]

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



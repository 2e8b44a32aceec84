"""Hugging Face GPTNeoXForCausalLM (Pythia, NeoX-20B, this project's GPT-NeoX configs).

Names: ours are HF's without the "gpt_neox." prefix; our "embed_out.weight" is HF's output
layer, written as "embed_out.weight" (the name in Pythia's files and the one transformers'
save_pretrained writes; transformers >= 5 loads it as lm_head, 4.x as embed_out). The QKV rows
are [heads, 3, head_dim] in both. HF's GPTNeoX has LayerNorm with bias, a plain GELU MLP with
biases and one key/value head per query head, so other settings are refused by name.
"""
from __future__ import annotations

import re

from neox_sophia.config.model import ModelConfig
from neox_sophia.convert.hf_arch import HFArchitecture, Tensors, integral, plain_rope, untie

HF_PREFIX = "gpt_neox."
OUTPUT = "embed_out.weight"
# HF activations that are the tanh approximation of GELU (NeoX's bias_gelu_fusion); gelu_new and
# gelu_fast write the same formula by hand, so they agree with it to float rounding.
TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_python_tanh")
# GPTNeoXConfig's defaults, for keys a config.json leaves out (transformers would use them too).
HF_DEFAULTS = {
    "vocab_size": 50432, "hidden_size": 6144, "num_hidden_layers": 44, "num_attention_heads": 64,
    "intermediate_size": 24576, "hidden_act": "gelu", "max_position_embeddings": 2048,
    "rotary_pct": 0.25, "rotary_emb_base": 10000, "layer_norm_eps": 1e-5, "tie_word_embeddings": False,
    "use_parallel_residual": True, "attention_bias": True, "attention_dropout": 0.0, "hidden_dropout": 0.0,
    "bos_token_id": 0, "eos_token_id": 2,
}
COMPARED = {
    "hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_attention_heads", "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings", "rotary_pct": "rotary_pct",
    "rotary_emb_base": "rotary_emb_base", "use_parallel_residual": "gpt_j_residual",
    "tie_word_embeddings": "no_weight_tying", "layer_norm_eps": "layernorm_epsilon",
    "hidden_act": "bias_gelu_fusion", "attention_bias": "use_bias_in_attn_linear",
}
# Buffers older transformers saved with the weights (causal mask, rotary frequencies): not weights.
IGNORED_BUFFERS = re.compile(r"^(gpt_neox\.)?(layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)"
                             r"|rotary_emb\.inv_freq)$")


def problems(model: ModelConfig) -> dict:
    gqa = model.kv_heads != model.num_attention_heads
    checks = {
        "pos_emb": (model.pos_emb != "rotary", f"'{model.pos_emb}' cannot be expressed; HF GPTNeoX "
                                               f"has only rotary position embeddings"),
        "norm": (model.norm != "layernorm", f"'{model.norm}' cannot be expressed; HF GPTNeoX has only LayerNorm"),
        "gpt_j_tied": (model.gpt_j_tied, "tied parallel-residual norms cannot be expressed; HF GPTNeoX "
                                         "has separate input and post-attention LayerNorms"),
        "activation": (model.activation != "gelu", f"'{model.activation}' cannot be expressed; only "
                                                   f"'gelu' (exact, or tanh with bias_gelu_fusion)"),
        "num_kv_heads": (gqa, f"{model.num_kv_heads} key/value heads cannot be expressed; HF GPTNeoX has one "
                              f"per query head"),
        "use_bias_in_mlp": (not model.use_bias_in_mlp, "false cannot be expressed; HF GPTNeoX's MLP has biases"),
        "sliding_window_width": (any(model.sliding_window(i) is not None for i in range(model.num_layers)),
                                 "cannot be expressed; HF GPTNeoX has no sliding-window attention"),
    }
    return {key: why for key, (bad, why) in checks.items() if bad}


def config(model: ModelConfig, padded_vocab_size: int) -> dict:
    """Rotary settings are written both as transformers 4.x reads them (rotary_pct,
    rotary_emb_base) and as 5.x does (rope_parameters)."""
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": padded_vocab_size,
        "hidden_size": model.hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "intermediate_size": model.ffn_hidden_size,
        "max_position_embeddings": model.max_position_embeddings,
        "rotary_pct": model.rotary_pct,
        "rotary_emb_base": model.rotary_emb_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rotary_emb_base,
                            "partial_rotary_factor": model.rotary_pct},
        "use_parallel_residual": model.gpt_j_residual,
        "tie_word_embeddings": not model.no_weight_tying,
        "layer_norm_eps": model.layernorm_epsilon,
        # our MLP computes F.gelu(approximate="tanh") under bias_gelu_fusion: HF's gelu_pytorch_tanh
        "hidden_act": "gelu_pytorch_tanh" if model.bias_gelu_fusion else "gelu",
        "attention_bias": model.use_bias_in_attn_linear,
        "attention_dropout": model.attention_dropout,
        "hidden_dropout": model.hidden_dropout,
        "initializer_range": model.init_method_std,
        "use_cache": True,
    }


def read_config(raw: dict, path: str) -> dict:
    cfg = {key: raw.get(key, default) for key, default in HF_DEFAULTS.items()}
    rope = plain_rope(raw, path)
    # transformers 5 takes rope_parameters over the legacy keys when both are there
    cfg["rotary_pct"] = rope.get("partial_rotary_factor", cfg["rotary_pct"])
    cfg["rotary_emb_base"] = rope.get("rope_theta", cfg["rotary_emb_base"])
    bias_gelu_fusion(cfg["hidden_act"])  # refuse an activation we do not have, by name
    if cfg["hidden_act"] in TANH_GELUS:
        cfg["hidden_act"] = "gelu_pytorch_tanh"
    return cfg


def bias_gelu_fusion(hidden_act: str) -> bool:
    if hidden_act == "gelu":
        return False
    if hidden_act in TANH_GELUS:
        return True
    raise ValueError(f"hidden_act: {hidden_act!r} cannot be expressed; our MLP has 'gelu' (exact) or "
                     f"its tanh approximation ({', '.join(TANH_GELUS)}: bias_gelu_fusion: true)")


def model_keys(hf: dict) -> dict:
    """seq_length is set to max_position_embeddings (lower it at will)."""
    return {
        "num_layers": hf["num_hidden_layers"],
        "hidden_size": hf["hidden_size"],
        "num_attention_heads": hf["num_attention_heads"],
        "intermediate_size": hf["intermediate_size"],
        "seq_length": hf["max_position_embeddings"],
        "max_position_embeddings": hf["max_position_embeddings"],
        "pos_emb": "rotary",
        "rotary_pct": hf["rotary_pct"],
        "rotary_emb_base": integral(hf["rotary_emb_base"]),
        "gpt_j_residual": hf["use_parallel_residual"],
        "no_weight_tying": not hf["tie_word_embeddings"],
        "norm": "layernorm",
        "layernorm_epsilon": hf["layer_norm_eps"],
        "activation": "gelu",
        "bias_gelu_fusion": bias_gelu_fusion(hf["hidden_act"]),
        "use_bias_in_attn_linear": hf["attention_bias"],
        "hidden_dropout": hf["hidden_dropout"],
        "attention_dropout": hf["attention_dropout"],
    }


def to_hf(weights: Tensors, model: ModelConfig) -> Tensors:
    return {(name if name == OUTPUT else HF_PREFIX + name): tensor for name, tensor in weights.items()}


def canonical(tensors: Tensors, hf: dict, where: str) -> Tensors:
    out: Tensors = {}
    for hf_name, tensor in tensors.items():
        if IGNORED_BUFFERS.match(hf_name):
            continue
        if hf_name in (OUTPUT, "lm_head.weight"):
            name = OUTPUT
        else:  # a GPTNeoXModel (no head) file has no prefix
            name = hf_name if hf_name.startswith(HF_PREFIX) else HF_PREFIX + hf_name
        if name in out:
            raise ValueError(f"{where}: two tensors map to {name} (one is {hf_name})")
        out[name] = tensor
    return untie(out, OUTPUT, HF_PREFIX + "embed_in.weight", hf["tie_word_embeddings"], where)


def to_ours(tensors: Tensors, model: ModelConfig) -> Tensors:
    return {(name if name == OUTPUT else name[len(HF_PREFIX):]): tensor for name, tensor in tensors.items()}


GPT_NEOX = HFArchitecture(model_type="gpt_neox", hf_class="GPTNeoXForCausalLM", problems=problems, config=config,
                          read_config=read_config, compared=COMPARED, to_hf=to_hf, canonical=canonical,
                          to_ours=to_ours, model_keys=model_keys,
                          # Exact vs tanh GELU: the same weights serve both. NeoX trained Pythia with the
                          # fused tanh form (bias_gelu_fusion: true) while its HF configs say "gelu";
                          # refusing would refuse every Pythia model. ~1e-3 in an activation.
                          warn_only={"hidden_act": "both are GELU, the model continues with ours"})

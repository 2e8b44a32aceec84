"""Hugging Face LlamaForCausalLM and MistralForCausalLM (NeoX's llama, llama2, llemma, mistral configs).

The mapping is NeoX's own converters' (tools/ckpts/convert_neox_to_hf.py, convert_hf_llama_to_neox.py
at ea7aefd8), stated on our TP-invariant names:

    embed_in.weight                        model.embed_tokens.weight
    layers.N.input_layernorm.weight        model.layers.N.input_layernorm.weight (RMSNorm: no bias)
    layers.N.post_attention_layernorm.*    model.layers.N.post_attention_layernorm.*
    layers.N.attention.query_key_value.*   model.layers.N.self_attn.{q,k,v}_proj.*: our rows are
                                           [kv_heads, group + 2, head_dim]; a group's query rows go to
                                           q_proj in order, its key row to k_proj, its value row to v_proj
    layers.N.attention.dense.*             model.layers.N.self_attn.o_proj.*
    layers.N.mlp.{gate,up,down}_proj.*     model.layers.N.mlp.{gate,up,down}_proj.*
    final_layer_norm.weight                model.norm.weight
    embed_out.weight                       lm_head.weight (none when embeddings are tied)

No rotary permutation: NeoX and HF both rotate the two halves of each head (rotate_half), and
NeoX's converters copy q and k unchanged. Gated activations: swiglu = "silu", geglu = "gelu"
(exact), reglu = "relu". A sliding window needs MistralForCausalLM; NeoX's window w (flash-attn
window_size=(w, -1): keys i-w..i) is HF's sliding_window w + 1 (keys i-w..i as kv > q - (w+1)).
"""
from __future__ import annotations

import re
from typing import Dict

import torch

from neox_sophia.config.model import ModelConfig
from neox_sophia.convert.hf_arch import HFArchitecture, Tensors, integral, plain_rope, untie
from neox_sophia.config.model import GATED_HF_ACT

LLAMA_DEFAULTS = {  # LlamaConfig's defaults (transformers 5.24), for keys a config.json leaves out
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0, "attention_bias": False,
    "mlp_bias": False, "attention_dropout": 0.0, "head_dim": None,
}
MISTRAL_DEFAULTS = {**LLAMA_DEFAULTS, "intermediate_size": 14336, "num_key_value_heads": 8,
                    "max_position_embeddings": 131072, "sliding_window": 4096}
COMPARED = {
    "hidden_size": "hidden_size", "num_hidden_layers": "num_layers", "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_kv_heads", "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings", "rope_theta": "rotary_emb_base",
    "rms_norm_eps": "rms_norm_epsilon", "hidden_act": "activation", "tie_word_embeddings": "no_weight_tying",
}
LLAMA_COMPARED = {**COMPARED, "attention_bias": "use_bias_in_attn_linear", "mlp_bias": "use_bias_in_mlp"}
MISTRAL_COMPARED = {**COMPARED, "sliding_window": "sliding_window_width"}
ACTIVATION_OF = {hf: ours for ours, hf in GATED_HF_ACT.items()}
BUFFERS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
NAMES = {"embed_in.weight": "model.embed_tokens.weight", "final_layer_norm.weight": "model.norm.weight",
         "embed_out.weight": "lm_head.weight"}
QKV = ("q_proj", "k_proj", "v_proj")


def _windows(model: ModelConfig) -> set:
    return {model.sliding_window(i) for i in range(model.num_layers)}


def problems(model: ModelConfig, mistral: bool = False) -> Dict[str, str]:
    cls = "MistralForCausalLM" if mistral else "LlamaForCausalLM"
    checks = {
        "pos_emb": (model.pos_emb != "rotary", f"'{model.pos_emb}' cannot be expressed; {cls} has only rotary "
                                               f"position embeddings"),
        "norm": (model.norm != "rmsnorm", f"'{model.norm}' cannot be expressed; {cls} has only RMSNorm"),
        "activation": (not model.gated, f"'{model.activation}' cannot be expressed; {cls}'s MLP is gated "
                                        f"({', '.join(GATED_HF_ACT)})"),
        "gpt_j_residual": (model.gpt_j_residual, f"true cannot be expressed; {cls}'s attention and MLP are "
                                                 f"sequential"),
        "rotary_pct": (model.rotary_pct != 1.0, f"{model.rotary_pct} cannot be expressed; {cls} rotates every "
                                                f"dimension of a head"),
        "sliding_window_width": (len(_windows(model)) > 1, f"a window in some layers only (the 'flash' ones of "
                                                           f"attention_config) cannot be expressed; {cls} "
                                                           f"treats every layer alike"),
    }
    if mistral:
        for key in ("use_bias_in_attn_linear", "use_bias_in_mlp"):
            checks[key] = (getattr(model, key), f"true cannot be expressed with a sliding window; {cls} has no "
                                                f"biases")
    return {key: why for key, (bad, why) in checks.items() if bad}


def config(model: ModelConfig, padded_vocab_size: int, mistral: bool = False) -> dict:
    theta = model.rotary_emb_base
    out = {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama",
        "vocab_size": padded_vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.kv_heads,
        "head_dim": model.head_dim,
        "hidden_act": GATED_HF_ACT.get(model.activation, model.activation),
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.rms_norm_epsilon,
        "rope_theta": theta,  # transformers 4.x; 5.x reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "attention_dropout": model.attention_dropout,
        "tie_word_embeddings": not model.no_weight_tying,
        "initializer_range": model.init_method_std,
        "use_cache": True,
    }
    if mistral:
        window = next(iter(_windows(model)))
        out["sliding_window"] = None if window is None else window + 1
    else:
        out.update(attention_bias=model.use_bias_in_attn_linear, mlp_bias=model.use_bias_in_mlp, pretraining_tp=1)
    return out


def read_config(raw: dict, path: str, mistral: bool = False) -> dict:
    cfg = {key: raw.get(key, default) for key, default in (MISTRAL_DEFAULTS if mistral else LLAMA_DEFAULTS).items()}
    rope = plain_rope(raw, path)
    cfg["rope_theta"] = rope.get("rope_theta", cfg["rope_theta"])
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{path}: partial_rotary_factor: {rope['partial_rotary_factor']} is not implemented for "
                         f"{raw.get('model_type')} models (LLaMA rotates whole heads)")
    if cfg["num_key_value_heads"] is None:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    natural = cfg["hidden_size"] // cfg["num_attention_heads"]
    if cfg["head_dim"] not in (None, natural):
        raise ValueError(f"{path}: head_dim: {cfg['head_dim']} is not hidden_size / num_attention_heads = {natural}; "
                         f"this model derives the head size from those two")
    cfg["head_dim"] = natural
    if cfg["hidden_act"] not in ACTIVATION_OF:
        raise ValueError(f"{path}: hidden_act: {cfg['hidden_act']!r} cannot be expressed; the gated MLP has "
                         f"{', '.join(f'{hf!r} ({ours})' for hf, ours in ACTIVATION_OF.items())}")
    if mistral and cfg["sliding_window"] is not None and cfg["sliding_window"] < 2:
        raise ValueError(f"{path}: sliding_window: {cfg['sliding_window']} leaves no earlier token to attend to")
    return cfg


def model_keys(hf: dict) -> dict:
    """NeoX keys for an HF LLaMA/Mistral config. intermediate_size is NeoX's pre-2/3 count:
    3 x HF's width gives exactly that width per branch with mlp_multiple_of 1."""
    keys = {
        "num_layers": hf["num_hidden_layers"], "hidden_size": hf["hidden_size"],
        "num_attention_heads": hf["num_attention_heads"], "intermediate_size": 3 * hf["intermediate_size"],
        "mlp_multiple_of": 1, "seq_length": hf["max_position_embeddings"],
        "max_position_embeddings": hf["max_position_embeddings"], "pos_emb": "rotary", "rotary_pct": 1.0,
        "rotary_emb_base": integral(hf["rope_theta"]), "gpt_j_residual": False,
        "no_weight_tying": not hf["tie_word_embeddings"], "norm": "rmsnorm", "rms_norm_epsilon": hf["rms_norm_eps"],
        "activation": ACTIVATION_OF[hf["hidden_act"]],
        "use_bias_in_attn_linear": bool(hf.get("attention_bias", False)),
        "use_bias_in_mlp": bool(hf.get("mlp_bias", False)), "attention_dropout": hf["attention_dropout"],
    }
    if hf["num_key_value_heads"] != hf["num_attention_heads"]:
        keys["num_kv_heads"] = hf["num_key_value_heads"]
    if hf.get("sliding_window") is not None:
        keys["sliding_window_width"] = hf["sliding_window"] - 1
        keys["attention_config"] = [[["flash"], hf["num_hidden_layers"]]]
    return keys


def to_hf(weights: Tensors, model: ModelConfig) -> Tensors:
    group, head_dim = model.num_attention_heads // model.kv_heads, model.head_dim
    out: Tensors = {}
    for name, tensor in weights.items():
        if name in NAMES:
            out[NAMES[name]] = tensor
        elif ".attention.query_key_value." in name:
            prefix, kind = "model." + name.split("attention.")[0] + "self_attn.", name.rsplit(".", 1)[1]
            rows = tensor.reshape(model.kv_heads, group + 2, head_dim, *tensor.shape[1:])
            parts = (rows[:, :group], rows[:, group], rows[:, group + 1])
            for proj, part in zip(QKV, parts):
                out[f"{prefix}{proj}.{kind}"] = part.reshape(-1, *tensor.shape[1:])
        else:
            out["model." + name.replace("attention.dense", "self_attn.o_proj")] = tensor
    return out


def canonical(tensors: Tensors, hf: dict, where: str) -> Tensors:
    out: Tensors = {}
    for hf_name, tensor in tensors.items():
        if BUFFERS.search(hf_name):
            continue
        name = hf_name if hf_name.startswith("model.") or hf_name == "lm_head.weight" else "model." + hf_name
        if name in out:
            raise ValueError(f"{where}: two tensors map to {name} (one is {hf_name})")
        out[name] = tensor
    return untie(out, "lm_head.weight", "model.embed_tokens.weight", hf["tie_word_embeddings"], where)


def to_ours(tensors: Tensors, model: ModelConfig) -> Tensors:
    group, head_dim = model.num_attention_heads // model.kv_heads, model.head_dim
    ours_of = {hf: ours for ours, hf in NAMES.items()}
    out: Tensors = {}
    for name, tensor in tensors.items():
        if name in ours_of:
            out[ours_of[name]] = tensor
        elif ".self_attn.q_proj." in name:
            prefix, kind = name[len("model."):].split("self_attn.")[0], name.rsplit(".", 1)[1]
            rest = tensor.shape[1:]
            q, k, v = (tensors[name.replace("q_proj", proj)] for proj in QKV)
            rows = torch.cat([q.reshape(model.kv_heads, group, head_dim, *rest),
                              k.reshape(model.kv_heads, 1, head_dim, *rest),
                              v.reshape(model.kv_heads, 1, head_dim, *rest)], dim=1)
            out[f"{prefix}attention.query_key_value.{kind}"] = rows.reshape(-1, *rest)
        elif ".self_attn.k_proj." not in name and ".self_attn.v_proj." not in name:
            out[name[len("model."):].replace("self_attn.o_proj", "attention.dense")] = tensor
    return out


def _architecture(mistral: bool) -> HFArchitecture:
    return HFArchitecture(
        model_type="mistral" if mistral else "llama", hf_class="MistralForCausalLM" if mistral else "LlamaForCausalLM",
        problems=lambda model: problems(model, mistral), config=lambda model, vocab: config(model, vocab, mistral),
        read_config=lambda raw, path: read_config(raw, path, mistral),
        compared=MISTRAL_COMPARED if mistral else LLAMA_COMPARED, to_hf=to_hf, canonical=canonical,
        to_ours=to_ours, model_keys=model_keys)


LLAMA, MISTRAL = _architecture(False), _architecture(True)

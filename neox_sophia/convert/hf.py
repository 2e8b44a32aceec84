"""Hugging Face GPTNeoX <-> our full weights: pure functions on {global name: full tensor} dicts.

    config = hf_config(cfg.model, padded_vocab_size)              # GPTNeoXConfig fields
    to_hf(weights, cfg.model, padded_vocab_size, "out/hf", dtype="bfloat16",
          tokenizer_files=["20B_tokenizer.json"])                 # config.json + model.safetensors
    weights = from_hf("EleutherAI/pythia-160m-local", cfg.model, padded_vocab_size)
    yaml_keys = model_config_from_hf("EleutherAI/pythia-160m-local")  # to write a matching YAML

Names: ours are HF's without the "gpt_neox." prefix; our "embed_out.weight" is HF's output
layer, written as "embed_out.weight" (the name in Pythia's files and the one transformers'
save_pretrained writes; transformers >= 5 loads it as lm_head, 4.x as embed_out). Tied
embeddings (no_weight_tying: false) write no output tensor: HF ties it to embed_in.

Vocabulary rule: export keeps NeoX's padded vocabulary (config vocab_size = padded size, every
padded row written). Pythia's HF configs do the same (vocab_size 50304 for a 50277-token
tokenizer): the padded rows are part of the trained matrices, logits over them are what the
model computes, and cutting them would change the softmax normalisation and break the round
trip. Import accepts an HF vocab_size up to our padded size and fills the extra rows with zeros
(refusing a bigger one: tokens would be lost).

Dtypes: export casts every tensor to float32, bfloat16 or float16 (float16 refuses values that
overflow it); import always returns float32.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from typing import Dict, Iterable, List, Mapping, Tuple, Union

import torch

from neox_sophia.convert.output import check_output_dir, write_directory

from neox_sophia.config.model import ModelConfig

HF_PREFIX = "gpt_neox."
OUTPUT = "embed_out.weight"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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
# HF config key -> the NeoX key that sets it (named in mismatch errors)
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
TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model")
WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"),
                ("pytorch_model.bin", "pytorch_model.bin.index.json"))


# ---------------------------------------------------------------------------------------- config
def check_representable(model: ModelConfig) -> None:
    """Refuse (ValueError naming the key) any setting HF's GPTNeoX cannot express."""
    problems = {
        "pos_emb": (model.pos_emb != "rotary", f"'{model.pos_emb}' cannot be expressed; HF GPTNeoX "
                                               f"has only rotary position embeddings"),
        "norm": (model.norm != "layernorm", f"'{model.norm}' cannot be expressed; HF GPTNeoX has only "
                                            f"LayerNorm"),
        "gpt_j_tied": (model.gpt_j_tied, "tied parallel-residual norms cannot be expressed; HF GPTNeoX "
                                         "has separate input and post-attention LayerNorms"),
        "activation": (model.activation != "gelu", f"'{model.activation}' cannot be expressed; only "
                                                   f"'gelu' (exact, or tanh with bias_gelu_fusion)"),
    }
    for key, (bad, why) in problems.items():
        if bad:
            raise ValueError(f"{key}: {why}")
    model.validate()  # everything else our model refuses (e.g. sparse attention_config types)


def hf_config(model: ModelConfig, padded_vocab_size: int, *, dtype: str = "float32",
              bos_token_id: int | None = None, eos_token_id: int | None = None) -> dict:
    """The config.json of a transformers GPTNeoXForCausalLM computing what ``model`` computes.

    vocab_size is the padded size (see the module docstring). Rotary settings are written both
    as transformers 4.x reads them (rotary_pct, rotary_emb_base) and as 5.x does
    (rope_parameters), likewise torch_dtype and dtype. bos/eos ids are null unless given:
    GPTNeoXConfig's own defaults (0 and 2) would be wrong for most tokenizers."""
    check_representable(model)
    if not isinstance(padded_vocab_size, int) or padded_vocab_size <= 0:
        raise ValueError(f"padded_vocab_size: must be a positive integer (got {padded_vocab_size!r})")
    dtype_name = _dtype_name(dtype)
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
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "use_cache": True,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


def read_hf_config(hf_dir: str) -> dict:
    """config.json of an HF GPTNeoX folder with every compared key filled (HF's defaults where
    absent) and the rotary settings read from either transformers format."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; {hf_dir} is not a Hugging Face model folder")
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    if raw.get("model_type") != "gpt_neox":
        raise ValueError(f"{path}: model_type: {raw.get('model_type')!r} is not 'gpt_neox'; only Hugging "
                         f"Face GPTNeoX models convert")
    cfg = {key: raw.get(key, default) for key, default in HF_DEFAULTS.items()}
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{path}: rope_parameters: rope type {rope_type!r} (RoPE scaling) is not implemented; "
                         f"only plain rotary embeddings")
    # transformers 5 takes rope_parameters over the legacy keys when both are there
    cfg["rotary_pct"] = rope.get("partial_rotary_factor", cfg["rotary_pct"])
    cfg["rotary_emb_base"] = rope.get("rope_theta", cfg["rotary_emb_base"])
    return cfg


def _bias_gelu_fusion(hidden_act: str) -> bool:
    if hidden_act == "gelu":
        return False
    if hidden_act in TANH_GELUS:
        return True
    raise ValueError(f"hidden_act: {hidden_act!r} cannot be expressed; our MLP has 'gelu' (exact) or "
                     f"its tanh approximation ({', '.join(TANH_GELUS)}: bias_gelu_fusion: true)")


def model_config_from_hf(hf_dir: str) -> dict:
    """The NeoX model keys (ModelConfig field names) of an HF GPTNeoX folder, to build a YAML.

    seq_length is set to max_position_embeddings (lower it at will). The vocabulary is not a
    model key: choose tokenizer and make_vocab_size_divisible_by so that the padded vocab is at
    least the HF vocab_size."""
    hf = read_hf_config(hf_dir)
    base = hf["rotary_emb_base"]
    return {
        "num_layers": hf["num_hidden_layers"],
        "hidden_size": hf["hidden_size"],
        "num_attention_heads": hf["num_attention_heads"],
        "intermediate_size": hf["intermediate_size"],
        "seq_length": hf["max_position_embeddings"],
        "max_position_embeddings": hf["max_position_embeddings"],
        "pos_emb": "rotary",
        "rotary_pct": hf["rotary_pct"],
        "rotary_emb_base": int(base) if float(base).is_integer() else base,
        "gpt_j_residual": hf["use_parallel_residual"],
        "no_weight_tying": not hf["tie_word_embeddings"],
        "norm": "layernorm",
        "layernorm_epsilon": hf["layer_norm_eps"],
        "activation": "gelu",
        "bias_gelu_fusion": _bias_gelu_fusion(hf["hidden_act"]),
        "use_bias_in_attn_linear": hf["attention_bias"],
        "hidden_dropout": hf["hidden_dropout"],
        "attention_dropout": hf["attention_dropout"],
    }


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) \
            or not isinstance(b, (int, float)):
        return a == b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def _check_config_agrees(hf: dict, model: ModelConfig, padded_vocab_size: int, where: str) -> None:
    ours = hf_config(model, padded_vocab_size)
    _bias_gelu_fusion(hf["hidden_act"])  # refuse an activation we do not have, by name
    problems = []
    for key, neox_key in COMPARED.items():
        theirs, mine = hf[key], ours[key]
        if key == "hidden_act" and theirs in TANH_GELUS:
            theirs_cmp = "gelu_pytorch_tanh"
        else:
            theirs_cmp = theirs
        if key == "hidden_act" and theirs_cmp != mine:
            # Exact vs tanh GELU: the same weights serve both. NeoX trained Pythia with the fused
            # tanh form (bias_gelu_fusion: true) while its HF configs say "gelu"; refusing would
            # refuse every Pythia model. The difference is ~1e-3 in an activation.
            warnings.warn(f"{where}: hidden_act: HF {theirs!r}, ours {mine!r} (from bias_gelu_fusion: "
                          f"{model.bias_gelu_fusion}); both are GELU, the model continues with ours")
            continue
        if not _same(theirs_cmp, mine):
            setting = repr(getattr(model, neox_key))
            if getattr(model, neox_key) is None and neox_key == "intermediate_size":
                setting = "None, i.e. 4 x hidden_size"
            problems.append(f"{key}: HF {theirs!r}, ours {mine!r} (from {neox_key}: {setting})")
    if hf["vocab_size"] > padded_vocab_size:
        problems.append(f"vocab_size: HF {hf['vocab_size']} is larger than our padded vocabulary "
                        f"{padded_vocab_size} (tokenizer size rounded up to make_vocab_size_divisible_by x "
                        f"model_parallel_size); rows would be lost")
    if problems:
        raise ValueError(f"{where}: the Hugging Face config does not match the model config:\n  "
                         + "\n  ".join(problems))


# --------------------------------------------------------------------------------------- weights
def expected_shapes(model: ModelConfig, vocab_size: int) -> Dict[str, Tuple[int, ...]]:
    """Every global parameter name of ``model`` with its full shape, in model order."""
    h, f = model.hidden_size, model.ffn_hidden_size
    shapes = {"embed_in.weight": (vocab_size, h)}
    for i in range(model.num_layers):
        p = f"layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[p + norm + ".weight"] = shapes[p + norm + ".bias"] = (h,)
        shapes[p + "attention.query_key_value.weight"] = (3 * h, h)
        if model.use_bias_in_attn_linear:
            shapes[p + "attention.query_key_value.bias"] = (3 * h,)
        shapes[p + "attention.dense.weight"] = (h, h)
        if model.use_bias_in_attn_linear:
            shapes[p + "attention.dense.bias"] = (h,)
        shapes[p + "mlp.dense_h_to_4h.weight"], shapes[p + "mlp.dense_h_to_4h.bias"] = (f, h), (f,)
        shapes[p + "mlp.dense_4h_to_h.weight"], shapes[p + "mlp.dense_4h_to_h.bias"] = (h, f), (h,)
    shapes["final_layer_norm.weight"] = shapes["final_layer_norm.bias"] = (h,)
    if model.no_weight_tying:
        shapes[OUTPUT] = (vocab_size, h)
    return shapes


def _check_weights(weights: Mapping[str, torch.Tensor], shapes: Dict[str, tuple], where: str) -> None:
    missing = [name for name in shapes if name not in weights]
    unexpected = [name for name in weights if name not in shapes]
    wrong = [f"{name}: shape {list(weights[name].shape)}, expected {list(shape)}"
             for name, shape in shapes.items() if name in weights and tuple(weights[name].shape) != shape]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if unexpected:
        hint = " (the model ties embeddings: no_weight_tying is false)" if OUTPUT in unexpected else ""
        problems.append(f"unexpected tensors: {_listing(unexpected)}{hint}")
    problems += wrong
    if problems:
        raise ValueError(f"{where}: the weights do not fit the model config:\n  " + "\n  ".join(problems))


def _listing(names: List[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _dtype_name(dtype: Union[str, torch.dtype]) -> str:
    for name, value in DTYPES.items():
        if dtype == name or dtype is value:
            return name
    raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")


def _export_tensors(weights: Mapping[str, torch.Tensor], model: ModelConfig, padded_vocab_size: int,
                    dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    out, storages = {}, set()
    for name in expected_shapes(model, padded_vocab_size):
        source = weights[name].detach()
        tensor = source.to(device="cpu", dtype=dtype).contiguous()
        if dtype == torch.float16 and bool((torch.isinf(tensor) & torch.isfinite(source.cpu())).any()):
            raise ValueError(f"{name}: values overflow float16 (max {torch.finfo(torch.float16).max}); "
                             f"export bfloat16 or float32")
        if tensor.untyped_storage().data_ptr() in storages:  # safetensors refuses shared storage
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        out[OUTPUT if name == OUTPUT else HF_PREFIX + name] = tensor
    return out


# ---------------------------------------------------------------------------------------- export
def to_hf(weights: Mapping[str, torch.Tensor], model_cfg: ModelConfig, padded_vocab_size: int, out_dir: str,
          dtype: str = "float32", tokenizer_files: Union[Iterable[str], Mapping[str, str]] = (),
          overwrite: bool = False, *, bos_token_id: int | None = None, eos_token_id: int | None = None) -> str:
    """Write an HF GPTNeoX folder: config.json, model.safetensors and the tokenizer files given.

    ``tokenizer_files``: paths copied under their own names, except that a `tokenizers` JSON
    under another name (NeoX's "20B_tokenizer.json") becomes tokenizer.json; or a mapping
    {name in out_dir: path}. bos/eos ids default to the "<|endoftext|>" id of that
    tokenizer.json (NeoX's end-of-document token; Pythia's configs use it for both).
    The folder is built in a temporary sibling and renamed into place: it appears complete or
    not at all. An existing non-empty ``out_dir`` is an error unless ``overwrite``."""
    check_output_dir(out_dir, overwrite)
    torch_dtype = DTYPES[_dtype_name(dtype)]
    tokenizer = _tokenizer_targets(tokenizer_files)
    if bos_token_id is None and eos_token_id is None and "tokenizer.json" in tokenizer:
        bos_token_id = eos_token_id = _eod_id(tokenizer["tokenizer.json"])
    config = hf_config(model_cfg, padded_vocab_size, dtype=_dtype_name(dtype), bos_token_id=bos_token_id,
                       eos_token_id=eos_token_id)
    _check_weights(weights, expected_shapes(model_cfg, padded_vocab_size), "to_hf")
    try:
        from safetensors.torch import save_file
    except ImportError as e:
        raise ImportError("to_hf needs the `safetensors` package: pip install safetensors") from e
    tensors = _export_tensors(weights, model_cfg, padded_vocab_size, torch_dtype)

    def fill(tmp: str) -> None:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name, source in tokenizer.items():
            shutil.copyfile(source, os.path.join(tmp, name))

    write_directory(out_dir, overwrite, fill)
    return out_dir


def _tokenizer_targets(files: Union[Iterable[str], Mapping[str, str]]) -> Dict[str, str]:
    pairs = list(files.items()) if isinstance(files, Mapping) else [(None, path) for path in files]
    targets: Dict[str, str] = {}
    for name, path in pairs:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path}: not found")
        if name is None:
            name = os.path.basename(path)
            if name not in TOKENIZER_NAMES and name.endswith(".json") and _is_tokenizers_json(path):
                name = "tokenizer.json"
        if name in ("config.json", "model.safetensors") or os.path.basename(name) != name:
            raise ValueError(f"tokenizer file {path}: cannot be written as {name!r}")
        if name in targets:
            raise ValueError(f"tokenizer files {targets[name]} and {path} would both be written as {name}")
        targets[name] = path
    return targets


def _is_tokenizers_json(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("model"), dict)


def _eod_id(tokenizer_json: str) -> int | None:
    from neox_sophia.data.tokenizers import EOD_TOKEN

    with open(tokenizer_json, encoding="utf-8") as f:
        data = json.load(f)
    for token in data.get("added_tokens") or []:
        if token.get("content") == EOD_TOKEN:
            return token["id"]
    vocab = (data.get("model") or {}).get("vocab")
    return vocab.get(EOD_TOKEN) if isinstance(vocab, dict) else None


# ---------------------------------------------------------------------------------------- import
def from_hf(hf_dir: str, model_cfg: ModelConfig, padded_vocab_size: int) -> Dict[str, torch.Tensor]:
    """Full fp32 weights in our global names from an HF GPTNeoX folder.

    config.json must agree with ``model_cfg`` (every mismatch is named: HF key, HF value, our
    value and the NeoX key behind it) and every tensor must have its expected shape. An HF
    vocab_size below ``padded_vocab_size`` is padded with zero rows. Reads model.safetensors,
    a sharded model.safetensors.index.json, or (only when no safetensors exist)
    pytorch_model.bin / its index with torch.load(weights_only=True)."""
    hf = read_hf_config(hf_dir)
    _check_config_agrees(hf, model_cfg, padded_vocab_size, hf_dir)
    weights = _our_names(_read_hf_tensors(hf_dir), tied=hf["tie_word_embeddings"], where=hf_dir)
    shapes = expected_shapes(model_cfg, hf["vocab_size"])
    _check_weights(weights, shapes, hf_dir)
    out = {}
    for name in shapes:
        tensor = weights[name].to(torch.float32)
        if name in ("embed_in.weight", OUTPUT) and tensor.shape[0] < padded_vocab_size:
            pad = tensor.new_zeros(padded_vocab_size - tensor.shape[0], tensor.shape[1])
            tensor = torch.cat([tensor, pad])
        out[name] = tensor.contiguous()
    return out


def _our_names(tensors: Dict[str, torch.Tensor], tied: bool, where: str) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for hf_name, tensor in tensors.items():
        if IGNORED_BUFFERS.match(hf_name):
            continue
        if hf_name in (OUTPUT, "lm_head.weight"):
            name = OUTPUT
        else:  # a GPTNeoXModel (no head) file has no prefix
            name = hf_name[len(HF_PREFIX):] if hf_name.startswith(HF_PREFIX) else hf_name
        if name in out:
            raise ValueError(f"{where}: two tensors map to {name} (one is {hf_name})")
        out[name] = tensor
    if tied and OUTPUT in out:  # some files store the tied head anyway; it must be the embedding
        if not torch.equal(out[OUTPUT], out.get("embed_in.weight", torch.empty(0))):
            raise ValueError(f"{where}: tie_word_embeddings is true but the output layer differs from "
                             f"gpt_neox.embed_in.weight")
        del out[OUTPUT]
    return out


def _read_hf_tensors(hf_dir: str) -> Dict[str, torch.Tensor]:
    for single, index in WEIGHT_FILES:
        if os.path.isfile(os.path.join(hf_dir, single)):
            return _load_file(os.path.join(hf_dir, single))
        index_path = os.path.join(hf_dir, index)
        if os.path.isfile(index_path):
            return _load_sharded(hf_dir, index_path)
    raise FileNotFoundError(f"{hf_dir}: no weights ({', '.join(n for pair in WEIGHT_FILES for n in pair)})")


def _load_sharded(hf_dir: str, index_path: str) -> Dict[str, torch.Tensor]:
    with open(index_path, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    tensors: Dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        loaded = _load_file(os.path.join(hf_dir, shard))
        wanted = {name for name, file in weight_map.items() if file == shard}
        if wanted - loaded.keys():
            raise ValueError(f"{index_path}: {shard} lacks {_listing(sorted(wanted - loaded.keys()))}")
        tensors.update({name: loaded[name] for name in wanted})
    return tensors


def _load_file(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except ImportError as e:
        raise ImportError("reading safetensors needs the `safetensors` package: pip install safetensors") from e
    except Exception as e:  # safetensors' SafetensorError and torch's unpickling errors share no base
        raise ValueError(f"{path}: cannot be read ({type(e).__name__}: {e}); is the file complete?") from e


__all__ = ["hf_config", "to_hf", "from_hf", "model_config_from_hf", "read_hf_config", "expected_shapes",
           "check_representable"]

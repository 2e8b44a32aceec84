"""Hugging Face <-> our full weights: pure functions on {global name: full tensor} dicts.

    config = hf_config(cfg.model, padded_vocab_size)              # config.json fields
    to_hf(weights, cfg.model, padded_vocab_size, "out/hf", dtype="bfloat16",
          tokenizer_files=["20B_tokenizer.json"])                 # config.json + model.safetensors
    weights = from_hf("EleutherAI/pythia-160m-local", cfg.model, padded_vocab_size)
    yaml_keys = model_config_from_hf("EleutherAI/pythia-160m-local")  # to write a matching YAML

Architectures (a registry keyed by config.json's model_type): the GPT-NeoX configs export as
GPTNeoXForCausalLM (hf_gpt_neox.py); the LLaMA family (RMSNorm and a gated MLP: NeoX's llama,
llama2, llemma configs) as LlamaForCausalLM, and with a sliding window (mistral) as
MistralForCausalLM (hf_llama.py). A setting the chosen class cannot compute is refused by key.

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
import os
import shutil
import warnings
from typing import Dict, Iterable, Mapping, Tuple, Union

import torch

from neox_sophia.config.model import ModelConfig
from neox_sophia.convert.hf_arch import HFArchitecture, listing, same
from neox_sophia.convert.hf_gpt_neox import GPT_NEOX
from neox_sophia.convert.hf_llama import LLAMA, MISTRAL
from neox_sophia.convert.output import check_output_dir, write_directory
from neox_sophia.model.gpt_neox import parameter_shapes

ARCHITECTURES: Dict[str, HFArchitecture] = {arch.model_type: arch for arch in (GPT_NEOX, LLAMA, MISTRAL)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model")
WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"),
                ("pytorch_model.bin", "pytorch_model.bin.index.json"))
expected_shapes = parameter_shapes  # the model's parameters by global name (kept under its old name)


# ---------------------------------------------------------------------------------------- config
def architecture_for(model: ModelConfig) -> HFArchitecture:
    """The HF class for ``model``: the LLaMA family for RMSNorm or a gated MLP (Mistral when its
    layers have a sliding window), GPTNeoX otherwise."""
    if model.norm == "rmsnorm" or model.gated:
        windowed = any(model.sliding_window(i) for i in range(model.num_layers))
        return MISTRAL if windowed else LLAMA
    return GPT_NEOX


def check_representable(model: ModelConfig, arch: HFArchitecture | None = None) -> HFArchitecture:
    """The architecture that computes what ``model`` computes; ValueError naming the first key it
    cannot express (and anything else our model refuses)."""
    arch = arch or architecture_for(model)
    problems = arch.problems(model)
    if problems:
        key, why = next(iter(problems.items()))
        raise ValueError(f"{key}: {why}")
    model.validate()
    return arch


def hf_config(model: ModelConfig, padded_vocab_size: int, *, dtype: str = "float32",
              bos_token_id: int | None = None, eos_token_id: int | None = None) -> dict:
    """The config.json of the transformers model computing what ``model`` computes.

    vocab_size is the padded size (see the module docstring); torch_dtype and dtype both name
    the dtype (transformers 4.x and 5.x). bos/eos ids are null unless given: the HF classes'
    own defaults would be wrong for most tokenizers."""
    arch = check_representable(model)
    if not isinstance(padded_vocab_size, int) or padded_vocab_size <= 0:
        raise ValueError(f"padded_vocab_size: must be a positive integer (got {padded_vocab_size!r})")
    dtype_name = _dtype_name(dtype)
    return {**arch.config(model, padded_vocab_size), "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
            "torch_dtype": dtype_name, "dtype": dtype_name}


def read_hf_config(hf_dir: str) -> Tuple[dict, HFArchitecture]:
    """config.json of an HF folder with every compared key filled (HF's defaults where absent),
    and its architecture."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; {hf_dir} is not a Hugging Face model folder")
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    arch = ARCHITECTURES.get(raw.get("model_type"))
    if arch is None:
        raise ValueError(f"{path}: model_type: {raw.get('model_type')!r} is not one of {', '.join(ARCHITECTURES)}; "
                         f"only those Hugging Face models convert")
    return arch.read_config(raw, path), arch


def model_config_from_hf(hf_dir: str) -> dict:
    """The NeoX model keys (ModelConfig field names) of an HF folder, to build a YAML.

    seq_length is set to max_position_embeddings (lower it at will). The vocabulary is not a
    model key: choose tokenizer and make_vocab_size_divisible_by so that the padded vocab is at
    least the HF vocab_size."""
    hf, arch = read_hf_config(hf_dir)
    return arch.model_keys(hf)


def _check_config_agrees(hf: dict, arch: HFArchitecture, model: ModelConfig, padded_vocab_size: int,
                         where: str) -> None:
    cannot = arch.problems(model)
    if cannot:
        raise ValueError(f"{where}: the Hugging Face model is a {arch.hf_class}, which cannot compute what the model "
                         f"config describes:\n  " + "\n  ".join(f"{k}: {why}" for k, why in cannot.items()))
    ours = arch.config(model, padded_vocab_size)
    problems = []
    for key, neox_key in arch.compared.items():
        theirs, mine = hf[key], ours[key]
        if same(theirs, mine):
            continue
        setting = getattr(model, neox_key)
        setting = "None, i.e. 4 x hidden_size" if setting is None and neox_key == "intermediate_size" else repr(setting)
        line = f"{key}: HF {theirs!r}, ours {mine!r} (from {neox_key}: {setting})"
        if key in arch.warn_only:
            warnings.warn(f"{where}: {line}; {arch.warn_only[key]}", stacklevel=1)
        else:
            problems.append(line)
    if hf["vocab_size"] > padded_vocab_size:
        problems.append(f"vocab_size: HF {hf['vocab_size']} is larger than our padded vocabulary "
                        f"{padded_vocab_size} (tokenizer size rounded up to make_vocab_size_divisible_by x "
                        f"model_parallel_size); rows would be lost")
    if problems:
        raise ValueError(f"{where}: the Hugging Face config does not match the model config:\n  "
                         + "\n  ".join(problems))


# --------------------------------------------------------------------------------------- weights
def hf_shapes(arch: HFArchitecture, model: ModelConfig, vocab_size: int) -> Dict[str, Tuple[int, ...]]:
    """Every tensor name the HF model of ``model`` has, with its shape (to_hf on shapes only)."""
    empty = {name: torch.empty(shape, device="meta") for name, shape in parameter_shapes(model, vocab_size).items()}
    return {name: tuple(t.shape) for name, t in arch.to_hf(empty, model).items()}


def _check_weights(weights: Mapping[str, torch.Tensor], shapes: Dict[str, tuple], where: str) -> None:
    missing = [name for name in shapes if name not in weights]
    unexpected = [name for name in weights if name not in shapes]
    wrong = [f"{name}: shape {list(weights[name].shape)}, expected {list(shape)}"
             for name, shape in shapes.items() if name in weights and tuple(weights[name].shape) != shape]
    problems = []
    if missing:
        problems.append(f"missing tensors: {listing(missing)}")
    if unexpected:
        head = any(name in ("embed_out.weight", "lm_head.weight") for name in unexpected)
        hint = " (the model ties embeddings: no_weight_tying is false)" if head else ""
        problems.append(f"unexpected tensors: {listing(unexpected)}{hint}")
    problems += wrong
    if problems:
        raise ValueError(f"{where}: the weights do not fit the model config:\n  " + "\n  ".join(problems))


def _dtype_name(dtype: Union[str, torch.dtype]) -> str:
    for name, value in DTYPES.items():
        if dtype == name or dtype is value:
            return name
    raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")


def _export_tensors(weights: Mapping[str, torch.Tensor], model: ModelConfig, padded_vocab_size: int,
                    dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    ours = {name: weights[name] for name in parameter_shapes(model, padded_vocab_size)}
    out, storages = {}, set()
    for name, source in architecture_for(model).to_hf(ours, model).items():
        source = source.detach()
        tensor = source.to(device="cpu", dtype=dtype).contiguous()
        if dtype == torch.float16 and bool((torch.isinf(tensor) & torch.isfinite(source.cpu())).any()):
            raise ValueError(f"{name}: values overflow float16 (max {torch.finfo(torch.float16).max}); "
                             f"export bfloat16 or float32")
        if tensor.untyped_storage().data_ptr() in storages:  # safetensors refuses shared storage
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


# ---------------------------------------------------------------------------------------- export
def to_hf(weights: Mapping[str, torch.Tensor], model_cfg: ModelConfig, padded_vocab_size: int, out_dir: str,
          dtype: str = "float32", tokenizer_files: Union[Iterable[str], Mapping[str, str]] = (),
          overwrite: bool = False, *, bos_token_id: int | None = None, eos_token_id: int | None = None) -> str:
    """Write an HF folder: config.json, model.safetensors and the tokenizer files given.

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
    _check_weights(weights, parameter_shapes(model_cfg, padded_vocab_size), "to_hf")
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
    """Full fp32 weights in our global names from an HF folder (GPTNeoX, Llama or Mistral).

    config.json must agree with ``model_cfg`` (every mismatch is named: HF key, HF value, our
    value and the NeoX key behind it) and every tensor must have its expected shape. An HF
    vocab_size below ``padded_vocab_size`` is padded with zero rows. Reads model.safetensors,
    a sharded model.safetensors.index.json, or (only when no safetensors exist)
    pytorch_model.bin / its index with torch.load(weights_only=True)."""
    hf, arch = read_hf_config(hf_dir)
    _check_config_agrees(hf, arch, model_cfg, padded_vocab_size, hf_dir)
    tensors = arch.canonical(_read_hf_tensors(hf_dir), hf, hf_dir)
    _check_weights(tensors, hf_shapes(arch, model_cfg, hf["vocab_size"]), hf_dir)
    weights = arch.to_ours(tensors, model_cfg)
    out = {}
    for name in parameter_shapes(model_cfg, hf["vocab_size"]):
        tensor = weights[name].to(torch.float32)
        if name in ("embed_in.weight", "embed_out.weight") and tensor.shape[0] < padded_vocab_size:
            pad = tensor.new_zeros(padded_vocab_size - tensor.shape[0], tensor.shape[1])
            tensor = torch.cat([tensor, pad])
        out[name] = tensor.contiguous()
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
            raise ValueError(f"{index_path}: {shard} lacks {listing(sorted(wanted - loaded.keys()))}")
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
           "check_representable", "architecture_for", "ARCHITECTURES"]

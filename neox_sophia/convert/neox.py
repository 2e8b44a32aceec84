"""GPT-NeoX's own checkpoint layout, read and written (weights; NeoX's optimizer state is not).

    SAVE/latest                               the tag (NeoX: global_stepN; its LLaMA converter: 0)
    SAVE/<tag>/layer_XX-model_YY-model_states.pt   pipe_parallel_size >= 1: layer XX's state dict
                                              on TP rank YY; XX is NeoX's index in GPT2ModelPipe:
                                                0      embedding       word_embeddings.weight
                                                1      _pre_transformer_block (no weights)
                                                2+i    transformer layer i
                                                L+2    _post_transformer_block (no weights)
                                                L+3    final norm      norm.{weight,bias} | norm.scale
                                                L+4    output layer    final_linear.weight (untied only)
    SAVE/<tag>/mp_rank_MM_model_states.pt     DeepSpeed's per model-parallel rank file: 'module' (the
                                              pipe_parallel_size 0 model, keys "sequential.XX.<key>";
                                              None under the PipelineModule), 'iteration', 'args', ...

A transformer layer's keys (NeoX megatron/model/transformer.py at ea7aefd8), and ours:

    input_layernorm.{weight,bias} | .scale    layers.i.input_layernorm.{weight,bias} (RMSNorm: weight)
    post_attention_layernorm.*                layers.i.post_attention_layernorm.*
    attention.query_key_value.{weight,bias}   layers.i.attention.query_key_value.*  rows per TP rank:
                                              MHA [heads, 3, head_dim] (ours, cut in TP chunks); GQA
                                              [q | k | v] of the rank's heads (ours: per key/value group)
    attention.dense.{weight,bias}             layers.i.attention.dense.*
    mlp.linear1.{weight,bias}                 plain: mlp.dense_h_to_4h.*; gated: per TP rank
                                              [up | gate] (NeoX's Gated_Activation) = mlp.up_proj, gate_proj
    mlp.linear2.{weight,bias}                 mlp.dense_4h_to_h.* | mlp.down_proj.*
    (read too: legacy mlp.dense_h_to_4h/dense_4h_to_h and mlp.w1 (gate), w3 (up), w2 (down))

Tensor parallelism follows NeoX's model code: column-parallel weights and biases are cut along
dim 0, row-parallel weights along dim 1, norms are replicated (read as their mean, as NeoX's
convert_neox_to_hf.py does). A row-parallel bias is where NeoX's layouts differ: with
gpt_j_residual every rank adds its bias before the one all-reduce, so the bias is the SUM over
ranks (what convert_neox_to_hf.py reads; written as bias / TP, as convert_hf_to_sequential.py
does); without it NeoX adds the (identical) bias once after the all-reduce, so each rank holds the
whole bias (NeoX's converters sum and divide here too, which is off by the TP factor for
sequential-residual models at TP > 1; this module follows the model code).

Weights are read as NeoX's `finetune` loads them: the module's tensors (bf16/fp16 in a
mixed-precision run), not the fp32 master copies in its ZeRO files. Files are read with
torch.load(weights_only=True); written in fp32.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from neox_sophia.config.model import ModelConfig
from neox_sophia.training.checkpoint import LATEST, CheckpointError, tag_for

OURS_MARKERS = ("complete", "config.yml", "layout.json", "rng_rank0.pt")  # files only our trainer writes
LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
MP_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # NeoX saves it only with rotary_save_freqs_buffer


@dataclass(frozen=True)
class Entry:
    """One tensor of NeoX's layout: its layer index, its key there, how TP ranks hold it, and the
    global name(s) of ours it comes from (two for a gated linear1: up, gate)."""
    layer: int
    key: str
    kind: str  # column | row | replicated | row_bias | qkv | gated
    ours: Tuple[str, ...]


def entries(model: ModelConfig) -> List[Entry]:
    """Every tensor of the NeoX checkpoint of ``model``, in NeoX's layer order."""
    L = model.num_layers
    norm_keys = [("scale", "weight")] if model.norm == "rmsnorm" else [("weight", "weight"), ("bias", "bias")]
    out = [Entry(0, "word_embeddings.weight", "column", ("embed_in.weight",))]
    for i in range(L):
        layer, p = i + 2, f"layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out += [Entry(layer, f"{norm}.{theirs}", "replicated", (f"{p}{norm}.{mine}",))
                    for theirs, mine in norm_keys]
        linears = [("attention.query_key_value", "qkv", "qkv", ("attention.query_key_value",),
                    model.use_bias_in_attn_linear),
                   ("attention.dense", "row", "row_bias", ("attention.dense",), model.use_bias_in_attn_linear)]
        if model.gated:
            linears += [("mlp.linear1", "gated", "gated", ("mlp.up_proj", "mlp.gate_proj"), model.use_bias_in_mlp),
                        ("mlp.linear2", "row", "row_bias", ("mlp.down_proj",), model.use_bias_in_mlp)]
        else:
            linears += [("mlp.linear1", "column", "column", ("mlp.dense_h_to_4h",), model.use_bias_in_mlp),
                        ("mlp.linear2", "row", "row_bias", ("mlp.dense_4h_to_h",), model.use_bias_in_mlp)]
        for key, weight_kind, bias_kind, ours, bias in linears:
            out.append(Entry(layer, f"{key}.weight", weight_kind, tuple(f"{p}{o}.weight" for o in ours)))
            if bias:
                out.append(Entry(layer, f"{key}.bias", bias_kind, tuple(f"{p}{o}.bias" for o in ours)))
    out += [Entry(L + 3, f"norm.{theirs}", "replicated", (f"final_layer_norm.{mine}",)) for theirs, mine in norm_keys]
    if model.no_weight_tying:
        out.append(Entry(L + 4, "final_linear.weight", "column", ("embed_out.weight",)))
    return out


# ------------------------------------------------------------------------- ours -> NeoX's TP ranks
def _gqa(model: ModelConfig) -> bool:
    return model.kv_heads != model.num_attention_heads  # NeoX's own test (ParallelSelfAttention.gqa)


def _qkv_rank(chunk: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """Our rows of one TP rank, [kv/tp, group + 2, head_dim], as NeoX's GQA rows [q | k | v]."""
    if not _gqa(model):
        return chunk
    group, rest = model.num_attention_heads // model.kv_heads, chunk.shape[1:]
    rows = chunk.reshape(-1, group + 2, model.head_dim, *rest)
    return torch.cat([rows[:, :group].reshape(-1, *rest), rows[:, group].reshape(-1, *rest),
                      rows[:, group + 1].reshape(-1, *rest)])


def _qkv_ours(rank: torch.Tensor, model: ModelConfig, tp: int) -> torch.Tensor:
    """The inverse of _qkv_rank."""
    if not _gqa(model):
        return rank
    group, head_dim, rest = model.num_attention_heads // model.kv_heads, model.head_dim, rank.shape[1:]
    kv = model.kv_heads // tp
    q, k, v = rank.split([kv * group * head_dim, kv * head_dim, kv * head_dim])
    rows = torch.cat([q.reshape(kv, group, head_dim, *rest), k.reshape(kv, 1, head_dim, *rest),
                      v.reshape(kv, 1, head_dim, *rest)], dim=1)
    return rows.reshape(-1, *rest)


def split(entry: Entry, weights: Dict[str, torch.Tensor], model: ModelConfig, tp: int) -> List[torch.Tensor]:
    """The tensor of ``entry`` on each of ``tp`` NeoX TP ranks."""
    full = weights[entry.ours[0]]
    if entry.kind == "replicated":
        return [full] * tp
    if entry.kind == "row_bias":  # see the module docstring
        return [full / tp] * tp if model.gpt_j_residual else [full] * tp
    if entry.kind == "row":
        return list(full.chunk(tp, dim=1))
    if entry.kind == "gated":
        up, gate = (weights[name].chunk(tp, dim=0) for name in entry.ours)
        return [torch.cat([u, g]) for u, g in zip(up, gate)]
    chunks = list(full.chunk(tp, dim=0))
    return [_qkv_rank(c, model) for c in chunks] if entry.kind == "qkv" else chunks


def merge(entry: Entry, ranks: List[torch.Tensor], model: ModelConfig) -> Dict[str, torch.Tensor]:
    """Our full tensor(s) of ``entry`` from its tensors on every NeoX TP rank."""
    tp = len(ranks)
    ranks = [r.float() for r in ranks]
    if entry.kind == "replicated" or (entry.kind == "row_bias" and not model.gpt_j_residual):
        full = sum(ranks) / tp
    elif entry.kind == "row_bias":
        full = sum(ranks)
    elif entry.kind == "row":
        full = torch.cat(ranks, dim=1)
    elif entry.kind == "gated":
        halves = [r.chunk(2) for r in ranks]
        return {entry.ours[0]: torch.cat([h[0] for h in halves]), entry.ours[1]: torch.cat([h[1] for h in halves])}
    elif entry.kind == "qkv":
        full = torch.cat([_qkv_ours(r, model, tp) for r in ranks])
    else:
        full = torch.cat(ranks)
    return {entry.ours[0]: full}


def neox_ranks(weights: Dict[str, torch.Tensor], model: ModelConfig, tp: int
               ) -> List[Dict[int, Dict[str, torch.Tensor]]]:
    """Our full weights as NeoX's: per TP rank, per layer index, {key: tensor} (fp32, contiguous)."""
    ranks: List[Dict[int, Dict[str, torch.Tensor]]] = [{} for _ in range(tp)]
    for entry in entries(model):
        for t, tensor in enumerate(split(entry, weights, model, tp)):
            ranks[t].setdefault(entry.layer, {})[entry.key] = tensor.detach().float().contiguous().clone()
    return ranks


def from_neox_ranks(ranks: List[Dict[int, Dict[str, torch.Tensor]]], model: ModelConfig,
                    where: str) -> Dict[str, torch.Tensor]:
    """The inverse of neox_ranks: our full fp32 weights; CheckpointError naming what is missing,
    unexpected or of the wrong shape."""
    ranks = [{layer: _legacy_names(keys) for layer, keys in rank.items()} for rank in ranks]
    wanted = entries(model)
    missing = [f"layer {e.layer} {e.key}" for e in wanted if any(e.key not in r.get(e.layer, {}) for r in ranks)]
    known = {(e.layer, e.key) for e in wanted}
    unexpected = sorted({f"layer {layer} {key}" for r in ranks for layer, keys in r.items() for key in keys
                         if (layer, key) not in known and not IGNORED.search(key)})
    if missing or unexpected:
        raise CheckpointError(f"{where}: the NeoX checkpoint does not fit the model config ("
                              + "; ".join(p for p in (f"missing: {', '.join(missing[:6])}" if missing else "",
                                                      f"unexpected: {', '.join(unexpected[:6])}" if unexpected else "")
                                          if p) + "); use the NeoX config the checkpoint was trained with")
    weights: Dict[str, torch.Tensor] = {}
    for entry in wanted:
        try:
            weights.update(merge(entry, [r[entry.layer][entry.key] for r in ranks], model))
        except RuntimeError as e:  # shapes that do not split or concatenate as the config says
            raise CheckpointError(f"{where}: layer {entry.layer} {entry.key} does not fit the model config "
                                  f"({e})") from e
    from neox_sophia.model.gpt_neox import parameter_shapes

    shapes = parameter_shapes(model, weights["embed_in.weight"].shape[0])
    wrong = [f"{n} {list(weights[n].shape)} (config: {list(s)})" for n, s in shapes.items() if weights[n].shape != s]
    if wrong:
        raise CheckpointError(f"{where}: tensors do not fit the model config: {', '.join(wrong[:4])}; use the NeoX "
                              f"config the checkpoint was trained with")
    return {name: weights[name] for name in shapes}  # model order


def _legacy_names(keys: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Older NeoX names as current ones: mlp.dense_h_to_4h / dense_4h_to_h (before 2024) and the
    LLaMA MLP's w1 (gate), w3 (up), w2 (down), each one TP-column/row matrix."""
    out = {}
    for key, value in keys.items():
        out[key.replace("mlp.dense_h_to_4h.", "mlp.linear1.").replace("mlp.dense_4h_to_h.", "mlp.linear2.")] = value
    for kind in ("weight", "bias"):
        if f"mlp.w1.{kind}" in out and f"mlp.w3.{kind}" in out:
            out[f"mlp.linear1.{kind}"] = torch.cat([out.pop(f"mlp.w3.{kind}"), out.pop(f"mlp.w1.{kind}")])
        if f"mlp.w2.{kind}" in out:
            out[f"mlp.linear2.{kind}"] = out.pop(f"mlp.w2.{kind}")
    return out


# ------------------------------------------------------------------------------------ files
def _tag_dir(path: str) -> str:
    """The checkpoint directory of ``path``: a tag directory itself, or a save directory whose
    `latest` names one (else its newest global_stepN/)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory")
    if any(MP_FILE.match(f) for f in os.listdir(path)):
        return path
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        if not os.path.isdir(os.path.join(path, tag)):
            raise CheckpointError(f"{latest}: names {tag!r}, which is not a directory of {path}")
        return os.path.join(path, tag)
    steps = sorted((int(m.group(1)), d) for d in os.listdir(path) if (m := re.match(r"^global_step(\d+)$", d)))
    if not steps:
        raise CheckpointError(f"{path}: no checkpoint (no `latest`, no global_stepN/, no mp_rank_00_model_states.pt)")
    return os.path.join(path, steps[-1][1])


def is_neox_checkpoint(path: str) -> bool:
    """Whether ``path`` holds a checkpoint GPT-NeoX wrote (DeepSpeed files without the files
    our trainer adds to every checkpoint)."""
    try:
        tag_dir = _tag_dir(path)
    except CheckpointError:
        return False
    names = os.listdir(tag_dir)
    return any(MP_FILE.match(f) for f in names) and not any(m in names for m in OURS_MARKERS)


def _load(path: str):
    from neox_sophia.convert.reader import load_file

    return load_file(path)


def _module_ranks(tag_dir: str, names: List[str]) -> List[Dict[int, Dict[str, torch.Tensor]]]:
    """Per TP rank, per layer, {key: tensor}: from layer files (PipelineModule) or from the
    mp_rank files' 'module' ("sequential.XX.<key>")."""
    layer_files = {(int(m.group(1)), int(m.group(2))): f for f in names if (m := LAYER_FILE.match(f))}
    if layer_files:
        tp = 1 + max(t for _, t in layer_files)
        return [{layer: {k: v for k, v in _load(os.path.join(tag_dir, f)).items() if isinstance(v, torch.Tensor)}
                 for (layer, t), f in sorted(layer_files.items()) if t == rank} for rank in range(tp)]
    ranks = []
    for f in sorted(f for f in names if MP_FILE.match(f)):
        module = _load(os.path.join(tag_dir, f)).get("module")
        if not isinstance(module, dict):
            raise CheckpointError(f"{os.path.join(tag_dir, f)}: no 'module' state dict and no layer_XX files; not a "
                                  f"GPT-NeoX checkpoint")
        rank: Dict[int, Dict[str, torch.Tensor]] = {}
        for key, value in module.items():
            m = re.match(r"^sequential\.(\d+)\.(.+)$", key)
            if m is None:
                raise CheckpointError(f"{os.path.join(tag_dir, f)}: parameter {key!r} is not a NeoX "
                                      f"'sequential.N.' name")
            rank.setdefault(int(m.group(1)), {})[m.group(2)] = value
        ranks.append(rank)
    return ranks


def read_neox(path: str, model: ModelConfig) -> Tuple[Dict[str, torch.Tensor], int, str]:
    """(our full fp32 weights, NeoX's iteration, the directory read) of a GPT-NeoX checkpoint at
    any TP size, PipelineModule or sequential. The vocabulary keeps the checkpoint's rows."""
    tag_dir = _tag_dir(path)
    names = sorted(os.listdir(tag_dir))
    mp_files = [f for f in names if MP_FILE.match(f)]
    if not mp_files:
        raise CheckpointError(f"{tag_dir}: no mp_rank_00_model_states.pt; not a DeepSpeed/GPT-NeoX checkpoint")
    states = _load(os.path.join(tag_dir, mp_files[0]))
    args = states.get("args") or {}
    for key in ("num_layers", "hidden_size", "num_attention_heads"):
        if key in args and args[key] != getattr(model, key):
            raise CheckpointError(f"{tag_dir}: the checkpoint was trained with {key} {args[key]}, the config says "
                                  f"{getattr(model, key)}; use the NeoX config the checkpoint was trained with")
    ranks = _module_ranks(tag_dir, names)
    if args.get("model_parallel_size") not in (None, len(ranks)):
        raise CheckpointError(f"{tag_dir}: its args say model_parallel_size {args['model_parallel_size']}, its files "
                              f"hold {len(ranks)} tensor-parallel rank(s); the checkpoint is incomplete")
    step = states.get("iteration", states.get("global_steps", 0))
    return from_neox_ranks(ranks, model, tag_dir), int(step or 0), tag_dir


def fit_vocab(weights: Dict[str, torch.Tensor], rows: int) -> Dict[str, torch.Tensor]:
    """The embedding and output rows cut or zero-filled to ``rows`` (callers make sure only
    padding rows, past the tokenizer's vocabulary, are cut)."""
    out = dict(weights)
    for name in ("embed_in.weight", "embed_out.weight"):
        if name in out and out[name].shape[0] != rows:
            tensor = out[name][:rows]
            out[name] = torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], tensor.shape[1])])
    return out


def neox_padded_vocab(rows: int, divisible_by: int, source_tp: int, target_tp: int,
                      vocab_size: Optional[int] = None) -> int:
    """The vocabulary NeoX pads to at ``target_tp`` (a multiple of make_vocab_size_divisible_by x
    TP above the tokenizer's size). From a checkpoint padded at ``source_tp`` that is ``rows``
    rounded up whenever target_tp is a multiple of source_tp; otherwise the tokenizer's size is
    needed."""
    multiple = divisible_by * target_tp
    if vocab_size is None:
        if target_tp % source_tp:
            raise ValueError(f"--vocab-size: needed to write at model_parallel_size {target_tp} a checkpoint padded "
                             f"at {source_tp} ({rows} rows): NeoX pads the tokenizer's vocabulary to a multiple of "
                             f"make_vocab_size_divisible_by x model_parallel_size; pass the tokenizer's size")
        vocab_size = rows
    if vocab_size > rows:
        raise ValueError(f"--vocab-size: {vocab_size} is more than the checkpoint's {rows} vocabulary rows")
    return -(-vocab_size // multiple) * multiple


def save_neox(out_dir: str, weights: Dict[str, torch.Tensor], cfg, step: int, tp: int, pipe_parallel_size: int,
              overwrite: bool = False) -> str:
    """Write ``weights`` (ours, full size, the vocabulary already padded for ``tp``) as the
    GPT-NeoX checkpoint of ``cfg`` (a NeoXConfig) at TP ``tp``: SAVE/latest and
    SAVE/global_step{step}/, with cfg.values in configs/config.yml. NeoX loads it with
    `finetune: true` (or `no_load_optim: true`): there is no optimizer state in it."""
    import deepspeed
    import yaml

    from neox_sophia.convert.output import write_directory

    model = cfg.model
    if tp < 1 or pipe_parallel_size < 0:
        raise ValueError(f"model_parallel_size {tp} / pipe_parallel_size {pipe_parallel_size}: must be >= 1 / >= 0")
    for key, size in (("num_attention_heads", model.num_attention_heads), ("num_kv_heads", model.kv_heads),
                      ("the MLP width", model.ffn_hidden_size), ("the padded vocabulary",
                                                                  weights["embed_in.weight"].shape[0])):
        if size % tp:
            raise ValueError(f"model_parallel_size: {tp} does not divide {key} ({size}); NeoX could not split it")
    ranks = neox_ranks(weights, model, tp)
    stages = max(pipe_parallel_size, 1)
    args = {"num_layers": model.num_layers, "hidden_size": model.hidden_size,
            "num_attention_heads": model.num_attention_heads, "max_position_embeddings": model.max_position_embeddings,
            "make_vocab_size_divisible_by": model.make_vocab_size_divisible_by,
            "padded_vocab_size": weights["embed_in.weight"].shape[0], "tokenizer_type": cfg.data.tokenizer_type,
            "model_parallel_size": tp}
    common = {"iteration": step, "global_steps": step, "skipped_steps": 0, "dp_world_size": 1,
              "mp_world_size": tp * stages if pipe_parallel_size else tp, "optimizer": None, "lr_scheduler": None,
              "buffer_names": [], "ds_version": deepspeed.__version__, "args": args}

    def fill(tmp: str) -> None:
        tag = tag_for(step)
        directory = os.path.join(tmp, tag)
        os.makedirs(os.path.join(directory, "configs"))
        for t, rank in enumerate(ranks):
            if pipe_parallel_size == 0:
                module = {f"sequential.{layer}.{key}": v for layer in sorted(rank) for key, v in rank[layer].items()}
                torch.save({**common, "module": module}, os.path.join(directory, f"mp_rank_{t:02d}_model_states.pt"))
            else:
                for layer, keys in sorted(rank.items()):
                    torch.save(keys, os.path.join(directory, f"layer_{layer:02d}-model_{t:02d}-model_states.pt"))
        if pipe_parallel_size:
            for m in range(tp * stages):
                torch.save({**common, "module": None}, os.path.join(directory, f"mp_rank_{m:02d}_model_states.pt"))
        with open(os.path.join(directory, "configs", "config.yml"), "w") as f:
            yaml.safe_dump(cfg.values, f, sort_keys=False)
        with open(os.path.join(tmp, LATEST), "w") as f:
            f.write(tag)

    write_directory(out_dir, overwrite, fill)
    return out_dir


__all__ = ["entries", "neox_ranks", "from_neox_ranks", "read_neox", "save_neox", "is_neox_checkpoint", "fit_vocab",
           "neox_padded_vocab"]

"""Read a checkpoint our trainer wrote, at any layout, into full tensors by global parameter name.

Offline and single-process: no torch.distributed, no engine, no model. Every file is read with
torch.load(weights_only=True). What the trainer writes (neox_sophia.training.checkpoint):

    SAVE_DIR/latest                    tag of the newest complete checkpoint
    SAVE_DIR/global_stepN/
      config.yml, layout.json, complete, rng_rank{r}.pt      ours
      mp_rank_{m:02d}_model_states.pt  DeepSpeed, one per model-parallel rank m = stage*tp + tp_rank:
                                       'module' (plain model: the TP shard's state_dict; None under
                                       the PipelineModule), 'optimizer' (ZeRO 0 only), 'param_shapes'
                                       (ZeRO 1/2 only: per param group, in flat order, DeepSpeed's
                                       names), dp/mp_world_size, checkpoint_parallel_dimensions,
                                       ds_config, and our client state: step, scheduler,
                                       nonfinite_steps
      layer_{i:02d}-model_{t:02d}-model_states.pt
                                       PipelineModule layer i's state_dict on TP rank t (i: 0
                                       embedding, 1..L transformer layers, L+1 final norm, L+2 output
                                       layer; with tied embeddings the last one is the embedding
                                       again and has no file)
      [bf16_]zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt
                                       ZeRO 1/2 and the bf16 optimizer: data-parallel rank d's flat
                                       fp32 partition of every param group (master weights) and the
                                       optimizer state of that partition (exp_avg, hessian, ...)

Optimizer-state formats, all read here:

    plain     ZeRO 0, fp32: torch optimizer state_dict, one entry per parameter (TP shard)
    unfused   ZeRO 0, bf16, no pipeline (DeepSpeed's FP16_UnfusedOptimizer in bf16): the same, on
              fp32 master copies ('fp32_groups')
    flat      ZeRO 1/2 (stage_1_and_2) and the BF16_Optimizer (bf16 with the PipelineModule):
              per param group one flat partition per data-parallel rank; concatenated over ranks
              and cut by the parameter shapes in flat order (plus ZeRO's per-parameter alignment
              paddings); trailing group padding is dropped

Parameter order within a param group: ZeRO files name it ('param_shapes'); the BF16_Optimizer's
files name it in 'param_slice_mappings'; for ZeRO 0 it is the module order split by the saved
groups' names (neox_sophia.optim.groups: one group per parameter role, or the weight_decay /
no_weight_decay pair of older checkpoints), checked against every saved state tensor's shape. The fragment links DeepSpeed keeps on live
parameters (_hp_mapping) are never used.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import yaml

from neox_sophia.model.layers import tensor_parallel_dim
from neox_sophia.optim.groups import GROUP_MEMBERS
from neox_sophia.training.checkpoint import (LAYOUT, MARKER, CheckpointError, complete_tags, newest_complete_tag,
                                           tag_for)

CLIENT_KEYS = ("step", "scheduler", "nonfinite_steps")


@dataclass
class FullCheckpoint:
    """A checkpoint at no layout: every tensor at full size under its global name."""

    config: Dict[str, Any]
    """The merged config values the run used (config.yml)."""
    step: int
    tag: str
    layout: Dict[str, Any]
    """Where it came from: tp, pp (pipe_parallel_size; 0 = plain module), dp, zero_stage,
    precision, world_size."""
    weights: Dict[str, torch.Tensor]
    """Global name -> full fp32 tensor (the fp32 master copy under bf16/fp16; vocab padding kept)."""
    optimizer: Dict[str, Dict[str, torch.Tensor]]
    """Global name -> {state key: full fp32 tensor}: Sophia's exp_avg and hessian, AdamW's
    exp_avg and exp_avg_sq. Scalars (step counters, hessian_rejected) are not kept."""
    client_state: Dict[str, Any]
    """step, scheduler (AnnealingLR.state_dict()), nonfinite_steps."""
    param_groups: List[Dict[str, Any]] = field(default_factory=list)
    """The optimizer's param-group hyperparameters as saved (name, lr, betas, rho, bs, weight_decay,
    ...), without their parameter lists; empty when not read."""


# ------------------------------------------------------------------------------------------ files
def _safe_classes() -> list:
    """The non-tensor objects DeepSpeed 0.19 pickles into its checkpoint files, and nothing else:

    LossScaler / DynamicLossScaler  ZeRO optimizer state 'loss_scaler' (static under fp32/bf16,
                                    dynamic under fp16)
    ZeroStageEnum                   ZeRO optimizer state 'zero_stage'
    fragment_address                ZeRO / bf16 optimizer state 'param_slice_mappings' (numel, start)
    numpy arrays                    GPT-NeoX's client state 'np_rng_state' (np.random.get_state(): a
                                    uint32 array); rebuilt as data, nothing executed
    """
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    multiarray = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    numpy_arrays = [multiarray.multiarray._reconstruct, np.ndarray, np.dtype]
    numpy_arrays += [getattr(np.dtypes, name) for name in ("UInt32DType", "Int64DType", "Float64DType")
                     if hasattr(getattr(np, "dtypes", None), name)]
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, *numpy_arrays]


def load_file(path: str) -> Any:
    """torch.load(weights_only=True) of one checkpoint file, memory-mapped (tensors the caller never
    touches are never read); CheckpointError naming the file when it is missing or unreadable."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete (a rank's file was not written "
                              f"or was removed). Copy the file back, or read another step (--step N)")
    try:
        with torch.serialization.safe_globals(_safe_classes()):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # a legacy (non-zip) file cannot be memory-mapped
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds on truncated or foreign files
        text = str(e).strip()
        # a weights_only refusal says what it refused after "WeightsUnpickler error:"
        refused = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
        detail = ("weights_only refused: " + " ".join(refused.group(1).split()) if refused
                  else (text.splitlines() or [""])[0].split(". ")[0])
        raise CheckpointError(f"{path}: could not be read ({type(e).__name__}: {detail[:300]}); the file is "
                              f"truncated or is not a DeepSpeed checkpoint file (it is loaded with "
                              f"weights_only=True: tensors and DeepSpeed's few record types only). Restore it, "
                              f"or read another step (--step N)") from e


def resolve(save_dir: str, step: Optional[int] = None) -> str:
    """The tag to read: global_step{step}, or `latest` when it is complete, else the newest
    complete checkpoint (as checkpoint.resolve_tag does for resuming)."""
    if not os.path.isdir(save_dir):
        raise CheckpointError(f"{save_dir}: no such directory; pass the run's `save` directory (it holds "
                              f"`latest` and global_stepN/)")
    tags = complete_tags(save_dir)
    available = ", ".join(str(s) for s, _ in tags) or "none"
    if step is not None:
        tag = tag_for(step)
        if not os.path.isdir(os.path.join(save_dir, tag)):
            raise CheckpointError(f"{os.path.join(save_dir, tag)}: no such checkpoint; complete steps in "
                                  f"{save_dir}: {available}")
        if not os.path.isfile(os.path.join(save_dir, tag, MARKER)):
            raise CheckpointError(f"{os.path.join(save_dir, tag)}: has no '{MARKER}' marker, so its save did not "
                                  f"finish and its files may be partial; read a complete step instead "
                                  f"({available})")
        return tag
    tag = newest_complete_tag(save_dir)
    if tag is None:
        partial = sorted(d for d in os.listdir(save_dir) if re.match(r"^global_step\d+$", d))
        why = (f"{', '.join(partial)} {'has' if len(partial) == 1 else 'have'} no '{MARKER}' marker (the save did "
               f"not finish)" if partial else f"no global_stepN/ with a '{MARKER}' marker")
        raise CheckpointError(f"{save_dir}: no complete checkpoint ({why}); pass a `save` directory with a complete "
                              f"checkpoint")
    return tag


def read_config(path: str) -> Dict[str, Any]:
    """config.yml of the checkpoint directory ``path`` (global_stepN/) as a dict."""
    file = os.path.join(path, "config.yml")
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: missing; the trainer writes it with every checkpoint and the reader "
                              f"needs it to know the model and the layout")
    try:
        with open(file) as f:
            values = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise CheckpointError(f"{file}: not valid YAML ({e})") from e
    if not isinstance(values, dict):
        raise CheckpointError(f"{file}: expected a mapping of config keys")
    return values


def neox_config(values: Dict[str, Any], where: str):
    """The NeoXConfig of saved config values; CheckpointError naming ``where`` when invalid."""
    from neox_sophia.config import ConfigError, config_from_values

    try:
        return config_from_values(dict(values), {key: where for key in values})
    except ConfigError as e:
        raise CheckpointError(f"{where}: the saved config is not valid here ({e})") from e


# ------------------------------------------------------------------------------------ the model
class _Model:
    """What the config says about parameter names and the file layout."""

    def __init__(self, cfg, path: str):
        self.cfg = cfg
        self.path = path
        self.tp = cfg.parallel.model_parallel_size
        self.pipe = cfg.parallel.pipe_parallel_size
        self.stages = max(self.pipe, 1)
        self.num_layers = cfg.model.num_layers
        self.tied = not cfg.model.no_weight_tying

    def global_name(self, ds_name: str) -> str:
        """DeepSpeed's parameter name (the engine module's) -> our global name."""
        parts = ds_name.split(".")
        if self.pipe == 0:  # GPTNeoX: embedding.*, layers.N.*, final_norm.*, output.*
            return ds_name if parts[0] == "layers" else ".".join(parts[1:])
        if parts[0] == "tied_modules":  # tied_modules.<key>.<local>
            return ".".join(parts[2:])
        if not parts[0].isdigit():
            raise CheckpointError(f"{self.path}: parameter '{ds_name}' is not a PipelineModule layer's, but "
                                  f"config.yml sets pipe_parallel_size {self.pipe}; restore config.yml as the "
                                  f"trainer wrote it")
        return self.layer_prefix(int(parts[0])) + ".".join(parts[1:])

    def layer_prefix(self, index: int) -> str:
        return f"layers.{index - 1}." if 1 <= index <= self.num_layers else ""

    def layer_index(self, ds_name: str) -> Optional[int]:
        """The pipeline layer index a DeepSpeed name belongs to (None: a tied module)."""
        head = ds_name.split(".")[0]
        return None if head == "tied_modules" or not head.isdigit() else int(head)

    def stage_layers(self, ds_names: Iterable[str], stage: int) -> List[int]:
        """The pipeline layers a stage's parameter names come from. The tied embedding is layer 0
        on stage 0; on the last stage it is a copy held for the tied output layer."""
        if self.pipe == 0:
            return []
        found = {self.layer_index(n) for n in ds_names}
        if None in found:
            found.discard(None)
            if stage == 0:
                found.add(0)
        return sorted(found)

    def layer_file(self, index: int, tp_rank: int) -> str:
        return os.path.join(self.path, f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt")

    def mp_file(self, mp_rank: int) -> str:
        return os.path.join(self.path, f"mp_rank_{mp_rank:02d}_model_states.pt")


def _tensors(state_dict: Dict[str, Any], skip: Iterable[str] = ()) -> List[Tuple[str, torch.Tensor]]:
    skip = set(skip)
    return [(k, v) for k, v in state_dict.items() if isinstance(v, torch.Tensor) and k not in skip]


def _hyperparameters(groups: Sequence[dict]) -> List[Dict[str, Any]]:
    out = []
    for group in groups:
        out.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"})
    return out


# ----------------------------------------------------------------------------- one model shard
@dataclass
class _Shard:
    """One (pipeline stage, TP rank): its parameters in order, TP-local tensors."""

    names: List[str] = field(default_factory=list)
    weights: Dict[str, torch.Tensor] = field(default_factory=dict)
    state: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)
    layers: List[int] = field(default_factory=list)  # pipeline layer indices read (not tied ones)


class _Reader:
    def __init__(self, save_dir: str, tag: str, optimizer_state: bool):
        self.save_dir, self.tag, self.optimizer_state = save_dir, tag, optimizer_state
        self.path = os.path.join(save_dir, tag)
        self.config = read_config(self.path)
        self.cfg = neox_config(self.config, os.path.join(self.path, "config.yml"))
        self.model = _Model(self.cfg, self.path)
        self.precision = self.cfg.engine.resolved_precision
        self.zero = self.cfg.engine.zero_stage
        self.param_groups: List[Dict[str, Any]] = []
        self.format: Optional[str] = None

    # -------------------------------------------------------------------------------- checks
    def note_groups(self, saved_groups: Sequence[dict]) -> None:
        """Collect each param group's hyperparameters once (by name: pipeline stages hold
        different roles; data-parallel and TP ranks the same ones)."""
        known = {g.get("name") for g in self.param_groups}
        self.param_groups += [g for g in _hyperparameters(saved_groups) if g.get("name") not in known]

    def mismatch(self, file: str, what: str) -> CheckpointError:
        return CheckpointError(f"{file}: {what}; the files of {self.path} do not match its config.yml (was the "
                               f"config edited, or files from another run copied in?). Restore the directory as "
                               f"the trainer wrote it")

    def check_files(self) -> None:
        """No model-parallel rank file beyond the config's TP x PP (each present one is loaded)."""
        m = self.model
        expected = m.tp * m.stages
        found = sorted(int(x.group(1)) for x in (re.match(r"^mp_rank_(\d+)_model_states\.pt$", f)
                                                  for f in os.listdir(self.path)) if x)
        extra = [r for r in found if r >= expected]
        if extra:
            raise self.mismatch(m.mp_file(extra[0]), f"config.yml says model_parallel_size {m.tp} x "
                                                     f"{m.stages} pipeline stage(s) = {expected} model-parallel "
                                                     f"rank(s), but there are files for {max(found) + 1}")
        if m.pipe == 0:
            return
        layers = {}  # tp rank -> layer indices with a file
        for f in os.listdir(self.path):
            x = re.match(r"^layer_(\d+)-model_(\d+)-model_states\.pt$", f)
            if x:
                layers.setdefault(int(x.group(2)), set()).add(int(x.group(1)))
        want = set(range(m.num_layers + 2)) | (set() if m.tied else {m.num_layers + 2})
        for t in range(m.tp):
            have = layers.get(t, set())
            if have - want:
                index = min(have - want)
                raise self.mismatch(m.layer_file(index, t), f"config.yml's {m.num_layers} transformer layers "
                                                            f"({'tied' if m.tied else 'untied'} embeddings) make "
                                                            f"pipeline layers 0..{max(want)}, but there is a file "
                                                            f"for layer {index}")
            if want - have:
                index = min(want - have)
                raise CheckpointError(f"{m.layer_file(index, t)}: missing; config.yml's {m.num_layers} transformer "
                                      f"layers ({'tied' if m.tied else 'untied'} embeddings) make pipeline layers "
                                      f"0..{max(want)}{' (the tied output layer has no file)' if m.tied else ''}. "
                                      f"Either a file was lost (copy it back, or read another step with --step N) "
                                      f"or config.yml does not match the files (restore it as the trainer wrote it)")
        extra_tp = sorted(t for t in layers if t >= m.tp)
        if extra_tp:
            raise self.mismatch(m.layer_file(min(layers[extra_tp[0]]), extra_tp[0]),
                                f"a layer file for tensor-parallel rank {extra_tp[0]}, but config.yml says "
                                f"model_parallel_size {m.tp}")

    def check_states(self, file: str, states: dict, mp_rank: int) -> None:
        m = self.model
        dims = states.get("checkpoint_parallel_dimensions") or {}
        saw = (dims.get("tp_degree"), dims.get("pp_degree"))
        if dims and saw != (m.tp, m.stages):
            raise self.mismatch(file, f"saved at tensor-parallel size {saw[0]} x pipeline stages {saw[1]}, config.yml "
                                      f"says {m.tp} x {m.stages}")
        if states.get("mp_world_size") not in (None, m.tp * m.stages):
            raise self.mismatch(file, f"model-parallel world size {states['mp_world_size']}, config.yml says "
                                      f"{m.tp * m.stages}")
        if (states.get("module") is None) != (m.pipe >= 1):
            raise self.mismatch(file, "a pipeline checkpoint (no 'module')" if m.pipe == 0
                                else "a plain-module checkpoint, but config.yml sets pipe_parallel_size")
        stage = ((states.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0)
        if stage != self.zero:
            raise self.mismatch(file, f"saved with ZeRO stage {stage}, config.yml says {self.zero}")
        if mp_rank == 0:
            self.dp = int(states.get("dp_world_size") or 1)
        elif int(states.get("dp_world_size") or 1) != self.dp:
            raise self.mismatch(file, f"data-parallel size {states.get('dp_world_size')} differs from "
                                      f"mp_rank_00's {self.dp}")

    # ---------------------------------------------------------------------------------- read
    def read(self) -> FullCheckpoint:
        m = self.model
        self.check_files()
        first = load_file(m.mp_file(0))
        self.check_states(m.mp_file(0), first, 0)
        client = {k: first[k] for k in CLIENT_KEYS if k in first}
        step = int(client.get("step", first.get("global_steps", -1)))
        tag_step = re.match(r"^global_step(\d+)$", self.tag)
        if tag_step and int(tag_step.group(1)) != step:
            raise self.mismatch(m.mp_file(0), f"holds step {step}, not {tag_step.group(1)}")
        client.setdefault("step", step)

        weights: Dict[str, torch.Tensor] = {}
        optimizer: Dict[str, Dict[str, torch.Tensor]] = {}
        cursor = 0  # the next pipeline layer index
        for stage in range(m.stages):
            shards = []
            for t in range(m.tp):
                mp_rank = stage * m.tp + t
                states = first if mp_rank == 0 else load_file(m.mp_file(mp_rank))
                if mp_rank:
                    self.check_states(m.mp_file(mp_rank), states, mp_rank)
                shards.append(self.read_shard(states, mp_rank, stage, t, cursor))
                del states
            first = None
            if m.pipe >= 1:
                cursor = self.check_stage_layers(stage, shards, cursor)
            self.merge(stage, shards, weights, optimizer)
            del shards
        order = self.check_model(weights)  # model order, whatever the layout's file order was
        weights = {name: weights[name] for name in order}
        optimizer = {name: optimizer[name] for name in order if name in optimizer}
        layout = {"tp": m.tp, "pp": m.pipe, "dp": self.dp, "zero_stage": self.zero, "precision": self.precision,
                  "world_size": m.tp * m.stages * self.dp}
        self.check_layout_record(layout)
        return FullCheckpoint(config=self.config, step=step, tag=self.tag, layout=layout, weights=weights,
                              optimizer=optimizer if self.optimizer_state else {}, client_state=client,
                              param_groups=self.param_groups)

    def check_layout_record(self, layout: Dict[str, Any]) -> None:
        file = os.path.join(self.path, LAYOUT)
        if not os.path.isfile(file):
            return
        with open(file) as f:
            saved = json.load(f)
        ours = {"model_parallel_size": layout["tp"], "pipe_parallel_size": layout["pp"],
                "data_parallel_size": layout["dp"], "zero_stage": layout["zero_stage"],
                "precision": layout["precision"]}
        differ = {k: (saved[k], v) for k, v in ours.items() if k in saved and saved[k] != v}
        if differ:
            raise self.mismatch(file, "records " + ", ".join(f"{k} {a}" for k, (a, _) in differ.items())
                                + " but the files and config.yml say " + ", ".join(f"{b}" for _, b in differ.values()))

    def check_stage_layers(self, stage: int, shards: List[_Shard], cursor: int) -> int:
        """Pipeline stages hold consecutive layers, together all of them."""
        m = self.model
        layers = sorted(shards[0].layers)
        if layers and layers != list(range(cursor, cursor + len(layers))):
            raise self.mismatch(m.mp_file(stage * m.tp), f"stage {stage} holds layers {layers}, expected "
                                                         f"consecutive layers from {cursor}")
        for t, shard in enumerate(shards[1:], 1):
            if shard.names != shards[0].names:
                raise self.mismatch(m.mp_file(stage * m.tp + t), "tensor-parallel ranks of one stage hold "
                                                                 "different parameters")
        return cursor + len(layers)

    def check_model(self, weights: Dict[str, torch.Tensor]) -> List[str]:
        """Every parameter config.yml's model has, at its full shape; returns the names in model order."""
        from neox_sophia.model.gpt_neox import parameter_shapes

        m, cfg = self.model, self.cfg
        if "embed_in.weight" not in weights:
            raise self.mismatch(self.path, "no embedding (embed_in.weight) found")
        padded = weights["embed_in.weight"].shape[0]
        multiple = cfg.model.make_vocab_size_divisible_by * m.tp
        if padded % multiple:
            raise self.mismatch(self.path, f"the vocabulary has {padded} rows, not a multiple of "
                                           f"make_vocab_size_divisible_by x model_parallel_size = {multiple}")
        shapes = parameter_shapes(cfg.model, padded)
        missing = [n for n in shapes if n not in weights]
        unexpected = [n for n in weights if n not in shapes]
        wrong = [f"{n} {list(weights[n].shape)} (config: {list(s)})" for n, s in shapes.items()
                 if n in weights and tuple(weights[n].shape) != tuple(s)]
        problems = ([f"missing {', '.join(missing[:5])}"] if missing else []) + \
                   ([f"unexpected {', '.join(unexpected[:5])}"] if unexpected else []) + wrong[:5]
        if problems:
            raise self.mismatch(self.path, "its parameters are not the model config.yml describes: "
                                + "; ".join(problems))
        return list(shapes)

    # ----------------------------------------------------------------------------- a shard
    def read_shard(self, states: dict, mp_rank: int, stage: int, t: int, cursor: int) -> _Shard:
        m = self.model
        file = m.mp_file(mp_rank)
        buffers = {m.global_name(b) for b in states.get("buffer_names") or ()}
        optim = states.get("optimizer")
        if states.get("param_shapes") is not None:  # ZeRO 1/2
            self.format = "flat"
            groups = [[(m.global_name(n), tuple(s)) for n, s in g.items()] for g in states["param_shapes"]]
            shard = _Shard()
            shard.layers = m.stage_layers([n for g in states["param_shapes"] for n in g], stage)
            self.read_flat(shard, groups, mp_rank, file, paddings_key="param_alignment_paddings")
            for name, value in (states.get("frozen_param_fragments") or {}).items():
                shard.names.append(m.global_name(name))
                shard.weights[m.global_name(name)] = value
            return shard
        if optim is None:
            raise self.mismatch(file, "no optimizer state and no ZeRO parameter shapes")
        if "state" in optim:  # a torch optimizer state_dict
            self.format = "plain"
            return self.read_per_param(states, optim, None, buffers, file, stage, t, cursor)
        if "fp32_groups" in optim or "fp32_groups_flat" in optim:  # FP16_(Unfused)Optimizer
            self.format = "unfused"
            return self.read_per_param(states, optim["optimizer_state_dict"], optim, buffers, file, stage, t, cursor)
        if "single_partition_of_fp32_groups" in optim:  # BF16_Optimizer: names in its slice mappings
            self.format = "flat"
            return self.read_bf16_optimizer(optim, mp_rank, file, stage, t, buffers)
        raise self.mismatch(file, f"an optimizer state this reader does not know (keys {sorted(optim)[:8]})")

    # -------------------------------------------------------------- ZeRO 0: one entry per param
    def module_params(self, states: dict, buffers: set, stage: int, t: int, cursor: int,
                      count: int) -> Tuple[List[Tuple[str, torch.Tensor]], List[int]]:
        """(global name, TP-local tensor) of the stage's parameters in module order, and the
        pipeline layers they came from. ``count``: how many parameters the optimizer holds, which
        is how a ZeRO-0 pipeline stage's layers are found (stages hold consecutive layers)."""
        m = self.model
        if m.pipe == 0:
            return [(m.global_name(n), v) for n, v in _tensors(states["module"]) if m.global_name(n) not in buffers], []
        last_stage = stage == m.stages - 1
        params: List[Tuple[str, torch.Tensor]] = []
        if m.tied and last_stage and stage > 0:  # the tied embedding: registered before the layers
            params += self.layer_params(0, t, buffers)
        layers, index = [], cursor
        while index <= m.num_layers + 2 and (last_stage or len(params) < count):
            if not (m.tied and index == m.num_layers + 2):  # the tied output layer has no file
                params += self.layer_params(index, t, buffers)
                layers.append(index)
            index += 1
        return params, layers

    def layer_params(self, index: int, t: int, buffers: set) -> List[Tuple[str, torch.Tensor]]:
        m = self.model
        prefix = m.layer_prefix(index)
        return [(prefix + n, v) for n, v in _tensors(load_file(m.layer_file(index, t))) if prefix + n not in buffers]

    def read_per_param(self, states: dict, optim_sd: dict, wrapper: Optional[dict], buffers: set, file: str,
                       stage: int, t: int, cursor: int) -> _Shard:
        saved_groups = optim_sd["param_groups"]
        self.note_groups(saved_groups)
        count = sum(len(g["params"]) for g in saved_groups)
        params, layers = self.module_params(states, buffers, stage, t, cursor, count)
        if len(params) != count:
            raise self.mismatch(file, f"the optimizer holds {count} parameters, the model files "
                                      f"{len(params)} for this stage")
        # each saved group names which parameters it holds (neox_sophia.optim.groups.GROUP_MEMBERS)
        unknown = [saved.get("name") for saved in saved_groups if saved.get("name") not in GROUP_MEMBERS]
        if unknown:
            raise self.mismatch(file, f"param groups named {unknown}: not groups this reader knows")
        groups = [[p for p in params if GROUP_MEMBERS[saved["name"]](p[0])] for saved in saved_groups]
        for g, (saved, group) in enumerate(zip(saved_groups, groups)):
            if len(group) != len(saved["params"]):
                raise self.mismatch(file, f"param group {g} ({saved.get('name')}) holds {len(saved['params'])} "
                                          f"parameters; by its name it should hold {len(group)}")
        masters = None
        if wrapper is not None:
            masters = wrapper.get("fp32_groups")
            if masters is None:  # FP16_Optimizer (fused): one flat master per group
                masters = [self.cut(flat.view(-1), [tuple(v.shape) for _, v in group], file, f"group {g}")
                           for g, (flat, group) in enumerate(zip(wrapper["fp32_groups_flat"], groups))]
        shard = _Shard(layers=layers)
        for g, (saved, group) in enumerate(zip(saved_groups, groups)):
            for i, ((name, module_value), index) in enumerate(zip(group, saved["params"])):
                shape = tuple(module_value.shape)
                weight = masters[g][i] if masters is not None else module_value
                if tuple(weight.shape) != shape:
                    raise self.mismatch(file, f"the master copy of {name} has shape {list(weight.shape)}, the "
                                              f"parameter {list(shape)}")
                shard.names.append(name)
                shard.weights[name] = weight
                if self.optimizer_state:
                    entry = {}
                    for key, value in (optim_sd["state"].get(index) or {}).items():
                        if isinstance(value, torch.Tensor) and value.dim() > 0:
                            if tuple(value.shape) != shape:
                                raise self.mismatch(file, f"optimizer state '{key}' #{index} has shape "
                                                          f"{list(value.shape)}, but by module order it belongs to "
                                                          f"{name} of shape {list(shape)}")
                            entry[key] = value
                    shard.state[name] = entry
        return shard

    # ------------------------------------------------------- flat partitions over data parallel
    def zero_files(self, mp_rank: int) -> List[str]:
        """The optimizer files of model-parallel rank ``mp_rank``, one per data-parallel rank."""
        prefixes = ("bf16_", "") if self.precision == "bfloat16" else ("", "bf16_")
        for prefix in prefixes:
            files = [os.path.join(self.path, f"{prefix}zero_pp_rank_{d}_mp_rank_{mp_rank:02d}_optim_states.pt")
                     for d in range(self.dp)]
            if os.path.isfile(files[0]):
                extra = os.path.join(self.path, f"{prefix}zero_pp_rank_{self.dp}_mp_rank_{mp_rank:02d}_optim_states.pt")
                if os.path.isfile(extra):
                    raise self.mismatch(extra, f"a file for data-parallel rank {self.dp}, but the checkpoint "
                                               f"was saved with {self.dp} data-parallel ranks")
                return files
        return [os.path.join(self.path, f"{prefixes[0]}zero_pp_rank_{d}_mp_rank_{mp_rank:02d}_optim_states.pt")
                for d in range(self.dp)]

    def load_partitions(self, mp_rank: int) -> Tuple[List[dict], List[str]]:
        files = self.zero_files(mp_rank)
        parts = []
        for file in files:
            osd = load_file(file).get("optimizer_state_dict")
            if not isinstance(osd, dict) or "single_partition_of_fp32_groups" not in osd:
                raise self.mismatch(file, "no flat optimizer partitions (optimizer_state_dict."
                                          "single_partition_of_fp32_groups)")
            parts.append(osd)
        return parts, files

    def read_flat(self, shard: _Shard, groups: List[List[Tuple[str, tuple]]], mp_rank: int, file: str,
                  paddings_key: Optional[str], parts: Optional[List[dict]] = None,
                  files: Optional[List[str]] = None) -> None:
        """Fill ``shard`` from the flat partitions of every data-parallel rank; ``groups``: the
        (global name, TP-local shape) of each param group in flat order."""
        if parts is None:
            parts, files = self.load_partitions(mp_rank)
        base0 = parts[0]["base_optimizer_state"]
        self.note_groups(base0["param_groups"] if isinstance(base0, dict) else [])
        for g, group in enumerate(groups):
            masters, states, padding = [], {}, 0
            for d, osd in enumerate(parts):
                master = osd["single_partition_of_fp32_groups"][g]
                masters.append(master.view(-1))
                padding += int((osd.get("group_paddings") or [0] * len(groups))[g])
                if self.optimizer_state:
                    for key, value in self.partition_state(osd, g).items():
                        if value.dim() != 1 or value.numel() not in (master.numel(),
                                                                     master.numel() + int(osd["group_paddings"][g])):
                            continue  # a scalar (step, hessian_rejected)
                        states.setdefault(key, []).append(value)
            for key, pieces in states.items():
                if len(pieces) != len(parts):
                    raise self.mismatch(files[0], f"optimizer state '{key}' of param group {g} is on "
                                                  f"{len(pieces)} of {len(parts)} data-parallel ranks")
            paddings = None
            if paddings_key:
                paddings = (parts[0].get(paddings_key) or [None] * len(groups))[g]
            shapes = [s for _, s in group]
            where = f"{files[0]} (and the other data-parallel ranks' files)"
            cut = self.cut(torch.cat(masters), shapes, where, f"param group {g}", paddings, padding)
            cut_states = {key: self.cut(torch.cat(pieces), shapes, where, f"'{key}' of param group {g}", paddings,
                                        padding) for key, pieces in states.items()}
            for i, (name, _) in enumerate(group):
                shard.names.append(name)
                shard.weights[name] = cut[i]
                if self.optimizer_state:
                    shard.state[name] = {key: values[i] for key, values in cut_states.items()}

    @staticmethod
    def partition_state(osd: dict, g: int) -> Dict[str, torch.Tensor]:
        base = osd["base_optimizer_state"]
        if isinstance(base, dict) and "state" in base:  # the client optimizer's state_dict
            index = base["param_groups"][g]["params"][0]  # one flat fp32 partition per group
            state = base["state"].get(index) or {}
        else:  # elastic checkpoint: one dict of state per group
            state = base[g]
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    def cut(self, flat: torch.Tensor, shapes: List[tuple], where: str, what: str,
            paddings: Optional[Sequence[int]] = None, trailing: Optional[int] = None) -> List[torch.Tensor]:
        """Split a flat group into tensors of ``shapes`` (with ``paddings`` after each one)."""
        out, offset = [], 0
        for i, shape in enumerate(shapes):
            n = math.prod(shape)
            if offset + n > flat.numel():
                raise self.mismatch(where, f"{what} holds {flat.numel()} values, fewer than its parameters need")
            out.append(flat[offset:offset + n].view(shape))
            offset += n + (int(paddings[i]) if paddings else 0)
        left = flat.numel() - offset
        if left < 0 or (trailing is not None and left not in (0, trailing)):
            raise self.mismatch(where, f"{what} holds {flat.numel()} values, its parameters {offset} (+ padding "
                                       f"{trailing}): the parameter shapes do not fit the partitions")
        return out

    def read_bf16_optimizer(self, optim: dict, mp_rank: int, file: str, stage: int, t: int,
                            buffers: set) -> _Shard:
        """DeepSpeed's BF16_Optimizer (bf16 with the PipelineModule at ZeRO 0): flat partitions
        over data parallelism; the parameter order is in each partition's slice mappings."""
        m = self.model
        parts, files = self.load_partitions(mp_rank)
        groups: List[List[str]] = [[] for _ in optim["single_partition_of_fp32_groups"]]
        for osd in parts:
            for g, mapping in enumerate(osd.get("param_slice_mappings") or []):
                for name in mapping:
                    if name not in groups[g]:
                        groups[g].append(name)
        shard = _Shard()
        shard.layers = m.stage_layers([n for g in groups for n in g], stage)
        shapes: Dict[str, tuple] = {}
        for index in shard.layers + ([0] if any(m.layer_index(n) is None for g in groups for n in g) else []):
            for name, value in self.layer_params(index, t, buffers):
                shapes[name] = tuple(value.shape)
        named = []
        for g, names in enumerate(groups):
            named.append([])
            for ds_name in names:
                name = m.global_name(ds_name)
                if name not in shapes:
                    raise self.mismatch(files[0], f"{ds_name} is in the optimizer but in no layer file")
                named[-1].append((name, shapes[name]))
        self.read_flat(shard, named, mp_rank, file, None, parts, files)
        return shard

    # --------------------------------------------------------------------------- TP merge
    def merge(self, stage: int, shards: List[_Shard], weights: dict, optimizer: dict) -> None:
        """Concatenate the TP shards of one stage and add them (a tied embedding already read from
        an earlier stage is kept from there)."""
        def full(values: List[torch.Tensor], name: str) -> torch.Tensor:
            dim = tensor_parallel_dim(name) if len(values) > 1 else None
            if dim is None:  # replicated (every TP rank holds the same): TP rank 0's
                return values[0].to(torch.float32, copy=True)  # own memory, not a view of a file
            return torch.cat(values, dim=dim).float()

        for name in shards[0].names:
            if name in weights:
                continue
            weights[name] = full([s.weights[name] for s in shards], name)
            if self.optimizer_state and name in shards[0].state:
                keys = shards[0].state[name].keys()
                optimizer[name] = {key: full([s.state[name][key] for s in shards], name) for key in keys}


def read_checkpoint(save_dir: str, step: Optional[int] = None, optimizer_state: bool = True) -> FullCheckpoint:
    """Read checkpoint ``step`` (default: `latest`, or the newest complete one) of the `save`
    directory ``save_dir``, written at any TP x PP x DP x ZeRO layout, into full tensors.

    optimizer_state=False skips the optimizer state (the fp32 master weights of a bf16/fp16 run are
    still read: they are the weights). Raises CheckpointError, naming the file and what to do,
    when the directory, a marker or a rank's file is missing, a file is unreadable, or the files do
    not match the checkpoint's config.yml."""
    tag = resolve(save_dir, step)
    return _Reader(save_dir, tag, optimizer_state).read()


__all__ = ["FullCheckpoint", "read_checkpoint", "load_file", "resolve", "read_config", "neox_config",
           "CLIENT_KEYS"]

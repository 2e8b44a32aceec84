"""Reading one checkpoint: check its files against config.yml, read each (pipeline stage, TP rank)
in its format, merge the TP shards and stages into full tensors by global name."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from neox_sophia.convert.reader.bf16 import BF16_OPTIMIZER
from neox_sophia.convert.reader.files import load_file, neox_config, read_config
from neox_sophia.convert.reader.flat import ZERO
from neox_sophia.convert.reader.layout import ModelFiles, Shard, hyperparameters
from neox_sophia.convert.reader.per_param import PLAIN, UNFUSED
from neox_sophia.model.layers import tensor_parallel_dim
from neox_sophia.training.checkpoint import LAYOUT, CheckpointError

FORMATS = (ZERO, PLAIN, UNFUSED, BF16_OPTIMIZER)
"""Every optimizer-state format DeepSpeed writes for our runs; the first that matches a rank's model
file reads it (layout.Format)."""
# Checkpointing.save's (training/components.py)
CLIENT_KEYS = ("step", "scheduler", "nonfinite_steps", "data_position", "good_checkpoint", "run")


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



class CheckpointReader:
    def __init__(self, save_dir: str, tag: str, optimizer_state: bool):
        self.save_dir, self.tag, self.optimizer_state = save_dir, tag, optimizer_state
        self.path = os.path.join(save_dir, tag)
        self.config = read_config(self.path)
        self.cfg = neox_config(self.config, os.path.join(self.path, "config.yml"))
        self.model = ModelFiles(self.cfg, self.path)
        self.precision = self.cfg.engine.resolved_precision
        self.zero = self.cfg.engine.zero_stage
        self.param_groups: List[Dict[str, Any]] = []
        self.format: Optional[str] = None

    # -------------------------------------------------------------------------------- checks
    def note_groups(self, saved_groups: Sequence[dict]) -> None:
        """Collect each param group's hyperparameters once (by name: pipeline stages hold
        different roles; data-parallel and TP ranks the same ones)."""
        known = {g.get("name") for g in self.param_groups}
        self.param_groups += [g for g in hyperparameters(saved_groups) if g.get("name") not in known]

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

    def read_shard(self, states: dict, mp_rank: int, stage: int, t: int, cursor: int) -> Shard:
        """One (stage, TP rank) in whichever format its files are (FORMATS, in this order)."""
        for fmt in FORMATS:
            if fmt.matches(states):
                self.format = fmt.kind
                return fmt.read(self, states, mp_rank, stage, t, cursor)
        file = self.model.mp_file(mp_rank)
        if states.get("optimizer") is None:
            raise self.mismatch(file, "no optimizer state and no ZeRO parameter shapes")
        raise self.mismatch(file, f"an optimizer state this reader does not know (keys "
                                  f"{sorted(states['optimizer'])[:8]})")

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

    def check_stage_layers(self, stage: int, shards: List[Shard], cursor: int) -> int:
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

    # --------------------------------------------------------------------------- TP merge
    def merge(self, stage: int, shards: List[Shard], weights: dict, optimizer: dict) -> None:
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

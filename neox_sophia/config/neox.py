"""The whole config: typed sections built from NeoX YAML files, and the values derived from them.

    cfg = load_config(["configs/125M.yml", "configs/sophia.yml"], overrides=["train_iters=2000"])
    cfg = load_config(["pythia/70M.yml"], override_files=["configs/sophia.yml"])  # replaces its optimizer
    cfg.model.hidden_size, cfg.optimizer.type
    layout = cfg.layout(world_size=16)           # tp, pp, dp and the batch triple
    cfg.padded_vocab_size(50277)                 # 50304 at TP=1
    cfg.deepspeed_config(world_size=16)          # the dict for deepspeed.initialize

Each section receives only its own keys; every error names the key and the file it came from.
"""
from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, NamedTuple, Optional

from neox_sophia.config.aliases import resolve_derived
from neox_sophia.config.base import ConfigError, build_section, section_keys
from neox_sophia.config.engine_options import deepspeed_zero_block, offload_device
from neox_sophia.config.keys import IGNORABLE, NEOX_DEFAULTS
from neox_sophia.config.loader import apply_overrides, read_config_files
from neox_sophia.config.model import ModelConfig, ParallelConfig
from neox_sophia.config.performance import PerformanceConfig
from neox_sophia.config.sections import (BatchConfig, CheckpointConfig, DataConfig, EngineConfig,
                                         LaunchConfig, LoggingConfig, OptimizerConfig, TrainingConfig)

SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "batch": BatchConfig,
    "engine": EngineConfig,
    "optimizer": OptimizerConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "launch": LaunchConfig,
    "performance": PerformanceConfig,
}
# key -> section name; a key belongs to exactly one section
KEY_SECTION = {key: name for name, cls in SECTIONS.items() for key in section_keys(cls)}


class IgnoredKeysWarning(UserWarning):
    """NeoX keys in a config that this project accepts but does not act on."""


class Layout(NamedTuple):
    world_size: int
    tp: int
    pp: int
    dp: int
    train_batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int


@dataclass
class NeoXConfig:
    model: ModelConfig
    parallel: ParallelConfig
    batch: BatchConfig
    engine: EngineConfig
    optimizer: OptimizerConfig
    training: TrainingConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    launch: LaunchConfig
    performance: PerformanceConfig
    values: Dict[str, Any] = field(default_factory=dict)
    """The merged keys as read (after overrides): what a checkpoint records."""
    origins: Dict[str, str] = field(default_factory=dict)
    """key -> the file (or --set override) it came from."""
    ignored: Dict[str, Any] = field(default_factory=dict)
    """IGNORABLE NeoX keys set to a non-default value (reported in one warning)."""
    notes: List[str] = field(default_factory=list)
    """One line per key read under another name (gas...) and per value an override file replaced."""

    def layout(self, world_size: Optional[int] = None) -> Layout:
        world_size = world_size or self.default_world_size
        tp, pp = self.parallel.model_parallel_size, self.parallel.pipeline_stages
        dp = self._located(lambda: self.parallel.data_parallel_size(world_size))
        tb, mb, ga = self._located(lambda: self.batch.resolve(dp))
        return Layout(world_size, tp, pp, dp, tb, mb, ga)

    @property
    def default_world_size(self) -> int:
        """global_num_gpus when set, else the smallest world the TP x PP grid needs."""
        return self.launch.global_num_gpus or self.parallel.model_parallel_size * self.parallel.pipeline_stages

    def padded_vocab_size(self, vocab_size: int) -> int:
        """The tokenizer's vocab rounded up to make_vocab_size_divisible_by x model_parallel_size."""
        multiple = self.model.make_vocab_size_divisible_by * self.parallel.model_parallel_size
        return -(-vocab_size // multiple) * multiple

    def lr_schedule(self):
        from neox_sophia.optim.schedules import LRSchedule

        decay = self.training.decay_iters
        if decay is None:
            raise self._error(ConfigError("train_iters: not set; the LR schedule needs it"))
        return LRSchedule(lr=self.optimizer.params.lr, min_lr=self.training.min_lr, decay_iters=decay,
                          warmup=self.training.warmup, style=self.training.lr_decay_style)

    @property
    def hessian_interval(self) -> Optional[int]:
        """Sophia's k (steps between Hessian refreshes); None for an optimizer without one."""
        return getattr(self.optimizer.params, "hessian_interval", None)

    def hessian_batch(self, world_size: Optional[int] = None) -> tuple:
        """(H, micro-batches per data-parallel rank) of every Hessian refresh.

        H is a number of global sequences, the same at every layout, so that rho*bs*h is too:
        optimizer.params.hessian_batch_size when set, else half a training batch (at least one),
        as the paper's Sophia-G used 240 of 480 sequences; from the global batch, not per rank.
        The H sequences (the next H of the sample stream, neox_sophia.data.schedule) are laid out
        like a training step's, in (micro-step, data-parallel rank) order in micro-batches of the
        training micro-batch size, so ceil(H / (micro batch x DP)) micro-batches per rank. When H
        is not a whole number of them, the rows past H are padding: they carry no loss (mask 0)
        and each micro-batch's loss is weighted by its real rows, so the gradient is the mean over
        exactly H sequences (steps.hessian_batches)."""
        lay = self.layout(world_size)
        size = getattr(self.optimizer.params, "hessian_batch_size", None) or max(1, lay.train_batch_size // 2)
        return size, -(-size // (lay.micro_batch_size * lay.dp))

    def hessian_tokens(self, world_size: Optional[int] = None) -> int:
        """Sophia's default ``bs``: the tokens of the global Hessian batch (the same at every layout)."""
        return self.hessian_batch(world_size)[0] * self.model.seq_length

    def deepspeed_config(self, world_size: Optional[int] = None) -> Dict[str, Any]:
        """The DeepSpeed config: batch triple, clipping, ZeRO, precision. The optimizer is a client
        optimizer built by neox_sophia.optim.factory, so it is not in here."""
        lay = self.layout(world_size)
        eng = self.engine
        ds: Dict[str, Any] = {
            "train_batch_size": lay.train_batch_size,
            "train_micro_batch_size_per_gpu": lay.micro_batch_size,
            "gradient_accumulation_steps": lay.gradient_accumulation_steps,
            "gradient_clipping": eng.gradient_clipping,
            "steps_per_print": eng.steps_per_print,
            "wall_clock_breakdown": eng.wall_clock_breakdown,
            "zero_optimization": deepspeed_zero_block(eng.zero_optimization, eng.zero_stage),
            # DeepSpeed insists on this for any optimizer it did not build itself under ZeRO
            "zero_allow_untested_optimizer": True,
        }
        if offload_device(eng.zero_optimization) == "cpu":
            ds["zero_force_ds_cpu_optimizer"] = False  # Sophia runs on the offloaded state (engine_options.py)
        precision = eng.resolved_precision
        if precision == "fp16":
            ds["fp16"] = {**(eng.fp16 or {}), "enabled": True}
            ds["fp16"].pop("fp16", None)  # NeoX configs repeat "fp16": true inside the block
        elif precision == "bfloat16":
            ds["bf16"] = {**(eng.bf16 or {}), "enabled": True}
        for key, value in (eng.deepspeed_extra_args or {}).items():
            if key in ds:
                raise self._error(ConfigError(f"deepspeed_extra_args: '{key}' is already set from the "
                                              f"config; set it there instead"))
            ds[key] = value
        return ds

    def validate(self) -> None:
        for name in SECTIONS:
            section = getattr(self, name)
            try:
                if name == "engine":
                    section.validate(pipeline=self.parallel.pipe_parallel_size >= 1)
                else:
                    section.validate()
            except ConfigError as e:
                raise self._error(e) from None
        # what the optimizer's Hessian estimator can run on (e.g. Sophia-H: the plain engine, fp32)
        self._located(lambda: self.optimizer.params.check_engine(
            pipeline=self.parallel.pipe_parallel_size >= 1, precision=self.engine.resolved_precision))
        tp = self.parallel.model_parallel_size
        for key, heads in (("num_attention_heads", self.model.num_attention_heads),
                           ("num_kv_heads", self.model.kv_heads)):
            if heads % tp:
                raise self._error(ConfigError(f"{key}: {heads} is not divisible by model_parallel_size {tp}"))
        if self.training.min_lr > self.optimizer.params.lr:
            raise self._error(ConfigError(f"min_lr: {self.training.min_lr} is above optimizer.params.lr "
                                          f"{self.optimizer.params.lr}"))

    def _located(self, fn):
        try:
            return fn()
        except ConfigError as e:
            raise self._error(e) from None

    def _error(self, error: ConfigError) -> ConfigError:
        where = self.origins.get(error.key) or ", ".join(sorted(set(self.origins.values()))) or "config"
        return ConfigError(f"{where}: {error}", error.key)


def _close_key(key: str) -> str:
    close = difflib.get_close_matches(key, list(KEY_SECTION) + list(NEOX_DEFAULTS), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _classify(values: Dict[str, Any], origins: Dict[str, str]) -> Dict[str, Any]:
    """The IGNORABLE keys set to non-default values; raises one error listing every key that
    is unknown or asks for something not implemented."""
    problems: List[str] = []
    ignored: Dict[str, Any] = {}
    for key, value in values.items():
        if key in KEY_SECTION:
            continue
        if key not in NEOX_DEFAULTS:
            problems.append(f"{origins[key]}: {key}: unknown key{_close_key(key)}")
        elif value == NEOX_DEFAULTS[key]:
            continue  # NeoX's default: asks for nothing
        elif key in IGNORABLE:
            ignored[key] = value
        else:
            problems.append(f"{origins[key]}: {key}: {value!r} is a GPT-NeoX setting this project does not "
                            f"implement; remove it (NeoX's default is {NEOX_DEFAULTS[key]!r})")
    if problems:
        raise ConfigError("\n".join(problems), problems[0].split(": ")[1])
    return ignored


def load_config(paths: Iterable[str], overrides: Iterable[str] = (), *, override_files: Iterable[str] = (),
                warn: bool = True) -> NeoXConfig:
    """Read, merge, replace (override files, then ``--set`` overrides), resolve older key names,
    classify, build and validate a config."""
    values, origins, notes = read_config_files(list(paths), list(override_files))
    apply_overrides(values, origins, overrides)
    notes += resolve_derived(values, origins)
    cfg = config_from_values(values, origins, warn=warn)
    cfg.notes = notes
    return cfg


def config_from_values(values: Dict[str, Any], origins: Dict[str, str], *, warn: bool = False) -> NeoXConfig:
    """Classify, build and validate merged config values (``origins``: key -> where it was set),
    e.g. the values a checkpoint was saved with."""
    ignored = _classify(values, origins)
    sections = {}
    for name, cls in SECTIONS.items():
        try:
            sections[name] = build_section(cls, values)
        except ConfigError as e:
            raise ConfigError(f"{origins.get(e.key, 'config')}: {e}", e.key) from None
    cfg = NeoXConfig(**sections, values=values, origins=origins, ignored=ignored)
    cfg.validate()
    if ignored and warn:
        listed = "\n".join(f"  {key} = {value!r} ({origins[key]}): {IGNORABLE[key]}"
                           for key, value in sorted(ignored.items()))
        warnings.warn(f"GPT-NeoX keys accepted but not acted on:\n{listed}", IgnoredKeysWarning, stacklevel=2)
    return cfg

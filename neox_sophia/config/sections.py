"""Typed config sections beyond the model: batch, engine (DeepSpeed), optimizer, training
schedule, data, checkpoints, logging and launch. Field names are GPT-NeoX keys, defaults are
NeoX's except where a comment says why not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from neox_sophia.config.base import ConfigError, check


@dataclass
class BatchConfig:
    train_batch_size: Optional[int] = None
    """Sequences per optimizer step, all data-parallel ranks together."""
    train_micro_batch_size_per_gpu: Optional[int] = None
    """Sequences per forward/backward on one data-parallel rank."""
    gradient_accumulation_steps: Optional[int] = None
    """Micro-batches per optimizer step. NeoX defaults this to 1, which makes a config that sets
    only train_batch_size and the micro batch fail its consistency check; here it is derived."""

    def validate(self) -> None:
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            value = getattr(self, key)
            check(value is None or value > 0, key, f"must be a positive integer (got {value})")
        check(self.train_batch_size is not None or self.train_micro_batch_size_per_gpu is not None,
              "train_batch_size", "set train_batch_size or train_micro_batch_size_per_gpu (or both)")
        tb, mb, ga = self.train_batch_size, self.train_micro_batch_size_per_gpu, self.gradient_accumulation_steps
        check(None in (tb, mb, ga) or tb % (mb * ga) == 0, "train_batch_size",
              f"{tb} is not a multiple of train_micro_batch_size_per_gpu {mb} x gradient_accumulation_steps "
              f"{ga}, at any data-parallel size")

    def resolve(self, dp: int) -> Tuple[int, int, int]:
        """(train_batch_size, micro batch, gradient accumulation) for ``dp`` data-parallel ranks:
        any two determine the third; one alone means no accumulation."""
        tb, mb, ga = self.train_batch_size, self.train_micro_batch_size_per_gpu, self.gradient_accumulation_steps
        if tb is not None and mb is None:
            ga = ga or 1
            check(tb % (dp * ga) == 0, "train_batch_size",
                  f"{tb} is not divisible by data-parallel size {dp} x gradient_accumulation_steps {ga}")
            mb = tb // (dp * ga)
        elif tb is None:
            ga = ga or 1
            tb = mb * ga * dp
        elif ga is None:
            check(tb % (mb * dp) == 0, "train_batch_size",
                  f"{tb} is not divisible by train_micro_batch_size_per_gpu {mb} x data-parallel "
                  f"size {dp}; change one of them or set gradient_accumulation_steps")
            ga = tb // (mb * dp)
        check(tb == mb * ga * dp, "train_batch_size",
              f"{tb} != train_micro_batch_size_per_gpu {mb} x gradient_accumulation_steps {ga} x "
              f"data-parallel size {dp}; set only two of the three")
        return tb, mb, ga


PRECISIONS = {"fp32": "fp32", "fp16": "fp16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclass
class EngineConfig:
    """What DeepSpeed's engine is configured with."""

    precision: Optional[str] = None
    """"fp32", "fp16" or "bfloat16" (NeoX); derived from an enabled fp16/bf16 block when unset."""
    fp16: Optional[dict] = None
    """DeepSpeed fp16 block (loss scaling); "enabled": true selects fp16."""
    bf16: Optional[dict] = None
    """DeepSpeed bf16 block; "enabled": true selects bfloat16."""
    zero_optimization: Optional[dict] = None
    """DeepSpeed ZeRO block. Stage 0, 1 or 2 (1 and 2 shard Sophia's hessian); ZeRO-1/2's
    communication switches and CPU offload of the optimizer state (offload_optimizer.device
    "cpu") pass through, other entries are refused (config/engine_options.py)."""
    gradient_clipping: float = 1.0
    """Global gradient-norm clip (also applied to the Hessian pass's sampled-label gradient)."""
    steps_per_print: int = 10
    """DeepSpeed's own progress print interval."""
    wall_clock_breakdown: bool = False
    """DeepSpeed timers for forward/backward/step."""
    deepspeed_extra_args: Optional[dict] = None
    """Further DeepSpeed config entries: monitors and profilers (comms_logger, flops_profiler...)
    only; entries that change what is trained are refused (config/engine_options.py)."""

    @property
    def resolved_precision(self) -> str:
        selected = [name for name, block in (("fp16", self.fp16), ("bfloat16", self.bf16))
                    if block and block.get("enabled", False)]
        if len(selected) > 1:
            raise ConfigError("fp16: both the fp16 and the bf16 block are enabled; enable one")
        if self.precision is not None:
            precision = PRECISIONS.get(self.precision.lower())
            check(precision is not None, "precision",
                  f"'{self.precision}' is not one of fp32, fp16, bfloat16")
            check(not selected or selected[0] == precision, "precision",
                  f"'{self.precision}' conflicts with the enabled {selected[0] if selected else ''} block")
            return precision
        return selected[0] if selected else "fp32"

    @property
    def zero_stage(self) -> int:
        return int((self.zero_optimization or {}).get("stage", 0))

    def validate(self, pipeline: bool) -> None:
        self.resolved_precision  # noqa: B018 (the property raises on conflicts)
        check(self.zero_stage in (0, 1, 2), "zero_optimization",
              f"stage {self.zero_stage} is not supported; use 0, 1 or 2 (ZeRO-1/2 shard Sophia's "
              f"hessian with the rest of the optimizer state)")
        check(not (pipeline and self.zero_stage >= 2), "zero_optimization",
              "stage 2 cannot be combined with pipe_parallel_size >= 1 (DeepSpeed's PipelineEngine "
              "supports ZeRO stage 0 and 1); use stage 1 or pipe_parallel_size 0")
        check(self.gradient_clipping >= 0, "gradient_clipping", f"must be >= 0 (got {self.gradient_clipping})")
        from neox_sophia.config.engine_options import check_extra_args, check_zero_block

        check_zero_block(self.zero_optimization, self.zero_stage)
        check_extra_args(self.deepspeed_extra_args)


@dataclass
class OptimizerConfig:
    optimizer: Optional[dict] = None
    """{"type": "sophia" | "adamw" | "adam", "params": {...}}; params are typed per type
    (neox_sophia.optim.factory: SophiaParams, AdamWParams). Unset: NeoX's default (Adam, lr 1e-3)."""
    weight_decay: float = 0.1
    """Decoupled weight decay for weights (biases and norms get none)."""
    embedding_weight_decay: bool = True
    """(neox-sophia) Whether the input embedding is weight-decayed: true as GPT-NeoX does; false as
    the official Sophia/GPT-2 code does (it exempts embeddings). Not a GPT-NeoX key."""

    @property
    def type(self) -> str:
        return self.parsed[0]

    @property
    def params(self):
        """The typed params of the optimizer type (SophiaParams / AdamWParams), read by attribute."""
        return self.parsed[1]

    @property
    def parsed(self) -> Tuple[str, object]:
        cached = self.__dict__.get("_parsed")
        if cached is None or cached[0] is not self.optimizer:
            from neox_sophia.optim.factory import parse_optimizer_block

            cached = (self.optimizer, parse_optimizer_block(self.optimizer))
            self.__dict__["_parsed"] = cached
        return cached[1]

    def validate(self) -> None:
        self.parsed  # noqa: B018 (the property parses the block and raises on bad input)
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0 (got {self.weight_decay})")


@dataclass
class TrainingConfig:
    train_iters: Optional[int] = None
    """Optimizer steps to train."""
    seed: int = 1234
    """Seeds weights, data order and sampled labels (the same at any parallel layout)."""
    lr_decay_style: str = "linear"
    """constant, linear, cosine or exponential (NeoX's AnnealingLR formulas)."""
    lr_decay_iters: Optional[int] = None
    """Steps over which the LR decays; default lr_decay_fraction x train_iters, else train_iters."""
    lr_decay_fraction: Optional[float] = None
    """lr_decay_iters as a fraction of train_iters."""
    warmup: float = 0.01
    """Linear warmup length as a fraction of the decay steps (NeoX semantics)."""
    min_lr: float = 0.0
    """LR floor."""
    max_nonfinite_steps: int = 10
    """(neox-sophia) Stop after this many steps in a row whose loss was not finite (each such
    step is skipped: no update). Not a GPT-NeoX key."""

    def validate(self) -> None:
        from neox_sophia.optim.schedules import DECAY_STYLES

        check(self.train_iters is None or self.train_iters > 0, "train_iters",
              f"must be positive (got {self.train_iters})")
        check(self.lr_decay_style in DECAY_STYLES, "lr_decay_style",
              f"'{self.lr_decay_style}' is not one of {sorted(DECAY_STYLES)}")
        check(0.0 <= self.warmup <= 1.0, "warmup", f"is a fraction of the decay steps in [0, 1] (got {self.warmup})")
        check(self.min_lr >= 0, "min_lr", f"must be >= 0 (got {self.min_lr})")
        check(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", f"must be >= 1 (got {self.max_nonfinite_steps})")
        check(self.lr_decay_fraction is None or 0 < self.lr_decay_fraction <= 1, "lr_decay_fraction",
              f"must be in (0, 1] (got {self.lr_decay_fraction})")

    @property
    def decay_iters(self) -> Optional[int]:
        if self.lr_decay_iters is not None:
            return max(1, self.lr_decay_iters)
        if self.train_iters is None:
            return None
        if self.lr_decay_fraction is not None:
            return max(1, int(self.train_iters * self.lr_decay_fraction))
        return self.train_iters


@dataclass
class DataConfig:
    data_path: Optional[str] = None
    """Prefix of one preprocessed dataset (.bin/.idx), split by `split`."""
    train_data_paths: Optional[List[str]] = None
    """Separate train/valid/test prefixes (all three, and then no data_path)."""
    valid_data_paths: Optional[List[str]] = None
    test_data_paths: Optional[List[str]] = None
    train_data_weights: Optional[List[float]] = None
    """Mixing weights, one per path (default 1 each)."""
    valid_data_weights: Optional[List[float]] = None
    test_data_weights: Optional[List[float]] = None
    split: str = "969, 30, 1"
    """Train/valid/test proportions of data_path's documents."""
    tokenizer_type: str = "GPT2BPETokenizer"
    """Any of NeoX's: HFTokenizer, GPT2BPETokenizer, SPMTokenizer, HFGPT2Tokenizer,
    TiktokenTokenizer, CharLevelTokenizer (see neox_sophia.data.tokenizers)."""
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    data_impl: str = "infer"
    """Only memory-mapped indexed datasets exist here: "infer" and "mmap" mean that."""
    num_workers: int = 2
    """DataLoader worker processes."""

    def validate(self) -> None:
        from neox_sophia.data.tokenizers import TOKENIZERS

        known = {key: cls.name for key, cls in TOKENIZERS.items()}
        check(self.tokenizer_type.lower() in known, "tokenizer_type",
              f"'{self.tokenizer_type}' is not one of {sorted(known.values())}")
        files = TOKENIZERS[self.tokenizer_type.lower()].file_keys
        given = [key for key in files if getattr(self, key) is not None]
        for key in files if given else ():  # one file without the other: name the missing one
            if key not in given:  # located at the file that set the other one
                raise ConfigError(f"{key}: not set; {known[self.tokenizer_type.lower()]} needs both "
                                  f"{' and '.join(files)} (GPT-2's vocab.json and merges.txt)", given[0])
        check(self.data_impl in ("infer", "mmap"), "data_impl",
              f"'{self.data_impl}' is not supported; use \"mmap\" (indexed .bin/.idx datasets)")
        split = [part.strip() for part in self.split.split(",")]
        ok = len(split) <= 3 and all(p.replace(".", "", 1).isdigit() for p in split) and sum(map(float, split)) > 0
        check(ok, "split", f"'{self.split}' is not like \"969, 30, 1\"")
        sets = [getattr(self, f"{s}_data_paths") is not None for s in ("train", "valid", "test")]
        check(all(sets) or not any(sets), "train_data_paths",
              "set train_data_paths, valid_data_paths and test_data_paths together")
        check(not (all(sets) and self.data_path), "data_path",
              "set either data_path or train/valid/test_data_paths, not both")
        for s in ("train", "valid", "test"):
            paths, weights = getattr(self, f"{s}_data_paths"), getattr(self, f"{s}_data_weights")
            check(weights is None or (paths is not None and len(weights) == len(paths)), f"{s}_data_weights",
                  f"needs one weight per entry of {s}_data_paths")
        check(self.num_workers >= 0, "num_workers", f"must be >= 0 (got {self.num_workers})")


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    """Directory to save checkpoints to."""
    load: Optional[str] = None
    """Directory to resume from (the latest complete checkpoint in it)."""
    checkpoint_factor: Optional[int] = None
    """Save every this many steps."""
    extra_save_iters: Optional[List[int]] = None
    """Additional steps to save at."""
    keep_last_n_checkpoints: Optional[int] = None
    """Delete older checkpoints beyond this many. The newest checkpoint whose next step had a finite
    loss is kept besides (the one to go back to after a divergence; usually the one before the
    newest), so the save folder needs room for one more."""
    finetune: bool = False
    """NeoX: load only the weights of `load` and start at step 0 with a fresh optimizer and LR
    schedule (e.g. from a NeoX, Pythia or Hugging Face-converted checkpoint)."""
    no_load_optim: bool = False
    """NeoX: load only the weights of `load`; the step (and the data position) continue from the
    checkpoint's, the optimizer state and the LR schedule start fresh. How a run trained with AdamW
    continues with Sophia (or the other way round)."""
    override_lr_scheduler: bool = False
    """NeoX: on resume take the LR schedule's settings (lr, warmup, decay, min_lr) from the config
    and only its step count from the checkpoint. That is what resuming always does here (a
    checkpoint stores only the step count), so true and false behave alike; with false NeoX also
    asserts that the settings did not change, which is not checked here."""

    def validate(self) -> None:
        check(self.save is None or self.checkpoint_factor is not None or self.extra_save_iters is not None,
              "save", "is set but neither checkpoint_factor nor extra_save_iters says when to save")
        check(self.checkpoint_factor is None or self.checkpoint_factor > 0, "checkpoint_factor",
              f"must be positive (got {self.checkpoint_factor})")
        check(self.keep_last_n_checkpoints is None or self.keep_last_n_checkpoints > 0,
              "keep_last_n_checkpoints", f"must be positive (got {self.keep_last_n_checkpoints})")


@dataclass
class LoggingConfig:
    log_dir: Optional[str] = None
    """Directory for the run's logs: rank 0's metrics.jsonl, one rank_NNNNN.log per rank (its
    lifecycle, warnings and error), and failed_rank_NNNNN markers of ranks that failed."""
    tensorboard_dir: Optional[str] = None
    """TensorBoard event files (when tensorboard is installed)."""
    log_interval: int = 100
    """Steps between metric lines (loss, lr, clip fraction, throughput)."""
    eval_interval: int = 1000
    """Steps between validation passes."""
    eval_iters: int = 100
    """Batches per validation pass, each of train_batch_size sequences (NeoX's count: an eval
    iteration is gradient_accumulation_steps micro-batches on every data-parallel rank)."""
    use_wandb: Optional[bool] = None
    """Log the metrics to Weights & Biases from rank 0. Needs `pip install wandb`; without it the
    run says so in one line and goes on. Unset means off (NeoX turns it on when it finds a wandb
    API key; here it is asked for)."""
    wandb_project: str = "neox"
    """wandb project."""
    wandb_group: Optional[str] = None
    """wandb group (e.g. one name for the runs of a sweep)."""
    wandb_run_name: Optional[str] = None
    """wandb run name (wandb picks one when unset)."""
    wandb_team: Optional[str] = None
    """wandb entity (team or user) that owns the project."""
    wandb_host: str = "https://api.wandb.ai"
    """wandb server, for a self-hosted one (sets WANDB_BASE_URL)."""

    def validate(self) -> None:
        for key in ("log_interval", "eval_interval"):
            check(getattr(self, key) > 0, key, f"must be positive (got {getattr(self, key)})")
        check(self.eval_iters >= 0, "eval_iters", f"must be >= 0 (got {self.eval_iters})")


# The launchers DeepSpeed's runner knows (deepspeed.launcher.runner.LAUNCHER_CLASSES; a test keeps
# the two equal). Only a run across hosts uses one; a single host is always started locally.
LAUNCHERS = ("pdsh", "openmpi", "mpich", "impi", "mvapich", "slurm")


@dataclass
class LaunchConfig:
    """What `neox-sophia launch` hands DeepSpeed's runner; its command-line flags win over these."""

    hostfile: Optional[str] = None
    """DeepSpeed hostfile: one "host slots=N" line per node, # comments (launch/hostfile.example)."""
    include: Optional[str] = None
    """DeepSpeed --include: "host1@host2:0,2" uses all of host1 and slots 0 and 2 of host2."""
    exclude: Optional[str] = None
    """DeepSpeed --exclude, same syntax; not together with include, num_nodes or num_gpus."""
    num_nodes: int = -1
    """Use the first N hosts of the hostfile (-1: all)."""
    num_gpus: Optional[int] = None
    """Processes (GPUs) per host, the first N slots of each (default: all its slots)."""
    master_port: int = 29500
    """TCP port of rank 0's rendezvous."""
    master_addr: Optional[str] = None
    """Address of rank 0's host (default: DeepSpeed asks the first host over ssh)."""
    launcher: str = "pdsh"
    """How the runner reaches the other hosts: pdsh, openmpi, mpich, impi, mvapich or slurm."""
    force_multi: bool = False
    """Use the multi-node launcher even for a single host."""
    no_ssh_check: bool = False
    """Skip the runner's passwordless-ssh probe of the first host."""
    deepspeed_mpi: bool = False
    """Discover ranks from MPI (mpirun) instead of the launcher's environment."""
    deepspeed_slurm: bool = False
    """Discover ranks from SLURM's environment (srun)."""
    global_num_gpus: Optional[int] = None
    """World size for planning, when no hostfile or GPUs say it."""
    distributed_backend: str = "nccl"
    """torch.distributed backend on GPUs (CPU runs use gloo)."""

    def validate(self) -> None:
        check(self.launcher in LAUNCHERS, "launcher", f"'{self.launcher}' is not one of {list(LAUNCHERS)}")
        check(self.num_nodes == -1 or self.num_nodes > 0, "num_nodes",
              f"must be positive, or -1 for every host (got {self.num_nodes})")
        check(self.num_gpus is None or self.num_gpus > 0, "num_gpus", f"must be positive (got {self.num_gpus})")
        check(0 < self.master_port < 65536, "master_port", f"must be a TCP port (got {self.master_port})")
        check(self.distributed_backend in ("nccl", "gloo", "mpi"), "distributed_backend",
              f"'{self.distributed_backend}' is not one of nccl, gloo, mpi")
        check(self.global_num_gpus is None or self.global_num_gpus > 0, "global_num_gpus",
              f"must be positive (got {self.global_num_gpus})")

"""Which DeepSpeed options a config may pass through `zero_optimization` and
`deepspeed_extra_args`, checked at load so that `plan` and `train` refuse the same ones.

ZeRO stage 1 and 2 hand Sophia (a client optimizer) flat fp32 partitions and call its step();
every option below that only changes how those partitions are communicated or where they live
keeps that contract. CPU offload of the optimizer state (offload_optimizer.device "cpu", or
NeoX's older `cpu_offload: true`) keeps it too: DeepSpeed then holds the fp32 partitions, their
gradients and the optimizer state in CPU memory and calls the same step() there, the training
loop's Hessian step included. DeepSpeed refuses a client optimizer under offload unless
`zero_force_ds_cpu_optimizer` is false (it expects its own CPU Adam); the DeepSpeed config
built here sets that. Everything else (ZeRO-3's options, NVMe, partial or "super" offload,
elastic checkpoints, switching off the gradient norm) is refused in one line.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from neox_sophia.config.base import ConfigError, check

# ZeRO-1/2 communication and memory-layout switches: numerically neutral for an elementwise optimizer
ZERO_PASS_THROUGH = ("stage", "allgather_partitions", "allgather_bucket_size", "overlap_comm", "reduce_scatter",
                     "reduce_bucket_size", "contiguous_gradients", "round_robin_gradients",
                     "use_multi_rank_bucket_allreduce", "ignore_unused_parameters", "cpu_offload",
                     "cpu_offload_use_pin_memory", "offload_optimizer")
# key -> (the value that is fine, why another is refused)
ZERO_ONLY_DEFAULT = {
    "compute_grad_norm": (True, "gradient clipping (of training and Hessian-pass gradients) needs the norm"),
    "load_from_fp32_weights": (True, "a resume must restore the fp32 master weights exactly"),
    "elastic_checkpoint": (False, "the checkpoint tools read DeepSpeed's default ZeRO-1/2 layout"),
    "cpu_offload_param": (False, "parameter offload is ZeRO-3 only"),
    "legacy_stage1": (False, "DeepSpeed itself no longer has it"),
}
OFFLOAD_KEYS = ("device", "pin_memory", "buffer_count", "fast_init")
OFFLOAD_DEVICES = ("cpu", "none")

# deepspeed_extra_args entries that only observe (monitors, profilers, timers)
EXTRA_PASS_THROUGH = ("comms_logger", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet",
                      "memory_breakdown", "dump_state", "timers")
# deepspeed_extra_args entries a config key already sets: where to set them instead
EXTRA_AS_CONFIG_KEY = {
    "fp16": "precision or a top-level fp16 block", "bf16": "precision: bfloat16 or a top-level bf16 block",
    "amp": "precision", "zero_optimization": "the top-level zero_optimization block",
    "optimizer": "the top-level optimizer block", "scheduler": "lr_decay_style, warmup and min_lr",
    "gradient_clipping": "gradient_clipping", "train_batch_size": "train_batch_size",
    "train_micro_batch_size_per_gpu": "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps": "gradient_accumulation_steps", "steps_per_print": "steps_per_print",
    "wall_clock_breakdown": "wall_clock_breakdown",
}


def check_zero_block(zero: Optional[dict], stage: int) -> None:
    """Refuse (ConfigError, one line) every zero_optimization entry that does not work with Sophia."""
    zero = zero or {}
    for key, value in zero.items():
        if key in ZERO_ONLY_DEFAULT:
            fine, why = ZERO_ONLY_DEFAULT[key]
            check(value == fine, "zero_optimization", f"{key}: {value!r} is not supported ({why}); remove it")
        else:
            check(key in ZERO_PASS_THROUGH, "zero_optimization",
                  f"'{key}' is not supported with Sophia here (ZeRO-3, NVMe and other engine options are "
                  f"refused); remove it. Supported: {', '.join(ZERO_PASS_THROUGH)}")
    offload = offload_device(zero)
    check(offload == "none" or stage in (1, 2), "zero_optimization",
          f"offload_optimizer: device '{offload}' needs stage 1 or 2 (the optimizer state is ZeRO's to move)")


def offload_device(zero: Optional[dict]) -> str:
    """Where the optimizer state lives: "cpu" or "none" (raises on anything else)."""
    zero = zero or {}
    block, legacy = zero.get("offload_optimizer"), zero.get("cpu_offload")
    check(legacy in (None, False, True), "zero_optimization", f"cpu_offload: expected true or false, got {legacy!r}")
    if block is None:
        return "cpu" if legacy else "none"
    check(not legacy, "zero_optimization", "cpu_offload: true and offload_optimizer both set; keep offload_optimizer")
    check(isinstance(block, dict), "zero_optimization", f"offload_optimizer: expected a mapping, got {block!r}")
    unknown = sorted(set(block) - set(OFFLOAD_KEYS))
    check(not unknown, "zero_optimization", f"offload_optimizer: {unknown} not supported (partial, NVMe and "
                                            f"super offload are refused); keep {', '.join(OFFLOAD_KEYS)}")
    device = str(block.get("device", "none")).lower()
    check(device in OFFLOAD_DEVICES, "zero_optimization",
          f"offload_optimizer: device '{device}' is not supported (NVMe offload is ZeRO-3 only); use cpu or none")
    return device


def deepspeed_zero_block(zero: Optional[dict], stage: int) -> Dict[str, Any]:
    """The zero_optimization block DeepSpeed gets: NeoX's `cpu_offload` spelled the current way."""
    block = {k: v for k, v in (zero or {}).items() if k not in ("cpu_offload", "cpu_offload_use_pin_memory")}
    device = offload_device(zero)
    if device == "cpu":
        pin = (zero or {}).get("cpu_offload_use_pin_memory")
        block["offload_optimizer"] = {**(block.get("offload_optimizer") or {}), "device": "cpu",
                                      **({"pin_memory": pin} if pin is not None else {})}
    else:
        block.pop("offload_optimizer", None)
    return {**block, "stage": stage}


def check_extra_args(extra: Optional[dict]) -> None:
    """Refuse (one line) every deepspeed_extra_args entry other than monitors, profilers and fp32
    gradient communication (more precise than the training precision, never less)."""
    for key, value in (extra or {}).items():
        if key == "communication_data_type":
            check(value == "fp32", "deepspeed_extra_args", f"communication_data_type: only \"fp32\" passes "
                                                           f"(got {value!r}; lower precision is refused)")
        elif key in EXTRA_AS_CONFIG_KEY:
            raise ConfigError(f"deepspeed_extra_args: '{key}' bypasses the config's own checks; set "
                              f"{EXTRA_AS_CONFIG_KEY[key]} instead", "deepspeed_extra_args")
        else:
            check(key in EXTRA_PASS_THROUGH, "deepspeed_extra_args",
                  f"'{key}' is not supported (only monitors, profilers and communication_data_type \"fp32\" "
                  f"pass through: {', '.join(EXTRA_PASS_THROUGH)}); remove it")

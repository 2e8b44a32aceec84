"""What `train` refuses before it builds anything, in one place, so that `plan` refuses the same.

    refuse_untrainable(cfg, world_size)   # ConfigError, one line: a setting train cannot run
    missing_for_training(cfg)             # lines: what train needs that is not there (yet)

The first are contradictions inside the config (a precision the engine mishandles, a batch the
world size cannot split; an estimator without a step for the engine is refused at config load);
`plan` refuses them too. The second depend on the machine or on files still to come (data, tokenizer files, train_iters in
another file), so `plan` only warns about them.
"""
from __future__ import annotations

import os
from typing import List

from neox_sophia.config.base import ConfigError


def refuse_untrainable(cfg, world_size: int) -> None:
    """Raise ConfigError for a config `train` would refuse at ``world_size`` ranks."""
    if cfg.engine.resolved_precision == "fp16" and cfg.engine.zero_stage == 0:
        # DeepSpeed 0.19's engine.backward() applies the loss scale only for ZeRO optimizers, but
        # its non-ZeRO fp16 optimizers divide the gradients by it all the same (deepspeedai/
        # DeepSpeed PR #8393, open): every gradient would reach Sophia loss_scale times too small
        # (measured: 65536x), which Sophia, unlike Adam, is not invariant to.
        raise cfg._error(ConfigError("zero_optimization: fp16 needs ZeRO stage 1 or 2 with this DeepSpeed: at stage 0 "
                          "it never applies the loss scale but still divides the gradients by it "
                          "(deepspeedai/DeepSpeed PR #8393); set zero_optimization.stage to 1 (it works "
                          "with pipe parallelism too), or use bf16", "zero_optimization"))
    cfg.layout(world_size)
    if cfg.hessian_interval is not None:
        cfg.hessian_batch(world_size)
    cfg.deepspeed_config(world_size)


def missing_for_training(cfg) -> List[str]:
    """What `train` needs and does not find here: train_iters, the data, the tokenizer files."""
    missing = []
    if cfg.training.train_iters is None:
        missing.append("train_iters: not set; say how many optimizer steps to train")
    data = cfg.data
    prefixes = [data.data_path] if data.data_path else [*(data.train_data_paths or []),
                                                      *(data.valid_data_paths or []), *(data.test_data_paths or [])]
    if not prefixes:
        missing.append("data_path: no training data configured; set data_path (or train_data_paths)")
    for prefix in dict.fromkeys(prefixes):
        if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
            missing.append(f"data_path: {prefix}.bin/.idx not found here")
    from neox_sophia.data.tokenizers import tokenizer_class

    tokenizer = tokenizer_class(data.tokenizer_type)
    for key in tokenizer.file_keys if tokenizer.local_files else ():
        path = getattr(data, key)
        if path is None:
            missing.append(f"{key}: {data.tokenizer_type} needs it; not set")
        elif not os.path.exists(path):
            missing.append(f"{key}: {path} not found here")
    return missing

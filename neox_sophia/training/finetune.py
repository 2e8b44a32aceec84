"""GPT-NeoX's `finetune` and `no_load_optim`: the weights of `load`, a fresh optimizer.

    finetune: true        weights only; step 0, the LR schedule from its start, data from the first
                          sample (NeoX: iteration 0; optimizer, LR scheduler and RNG not loaded)
    no_load_optim: true   weights only; the step, and with it the data position and the end at
                          train_iters, continue from the checkpoint's; the optimizer state and the
                          LR schedule start fresh (NeoX loads neither)

`load` may be a `save` directory of ours saved at any layout (its fp32 weights are read offline,
so the new run's TP x PP x DP x ZeRO layout is free), a universal checkpoint, or a checkpoint
GPT-NeoX wrote (convert/neox.py), whose optimizer state is NeoX's and so loads only this way.
The vocabulary rows follow the new run's padding: padding rows past the tokenizer's vocabulary
are cut or zero-filled. RNG states are not restored (they drive dropout only).
"""
from __future__ import annotations

import os
from typing import Dict

from neox_sophia.training.checkpoint import CheckpointError, complete_tags


def weights_only(cfg) -> bool:
    """Whether `load` gives weights only (``cfg``: the CheckpointConfig)."""
    return bool(cfg.finetune or cfg.no_load_optim)


def refuse_overwrite(cfg) -> None:
    """finetune restarts the step count at 0: a `save` that already holds later checkpoints of a
    run would have them replaced as the new run reaches their steps."""
    saved = [step for step, _ in complete_tags(cfg.save)] if cfg.save else []
    if cfg.finetune and saved:
        raise CheckpointError(f"finetune: true starts again at step 0, but save: {cfg.save} already holds checkpoints "
                              f"up to step {max(saved)} that this run would replace; to resume that run set load: "
                              f"{cfg.save} and finetune: false, to start over use a new save directory")


def read_weights(path: str, run) -> tuple:
    """(our full weights at the run's padded vocabulary, the checkpoint's step, where they came from)."""
    from neox_sophia.convert.neox import fit_vocab, is_neox_checkpoint, read_neox
    from neox_sophia.convert.universal import read_any

    if is_neox_checkpoint(path):
        weights, step, where = read_neox(path, run.cfg.model)
    else:
        checkpoint = read_any(path, optimizer_state=False)
        weights, step, where = checkpoint.weights, checkpoint.client_state.get("step", checkpoint.step), path
    rows = weights["embed_in.weight"].shape[0]
    if rows < run.vocab_size:
        raise CheckpointError(f"load: {where} has {rows} vocabulary rows, fewer than this run's tokenizer's "
                              f"{run.vocab_size}; it was trained with another tokenizer")
    return fit_vocab(weights, run.cfg.padded_vocab_size(run.vocab_size)), int(step), where


def load_weights_only(run, path: str) -> Dict[str, object]:
    """Load the weights of ``path`` into ``run``'s engine with fresh optimizer state; returns the
    client state to start from ({"step": ...}: 0 under finetune, else the checkpoint's)."""
    from neox_sophia.convert.reader import FullCheckpoint
    from neox_sophia.training.reshard import load_universal_into

    cfg = run.cfg.checkpoint
    refuse_overwrite(cfg)
    weights, step, where = read_weights(path, run)
    fresh = FullCheckpoint(config={}, step=0, tag="", layout={}, weights=weights, optimizer={},
                           client_state={"step": 0})
    load_universal_into(run.engine, run.optimizer, fresh, where)
    return {"step": 0 if cfg.finetune else step, "where": f"{where} (weights only: "
                                                           f"{'finetune' if cfg.finetune else 'no_load_optim'})"}


def neox_needs_weights_only(path: str) -> str:
    """The one-line refusal for a NeoX checkpoint in `load` without finetune / no_load_optim."""
    return (f"load: {os.path.abspath(path)} is a GPT-NeoX checkpoint; its optimizer state is NeoX's and cannot be "
            f"continued here: set finetune: true (start at step 0) or no_load_optim: true (continue at its step with "
            f"a fresh optimizer)")

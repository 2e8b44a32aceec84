"""`neox-sophia plan`: what a config costs per GPU, before asking a cluster for it.

The model is built on the meta device (no memory, no init), so the parameter count is counted
from the real modules. Per-rank memory follows from the layout:

- TP shards every tensor-parallel weight (replicated norms and row-parallel biases are not).
- PP gives each stage its blocks, split exactly as DeepSpeed's PipelineModule will split them
  (its own partition functions, on the same per-block weights).
- ZeRO-1 shards the fp32 master weights and optimizer state (exp_avg and hessian for Sophia,
  exp_avg and exp_avg_sq for AdamW) over DP; ZeRO-2 also the gradients.

Activations use Korthikanti et al. (2022, "Reducing Activation Recomputation in Large
Transformer Models"): per layer s*b*h*(10 + 24/t + 5*a*s/(h*t)) bytes in 16-bit without
recomputation, 2*s*b*h with full activation checkpointing (plus one layer recomputed at a time).
The 5as/(ht) attention-score term is what a fused (flash / SDPA) kernel avoids; it is kept, so
the estimate is an upper bound there. The first pipeline stage holds up to pp micro-batches in
flight (1F1B). The fp32 logits of the last stage are added (b*s*V/t*4 bytes, twice for the loss).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from neox_sophia.config.model import ModelConfig, ParallelConfig

GIB = 2 ** 30

# Vocab sizes of the tokenizers NeoX configs name, for planning without the file at hand:
# GPT-2's BPE (50257) and the GPT-NeoX-20B tokenizer.json used for the Pile (50277).
KNOWN_VOCAB_SIZES = {"gpt2bpetokenizer": 50257, "hftokenizer": 50277}


@dataclass
class BlockCount:
    name: str
    params: int          # full size
    params_per_tp_rank: int


def count_blocks(cfg: ModelConfig, padded_vocab_size: int, tp_size: int) -> List[BlockCount]:
    """Parameter counts of [embedding, layers..., final norm, output] built on the meta device."""
    from neox_sophia.model.gpt_neox import build_blocks
    from neox_sophia.parallel.topology import initialize_model_parallel

    initialize_model_parallel(1, 1)  # build at TP=1 and divide: one process can plan any layout
    with torch.device("meta"):
        blocks = build_blocks(cfg, padded_vocab_size, tp_size=1)
    counts = []
    for block in blocks:
        full = sum(p.numel() for p in block.parameters())
        sharded = sum(p.numel() // tp_size if getattr(p, "tensor_model_parallel", False) else p.numel()
                      for p in block.parameters())
        counts.append(BlockCount(type(block).__name__, full, sharded))
    if not cfg.no_weight_tying:  # the last stage holds a second copy of the tied embedding
        counts.append(BlockCount("TiedOutput", 0, counts[0].params_per_tp_rank))
    return counts


def model_flops_per_token(cfg: ModelConfig, padded_vocab_size: int) -> int:
    """Training FLOPs per token (forward + backward, no recomputation), the PaLM / Megatron MFU
    convention: 6 per weight that multiplies an activation (per layer the query and output
    projections, 2h^2, the key and value projections, 2 h kv_heads head_dim, and the MLP, 2 h ffn,
    or 3 h ffn when gated; the output layer, V h, tied or not; the input embedding is a lookup)
    plus 12 x layers x hidden x seq for the attention scores and their use (a sliding window's
    savings are not counted). Sophia's Hessian steps are extra work, not counted: MFU counts useful
    training FLOPs."""
    h, layers = cfg.hidden_size, cfg.num_layers
    attention = 2 * h * h + 2 * h * cfg.kv_heads * cfg.head_dim
    mlp = (3 if cfg.gated else 2) * h * cfg.ffn_hidden_size
    matmul = layers * (attention + mlp) + padded_vocab_size * h
    return 6 * matmul + 12 * layers * h * cfg.seq_length


def stage_parts(blocks: List[BlockCount], parallel: ParallelConfig) -> List[int]:
    """Block boundaries per pipeline stage, computed with DeepSpeed's own partitioner."""
    from deepspeed.runtime import utils as ds_utils
    import re

    stages = parallel.pipeline_stages
    method = parallel.pipe_partition_method
    if stages == 1:
        return [0, len(blocks)]
    if method == "uniform":
        return ds_utils.partition_uniform(num_items=len(blocks), num_parts=stages)
    if method == "parameters":
        return ds_utils.partition_balanced(weights=[b.params_per_tp_rank for b in blocks], num_parts=stages)
    if method.startswith("type:"):
        pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)
        names = [("TransformerLayer" if b.name == "TransformerLayer" else b.name) for b in blocks]
        weights = [1 if pattern.search(n) else 0 for n in names]
        return ds_utils.partition_balanced(weights=weights, num_parts=stages)
    raise ValueError(f"pipe_partition_method: '{method}' is not one of uniform, parameters, type:REGEX")


def plan(cfg: ModelConfig, parallel: ParallelConfig, padded_vocab_size: int, *, world_size: int,
         micro_batch: int, zero_stage: int, precision: str, optimizer: str,
         gpu_memory_gib: float | None = None) -> Dict:
    """The plan as one JSON-ready dict (bytes in GiB, for the busiest rank)."""
    tp, pp = parallel.model_parallel_size, parallel.pipeline_stages
    dp = parallel.data_parallel_size(world_size)
    blocks = count_blocks(cfg, padded_vocab_size, tp)
    parts = stage_parts(blocks, parallel)
    per_stage = [sum(b.params_per_tp_rank for b in blocks[parts[i]:parts[i + 1]]) for i in range(pp)]
    params_rank = max(per_stage)
    half = precision in ("fp16", "bfloat16", "bf16")
    weight_bytes = 2 if half else 4
    optimizer_words = 2  # exp_avg + hessian (Sophia) or exp_avg + exp_avg_sq (AdamW)
    shard = dp if zero_stage >= 1 else 1
    memory = {
        "weights": params_rank * weight_bytes,
        "gradients": params_rank * weight_bytes / (dp if zero_stage >= 2 else 1),
        "master_weights": params_rank * 4 / shard if half else 0,
        "exp_avg": params_rank * 4 / shard,
        "hessian" if optimizer == "sophia" else "exp_avg_sq": params_rank * 4 * (optimizer_words - 1) / shard,
    }
    act = activation_bytes(cfg, tp, pp, micro_batch, padded_vocab_size)
    state_total = sum(memory.values())
    result = {
        "parameters": sum(b.params for b in blocks),
        "padded_vocab_size": padded_vocab_size,
        "layout": {"world_size": world_size, "tp": tp, "pp": pp, "dp": dp, "zero_stage": zero_stage,
                   "precision": precision, "optimizer": optimizer, "micro_batch": micro_batch},
        "parameters_per_rank": params_rank,
        "parameters_per_stage": per_stage,
        "memory_gib": {k: v / GIB for k, v in memory.items()},
        "optimizer_state_gib_per_rank": (memory["exp_avg"] + memory.get("hessian", memory.get("exp_avg_sq", 0))) / GIB,
        "activations_gib": {k: v / GIB for k, v in act.items()},
        "total_gib": {"without_checkpointing": (state_total + act["without_checkpointing"]) / GIB,
                      "with_checkpointing": (state_total + act["with_checkpointing"]) / GIB},
    }
    if gpu_memory_gib is not None:
        key = "with_checkpointing" if cfg.checkpoint_activations else "without_checkpointing"
        result["gpu_memory_gib"] = gpu_memory_gib
        result["fits"] = result["total_gib"][key] <= gpu_memory_gib
    return result


def checkpoint_bytes(parameters: int, precision: str, zero_stage: int) -> int:
    """Bytes of one checkpoint of a model of ``parameters``, all ranks' files together: the weights
    at their precision, two fp32 optimizer words per parameter (exp_avg and hessian, or exp_avg and
    exp_avg_sq) and, under ZeRO or a 16-bit precision, the fp32 master weights."""
    half = precision in ("fp16", "bfloat16", "bf16")
    return parameters * ((2 if half else 4) + 8 + (4 if half or zero_stage >= 1 else 0))


def tokenizer_vocab_size(cfg) -> tuple:
    """(vocab size, where it came from): the tokenizer file when it exists, else the known size
    of the tokenizer type (GPT-2 BPE, the 20B tokenizer)."""
    import os

    from neox_sophia.data.tokenizers import build_tokenizer

    data = cfg.data
    if data.vocab_file and os.path.isfile(data.vocab_file):
        tok = build_tokenizer(data.tokenizer_type, data.vocab_file, data.merge_file)
        return tok.vocab_size, data.vocab_file
    known = KNOWN_VOCAB_SIZES.get(data.tokenizer_type.lower())
    if known is None:
        raise ValueError(f"vocab_file: {data.vocab_file!r} is not readable and {data.tokenizer_type} has no "
                         f"known vocab size; pass --vocab-size")
    why = f"{data.vocab_file} not found" if data.vocab_file else "no vocab_file set"
    return known, f"known size of {data.tokenizer_type}; {why}"


def plan_config(cfg, *, world_size: int | None = None, gpu_memory_gib: float | None = None,
                vocab_size: int | None = None) -> Dict:
    """plan() for a loaded NeoXConfig."""
    source = "--vocab-size"
    if vocab_size is None:
        vocab_size, source = tokenizer_vocab_size(cfg)
    lay = cfg.layout(world_size)
    result = plan(cfg.model, cfg.parallel, cfg.padded_vocab_size(vocab_size), world_size=lay.world_size,
                  micro_batch=lay.micro_batch_size, zero_stage=cfg.engine.zero_stage,
                  precision=cfg.engine.resolved_precision, optimizer=cfg.optimizer.type,
                  gpu_memory_gib=gpu_memory_gib)
    result["vocab_size"] = vocab_size
    result["vocab_source"] = source
    result["layout"].update(train_batch_size=lay.train_batch_size,
                            gradient_accumulation_steps=lay.gradient_accumulation_steps)
    result["checkpoint_gib"] = checkpoint_bytes(result["parameters"], cfg.engine.resolved_precision,
                                                cfg.engine.zero_stage) / GIB
    return result


def activation_bytes(cfg: ModelConfig, tp: int, pp: int, micro_batch: int, vocab: int) -> Dict[str, float]:
    s, b, h, a = cfg.seq_length, micro_batch, cfg.hidden_size, cfg.num_attention_heads
    layers_per_stage = -(-cfg.num_layers // pp)
    in_flight = pp  # 1F1B: the first stage holds up to pp micro-batches
    per_layer = s * b * h * (10 + 24 / tp + 5 * a * s / (h * tp))
    logits = 2 * s * b * vocab / tp * 4
    return {
        "without_checkpointing": per_layer * layers_per_stage * in_flight + logits,
        "with_checkpointing": 2 * s * b * h * layers_per_stage * in_flight + per_layer + logits,
    }


def format_plan(result: Dict) -> str:
    lay = result["layout"]
    lines = [
        f"parameters           {result['parameters']:,} (padded vocab {result['padded_vocab_size']:,}"
        + (f" from {result['vocab_size']:,}: {result['vocab_source']})" if "vocab_size" in result else ")"),
        f"layout               {lay['world_size']} ranks = TP {lay['tp']} x PP {lay['pp']} x DP {lay['dp']}, "
        f"ZeRO-{lay['zero_stage']}, {lay['precision']}, {lay['optimizer']}, micro-batch {lay['micro_batch']}",
        f"parameters per rank  {result['parameters_per_rank']:,} (per stage: "
        f"{', '.join(f'{n:,}' for n in result['parameters_per_stage'])})",
        "memory per rank (GiB, busiest stage):",
    ]
    lines += [f"  {k:<22}{v:8.2f}" for k, v in result["memory_gib"].items()]
    lines += [f"  {'activations':<22}{result['activations_gib']['without_checkpointing']:8.2f}"
              f"   ({result['activations_gib']['with_checkpointing']:.2f} with activation checkpointing)",
              f"  {'total':<22}{result['total_gib']['without_checkpointing']:8.2f}"
              f"   ({result['total_gib']['with_checkpointing']:.2f} with activation checkpointing)"]
    if "checkpoint_gib" in result:
        lines.append(f"checkpoint size      {result['checkpoint_gib']:.2f} GiB (all ranks' files; "
                     f"save needs room for two)")
    if "fits" in result:
        lines.append(f"fits in {result['gpu_memory_gib']:g} GiB: {'yes' if result['fits'] else 'NO'}")
    return "\n".join(lines)


__all__ = ["plan", "plan_config", "format_plan", "count_blocks", "stage_parts", "activation_bytes"]

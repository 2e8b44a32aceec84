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
                                       nonfinite_steps, data_position, good_checkpoint, run
      layer_{i:02d}-model_{t:02d}-model_states.pt
                                       PipelineModule layer i's state_dict on TP rank t (i: 0
                                       embedding, 1..L transformer layers, L+1 final norm, L+2 output
                                       layer; with tied embeddings the last one is the embedding
                                       again and has no file)
      [bf16_]zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt
                                       ZeRO 1/2 and the bf16 optimizer: data-parallel rank d's flat
                                       fp32 partition of every param group (master weights) and the
                                       optimizer state of that partition (exp_avg, hessian, ...)

Optimizer-state formats, one module each, behind one interface (layout.Format; read.FORMATS):

    per_param.py  plain: ZeRO 0, fp32: torch optimizer state_dict, one entry per parameter (TP
                  shard); unfused: ZeRO 0, bf16, no pipeline (DeepSpeed's FP16_UnfusedOptimizer in
                  bf16): the same, on fp32 master copies ('fp32_groups')
    flat.py       ZeRO 1/2 (stage_1_and_2): per param group one flat partition per data-parallel
                  rank; concatenated over ranks and cut by the parameter shapes in flat order (plus
                  ZeRO's per-parameter alignment paddings); trailing group padding is dropped
    bf16.py       the BF16_Optimizer (bf16 with the PipelineModule): flat partitions as ZeRO's

Parameter order within a param group: ZeRO files name it ('param_shapes'); the BF16_Optimizer's
files name it in 'param_slice_mappings'; for ZeRO 0 it is the module order split by the saved
groups' names (neox_sophia.optim.groups: one group per parameter role, or the weight_decay /
no_weight_decay pair of older checkpoints), checked against every saved state tensor's shape. The
fragment links DeepSpeed keeps on live parameters (_hp_mapping) are never used. files.py reads
files safely; read.py checks them against config.yml and merges TP shards and pipeline stages.
"""
from __future__ import annotations

from typing import Optional

from neox_sophia.convert.reader.files import load_file, neox_config, read_config, resolve
from neox_sophia.convert.reader.read import CLIENT_KEYS, CheckpointReader, FullCheckpoint


def read_checkpoint(save_dir: str, step: Optional[int] = None, optimizer_state: bool = True) -> FullCheckpoint:
    """Read checkpoint ``step`` (default: `latest`, or the newest complete one) of the `save`
    directory ``save_dir``, written at any TP x PP x DP x ZeRO layout, into full tensors.

    optimizer_state=False skips the optimizer state (the fp32 master weights of a bf16/fp16 run are
    still read: they are the weights). Raises CheckpointError, naming the file and what to do,
    when the directory, a marker or a rank's file is missing, a file is unreadable, or the files do
    not match the checkpoint's config.yml."""
    tag = resolve(save_dir, step)
    return CheckpointReader(save_dir, tag, optimizer_state).read()


__all__ = ["FullCheckpoint", "read_checkpoint", "load_file", "resolve", "read_config", "neox_config",
           "CLIENT_KEYS"]

"""`neox-sophia convert` and `neox-sophia inspect`: checkpoints between layouts and ecosystems.

    neox-sophia convert consolidate --checkpoint SAVE_DIR [--step N] --output DIR
        any TP x PP x ZeRO checkpoint -> one universal checkpoint (full fp32 weights, exp_avg,
        hessian, schedule state; safetensors). Set `load: DIR` to resume at any layout.
    neox-sophia convert to-hf --checkpoint SAVE_DIR|DIR [--step N] --output HF_DIR [--dtype bfloat16]
        -> a Hugging Face folder (config.json, model.safetensors, tokenizer when known):
        GPTNeoXForCausalLM, or LlamaForCausalLM / MistralForCausalLM for the LLaMA family
    neox-sophia convert from-hf --input HF_DIR --output DIR --config CONFIG... [--set key=value]
        a Hugging Face GPTNeoX, Llama or Mistral model -> a universal checkpoint at step 0 with
        fresh optimizer state
        for CONFIG's model, to continue pre-training with `load: DIR` at any layout
    neox-sophia convert to-neox --checkpoint SAVE_DIR|DIR [--step N] --output NEOX_SAVE
                                [--model-parallel-size T] [--pipe-parallel-size P] [--vocab-size V]
        -> GPT-NeoX's own checkpoint layout (NEOX_SAVE/latest, global_stepN/ with NeoX's layer
        indices and names), weights only: NeoX loads it with `finetune: true`, and its
        tools/ckpts/convert_neox_to_hf.py reads it
    neox-sophia convert from-neox --input NEOX_SAVE|TAG_DIR --output DIR --config CONFIG...
        a GPT-NeoX (or Pythia) checkpoint at any TP, pipelined or not -> a universal checkpoint at
        NeoX's iteration with fresh optimizer state (or set `load` to the NeoX folder directly,
        with finetune or no_load_optim)
    neox-sophia inspect SAVE_DIR|DIR [--step N] [--json]
        layout, step, config, tensors and optimizer-state summary

Outputs are written whole or not at all and never replace an existing directory unless
--overwrite is given.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="conversion", metavar="CONVERSION", required=True)
    consolidate = sub.add_parser("consolidate", help="a checkpoint at any layout -> one universal checkpoint")
    to_hf = sub.add_parser("to-hf", help="a checkpoint -> a Hugging Face GPTNeoX folder")
    for p in (consolidate, to_hf):
        p.add_argument("--checkpoint", required=True, metavar="SAVE_DIR",
                       help="a `save` directory (or a universal checkpoint for to-hf)")
        p.add_argument("--step", type=int, help="the global_stepN to read (default: the latest complete one)")
        p.add_argument("--output", required=True, metavar="DIR")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    to_hf.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    to_neox = sub.add_parser("to-neox", help="a checkpoint -> GPT-NeoX's checkpoint layout (weights)")
    to_neox.add_argument("--checkpoint", required=True, metavar="SAVE_DIR",
                         help="a `save` directory or a universal checkpoint")
    to_neox.add_argument("--step", type=int, help="the global_stepN to read (default: the latest complete one)")
    to_neox.add_argument("--output", required=True, metavar="NEOX_SAVE")
    to_neox.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    to_neox.add_argument("--model-parallel-size", type=int, metavar="T",
                         help="NeoX's TP size to write (default: the run's)")
    to_neox.add_argument("--pipe-parallel-size", type=int, metavar="P",
                         help="NeoX's pipe_parallel_size: 0 writes mp_rank files, >= 1 layer files "
                              "(default: the run's)")
    to_neox.add_argument("--vocab-size", type=int, metavar="V",
                         help="the tokenizer's size, needed when T is not a multiple of the run's TP")
    for name, source, help_text in (("from-hf", "HF_DIR", "a Hugging Face GPTNeoX/Llama/Mistral model"),
                                    ("from-neox", "NEOX_SAVE", "a GPT-NeoX or Pythia checkpoint")):
        p = sub.add_parser(name, help=f"{help_text} -> a universal checkpoint")
        p.add_argument("--input", required=True, metavar=source)
        p.add_argument("--output", required=True, metavar="DIR")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
        p.add_argument("--config", dest="configs", nargs="+", required=True, metavar="CONFIG",
                       help="the GPT-NeoX YAML files of the run that will continue from it")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _config_of(checkpoint, where: str):
    from neox_sophia.convert.reader import neox_config

    return neox_config(checkpoint.config, f"{where} (config.yml)")


def _consolidate(args) -> str:
    from neox_sophia.convert.universal import read_any, save_universal

    save_universal(args.output, read_any(args.checkpoint, args.step), overwrite=args.overwrite)
    return f"wrote the universal checkpoint {args.output}"


def _tokenizer_files(data) -> dict:
    """The run's tokenizer files under the names Hugging Face looks for (none if unknown or gone)."""
    kind = (data.tokenizer_type or "").lower()
    files = {"hftokenizer": {"tokenizer.json": data.vocab_file},
             "gpt2bpetokenizer": {"vocab.json": data.vocab_file, "merges.txt": data.merge_file},
             "spmtokenizer": {"tokenizer.model": data.vocab_file}}.get(kind, {})
    return files if files and all(p and os.path.isfile(p) for p in files.values()) else {}


def _to_hf(args) -> str:
    from neox_sophia.convert.hf import to_hf
    from neox_sophia.convert.universal import read_any

    checkpoint = read_any(args.checkpoint, args.step, optimizer_state=False)
    cfg = _config_of(checkpoint, args.checkpoint)
    padded = checkpoint.weights["embed_in.weight"].shape[0]
    tokenizer = _tokenizer_files(cfg.data)
    to_hf(checkpoint.weights, cfg.model, padded, args.output, dtype=args.dtype, tokenizer_files=tokenizer,
          overwrite=args.overwrite)
    return f"wrote the Hugging Face model {args.output} (step {checkpoint.step})"


def _run_config(args):
    """The config of the run that continues from the conversion, and its padded vocabulary."""
    from neox_sophia.config import load_config
    from neox_sophia.data.tokenizers import build_tokenizer

    cfg = load_config(args.configs, args.overrides, warn=False)
    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.vocab_file, cfg.data.merge_file)
    return cfg, tokenizer.vocab_size, cfg.padded_vocab_size(tokenizer.vocab_size)


def _save_weights(args, cfg, weights, step: int, source: str) -> None:
    from neox_sophia.convert.reader import FullCheckpoint
    from neox_sophia.convert.universal import save_universal

    save_universal(args.output, FullCheckpoint(config=cfg.values, step=step, tag=args.conversion,
                                               layout={"source": f"{source}: {os.path.abspath(args.input)}"},
                                               weights=weights, optimizer={}, client_state={"step": step}),
                   overwrite=args.overwrite)


def _from_hf(args) -> str:
    from neox_sophia.convert.hf import from_hf

    cfg, _, padded = _run_config(args)
    _save_weights(args, cfg, from_hf(args.input, cfg.model, padded), 0, "hugging face")
    return f"wrote the universal checkpoint {args.output} (step 0, fresh optimizer state); set load to it"


def _from_neox(args) -> str:
    from neox_sophia.convert.neox import fit_vocab, read_neox

    cfg, vocab, padded = _run_config(args)
    weights, step, where = read_neox(args.input, cfg.model)
    if weights["embed_in.weight"].shape[0] < vocab:
        raise ValueError(f"{where}: {weights['embed_in.weight'].shape[0]} vocabulary rows, fewer than the "
                         f"tokenizer's {vocab}; it was trained with another tokenizer")
    _save_weights(args, cfg, fit_vocab(weights, padded), step, "gpt-neox")
    return (f"wrote the universal checkpoint {args.output} from {where} (step {step}, fresh optimizer state); set "
            f"load to it (finetune: true starts at step 0)")


def _to_neox(args) -> str:
    from neox_sophia.convert.neox import fit_vocab, neox_padded_vocab, save_neox
    from neox_sophia.convert.universal import read_any

    checkpoint = read_any(args.checkpoint, args.step, optimizer_state=False)
    cfg = _config_of(checkpoint, args.checkpoint)
    tp = args.model_parallel_size or cfg.parallel.model_parallel_size
    pipe = cfg.parallel.pipe_parallel_size if args.pipe_parallel_size is None else args.pipe_parallel_size
    rows = checkpoint.weights["embed_in.weight"].shape[0]
    padded = neox_padded_vocab(rows, cfg.model.make_vocab_size_divisible_by, cfg.parallel.model_parallel_size, tp,
                               args.vocab_size)
    save_neox(args.output, fit_vocab(checkpoint.weights, padded), cfg, checkpoint.step, tp, pipe,
              overwrite=args.overwrite)
    return (f"wrote the GPT-NeoX checkpoint {args.output} (step {checkpoint.step}, model_parallel_size {tp}, "
            f"pipe_parallel_size {pipe}, weights only); NeoX loads it with finetune: true")


CONVERSIONS = {"consolidate": _consolidate, "to-hf": _to_hf, "from-hf": _from_hf, "to-neox": _to_neox,
               "from-neox": _from_neox}


def run(args: argparse.Namespace) -> int:
    from neox_sophia.config import ConfigError
    from neox_sophia.training.checkpoint import CheckpointError

    try:
        print(CONVERSIONS[args.conversion](args))
    except (CheckpointError, ConfigError, ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"neox-sophia convert {args.conversion}: {e}", file=sys.stderr)
        return 2
    return 0


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="SAVE_DIR", help="a `save` directory or a universal checkpoint")
    parser.add_argument("--step", type=int, help="the global_stepN to read (default: the latest complete one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run_inspect(args: argparse.Namespace) -> int:
    from neox_sophia.convert.summary import render, summarize
    from neox_sophia.training.checkpoint import CheckpointError

    try:
        summary = summarize(args.checkpoint, step=args.step)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"neox-sophia inspect: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str) if args.json else render(summary))
    return 0

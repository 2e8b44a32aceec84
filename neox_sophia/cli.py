"""The `neox-sophia` command. Thin: each subcommand registers its parser and its runner here.

    neox-sophia --version
    neox-sophia env            versions of torch / deepspeed / megatron-core, devices
    neox-sophia plan CONFIG... [--world-size N] [--gpu-memory 80GB] [--json]
                               parameters and per-GPU memory of a config, before a cluster run
    neox-sophia train CONFIG... [--override FILE] [--set key=value] [-d DIR]
                               train (one rank: alone, or under deepspeed/torchrun/mpirun/srun)
    neox-sophia launch [--num-gpus N] [--hostfile F] ... CONFIG...
                               the deepspeed runner around `train`
    neox-sophia preprocess --input A.jsonl[,B.jsonl.zst] ... --output-prefix P
                               jsonl -> Megatron indexed dataset (GPT-NeoX's arguments)
    neox-sophia corpus [--source stdlib|gcide] --output-dir data/stdlib
                               build a built-in corpus (Python's stdlib, or GCIDE English) and its tokenizer
    neox-sophia convert consolidate|to-hf|from-hf|to-neox|from-neox ...
                               checkpoints between layouts, Hugging Face and GPT-NeoX (convert/cli.py)
    neox-sophia inspect SAVE_DIR
                               a checkpoint's layout, step, tensors and optimizer state
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

import neox_sophia

# name -> (help, add_arguments(parser), run(args) -> exit code)
Command = Tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: Dict[str, Command] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help, add_arguments, run)
        return run

    return register


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@command("env", "print the versions and devices this install sees", lambda parser: None)
def _env(args: argparse.Namespace) -> int:
    import torch

    print(f"neox-sophia    {neox_sophia.__version__}")
    print(f"python         {sys.version.split()[0]}")
    for package in ("torch", "deepspeed", "megatron-core", "transformers", "mpi4py"):
        print(f"{package:14s} {_version(package)}")
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"cuda devices   {cuda}" + (f" ({torch.cuda.get_device_name(0)})" if cuda else ""))
    print(f"cpu threads    {torch.get_num_threads()}")
    return 0


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("configs", nargs="+", metavar="CONFIG",
                        help="GPT-NeoX YAML files, merged in order (a key may appear in only one); "
                             "'.yml' is added to a name without an extension, as NeoX's deepy.py does")
    parser.add_argument("-d", "--conf-dir", "--conf_dir", dest="conf_dir", metavar="DIR",
                        help="folder the CONFIG names are in (deepy.py's -d)")
    parser.add_argument("--override", dest="override_files", action="append", default=[], metavar="FILE",
                        help="a config file read after the CONFIGs whose keys replace theirs on purpose, "
                             "each replacement said in one line (e.g. --override configs/sophia.yml "
                             "switches any upstream config to Sophia); repeatable")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key (VALUE is YAML; dotted keys reach nested blocks, "
                             "e.g. optimizer.params.lr=7.0e-4); repeatable, applied last")


CONFIG_SUFFIXES = (".yml", ".yaml", ".json")


def config_path(name: str, conf_dir: Optional[str] = None) -> str:
    """A config name as deepy.py reads it: under ``conf_dir`` when given, '.yml' appended to a
    name without a YAML/JSON extension."""
    path = os.path.join(conf_dir, name) if conf_dir else name
    return path if path.lower().endswith(CONFIG_SUFFIXES) else path + ".yml"


def resolve_config_args(args: argparse.Namespace) -> None:
    """Turn the CONFIG names (and override files) into paths, in place: what `launch` hands on."""
    args.configs = [config_path(name, getattr(args, "conf_dir", None)) for name in args.configs]
    args.override_files = [config_path(name) for name in getattr(args, "override_files", [])]
    args.conf_dir = None


def print_notes(lines: List[str]) -> None:
    """Config notes (keys read under another name, values replaced) on stderr, once per run:
    from rank 0 when a launcher started several ranks."""
    launched_rank = next((os.environ[k] for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK",
                                                  "SLURM_PROCID") if k in os.environ), "0")
    if launched_rank == "0":  # deepspeed/torchrun, mpirun or srun: the rank they gave this process
        for line in lines:
            print(f"neox-sophia: {line}", file=sys.stderr)


def parse_memory(text: str) -> float:
    """'80GB', '80GiB', '80' -> GiB (GB is read as GiB, as GPU memory is quoted)."""
    value = text.strip().lower().removesuffix("ib").removesuffix("b").removesuffix("g")
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gpu-memory: '{text}' is not like 80GB") from None


def load_config_from_args(args: argparse.Namespace):
    """The config of ``add_config_arguments``; its notes and the ignored NeoX keys go to stderr."""
    import warnings

    from neox_sophia.config import IgnoredKeysWarning, load_config

    resolve_config_args(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", IgnoredKeysWarning)
        cfg = load_config(args.configs, args.overrides, override_files=args.override_files)
    print_notes(cfg.notes + [str(w.message) for w in caught])
    return cfg


def _plan_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--world-size", type=int, help="GPUs in the run (default: global_num_gpus, "
                                                       "else TP x PP)")
    parser.add_argument("--gpu-memory", type=parse_memory, help="memory per GPU, e.g. 80GB: adds 'fits'")
    parser.add_argument("--vocab-size", type=int, help="tokenizer vocab size (default: from vocab_file)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


@command("plan", "parameter count and per-GPU memory of a config under its parallel layout", _plan_arguments)
def _plan(args: argparse.Namespace) -> int:
    """Refuses what `train` refuses (training/preflight.py) and warns about what train would not
    find here; with --json stdout holds the JSON object alone (library logs go to stderr)."""
    import json

    from neox_sophia.config import ConfigError
    from neox_sophia.plan import format_plan, plan_config
    from neox_sophia.training.preflight import missing_for_training, refuse_untrainable

    with stdout_to_stderr():
        try:
            cfg = load_config_from_args(args)
            refuse_untrainable(cfg, cfg.layout(args.world_size).world_size)
            result = plan_config(cfg, world_size=args.world_size, gpu_memory_gib=args.gpu_memory,
                                 vocab_size=args.vocab_size)
            missing = missing_for_training(cfg)
        except (ConfigError, ValueError) as e:
            print(f"neox-sophia plan: {e}", file=sys.stderr)
            return 2
        for line in missing:
            print(f"neox-sophia plan: warning: train would stop here: {line}", file=sys.stderr)
    result["missing_for_training"] = missing
    print(json.dumps(result, indent=2) if args.json else format_plan(result), flush=True)
    return 0


@contextlib.contextmanager
def stdout_to_stderr():
    """Within the block, whatever writes to stdout goes to stderr: sys.stdout is stderr (a log
    handler created meanwhile, as DeepSpeed's at import, takes that), and file descriptor 1 is
    pointed at 2 (for handlers that already hold the stdout stream, and for C code)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _train(args: argparse.Namespace) -> int:
    """One rank. Any error: "rank R failed: ..." on stderr and, with other ranks, an immediate exit
    so that none of them waits on this one (training/lifecycle.py); SIGTERM: save and exit 0."""
    from neox_sophia.training.lifecycle import RankProcess
    from neox_sophia.training.loop import train

    rank = RankProcess()
    try:
        cfg = load_config_from_args(args)
        train(cfg, open_log=lambda: rank.open_log(cfg.logging.log_dir))  # once the save folder is this run's
    except BaseException as e:  # noqa: B036 - every failure ends this rank the same way
        return rank.fail(e)
    return 0


command("train", "train a config (this process is one rank)", add_config_arguments)(_train)


def _launch_arguments(parser: argparse.ArgumentParser) -> None:
    from neox_sophia import launch

    launch.add_arguments(parser)
    add_config_arguments(parser)


@command("launch", "run `train` on every rank through the deepspeed runner", _launch_arguments)
def _launch(args: argparse.Namespace) -> int:
    from neox_sophia import launch
    from neox_sophia.config import ConfigError

    try:
        cfg = load_config_from_args(args)
    except ConfigError as e:
        print(f"neox-sophia launch: {e}", file=sys.stderr)
        return 2
    return launch.run(cfg, args)


def _delegate(module: str, add: str = "add_arguments", run: str = "run"):
    """A subcommand whose arguments and runner live in ``module`` (imported only when used)."""
    import importlib

    return (lambda parser: getattr(importlib.import_module(module), add)(parser),
            lambda args: getattr(importlib.import_module(module), run)(args))


for _name, _help, _module, _names in [
        ("preprocess", "tokenize jsonl into a Megatron indexed dataset (.bin/.idx)", "neox_sophia.data.preprocess", ()),
        ("corpus", "build a built-in corpus (Python's stdlib; GCIDE English) and its tokenizer",
         "neox_sophia.data.corpus", ()),
        ("convert", "checkpoints: consolidate (any layout -> universal), to-hf, from-hf, to-neox, from-neox",
         "neox_sophia.convert.cli", ()),
        ("inspect", "layout, step, config, tensors and optimizer state of a checkpoint", "neox_sophia.convert.cli",
         ("add_inspect_arguments", "run_inspect"))]:
    _add, _run = _delegate(_module, *_names)
    command(_name, _help, _add)(_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neox-sophia",
                                     description="Sophia for GPT-NeoX-style scale-out pre-training.")
    parser.add_argument("--version", action="version", version=neox_sophia.__version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text)
        add_arguments(sp)
        sp.set_defaults(run=run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    import warnings

    # megatron-core says this on every import on machines without them; apex is optional here
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

"""The `neox-sophia` command. Thin: each subcommand registers its parser and its runner here.

    neox-sophia --version
    neox-sophia env            versions of torch / deepspeed / megatron-core, devices
"""
from __future__ import annotations

import argparse
import importlib.metadata
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neox-sophia", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=neox_sophia.__version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text)
        add_arguments(sp)
        sp.set_defaults(run=run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

"""`neox-sophia launch`: the deepspeed runner around `neox-sophia train`, with the same configs.

    neox-sophia launch --num-gpus 8 --hostfile hosts configs/1-5B.yml configs/sophia.yml ...

becomes `python -m deepspeed.launcher.runner --num_gpus 8 --hostfile hosts --module
neox_sophia.cli train CONFIG...` (the `deepspeed` command, run by this Python).
Command-line flags win over the config's launch keys (hostfile, include, exclude, num_nodes,
num_gpus, master_port, master_addr, launcher, force_multi, no_ssh_check), as in NeoX's deepy.py.
On a CPU machine `--num-gpus N` starts N local CPU ranks (gloo).
"""
from __future__ import annotations

import argparse
import sys
from typing import List

LAUNCHERS = ("pdsh", "openmpi", "mvapich", "mpich", "impi", "slurm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-gpus", type=int, help="processes per node (default: config num_gpus, else all GPUs)")
    parser.add_argument("--num-nodes", type=int, help="use the first N hosts of the hostfile")
    parser.add_argument("--hostfile", help="DeepSpeed hostfile ('host slots=N' lines)")
    parser.add_argument("--launcher", choices=LAUNCHERS, help="multi-node launcher (default: config, else pdsh)")
    parser.add_argument("--include", help="DeepSpeed --include")
    parser.add_argument("--exclude", help="DeepSpeed --exclude")
    parser.add_argument("--master-port", type=int)
    parser.add_argument("--master-addr")


def runner_command(cfg, args: argparse.Namespace) -> List[str]:
    """The deepspeed runner's argv for this config and these flags."""
    launch = cfg.launch
    pick = lambda flag, key: flag if flag is not None else getattr(launch, key)  # noqa: E731
    # the runner of this Python's deepspeed, whether or not its bin/ is on PATH
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    options = [("--num_gpus", pick(args.num_gpus, "num_gpus")),
               ("--num_nodes", pick(args.num_nodes, "num_nodes") if pick(args.num_nodes, "num_nodes") != -1 else None),
               ("--hostfile", pick(args.hostfile, "hostfile")),
               ("--include", pick(args.include, "include")),
               ("--exclude", pick(args.exclude, "exclude")),
               ("--master_port", pick(args.master_port, "master_port")),
               ("--master_addr", pick(args.master_addr, "master_addr"))]
    for flag, value in options:
        if value is not None:
            cmd += [flag, str(value)]
    hosts = pick(args.hostfile, "hostfile")
    if hosts:  # the launcher only matters across nodes
        cmd += ["--launcher", args.launcher or launch.launcher]
    if launch.force_multi:
        cmd.append("--force_multi")
    if launch.no_ssh_check:
        cmd.append("--no_ssh_check")
    # LOCAL_RANK is in the environment; the argument form would land before our subcommand
    cmd += ["--no_local_rank", "--module", "neox_sophia.cli", "train", *args.configs]
    for override in args.overrides:
        cmd += ["--set", override]
    return cmd


def run(cfg, args: argparse.Namespace) -> int:
    import subprocess

    cmd = runner_command(cfg, args)
    print("neox-sophia launch: " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.call(cmd)

"""`neox-sophia launch`: DeepSpeed's runner around `neox-sophia train`, with the same configs.

    neox-sophia launch --hostfile hosts --num-gpus 8 configs/1-5B.yml configs/sophia.yml

runs (and prints, shell-quoted, on stderr)

    python -m deepspeed.launcher.runner --num_gpus 8 --hostfile hosts ... --launcher pdsh \\
        --no_local_rank --module neox_sophia.cli train configs/1-5B.yml configs/sophia.yml

with this Python, whether or not the `deepspeed` script is on PATH. Command-line flags win over
the config's launch keys (hostfile, include, exclude, num_nodes, num_gpus, master_addr,
master_port, launcher, force_multi, no_ssh_check), as in NeoX's deepy.py. `--dry-run` prints the
command and starts nothing. On a CPU machine `--num-gpus N` starts N local CPU ranks (gloo).

A hostfile that does not exist (NeoX's 125M.yml names `/mock_path`) means this host alone, as NeoX
and DeepSpeed's runner read it: launch says so in one line and starts the local GPUs (on a CPU
machine, --num-gpus CPU ranks). Everything else the runner would trip over later, on some node, is
refused here first, in one line naming the key or file: the hostfile, the host and slot filters,
the launcher's limits, and the world size against the TP x PP grid and the batch. The world size is
computed by DeepSpeed's own hostfile parser and filters (`active_resources`), so it is the number
of processes the runner will start. `--no-ssh --node-rank I` starts only host I's ranks (run once
per host, e.g. one srun task per node: launch/slurm.sbatch). SIGTERM and Ctrl-C go to every process
launched, and launch returns only after the last one, so that ranks saving a checkpoint on SIGTERM
are not cut off. Slurm and mpirun recipes are in launch/ at the repository root.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Dict, List, Optional

from neox_sophia.config.base import ConfigError
from neox_sophia.config.sections import LAUNCHERS, LaunchConfig

# launchers that start the whole hostfile through MPI: no host/slot filters, and (but openmpi)
# the same slot count on every host (deepspeed.launcher.multinode_runner)
MPI_LAUNCHERS = ("openmpi", "mpich", "impi", "mvapich")
SAME_SLOTS = ("mpich", "impi", "mvapich")
DLTS_HOSTFILE = "/job/hostfile"  # deepspeed.launcher.runner's default --hostfile
HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")  # the pattern DeepSpeed's _parse_hostfile uses


class LaunchError(ConfigError):
    """A launch setting that cannot work; the message names the key or file and the fix."""


@dataclass
class LaunchSettings(LaunchConfig):
    """The config's launch keys after command-line flags were applied (None: the runner's
    default), and the two settings only the command line has."""

    no_ssh: bool = False
    node_rank: Optional[int] = None
    missing_hostfile: Optional[str] = None
    """The hostfile named but not there: this host alone is used instead (NeoX, DeepSpeed)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-gpus", type=int, help="processes per host (default: config num_gpus, else all slots)")
    parser.add_argument("--num-nodes", type=int, help="use the first N hosts of the hostfile")
    parser.add_argument("--hostfile", help="DeepSpeed hostfile ('host slots=N' lines)")
    parser.add_argument("--launcher", choices=LAUNCHERS, help="multi-node launcher (default: config, else pdsh)")
    parser.add_argument("--include", help="DeepSpeed --include, e.g. 'node1@node2:0,1'")
    parser.add_argument("--exclude", help="DeepSpeed --exclude, e.g. 'node3'")
    parser.add_argument("--master-port", type=int)
    parser.add_argument("--master-addr")
    parser.add_argument("--force-multi", action="store_const", const=True,
                        help="use the multi-node launcher even for one host")
    parser.add_argument("--no-ssh-check", action="store_const", const=True,
                        help="skip the runner's passwordless-ssh probe")
    parser.add_argument("--no-ssh", action="store_true",
                        help="start only this host's ranks (run once per host, e.g. one srun task per node; "
                             "needs --hostfile and --node-rank)")
    parser.add_argument("--node-rank", type=int, help="with --no-ssh: this host's index in the hostfile")
    parser.add_argument("--dry-run", action="store_true", help="print the command and start nothing")


def settings_from(launch, args: argparse.Namespace) -> LaunchSettings:
    """The config's LaunchConfig with the command line's flags on top."""
    def pick(key: str):
        flag = getattr(args, key, None)
        return flag if flag is not None else getattr(launch, key)

    s = LaunchSettings(**{f.name: pick(f.name) for f in fields(launch)},
                       no_ssh=bool(getattr(args, "no_ssh", False)), node_rank=getattr(args, "node_rank", None))
    if s.hostfile is None and os.path.isfile(DLTS_HOSTFILE):
        s.hostfile = DLTS_HOSTFILE  # the runner's default; named on the command so that both agree
    if s.hostfile and not os.path.exists(s.hostfile) and not s.no_ssh:
        s.missing_hostfile, s.hostfile = s.hostfile, None
    return s


def read_hostfile(path: str) -> "OrderedDict[str, int]":
    """host -> slots, parsed by DeepSpeed's own parser after a check that names the bad line."""
    from deepspeed.launcher.runner import _parse_hostfile

    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError as e:
        raise LaunchError(f"hostfile: cannot read {path} ({e.strerror}); give an existing file of "
                          f"'host slots=N' lines", "hostfile") from None
    seen: Dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        match = HOSTFILE_LINE.search(text)
        where = f"hostfile: {path} line {number}"
        if not match:
            raise LaunchError(f"{where}: '{text}' is not 'host slots=N' (e.g. 'node1 slots=8')", "hostfile")
        host, slots = match.group(1), int(match.group(2))
        if host in seen:
            raise LaunchError(f"{where}: host '{host}' is already on line {seen[host]}; list each host once",
                              "hostfile")
        if slots == 0:
            raise LaunchError(f"{where}: '{host}' has slots=0; give it at least one slot or remove the line",
                              "hostfile")
        seen[host] = number
    if not seen:
        raise LaunchError(f"hostfile: {path} lists no hosts; add 'host slots=N' lines", "hostfile")
    return _parse_hostfile(lines)


def local_slots(num_gpus: Optional[int]) -> int:
    """What the runner uses on one host without a hostfile: the visible devices, else all of them.
    On the CPU accelerator a rank is a process, not a device: --num_gpus N starts N of them."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    visible = os.environ.get(accelerator.visible_devices_envs()[0], "")
    count = len(visible.split(",")) if visible else accelerator.device_count()
    return max(count, num_gpus or 0) if accelerator.device_name() == "cpu" else count


def active_resources(s: LaunchSettings) -> "OrderedDict[str, List[int]]":
    """host -> slot ids the runner will start a rank on, computed with DeepSpeed's runner functions
    (parse_inclusion_exclusion, apply_num_nodes_and_gpus); every setting they would reject, or
    silently stretch (num_gpus beyond a host's slots), is refused first."""
    from deepspeed.launcher.runner import apply_num_nodes_and_gpus, parse_inclusion_exclusion

    if s.include and s.exclude:
        raise LaunchError("include: cannot be combined with exclude; use one of them", "include")
    filtered = "include" if s.include else "exclude" if s.exclude else None
    for key in ("num_nodes", "num_gpus"):
        value = getattr(s, key)
        if value is not None and value != -1 and value <= 0:
            raise LaunchError(f"{key}: must be positive (got {value})", key)
        if filtered and value not in (None, -1):
            raise LaunchError(f"{key}: cannot be combined with {filtered} (DeepSpeed's runner refuses it); "
                              f"select hosts and slots with {filtered} alone", key)
    if s.hostfile:
        pool = read_hostfile(s.hostfile)
    else:
        pool = OrderedDict(localhost=local_slots(s.num_gpus))
    source = f"the hostfile {s.hostfile}" if s.hostfile else "this host (no hostfile)"
    if s.num_nodes > len(pool):
        raise LaunchError(f"num_nodes: {s.num_nodes} is more than the {len(pool)} host(s) of {source}; "
                          f"lower num_nodes or add hosts", "num_nodes")
    nodes = list(pool.items())[:s.num_nodes] if s.num_nodes > 0 else list(pool.items())
    for host, slots in nodes:
        if s.num_gpus is not None and s.num_gpus > slots:
            raise LaunchError(f"num_gpus: {s.num_gpus} is more than the {slots} slot(s) of '{host}' in {source}; "
                              f"lower num_gpus or raise its slots", "num_gpus")
    try:
        active = parse_inclusion_exclusion(pool, s.include or "", s.exclude or "")
    except ValueError as e:  # unknown host or slot, malformed NAME:SLOT
        raise LaunchError(f"{filtered}: '{getattr(s, filtered)}' does not fit {source} ({e}); name its hosts "
                          f"and slots as 'host' or 'host:0,1'", filtered) from None
    active = apply_num_nodes_and_gpus(active, s.num_nodes, s.num_gpus if s.num_gpus is not None else -1)
    if not active:
        raise LaunchError(f"{filtered}: '{getattr(s, filtered)}' leaves no slot of {source}; exclude less",
                          filtered)
    _check_launcher(s, pool, active, filtered)
    return active


def _check_launcher(s: LaunchSettings, pool, active, filtered: Optional[str]) -> None:
    """What the chosen multi-node launcher cannot express (DeepSpeed raises these only after ssh)."""
    from deepspeed.launcher.runner import LAUNCHER_CLASSES

    if s.launcher not in LAUNCHERS:
        raise LaunchError(f"launcher: '{s.launcher}' is not one of {list(LAUNCHERS)}", "launcher")
    if s.no_ssh:
        if not s.hostfile:
            raise LaunchError("hostfile: --no-ssh needs the hostfile that lists every host of the run", "hostfile")
        if s.node_rank is None or not 0 <= s.node_rank < len(active):
            raise LaunchError(f"node_rank: --no-ssh needs --node-rank between 0 and {len(active) - 1} (this "
                              f"host's index among the hosts used; got {s.node_rank})", "node_rank")
        return
    if not (s.force_multi or len(active) > 1):
        return  # one host: started locally, the launcher is not used
    limited = filtered or next((k for k in ("num_nodes", "num_gpus") if getattr(s, k) not in (None, -1)), None)
    if s.launcher in MPI_LAUNCHERS and limited:
        raise LaunchError(f"launcher: {s.launcher} starts every slot of the hostfile and cannot apply "
                          f"{limited}; edit the hostfile instead, or use launcher pdsh or slurm", "launcher")
    if s.launcher in SAME_SLOTS and len(set(pool.values())) > 1:
        raise LaunchError(f"launcher: {s.launcher} needs the same slots on every host of {s.hostfile} (got "
                          f"{dict(pool)}); equalize them or use launcher pdsh", "launcher")
    try:
        LAUNCHER_CLASSES[s.launcher].validate_active_resources(active)
    except ValueError as e:
        raise LaunchError(f"launcher: {e}", "launcher") from None


def world_size(s: LaunchSettings) -> int:
    """Processes the runner starts for these settings (all hosts together)."""
    return sum(len(slots) for slots in active_resources(s).values())


def check_layout(cfg, world: int) -> None:
    """The world must hold whole TP x PP grids and factor the batch and Sophia's Hessian batch
    (cfg.layout and cfg.hessian_batch raise if not), as every rank checks when it starts."""
    tp, pp = cfg.parallel.model_parallel_size, cfg.parallel.pipeline_stages
    if world % (tp * pp):
        raise LaunchError(f"model_parallel_size: the launch starts {world} process(es), not a multiple of "
                          f"model_parallel_size x pipe stages = {tp} x {pp}; change num_nodes/num_gpus/"
                          f"include/exclude or the parallel sizes", "model_parallel_size")
    try:
        cfg.layout(world)
        if cfg.hessian_interval is not None:
            cfg.hessian_batch(world)
    except ConfigError as e:
        raise LaunchError(f"{e} (the launch starts {world} processes)", e.key) from None


def runner_command(s: LaunchSettings, configs: List[str], overrides: List[str],
                   override_files: List[str] = ()) -> List[str]:
    """DeepSpeed runner's argv for these settings, running
    `neox-sophia train CONFIG... --override FILE... --set ...`."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    options = [("--num_gpus", s.num_gpus), ("--num_nodes", s.num_nodes if s.num_nodes != -1 else None),
               ("--hostfile", s.hostfile), ("--include", s.include), ("--exclude", s.exclude),
               ("--master_port", s.master_port), ("--master_addr", s.master_addr)]
    for flag, value in options:
        if value is not None:
            cmd += [flag, str(value)]
    if s.hostfile:  # the launcher only matters across hosts
        cmd += ["--launcher", s.launcher]
    cmd += [flag for flag, on in (("--force_multi", s.force_multi), ("--no_ssh_check", s.no_ssh_check),
                                  ("--no_ssh", s.no_ssh)) if on]
    if s.no_ssh:
        cmd += ["--node_rank", str(s.node_rank)]
    # LOCAL_RANK is in the environment; the argument form would land before our subcommand
    cmd.append("--no_local_rank")
    if s.hostfile and s.launcher == "slurm" and not s.no_ssh:
        cmd.append(train_script())  # DeepSpeed's srun command drops --module: name a file
    else:
        cmd += ["--module", "neox_sophia.cli"]
    cmd += ["train", *configs]
    for path in override_files:
        cmd += ["--override", path]
    for override in overrides:
        cmd += ["--set", override]
    return cmd


def train_script() -> str:
    """The `neox-sophia` console script of this install: a Python file that runs the CLI."""
    import shutil

    script = shutil.which("neox-sophia", path=os.path.dirname(sys.executable)) or shutil.which("neox-sophia")
    if script is None:
        raise LaunchError("launcher: slurm runs a script file and the neox-sophia script is not installed "
                          "next to this Python or on PATH; pip install the package, or use launch/slurm.sbatch",
                          "launcher")
    return os.path.abspath(script)


def plan(cfg, args: argparse.Namespace, notes: Optional[List[str]] = None) -> List[str]:
    """The checked command for this config and these flags (raises LaunchError / ConfigError);
    what it decided on its own (a missing hostfile) is appended to ``notes``."""
    s = settings_from(cfg.launch, args)
    active = active_resources(s)
    world = sum(len(slots) for slots in active.values())
    check_layout(cfg, world)
    if s.no_ssh and not s.master_addr:  # the runner would ask the first host over ssh
        s.master_addr = next(iter(active))
    if s.missing_hostfile and notes is not None:
        notes.append(f"hostfile: {s.missing_hostfile} does not exist: starting {world} rank(s) on this host "
                     f"only, as NeoX and DeepSpeed's runner do")
    return runner_command(s, args.configs, args.overrides, getattr(args, "override_files", []))


def run(cfg, args: argparse.Namespace) -> int:
    notes: List[str] = []
    try:
        cmd = plan(cfg, args, notes)
    except ConfigError as e:
        print(f"neox-sophia launch: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"neox-sophia launch: {note}", file=sys.stderr)
    print("neox-sophia launch: " + shlex.join(cmd), file=sys.stderr, flush=True)
    if getattr(args, "dry_run", False):
        return 0
    return supervise(cmd)


def supervise(cmd: List[str]) -> int:
    """Run ``cmd`` in its own process group; on SIGTERM/SIGINT pass the signal to the whole group
    and return only when every process under it has exited. A scheduler's early SIGTERM (Slurm's
    --signal) so reaches every rank, and this process, often the job step's main task, outlives
    the ranks that are saving a checkpoint (DeepSpeed's runner itself exits at once on SIGTERM;
    as a subreaper this process collects the ranks it leaves behind)."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    children: List[subprocess.Popen] = []
    signalled: List[int] = []

    def forward(signum, frame):
        signalled.append(signum)
        for child in children:
            try:
                os.killpg(child.pid, signum)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    children.append(subprocess.Popen(cmd, start_new_session=True))
    if signalled:  # arrived while it was starting
        os.killpg(children[0].pid, signalled[-1])
    try:
        code = children[0].wait()
        while signalled:  # reap the ranks the runner left behind
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code if code >= 0 else 128 - code

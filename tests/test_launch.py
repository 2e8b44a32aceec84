"""How a rank finds its place (deepspeed/torchrun, mpirun, srun) and what `launch` runs: the
command, its world size (against DeepSpeed's runner itself), every refusal before anything
starts, --dry-run, and SIGTERM reaching the ranks. Real multi-node runs are test_multinode.py."""
import argparse
import base64
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from neox_sophia.config import ConfigError, load_config
from neox_sophia.launch import (LAUNCHERS, LaunchError, LaunchSettings, plan, runner_command, settings_from,
                                world_size)
from neox_sophia.parallel.topology import launcher_environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yml")
LAUNCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables during the test, and none left behind: launcher_environment()
    writes os.environ directly, so every key is registered with monkeypatch to be restored."""
    for key in LAUNCH_KEYS + ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MPI_LOCALRANKID",
                              "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NNODES"):
        monkeypatch.setenv(key, "registered")
        monkeypatch.delenv(key)
    return monkeypatch


def test_srun_environment_becomes_torch_distributed_names(clean_env):
    clean_env.setenv("SLURM_PROCID", "3")
    clean_env.setenv("SLURM_NTASKS", "4")
    clean_env.setenv("SLURM_LOCALID", "1")
    launcher_environment()
    assert [os.environ[k] for k in LAUNCH_KEYS] == ["3", "4", "1", "127.0.0.1", "29500"]


def test_launcher_variables_already_set_win(clean_env):
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("SLURM_PROCID", "5")
    clean_env.setenv("SLURM_NTASKS", "8")
    launcher_environment()
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "2"


def test_a_lone_srun_task_stays_a_single_process(clean_env):
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "1")
    launcher_environment()
    assert "RANK" not in os.environ


def args(**flags):
    base = dict(num_gpus=None, num_nodes=None, hostfile=None, launcher=None, include=None, exclude=None,
                master_port=None, master_addr=None, force_multi=None, no_ssh_check=None, no_ssh=False,
                node_rank=None, dry_run=False, configs=["a.yml"], overrides=["train_iters=5"])
    return argparse.Namespace(**{**base, **flags})


def config(*sets):
    return load_config([QUICKSTART], list(sets), warn=False)


def test_runner_command_flags_win_over_config_keys(tmp_path):
    hosts = tmp_path / "hosts.cfg"
    hosts.write_text("node-a slots=8\n")
    cfg = config(f"hostfile={hosts}", "num_gpus=4", "launcher=mpich", "no_ssh_check=true")
    cmd = runner_command(settings_from(cfg.launch, args(num_gpus=8)), ["a.yml"], ["train_iters=5"], ["s.yml"])
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert cmd[3:] == ["--num_gpus", "8", "--hostfile", str(hosts), "--master_port", "29500",
                       "--launcher", "mpich", "--no_ssh_check", "--no_local_rank", "--module", "neox_sophia.cli",
                       "train", "a.yml", "--override", "s.yml", "--set", "train_iters=5"]
    local = runner_command(settings_from(config().launch, args(num_gpus=2, launcher="openmpi")), ["a.yml"], [])
    assert "--launcher" not in local  # one node: no multi-node launcher


def test_one_launcher_list_the_one_deepspeeds_runner_accepts():
    from deepspeed.launcher.runner import LAUNCHER_CLASSES

    from neox_sophia.config import sections

    assert sections.LAUNCHERS is LAUNCHERS and set(LAUNCHERS) == set(LAUNCHER_CLASSES)
    for launcher in LAUNCHERS:
        assert config(f"launcher={launcher}").launch.launcher == launcher
    with pytest.raises(ConfigError, match="launcher: 'torchrun' is not one of"):
        config("launcher=torchrun")


def runner_world(hostfile, s: LaunchSettings, monkeypatch) -> int:
    """The processes DeepSpeed's runner.main itself would start: its command is captured (nothing
    runs) and the world_info it hands every node is decoded. --no_ssh keeps it from ssh."""
    from deepspeed.launcher import runner

    started = []

    class Captured:
        returncode = 0

        def __init__(self, cmd, env=None):
            started.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(runner.subprocess, "Popen", Captured)
    argv = ["--hostfile", hostfile, "--no_ssh", "--node_rank", "0", "--master_addr", "127.0.0.1"]
    for flag, value in (("--num_nodes", s.num_nodes), ("--num_gpus", s.num_gpus), ("--include", s.include),
                        ("--exclude", s.exclude)):
        if value not in (None, -1):
            argv += [flag, str(value)]
    runner.main(argv + ["--module", "neox_sophia.cli", "train"])
    info = next(a for a in started[0] if a.startswith("--world_info=")).split("=", 1)[1]
    return sum(len(slots) for slots in json.loads(base64.urlsafe_b64decode(info)).values())


@pytest.mark.parametrize("selection, expected", [
    ({}, 12), ({"num_nodes": 1}, 4), ({"num_gpus": 2}, 6), ({"num_nodes": 2, "num_gpus": 2}, 4),
    ({"num_nodes": 1, "num_gpus": 3}, 3),
    ({"include": "node-a:0,1@node-c"}, 8), ({"include": "node-b"}, 2), ({"exclude": "node-c:1,5"}, 10),
    ({"exclude": "node-a"}, 8)])
def test_world_size_is_what_deepspeeds_runner_starts(tmp_path, monkeypatch, selection, expected):
    hosts = tmp_path / "hostfile"
    hosts.write_text("# three nodes\nnode-a slots=4\n\nnode-b slots=2   # a small one\nnode-c slots=6\n")
    s = LaunchSettings(hostfile=str(hosts), **selection)
    assert world_size(s) == runner_world(str(hosts), s, monkeypatch) == expected


HOSTS = "node-a slots=4\nnode-b slots=4\n"


@pytest.mark.parametrize("hostfile, flags, sets, says", [
    (None, dict(hostfile="/"), [], ["hostfile: cannot read / (Is a directory)"]),
    ("# ok\nnode-a slots=4\nnode-b 4\n", {}, [], ["hostfile: HOSTFILE line 3: 'node-b 4' is not 'host slots=N'"]),
    ("node-a slots=4\nnode-a slots=2\n", {}, [], ["HOSTFILE line 2: host 'node-a' is already on line 1"]),
    ("node-a slots=0\n", {}, [], ["HOSTFILE line 1: 'node-a' has slots=0"]),
    ("# nothing\n\n", {}, [], ["hostfile: HOSTFILE lists no hosts"]),
    (HOSTS, dict(num_nodes=3), [], ["num_nodes: 3 is more than the 2 host(s) of the hostfile HOSTFILE"]),
    (HOSTS, dict(num_gpus=5), [], ["num_gpus: 5 is more than the 4 slot(s) of 'node-a' in the hostfile HOSTFILE"]),
    (HOSTS, {}, ["num_gpus=6"], ["num_gpus: 6 is more than the 4 slot(s)"]),
    (HOSTS, dict(include="node-c"), [], ["include: 'node-c' does not fit the hostfile HOSTFILE",
                                         "'node-c' not found"]),
    (HOSTS, dict(exclude="node-b:7"), [], ["exclude: 'node-b:7' does not fit", "No slot '7'"]),
    (HOSTS, dict(exclude="node-a@node-b"), [], ["exclude: 'node-a@node-b' leaves no slot"]),
    (HOSTS, dict(include="node-a", exclude="node-b"), [], ["include: cannot be combined with exclude"]),
    (HOSTS, dict(include="node-a", num_gpus=2), [], ["num_gpus: cannot be combined with include"]),
    (HOSTS, dict(num_nodes=0), [], ["num_nodes: must be positive"]),
    (HOSTS, dict(launcher="openmpi", num_gpus=2), [], ["launcher: openmpi starts every slot", "num_gpus"]),
    ("node-a slots=4\nnode-b slots=2\n", dict(launcher="mpich"), [], ["launcher: mpich needs the same slots"]),
    (HOSTS, dict(launcher="slurm", include="node-a@node-b:1,2"), [], ["launcher: slurm backend cannot select"]),
    (HOSTS, dict(num_gpus=3), ["model_parallel_size=4", "num_attention_heads=8"],
     ["model_parallel_size: the launch starts 6 process(es), not a multiple of", "4 x 1"]),
    (HOSTS, {}, ["pipe_parallel_size=3"], ["model_parallel_size: the launch starts 8", "1 x 3"]),
    (HOSTS, dict(num_gpus=3), ["train_batch_size=8", "train_micro_batch_size_per_gpu=1",
                               "gradient_accumulation_steps=null"],
     ["train_batch_size: 8 is not divisible by", "(the launch starts 6 processes)"]),
    (None, dict(no_ssh=True, node_rank=0), [], ["hostfile: --no-ssh needs the hostfile"]),
    (HOSTS, dict(no_ssh=True, node_rank=2), [], ["node_rank: --no-ssh needs --node-rank between 0 and 1"]),
])
def test_inconsistent_settings_are_refused_naming_the_key_or_file(tmp_path, hostfile, flags, sets, says):
    path = tmp_path / "hosts"
    if hostfile is not None:
        path.write_text(hostfile)
        flags = {"hostfile": str(path), **flags}
    with pytest.raises(ConfigError) as refused:
        plan(config(*sets), args(**flags))
    message = str(refused.value)
    assert isinstance(refused.value, LaunchError) and "\n" not in message
    for part in says:
        assert part.replace("HOSTFILE", str(path)) in message, message


def test_two_hosts_and_the_mp_grid_that_fit_pass(tmp_path):
    path = tmp_path / "hosts"
    path.write_text(HOSTS)
    cmd = plan(config("model_parallel_size=2", "pipe_parallel_size=2", "train_micro_batch_size_per_gpu=1",
                      "optimizer.params.hessian_batch_size=2"), args(hostfile=str(path), num_gpus=2))
    assert world_size(LaunchSettings(hostfile=str(path), num_gpus=2)) == 4
    assert cmd[cmd.index("--hostfile") + 1] == str(path) and cmd[cmd.index("--launcher") + 1] == "pdsh"
    no_ssh = plan(config(), args(hostfile=str(path), no_ssh=True, node_rank=1))
    assert no_ssh[no_ssh.index("--master_addr") + 1] == "node-a"  # rank 0's host, not an ssh probe
    assert no_ssh[no_ssh.index("--node_rank") + 1] == "1" and "--no_ssh" in no_ssh


def test_the_slurm_launcher_gets_a_command_srun_can_run(tmp_path, monkeypatch):
    """DeepSpeed's srun command is `python -u SCRIPT ...` whatever --module says: launch names the
    neox-sophia script file instead, and the runner's own srun line then runs it."""
    import shutil

    from deepspeed.launcher import runner

    path = tmp_path / "hosts"
    path.write_text(HOSTS)
    cmd = plan(config(), args(hostfile=str(path), launcher="slurm", master_addr="node-a", no_ssh_check=True))
    assert "--module" not in cmd
    started = []
    monkeypatch.setattr(runner.subprocess, "Popen", lambda cmd, env=None: started.append(cmd) or
                        argparse.Namespace(wait=lambda: 0, returncode=0))
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: f"/usr/bin/{name}")  # sinfo "installed"
    runner.main(cmd[3:])
    srun = started[0]
    assert srun[:3] == ["srun", "-n", "8"] and srun[srun.index("-u") + 1] == cmd[cmd.index("train") - 1]
    script = srun[srun.index("-u") + 1]
    assert os.path.isfile(script) and srun[srun.index(script) + 1] == "train"


@pytest.fixture
def nothing_starts(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a process was started")

    for name in ("Popen", "call", "run", "check_call"):
        monkeypatch.setattr(subprocess, name, refuse)


def launch_lines(text):
    return [line for line in text.splitlines() if line.startswith("neox-sophia launch: ")]


def test_dry_run_prints_the_exact_command_and_starts_nothing(tmp_path, capsys, nothing_starts):
    from neox_sophia.cli import main

    path = tmp_path / "hosts"
    path.write_text(HOSTS)
    adamw = "optimizer={type: adamw, params: {lr: 0.001}}"
    assert main(["launch", "--dry-run", "--hostfile", str(path), "--num-gpus", "2", "--master-addr", "10.0.0.1",
                 QUICKSTART, "--set", adamw, "--set", "train_iters=3"]) == 0
    lines = launch_lines(capsys.readouterr().err)
    assert len(lines) == 1
    cmd = shlex.split(lines[0].removeprefix("neox-sophia launch: "))
    assert cmd == plan(config(adamw, "train_iters=3"),
                       args(hostfile=str(path), num_gpus=2, master_addr="10.0.0.1", configs=[QUICKSTART],
                            overrides=[adamw, "train_iters=3"]))
    assert cmd[-4:] == ["--set", adamw, "--set", "train_iters=3"]  # one argument, spaces and all


def test_a_refused_launch_says_one_line_and_starts_nothing(tmp_path, capsys, nothing_starts):
    from neox_sophia.cli import main

    assert main(["launch", "--hostfile", str(tmp_path), QUICKSTART]) == 2
    lines = launch_lines(capsys.readouterr().err)
    assert len(lines) == 1 and f"hostfile: cannot read {tmp_path} (Is a directory)" in lines[0]


UPSTREAM = os.path.join(ROOT, "tests", "fixtures", "upstream")


def test_a_missing_hostfile_means_this_host_as_in_neox(capsys):
    """NeoX's flagship 125M.yml names `hostfile: /mock_path`; NeoX and DeepSpeed's runner then use
    the local GPUs. Config names without .yml under a config folder (deepy.py's -d) and an
    override file reach the ranks' train command as paths."""
    from neox_sophia.cli import main

    sophia = os.path.join(ROOT, "configs", "sophia.yml")
    assert main(["launch", "--dry-run", "--num-gpus", "2", "-d", os.path.join(UPSTREAM, "gpt-neox"), "125M",
                 "local_setup", "--override", sophia]) == 0
    lines = launch_lines(capsys.readouterr().err)
    assert lines[0] == ("neox-sophia launch: hostfile: /mock_path does not exist: starting 2 rank(s) on this "
                        "host only, as NeoX and DeepSpeed's runner do")
    cmd = shlex.split(lines[1].removeprefix("neox-sophia launch: "))
    assert "--hostfile" not in cmd and cmd[cmd.index("--num_gpus") + 1] == "2"
    assert cmd[cmd.index("train") + 1:] == [os.path.join(UPSTREAM, "gpt-neox", "125M.yml"),
                                            os.path.join(UPSTREAM, "gpt-neox", "local_setup.yml"),
                                            "--override", sophia]


RUNNER = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", {rank!r}])
time.sleep(60)  # like DeepSpeed's runner: dies at once on SIGTERM, its ranks live on
"""
RANK = """
import os, signal, sys, time
def save(signum, frame):
    time.sleep(1.5)  # a checkpoint being written
    open({saved!r}, "w").write(str(os.getppid()))
    sys.exit(0)
signal.signal(signal.SIGTERM, save)
open({ready!r}, "w").close()
time.sleep(60)
"""


def test_sigterm_reaches_the_ranks_and_launch_waits_for_them(tmp_path):
    """What Slurm's --signal=TERM@120 does to `neox-sophia launch`: the runner goes at once, the
    ranks get SIGTERM and time to save, and launch returns only after them."""
    ready, saved = str(tmp_path / "ready"), str(tmp_path / "saved")
    runner = RUNNER.format(rank=RANK.format(saved=saved, ready=ready))
    supervisor = subprocess.Popen([sys.executable, "-c", "import sys; from neox_sophia.launch import supervise; "
                                   f"sys.exit(supervise([sys.executable, '-c', {runner!r}]))"], cwd=ROOT)
    deadline = time.time() + 60
    while not os.path.exists(ready):
        assert time.time() < deadline and supervisor.poll() is None
        time.sleep(0.1)
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=60) == 128 + signal.SIGTERM  # the runner's end, as a shell says it
    assert os.path.exists(saved)  # the rank finished saving before launch returned
    with open(saved) as f:
        assert int(f.read()) == supervisor.pid  # orphaned by the runner, collected by launch

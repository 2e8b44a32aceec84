"""How a rank finds its place (deepspeed/torchrun, mpirun, srun) and what `launch` runs."""
import argparse
import os
import sys

import pytest

from neox_sophia.config import load_config
from neox_sophia.launch import runner_command
from neox_sophia.parallel.topology import launcher_environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
                master_port=None, master_addr=None, configs=["a.yml"], overrides=["train_iters=5"])
    return argparse.Namespace(**{**base, **flags})


def test_runner_command_flags_win_over_config_keys():
    cfg = load_config([os.path.join(ROOT, "configs", "quickstart.yml")],
                      ["hostfile=/etc/hosts.cfg", "num_gpus=4", "launcher=slurm"], warn=False)
    cmd = runner_command(cfg, args(num_gpus=8))
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert cmd[3:] == ["--num_gpus", "8", "--hostfile", "/etc/hosts.cfg", "--master_port", "29500",
                       "--launcher", "slurm", "--no_local_rank", "--module", "neox_sophia.cli", "train",
                       "a.yml", "--set", "train_iters=5"]
    local = runner_command(load_config([os.path.join(ROOT, "configs", "quickstart.yml")], warn=False),
                           args(num_gpus=2, launcher="openmpi"))
    assert "--launcher" not in local  # one node: no multi-node launcher

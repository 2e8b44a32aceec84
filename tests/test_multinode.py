"""Multi-node launches, for real, on this one machine (CPU ranks, gloo).

Two "nodes" named in a hostfile are started through DeepSpeed's own multi-node runner over pdsh
(a stand-in `pdsh` on PATH runs each host's command locally, as pdsh does over ssh, with a login
shell's bare environment), and launch/slurm.sbatch runs on a two-node "allocation" (stand-in
`srun` and `scontrol`) in both its modes: one `neox-sophia launch --no-ssh --node-rank I` per node,
and one `neox-sophia train` per rank. Their per-step losses must be those of one process with the
same global batch. `mpirun -n 4 neox-sophia train`, as launch/mpirun.sh runs it, must match the
deepspeed-launched 4-rank run.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yml")
STEPS = 4

pytestmark = pytest.mark.distributed

# pdsh -S -f FANOUT -w host1,host2 CMD...: CMD (its words joined by spaces) runs on every host in
# a fresh login shell, %n replaced by the host's index in the -w list; -S returns the largest exit
# status. Here each "host" is a local bash with only a login's variables.
FAKE_PDSH = """#!{python}
import os, subprocess, sys
args, hosts = sys.argv[1:], []
while args and args[0].startswith("-"):
    flag = args.pop(0)
    if flag in ("-w", "-f"):
        value = args.pop(0)
        hosts = value.split(",") if flag == "-w" else hosts
login = {{k: v for k, v in os.environ.items()
         if k in ("PATH", "HOME", "USER", "TMPDIR", "DS_ACCELERATOR", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR")}}
with open(os.path.join(os.path.dirname(sys.argv[0]), "calls.txt"), "a") as f:
    f.write(",".join(hosts) + "\\n")
command = " ".join(args)
ranks = [subprocess.Popen(["bash", "-c", command.replace("%n", str(n))], env=login) for n in range(len(hosts))]
sys.exit(max(rank.wait() for rank in ranks))
"""


def sets(corpus, run_dir, micro, accumulation, hessian_batch=2):
    """A short quickstart run of 4 sequences per step as micro x accumulation x data-parallel ranks;
    the Hessian batch and the data order do not depend on that split."""
    values = {"data_path": corpus.data_prefix, "vocab_file": corpus.tokenizer, "seq_length": 32,
              "max_position_embeddings": 32, "train_batch_size": 4, "train_micro_batch_size_per_gpu": micro,
              "gradient_accumulation_steps": accumulation, "train_iters": STEPS, "lr_decay_iters": STEPS,
              "log_interval": 1, "eval_interval": 100, "eval_iters": 0, "optimizer.params.hessian_interval": 2,
              "optimizer.params.lr": 2.0e-3, "optimizer.params.hessian_batch_size": hessian_batch, "save": None,
              "load": None, "log_dir": os.path.join(run_dir, "logs"), "num_workers": 0}
    out = []
    for key, value in values.items():
        out += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return out


def env(**extra):
    """This environment without launcher variables, CPU ranks of one thread each."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**clean, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}


def neox(args, environ=None, timeout=300):
    return subprocess.Popen([sys.executable, "-m", "neox_sophia.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, stdin=subprocess.DEVNULL,
                            env=environ or env())


def finish(process, timeout=300):
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-4000:]
    return out


def losses(run_dir):
    with open(os.path.join(run_dir, "logs", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_same_losses(got, want):
    assert sorted(got) == list(range(1, STEPS + 1)), got
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4), (step, got, want)


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    """Per-step losses of a single process (2 micro-batches of 2)."""
    run = str(tmp_path_factory.mktemp("one"))
    finish(neox(["train", QUICKSTART, *sets(corpus, run, micro=2, accumulation=2)]))
    return losses(run)


def hostfile(path, *hosts):
    path.write_text("# two nodes of one slot each; both are this machine\n"
                    + "".join(f"{host} slots=1\n" for host in hosts))
    return str(path)


def test_two_nodes_over_pdsh_match_one_process(corpus, tmp_path, one_process):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pdsh").write_text(FAKE_PDSH.format(python=sys.executable))
    (bin_dir / "pdsh").chmod(0o755)
    hosts = hostfile(tmp_path / "hostfile", "node-a", "node-b")
    run = str(tmp_path / "run")
    out = finish(neox(["launch", "--hostfile", hosts, "--launcher", "pdsh", "--master-addr", "127.0.0.1",
                       "--master-port", str(free_port()), "--no-ssh-check", QUICKSTART,
                       *sets(corpus, run, micro=1, accumulation=2)],
                      env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")))
    assert "deepspeed.launcher.runner --hostfile" in out and "--launcher pdsh" in out
    assert (bin_dir / "calls.txt").read_text() == "node-a,node-b\n"  # one pdsh call, both hosts
    assert "dist_world_size=2" in out
    assert_same_losses(losses(run), one_process)


@pytest.mark.skipif(shutil.which("mpirun", path=os.path.dirname(sys.executable)) is None,
                    reason="no mpirun next to this Python (the mpich wheel of the test extra provides one)")
def test_mpirun_of_four_ranks_matches_the_deepspeed_launch_of_four(corpus, tmp_path):
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable))
    ds_run, mpi_run = str(tmp_path / "deepspeed"), str(tmp_path / "mpi")
    launched = neox(["launch", "--num-gpus", "4", "--master-port", str(free_port()), QUICKSTART,
                     *sets(corpus, ds_run, micro=1, accumulation=1, hessian_batch=4)])
    finish(launched)
    # launch/mpirun.sh runs `mpirun -n 4 -f HOSTS python -m neox_sophia.cli train ...`
    hosts = tmp_path / "hostfile"
    hosts.write_text("# this machine, 4 ranks\nlocalhost slots=4\n")
    under_mpi = subprocess.Popen(["bash", os.path.join(ROOT, "launch", "mpirun.sh"), QUICKSTART,
                                  *sets(corpus, mpi_run, micro=1, accumulation=1, hessian_batch=4)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                 stdin=subprocess.DEVNULL,
                                 env=env(MASTER_PORT=str(free_port()), NP="4", HOSTFILE=str(hosts), MPIRUN=mpirun,
                                         PYTHON=sys.executable))
    out = finish(under_mpi)
    assert f"{mpirun} -n 4 -f " in out  # the script's command (set -x)
    assert_same_losses(losses(mpi_run), losses(ds_run))


# Slurm's commands as launch/slurm.sbatch uses them, on one machine: `scontrol show hostnames L`
# lists the nodes of L; `srun [--ntasks-per-node=1 ...] CMD` starts CMD once per task with the
# task's SLURM_* variables (one task per node, or the allocation's SLURM_NTASKS spread over nodes).
FAKE_SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] && tr ',' '\\n' <<< "$3"
"""
FAKE_SRUN = """#!{python}
import os, subprocess, sys
args, per_node = sys.argv[1:], None
while args[0].startswith("--"):
    flag = args.pop(0)
    if flag.startswith("--ntasks-per-node="):
        per_node = int(flag.split("=")[1])
nodes = os.environ["SLURM_JOB_NODELIST"].split(",")
per_node = per_node or int(os.environ["SLURM_NTASKS"]) // len(nodes)
tasks = [(node_id, local) for node_id in range(len(nodes)) for local in range(per_node)]
ranks = []
for rank, (node_id, local) in enumerate(tasks):
    env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_NTASKS=str(len(tasks)), SLURM_LOCALID=str(local),
               SLURM_NODEID=str(node_id), SLURMD_NODENAME=nodes[node_id], SLURM_NNODES=str(len(nodes)))
    ranks.append(subprocess.Popen(args, env=env))
sys.exit(max(r.wait() for r in ranks))
"""


@pytest.mark.parametrize("mode", ["launcher", "srun"])
def test_slurm_sbatch_on_two_nodes_matches_one_process(corpus, tmp_path, one_process, mode):
    """launch/slurm.sbatch as sbatch would run it on a 2-node allocation of 1 GPU (here: CPU rank) each."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN.format(python=sys.executable))):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run = str(tmp_path / "run")
    path = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ["PATH"]])
    slurm = dict(MODE=mode, PATH=path, SLURM_JOB_NODELIST="localhost,127.0.0.1", SLURM_JOB_NUM_NODES="2",
                 SLURM_NNODES="2", SLURM_NTASKS="2", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(tmp_path),
                 SLURM_CPUS_PER_TASK="1", GPUS_PER_NODE="1", MASTER_PORT=str(free_port()))
    job = subprocess.Popen(["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), QUICKSTART,
                            *sets(corpus, run, micro=1, accumulation=2)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                           env=env(**slurm))
    out = finish(job)
    if mode == "launcher":
        assert (tmp_path / "hostfile.4242").read_text() == "localhost slots=1\n127.0.0.1 slots=1\n"
        assert out.count("--no_ssh --node_rank") == 2 and "--node_rank 1" in out
    assert_same_losses(losses(run), one_process)

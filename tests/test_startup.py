"""Startup: the trainer reports its time to the first step phase by phase, and DeepSpeed's CPU
comm op (a 1-3 minute C++ build on a fresh machine, used only by DeepSpeed's inference
all-reduce) is not built."""
import json
import os
import subprocess
import sys

import pytest

from tests.distributed import run_ranks
from tests.test_training import QUICKSTART, ROOT, corpus  # noqa: F401  (a fixture)

pytestmark = pytest.mark.distributed

PHASES = ["imports and config", "distributed", "tokenizer", "model", "engine", "datasets", "first step"]


def test_bench_startup_reports_every_phase(corpus):  # noqa: F811
    sets = [f"data_path={corpus.data_prefix}", f"vocab_file={corpus.tokenizer}", "seq_length=32",
            "max_position_embeddings=32"]
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_startup.py"), QUICKSTART, "--runs", "1",
                           "--json"] + [a for s in sets for a in ("--set", s)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    [run] = json.loads(done.stdout)["runs"]
    assert list(run["phases_s"]) == PHASES and all(t >= 0 for t in run["phases_s"].values())
    assert run["total_s"] == pytest.approx(sum(run["phases_s"].values()))
    assert 0 < run["total_s"] <= run["process_wall_s"] + 1.0  # the process started just before the tool's clock


def _comm_op_worker(rank, world_size):
    import deepspeed.comm

    from neox_sophia.parallel.topology import init_distributed

    init_distributed("gloo")
    return deepspeed.comm.comm.cdb.shm_comm_op is None


def test_deepspeed_cpu_comm_op_is_not_built():
    assert run_ranks(_comm_op_worker, 1) == [True]

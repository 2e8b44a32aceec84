"""Startup: DeepSpeed's CPU comm op (a 1-3 minute C++ build on a fresh machine, used only by
DeepSpeed's inference all-reduce) is not built. (The phase report: tests/test_gpu_check.py.)"""
import pytest

from tests.distributed import run_ranks

pytestmark = pytest.mark.distributed


def _comm_op_worker(rank, world_size):
    import deepspeed.comm

    from neox_sophia.parallel.topology import init_distributed

    init_distributed("gloo")
    return deepspeed.comm.comm.cdb.shm_comm_op is None


def test_deepspeed_cpu_comm_op_is_not_built():
    assert run_ranks(_comm_op_worker, 1) == [True]

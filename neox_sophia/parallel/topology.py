"""The one place that sets up processes and the TP x PP x DP grid.

torch.distributed is initialized from the launcher's environment: RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT (deepspeed, torchrun), or what mpirun (via mpi4py) and srun (SLURM_*)
provide, translated into those names; as a single process when none is set. megatron-core's
parallel_state is initialized with the same TP and PP sizes as DeepSpeed's
PipeModelDataParallelTopology; both order ranks TP innermost, then DP, then PP, so their groups agree.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _from_mpi() -> dict:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank).Get_rank()
    master = comm.bcast(socket.gethostname() if rank == 0 else None, root=0)
    return {"RANK": rank, "WORLD_SIZE": comm.Get_size(), "LOCAL_RANK": local_rank, "MASTER_ADDR": master}


def _from_slurm() -> dict:
    env = os.environ
    master = "127.0.0.1"
    nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if nodes and int(env.get("SLURM_NNODES", "1")) > 1:
        import subprocess

        master = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                check=True).stdout.split()[0]
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "MASTER_ADDR": master}


def launcher_environment() -> None:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT when mpirun or srun (rather
    than deepspeed or torchrun, which set RANK and WORLD_SIZE) started this process. A
    MASTER_ADDR or MASTER_PORT already set is kept."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return
    if any(k in env for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MPI_LOCALRANKID")):
        found = _from_mpi()
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        found = _from_slurm()
    else:
        return
    if int(found["WORLD_SIZE"]) == 1 and "MASTER_ADDR" not in env:
        return  # a lone process: the in-memory group below
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # the launcher knows these; a stale value does not
        env[key] = str(found[key])
    env.setdefault("MASTER_ADDR", str(found["MASTER_ADDR"]))
    env.setdefault("MASTER_PORT", "29500")


def init_distributed(backend: str | None = None) -> None:
    """Initialize the default process group from the environment, or as one process, and
    DeepSpeed's comm layer on top of it (its PipelineModule and engines use that).

    megatron-core's layers need a process group even at world size 1, so a single process
    gets an in-memory one.
    """
    import deepspeed

    backend = backend or default_backend()
    if not dist.is_initialized():
        launcher_environment()
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's PipelineModule reads it
    _skip_deepspeed_shm_op()
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)


def _skip_deepspeed_shm_op() -> None:
    """On its CPU accelerator DeepSpeed's comm layer builds a shared-memory all-reduce op when it
    starts: a C++ build of 1-3 minutes the first time on a machine (then a cache load), after
    probing every op's compatibility. Only DeepSpeed's inference all-reduce uses that op, never
    training; declaring no op compatible before the comm layer starts skips the build and the
    probe (deepspeed 0.19 reads deepspeed.ops.__compatible_ops__ for nothing else). On CUDA no
    such op exists and this changes nothing. NEOX_SOPHIA_DEEPSPEED_SHM_OP=1 keeps DeepSpeed's
    behaviour (tools/bench_startup.py --deepspeed-shm-op measures what it costs)."""
    import deepspeed.ops

    if os.environ.get("NEOX_SOPHIA_DEEPSPEED_SHM_OP") != "1" and "__compatible_ops__" not in vars(deepspeed.ops):
        deepspeed.ops.__compatible_ops__ = {}


@dataclass(frozen=True)
class Grid:
    """This rank's coordinates in the TP x PP x DP grid."""

    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int


def initialize_model_parallel(tp_size: int, pp_size: int) -> Grid:
    """Initialize megatron-core's parallel_state for a TP x PP grid (DP = the rest)."""
    from megatron.core import parallel_state as ps

    init_distributed()
    world = dist.get_world_size()
    if world % (tp_size * pp_size):
        raise ValueError(f"world size {world} is not divisible by model_parallel_size x "
                         f"pipe stages = {tp_size} x {pp_size}")
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) \
                != (tp_size, pp_size):
            ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp_size,
                                     pipeline_model_parallel_size=pp_size)
    return current_grid()


def current_grid() -> Grid:
    from megatron.core import parallel_state as ps

    return Grid(tp_size=ps.get_tensor_model_parallel_world_size(),
                pp_size=ps.get_pipeline_model_parallel_world_size(),
                dp_size=ps.get_data_parallel_world_size(),
                tp_rank=ps.get_tensor_model_parallel_rank(),
                pp_rank=ps.get_pipeline_model_parallel_rank(),
                dp_rank=ps.get_data_parallel_rank())


def gather_tensor_parallel(tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate a tensor's TP shards along ``dim`` (no autograd).

    megatron-core's own gather allocates on the current CUDA device; this works on any device.
    """
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    size = dist.get_world_size(group)
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class MegatronMPU:
    """DeepSpeed's `mpu` for a plain (not pipelined) module, answered from megatron-core's
    parallel_state: DeepSpeed's "model parallel" group is the tensor-parallel group, so ZeRO
    shards over the data-parallel group and gradient-norm clipping counts TP shards once each."""

    @staticmethod
    def _ps():
        from megatron.core import parallel_state

        return parallel_state

    def get_model_parallel_group(self):
        return self._ps().get_tensor_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return self._ps().get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self._ps().get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps().get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self):
        return self._ps().get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self._ps().get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps().get_data_parallel_world_size()


def tensor_parallel_group():
    """The tensor-parallel process group of this rank (megatron-core's)."""
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()

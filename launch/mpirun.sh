#!/usr/bin/env bash
# neox-sophia training started by mpirun/mpiexec: one MPI process per GPU, each running
# `neox-sophia train`. A rank learns its place from MPI (mpi4py): rank, world size, local rank
# (ranks sharing its node) and rank 0's host name as the rendezvous address.
#
#   NP=8 launch/mpirun.sh configs/1-5B.yml configs/sophia.yml                # one node
#   NP=16 HOSTFILE=launch/hostfile.example launch/mpirun.sh configs/...      # two nodes of 8
#
# Environment:
#   NP           processes in all (default: the GPUs nvidia-smi lists on this node)
#   HOSTFILE     DeepSpeed/Open MPI hostfile ("host slots=N" lines); MPICH gets it converted
#   MPIRUN       the mpirun/mpiexec to use (default: mpirun on PATH; the mpich wheel puts one next
#                to the virtualenv's python)
#   PYTHON       the Python that has neox-sophia installed (default: python)
#   MASTER_PORT  rendezvous port (default 29500); MASTER_ADDR overrides rank 0's host name
#   MPI_ARGS     extra arguments for mpirun, e.g. "--mca btl_tcp_if_include ib0"
# Remote nodes must reach this directory at the same path (configs, data, checkpoints) and have
# the same Python environment. NCCL_* / GLOO_* / TORCH_* variables set here are passed on.
set -euo pipefail

MPIRUN=${MPIRUN:-mpirun}
PYTHON=${PYTHON:-python}
if [ -z "${NP:-}" ]; then
    NP=$(nvidia-smi -L 2>/dev/null | wc -l)
fi
if [ "$NP" -lt 1 ]; then
    echo "mpirun.sh: set NP, the number of processes (no GPU found to count)" >&2
    exit 2
fi
export MASTER_PORT=${MASTER_PORT:-29500}

args=(-n "$NP")
# shellcheck disable=SC2206  # MPI_ARGS is split into words on purpose
extra=(${MPI_ARGS:-})
if "$MPIRUN" --version 2>&1 | grep -q "Open MPI"; then
    # Open MPI passes only the variables named with -x; by default it binds each rank to one
    # core, which starves a rank's data-loader workers and threads.
    args+=(--bind-to none --map-by slot)
    for name in $(compgen -e | grep -E '^(NCCL_|GLOO_|TORCH_|MASTER_|PYTHON|CUDA_VISIBLE_DEVICES$|PATH$|LD_LIBRARY_PATH$)'); do
        args+=(-x "$name")
    done
    if [ -n "${HOSTFILE:-}" ]; then
        args+=(--hostfile "$HOSTFILE")
    fi
else
    # MPICH / Intel MPI (Hydra) pass the whole environment; their hostfile says "host:N".
    if [ -n "${HOSTFILE:-}" ]; then
        machinefile=$(mktemp)
        trap 'rm -f "$machinefile"' EXIT
        awk '!/^[[:space:]]*(#|$)/ { split($2, s, "="); print $1 ":" s[2] }' "$HOSTFILE" > "$machinefile"
        args+=(-f "$machinefile")
    fi
fi

set -x
"$MPIRUN" "${args[@]}" "${extra[@]}" "$PYTHON" -m neox_sophia.cli train "$@"

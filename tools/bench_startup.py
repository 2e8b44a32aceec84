"""Time from `neox-sophia train` to the first training step, phase by phase.

Runs the trainer in fresh processes (one rank, train_iters=1, no checkpoints) and reads the
startup line each writes to its rank log (neox_sophia/training/startup.py): the process's own
start (interpreter, imports, config), the process group and DeepSpeed's comm layer, the
tokenizer, the model (build, initialization, compile_model), the engine (optimizer and
deepspeed.initialize), the datasets (index building; megatron-core caches the indices next to
the data, so only a first run on a dataset pays for them) and the first step itself (compiled
kernels: compiled there, or loaded from torch's cache).

    .venv/bin/python tools/bench_startup.py configs/125M.yml configs/sophia.yml $STDLIB --runs 2
    .venv/bin/python tools/bench_startup.py configs/quickstart.yml --cold --json

--cold gives the first run empty torch extension and inductor caches (what the first run on a
fresh machine pays); --deepspeed-shm-op lets DeepSpeed build its CPU shared-memory comm op as it
would by itself (neox-sophia skips it: only DeepSpeed's inference all-reduce uses it), to
measure what skipping it saves. ($STDLIB: the built-in corpus, see benchmarks/README.md.)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def startup_record(log_dir: str) -> Dict:
    """The JSON of the 'startup' line of rank 0's log."""
    with open(os.path.join(log_dir, "rank_00000.log")) as f:
        for line in f:
            if " startup {" in line:
                return json.loads(line.split(" startup ", 1)[1])
    raise SystemExit(f"bench_startup: no startup line in {log_dir}/rank_00000.log")


def one_run(configs: List[str], overrides: List[str], env: Dict[str, str]) -> Dict:
    with tempfile.TemporaryDirectory() as log_dir:
        sets = overrides + ["train_iters=1", "lr_decay_iters=1", "save=null", "load=null", "eval_iters=0",
                            f"log_dir={log_dir}"]
        command = [sys.executable, "-m", "neox_sophia.cli", "train", *configs] + [a for s in sets for a in ("--set", s)]
        start = time.time()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        wall = time.time() - start
        if done.returncode != 0:
            raise SystemExit(f"bench_startup: the trainer failed:\n{done.stderr[-3000:]}")
        return {**startup_record(log_dir), "process_wall_s": wall}


def measure(configs: List[str], overrides: List[str], runs: int, cold: bool, shm_op: bool) -> Dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_KEYS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if shm_op:
        env["NEOX_SOPHIA_DEEPSPEED_SHM_OP"] = "1"
    results = []
    with tempfile.TemporaryDirectory() as caches:
        for _ in range(runs):
            run_env = dict(env)
            if cold:  # the same fresh caches for every run: the first fills them, later ones reuse them
                run_env.update(TORCH_EXTENSIONS_DIR=os.path.join(caches, "extensions"),
                               TORCHINDUCTOR_CACHE_DIR=os.path.join(caches, "inductor"))
            results.append(one_run(configs, overrides, run_env))
    return {"runs": results, "cold_first_run": cold, "deepspeed_shm_op": shm_op, "configs": configs,
            "overrides": overrides}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--runs", type=int, default=2, help="fresh processes, one after the other")
    parser.add_argument("--cold", action="store_true", help="start from empty torch extension/inductor caches")
    parser.add_argument("--deepspeed-shm-op", action="store_true", help="let DeepSpeed build its CPU comm op")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = measure(args.configs, args.overrides, args.runs, args.cold, args.deepspeed_shm_op)
    if args.json:
        print(json.dumps(result))
        return 0
    for index, run in enumerate(result["runs"]):
        label = "first (empty caches)" if index == 0 and args.cold else f"run {index + 1}"
        phases = ", ".join(f"{name} {seconds:.1f}" for name, seconds in run["phases_s"].items())
        print(f"{label}: first step {run['total_s']:.1f} s after start ({phases}); "
              f"process {run['process_wall_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Grid points through the trainer, the grid search with its edge rule, and --jobs.

Every run is built by the trainer (neox_sophia.training.loop.setup / train_loop) from the config
files plus --set overrides; a point only replaces the optimizer block, weight_decay and min_lr
(and adds its variant's overrides). With --jobs N the points of a round run in N worker
processes (spawned, so each sets its torch threads before torch does any work); a point's
result is a function of its config alone (same seed, same data), so the grid's results do not
depend on N.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, Generator, List, Optional, Sequence, Tuple

from neox_sophia.bench.curves import extension, final_loss, is_diverged, metric_curves
from neox_sophia.bench.variants import Variant
from neox_sophia.optim.factory import SophiaParams

SOPHIA_DEFAULTS = {key: getattr(SophiaParams(), key) for key in ("betas", "eps", "hessian_interval", "estimator")}
"""The paper's settings the benchmark's Sophia starts from when the config has no Sophia block:
optimizer.params' own defaults (optim/factory.py, the one table)."""
ADAMW_BETAS = [0.9, 0.95]


def flow(value) -> str:
    """A Python value as a YAML flow literal for --set. Floats keep a decimal point: YAML 1.1
    (PyYAML) reads 1e-15 as a string, 1.000000e-15 as a float."""
    import json

    if isinstance(value, float):
        text = repr(value)
        return text if "e" not in text and "n" not in text else f"{value:.6e}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(flow(v) for v in value) + "]"
    return json.dumps(value)


@dataclass(frozen=True)
class PointSpec:
    """One grid point: what a worker process needs to train it."""

    optimizer: str
    lr: float
    rho: Optional[float]
    overrides: Tuple[str, ...]
    """The point's --set overrides, after the common ones: optimizer block, weight_decay, min_lr,
    then its variant's."""
    variant: Optional[str] = None


def point_overrides(optimizer: str, lr: float, rho: Optional[float], sophia_params: dict, wd: float,
                    min_lr_ratio: float, variant_overrides: Sequence[str] = ()) -> Tuple[str, ...]:
    if optimizer == "adamw":
        block = {"type": "adamw", "params": {"lr": lr, "betas": ADAMW_BETAS, "eps": 1.0e-8}}
    else:
        block = {"type": "sophia", "params": {**sophia_params, "lr": lr, "rho": rho}}
    return (f"optimizer={flow(block)}", f"weight_decay={flow(float(wd))}", f"min_lr={flow(min_lr_ratio * lr)}",
            *variant_overrides)


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def fixed_eval_batches(run) -> list:
    """The held-out set every evaluation of the benchmark uses: the trainer's first validation
    pass (eval_iters batches of train_batch_size sequences, as NeoX counts them), at every
    evaluation, so that the curves are smooth and comparable."""
    return run.eval_micro_batches(0)


def timed_training(run) -> Tuple[float, dict, float, Optional[object], Optional[str]]:
    """train_loop with every evaluation on the fixed held-out set and timed apart: (the initial
    model's validation loss, curve, eval seconds, the RunResult or None, the TrainingError
    message or None)."""
    from neox_sophia.training import loop
    from neox_sophia.training.components import Hooks
    from neox_sophia.training.steps import evaluate

    fixed = fixed_eval_batches(run)
    curve = {"step": [], "seconds": [], "val_loss": []}
    clock = {"eval": 0.0}

    def timed_evaluate(engine, batches, pipeline, *rest):
        # train_loop evaluates at every eval_interval; here on the fixed set, and the clock
        # stops while it does so that `seconds` counts training only.
        _sync()
        entered = time.perf_counter()
        curve["seconds"].append(entered - clock["start"] - clock["eval"])
        loss = evaluate(engine, fixed, pipeline, *rest)
        curve["val_loss"].append(loss if math.isfinite(loss) else None)
        clock["eval"] += time.perf_counter() - entered
        return loss

    initial = evaluate(run.engine, fixed, run.pipeline)  # the divergence bar
    error, result = None, None
    try:
        _sync()
        clock["start"] = time.perf_counter()
        result = loop.train_loop(run, hooks=Hooks(evaluate=timed_evaluate))
    except loop.TrainingError as err:  # too many non-finite steps in a row: a diverged point
        error = str(err)
        curve["val_loss"].append(None)  # the run's end, not finite
        curve["seconds"].append(time.perf_counter() - clock["start"] - clock["eval"])
    interval = run.cfg.logging.eval_interval  # train_loop evaluates at every multiple of it
    curve["step"] = [interval * (i + 1) for i in range(len(curve["val_loss"]))]
    if error:
        curve["step"][-1] = run.cfg.training.train_iters
    return initial, curve, clock["eval"], result, error


def train_point(configs: Sequence[str], common: Sequence[str], spec: PointSpec) -> Tuple[dict, dict]:
    """Train one grid point: (its record: curve of step, training seconds, val loss; statistics
    from metrics.jsonl; divergence), (the model and layout it ran, for the report)."""
    from neox_sophia.config import load_config
    from neox_sophia.training import loop

    logs = tempfile.mkdtemp(prefix="bench_convergence-")  # the trainer's metrics.jsonl: win rates
    cfg = load_config(list(configs), [*common, *spec.overrides, f"log_dir={flow(logs)}"], warn=False)
    run = loop.setup(cfg)
    initial, curve, eval_seconds, result, error = timed_training(run)
    params = cfg.optimizer.params
    point = {"optimizer": spec.optimizer, "lr": spec.lr, "weight_decay": cfg.optimizer.weight_decay,
             "min_lr": cfg.training.min_lr, "curve": curve,
             "train_seconds": curve["seconds"][-1] if curve["seconds"] else None,
             "eval_seconds": eval_seconds, "initial_val_loss": initial if math.isfinite(initial) else None,
             "diverged": is_diverged(curve, error is not None, initial),
             "optimizer_params": {k: v for k, v in dataclasses.asdict(params).items() if k not in ("lr", "rho", "bs")}}
    if spec.optimizer == "sophia":
        point.update(rho=spec.rho, variant=spec.variant, betas=params.betas,
                     hessian_interval=params.hessian_interval,
                     hessian_updates=result.hessian_updates if result else None)
    else:
        point["betas"] = ADAMW_BETAS
    if error:
        point["error"] = error
    if result is not None:
        point["nonfinite_steps"] = result.nonfinite_steps
    point.update(metric_curves(os.path.join(logs, "metrics.jsonl")))
    shutil.rmtree(logs, ignore_errors=True)
    description = describe(run, cfg)
    del run
    gc.collect()
    if rank() == 0:
        what = f"lr {spec.lr:g}" + (f" rho {spec.rho:g}" if spec.rho is not None else "")
        name = spec.optimizer if spec.optimizer == "adamw" else f"sophia/{spec.variant}"
        print(f"bench_convergence: {name:18s} {what:22s} final val_loss {final_loss(point):.4f}"
              f"{' (diverged)' if point['diverged'] else ''} ({point['train_seconds'] or 0:.0f} s training, "
              f"{eval_seconds:.0f} s eval)", flush=True)
    return point, description


def describe(run, cfg) -> dict:
    """The model, layout and evaluation set of a run (the same for every point of a grid)."""
    import torch
    import torch.distributed as dist

    params = sum(p.numel() for p in run.engine.module.parameters())
    # the input embedding and the (untied) output layer: word_embeddings / embed_out
    embedding = sum(p.numel() for n, p in run.engine.module.named_parameters() if "embed" in n.lower())
    if dist.get_world_size() > 1:  # parameters are sharded over TP / PP ranks: count each shard once
        counts = torch.tensor([params, embedding], dtype=torch.float64)
        if run.layout.dp > 1:
            counts /= run.layout.dp
        dist.all_reduce(counts)
        params, embedding = int(counts[0]), int(counts[1])
    m, lay = cfg.model, run.layout
    return {"model": {"parameters": params, "embedding_and_output_parameters": embedding,
                      "non_embedding_parameters": params - embedding, "num_layers": m.num_layers,
                      "hidden_size": m.hidden_size, "num_attention_heads": m.num_attention_heads,
                      "seq_length": m.seq_length, "vocab_size": run.vocab_size},
            "layout": {"world_size": lay.world_size, "tp": lay.tp, "pp": lay.pp, "dp": lay.dp,
                       "train_batch_size": lay.train_batch_size, "micro_batch_size": lay.micro_batch_size,
                       "gradient_accumulation_steps": lay.gradient_accumulation_steps,
                       "precision": cfg.engine.resolved_precision, "zero_stage": cfg.engine.zero_stage,
                       "device": str(run.device)},
            "tokens_per_step": lay.train_batch_size * m.seq_length,
            "eval_sequences": cfg.logging.eval_iters * lay.train_batch_size}


# ---------------------------------------------------------------------------------------------
# Running points: in this process, or in --jobs worker processes

def _worker_init(threads: int) -> None:
    """Before torch does any work in the worker: its share of the cores."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _worker_point(configs, common, spec) -> Tuple[dict, dict]:
    return train_point(configs, common, spec)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Runner:
    """Trains lists of points, in order; with jobs > 1 in a pool of spawned processes, each with
    torch threads = `threads` (default max(1, cores // jobs)). The thread count changes float
    reduction order, so results are identical bit for bit at the same thread count (a sequential
    run with --threads 1 equals --jobs 2 on 2 cores); otherwise they agree to rounding (~1e-7)."""

    def __init__(self, configs: Sequence[str], common: Sequence[str], jobs: int = 1, threads: Optional[int] = None):
        self.configs, self.common, self.jobs = list(configs), list(common), jobs
        self.threads = threads or max(1, cores() // jobs)
        self.description: Optional[dict] = None
        self.pool = None
        if jobs > 1:
            import multiprocessing

            self.pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_init, initargs=(self.threads,))
        else:
            import torch

            if threads:  # in this process only when asked: a launcher's ranks keep their own setting
                torch.set_num_threads(threads)
            self.threads = torch.get_num_threads()

    def run(self, specs: List[PointSpec]) -> List[dict]:
        if self.pool is None:
            done = [train_point(self.configs, self.common, spec) for spec in specs]
        else:
            futures = [self.pool.submit(_worker_point, self.configs, self.common, spec) for spec in specs]
            done = [f.result() for f in futures]
        for _, description in done:
            self.description = self.description or description
        return [point for point, _ in done]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# The grid search: each tuning a generator of rounds, rounds of all tunings run together

Tuning = Generator[List[Tuple[float, Optional[float]]], List[dict], List[dict]]


def tune(lrs: Sequence[float], rhos: Sequence[Optional[float]], extend: int) -> Tuning:
    """The grid lr x rho, then up to `extend` more lrs beyond an edge that holds the best (at the
    best rho; curves.extension). Yields the (lr, rho) of each round, receives their points;
    returns all points."""
    points = yield [(lr, rho) for rho in rhos for lr in lrs]
    for _ in range(extend):
        more = extension(points)
        if more is None:
            break
        lr, rho, side = more
        new = yield [(lr, rho)]
        new[0]["extension"] = side
        points = points + new
    return points


@dataclass
class Search:
    """One tuning of the search: its generator and how its (lr, rho) become PointSpecs."""

    name: str
    tuning: Tuning
    spec: Callable[[float, Optional[float]], PointSpec]
    points: Optional[List[dict]] = None
    pending: Optional[list] = None


def run_searches(runner: Runner, searches: List[Search]) -> Dict[str, List[dict]]:
    """Drive every search to its end, running the points of all searches' current rounds in one
    batch (so --jobs keeps its workers busy across optimizers and variants)."""
    for s in searches:
        s.pending = next(s.tuning)
    while any(s.pending is not None for s in searches):
        active = [s for s in searches if s.pending is not None]
        specs = [s.spec(lr, rho) for s in active for lr, rho in s.pending]
        points = runner.run(specs)
        for s in active:
            mine, points = points[:len(s.pending)], points[len(s.pending):]
            try:
                s.pending = s.tuning.send(mine)
            except StopIteration as done:
                s.points, s.pending = done.value, None
    return {s.name: s.points for s in searches}


def best_lr(points: List[dict]) -> float:
    return min(points, key=final_loss)["lr"]


def search_all(runner: Runner, args, sophia_params: dict, variants: List[Variant],
               adamw_points: Optional[List[dict]]) -> Tuple[List[dict], Dict[str, List[dict]]]:
    """AdamW's grid (unless given) and each variant's Sophia grid; a variant that needs the best
    AdamW lr runs after AdamW's search ends. Returns (AdamW points, variant name -> points)."""
    def adamw_search() -> Search:
        def spec(lr, rho):
            return PointSpec("adamw", lr, None, point_overrides("adamw", lr, None, sophia_params, args.adamw_wd,
                                                                  args.min_lr_ratio))
        return Search("adamw", tune(floats(args.adamw_lr), [None], args.extend_edges), spec)

    # --sophia-steps: Sophia on its own, shorter schedule (the paper's protocol), AdamW on the full one
    own_schedule = [f"train_iters={args.sophia_steps}", f"lr_decay_iters={args.sophia_steps}"] \
        if args.sophia_steps else []

    def sophia_search(variant: Variant, adamw_lr: Optional[float]) -> Search:
        extra = [*variant.resolved(adamw_lr), *own_schedule]

        def spec(lr, rho):
            return PointSpec("sophia", lr, rho, point_overrides("sophia", lr, rho, sophia_params, args.sophia_wd,
                                                                  args.min_lr_ratio, extra), variant.name)
        return Search(variant.name, tune(floats(args.sophia_lr), floats(args.sophia_rho), args.extend_edges), spec)

    known = adamw_points is not None  # from --adamw-from: every variant can start at once
    first = [sophia_search(v, best_lr(adamw_points) if known else None) for v in variants
             if known or not v.needs_adamw]
    # Sophia's points first in each round: a variant the trainer refuses at setup fails at once
    found = run_searches(runner, first if known else [*first, adamw_search()])
    adamw_points = found.pop("adamw", adamw_points)
    later = [sophia_search(v, best_lr(adamw_points)) for v in variants if v.name not in found]
    found.update(run_searches(runner, later))
    return adamw_points, {v.name: found[v.name] for v in variants}


def floats(text: str) -> List[float]:
    return [float(v) for v in text.split(",") if v.strip()]

"""Convergence benchmark: AdamW against Sophia-G on the same GPT-NeoX model, data, batch, LR
schedule (warmup + cosine to 0.05 x lr) and number of steps, each tuned on a small grid by
validation loss (a held-out split); then the validation-loss curves of the best of each.

    .venv/bin/python tools/bench_convergence.py                     # the default CPU run (~1 hour, 2 cores)
    .venv/bin/python tools/bench_convergence.py --estimate          # time a few steps, project the total
    .venv/bin/python tools/bench_convergence.py --steps 60 --adamw-lr 4e-3,8e-3 --sophia-lr 1e-3 \\
        --sophia-rho 0.03,0.1 --output /tmp/short.json               # a short look
    deepspeed --num_gpus 2 tools/bench_convergence.py CONFIG...      # under a launcher (layout from CONFIG)
    python tools/bench_convergence.py configs/125M.yml configs/sophia.yml --device cuda \\
        --precision bfloat16 --steps 2000 --eval-interval 100 --set train_batch_size=120 --set eval_iters=8

Every run is built by the trainer (neox_sophia.training.loop.setup / train_loop) from the config
files plus --set overrides; the tool only replaces the optimizer block, weight_decay and min_lr
per grid point. AdamW: betas 0.9/0.95, wd 0.1 (the paper's baseline); Sophia-G: the config's
betas/eps/k (or the paper's 0.965/0.99, 1e-15, 10), wd 0.2; min_lr = 0.05 x lr for both.
Data: the built-in corpus (Python's stdlib sources, `neox-sophia corpus`) unless --data config.

Every evaluation uses the same held-out sequences (the validation split's first eval_iters
micro-batches), so the curves are smooth and comparable; seconds are training seconds
(evaluations excluded). The best point of each optimizer is its grid run with the lowest final
validation loss; its curve is that run's curve (re-running it repeats it: same seed, same data).
A best lr at an edge of its grid is extended by one more lr beyond that edge (--extend-edges),
the same rule for both optimizers; an edge that remains is reported.

Writes a JSON file (--output) and, with matplotlib installed, a plot (--plot): validation loss
against step and against seconds. Without matplotlib it prints the pip command and writes the JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CONFIG = str(ROOT / "configs" / "bench_convergence.yml")
ADAMW_LR = "2e-3,4e-3,8e-3,1.6e-2"
SOPHIA_LR = "2e-3,6e-3"
SOPHIA_RHO = "0.05,0.5"
SOPHIA_DEFAULTS = {"betas": [0.965, 0.99], "eps": 1.0e-15, "hessian_interval": 10, "estimator": "gnb"}
PLOT_INSTALL = "pip install matplotlib   # or: pip install -e '.[bench]'"
REGIME = ("a tiny model on 2 CPU cores: a few M parameters, a few thousand tokens per step, a few hundred "
          "steps; the paper's regime is ~0.5M tokens per step at 125M+ parameters for 100k steps, which a "
          "CPU cannot reach. This measures the small-scale regime only.")


# ---------------------------------------------------------------------------------------------
# Curve arithmetic (pure; unit-tested on synthetic curves)

def first_step_reaching(steps: Sequence[int], losses: Sequence[float], target: float) -> Optional[int]:
    """Index of the first evaluation whose loss is <= target, or None if none is."""
    for i, loss in enumerate(losses):
        if loss is not None and math.isfinite(loss) and loss <= target:
            return i
    return None


def steps_to_reach_ratio(reference: Dict[str, list], candidate: Dict[str, list]) -> Dict[str, Optional[float]]:
    """How soon `candidate` reaches `reference`'s final validation loss, as fractions of the
    reference run: steps (first eval step at which candidate's loss <= reference's final loss,
    over the reference's last step) and seconds (the same in training seconds). None where the
    candidate never reaches it. Curves are dicts of equal-length lists: step, seconds, val_loss."""
    target = reference["val_loss"][-1]
    i = first_step_reaching(candidate["step"], candidate["val_loss"], target) if math.isfinite(target) else None
    if i is None:
        return {"target_val_loss": target, "step": None, "steps_ratio": None, "seconds": None, "seconds_ratio": None}
    step, seconds = candidate["step"][i], candidate["seconds"][i]
    return {"target_val_loss": target, "step": step, "steps_ratio": step / reference["step"][-1],
            "seconds": seconds, "seconds_ratio": seconds / reference["seconds"][-1]}


def edges(points: List[dict], best: dict, key: str) -> Optional[str]:
    """'lower' / 'upper' when best[key] is the smallest / largest value of key in the grid (among
    points sharing best's other knobs), None inside it or when the grid has one value."""
    values = sorted({p[key] for p in points})
    if len(values) < 2:
        return "single value" if values else None
    if best[key] == values[0]:
        return "lower"
    if best[key] == values[-1]:
        return "upper"
    return None


def final_loss(point: dict) -> float:
    loss = point["curve"]["val_loss"][-1] if point["curve"]["val_loss"] else None
    return loss if loss is not None and math.isfinite(loss) else math.inf


# ---------------------------------------------------------------------------------------------
# Runs

def _floats(text: str) -> List[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _flow(value) -> str:
    """A Python value as a YAML flow literal for --set. Floats keep a decimal point: YAML 1.1
    (PyYAML) reads 1e-15 as a string, 1.000000e-15 as a float."""
    if isinstance(value, float):
        text = repr(value)
        return text if "e" not in text and "n" not in text else f"{value:.6e}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return json.dumps(value)


class Bench:
    def __init__(self, args):
        self.args = args
        self.common = list(args.overrides)
        if args.data == "builtin":
            self.common += self._builtin_data()
        if args.steps:
            self.common += [f"train_iters={args.steps}", f"lr_decay_iters={args.steps}"]
        if args.eval_interval:
            self.common += [f"eval_interval={args.eval_interval}", f"log_interval={args.eval_interval}"]
        if args.precision:
            self.common += [f"precision={args.precision}"]
        self.common += ["save=null", "load=null", "log_dir=null"]
        from neox_sophia.config import load_config

        self.base = load_config(args.configs, self.common, warn=False)
        t, log = self.base.training, self.base.logging
        if t.train_iters % log.eval_interval or log.eval_iters < 1:
            raise SystemExit(f"bench_convergence: train_iters ({t.train_iters}) must be a multiple of eval_interval "
                             f"({log.eval_interval}) and eval_iters ({log.eval_iters}) at least 1, so that the "
                             f"last step is evaluated")
        params = self.base.optimizer.params
        self.sophia_params = {k: getattr(params, k, v) for k, v in SOPHIA_DEFAULTS.items()}
        if getattr(params, "hessian_batch_size", None):
            self.sophia_params["hessian_batch_size"] = params.hessian_batch_size

    def _builtin_data(self) -> List[str]:
        from neox_sophia.data.corpus import prepare_builtin_corpus

        import torch.distributed as dist

        out = self.args.corpus_dir
        rank = int(os.environ.get("RANK", "0"))
        # A complete corpus there (its manifest is written last) is used whatever its recipe;
        # otherwise the default one is made (~25 s, once).
        if rank == 0 and not os.path.exists(os.path.join(out, "corpus.json")):
            prepare_builtin_corpus(out, log=sys.stderr)
        if dist.is_initialized():
            dist.barrier()
        else:  # other ranks wait for rank 0's manifest (the process group comes later, in setup)
            while not os.path.exists(os.path.join(out, "corpus.json")):
                time.sleep(1)
        paths = self._corpus_paths(out)
        self.corpus = json.loads(Path(paths.manifest).read_text("utf-8"))
        self.corpus["data_path"] = paths.data_prefix
        return [f"data_path={paths.data_prefix}", f"vocab_file={paths.tokenizer}", "tokenizer_type=HFTokenizer",
                f"split={_flow(self.args.split)}"]

    @staticmethod
    def _corpus_paths(out):
        from neox_sophia.data.corpus import corpus_paths

        return corpus_paths(out)

    def overrides(self, optimizer: str, lr: float, rho: Optional[float]) -> List[str]:
        a = self.args
        if optimizer == "adamw":
            block = {"type": "adamw", "params": {"lr": lr, "betas": [0.9, 0.95], "eps": 1.0e-8}}
            wd = a.adamw_wd
        else:
            block = {"type": "sophia", "params": {**self.sophia_params, "lr": lr, "rho": rho}}
            wd = a.sophia_wd
        return [f"optimizer={_flow(block)}", f"weight_decay={_flow(float(wd))}", f"min_lr={_flow(a.min_lr_ratio * lr)}"]

    def config(self, optimizer: str, lr: float, rho: Optional[float], log_dir: Optional[str] = None):
        from neox_sophia.config import load_config

        extra = [f"log_dir={_flow(log_dir)}"] if log_dir else []
        return load_config(self.args.configs, self.common + self.overrides(optimizer, lr, rho) + extra, warn=False)

    def train(self, optimizer: str, lr: float, rho: Optional[float]) -> dict:
        """One grid point through the trainer; its curve (step, training seconds, val loss)."""
        import torch.distributed as dist

        from neox_sophia.training import loop

        logs = tempfile.mkdtemp(prefix="bench_convergence-")  # the trainer's metrics.jsonl: Sophia's win rate
        cfg = self.config(optimizer, lr, rho, log_dir=logs)
        run = loop.setup(cfg)
        fixed = run.micro_batches(run.valid_data, 0, cfg.logging.eval_iters)  # the same held-out set every time
        curve = {"step": [], "seconds": [], "val_loss": []}
        clock = {"eval": 0.0}
        evaluate = loop.evaluate

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

        diverged, result = None, None
        loop.evaluate = timed_evaluate
        try:
            _sync()
            clock["start"] = time.perf_counter()
            result = loop.train_loop(run)
        except loop.TrainingError as err:  # too many non-finite steps in a row: a diverged point
            diverged = str(err)
            curve["val_loss"].append(None)  # the run's end, not finite
            curve["seconds"].append(time.perf_counter() - clock["start"] - clock["eval"])
        finally:
            loop.evaluate = evaluate
        interval = cfg.logging.eval_interval  # train_loop evaluates at every multiple of it
        curve["step"] = [interval * (i + 1) for i in range(len(curve["val_loss"]))]
        if diverged:
            curve["step"][-1] = cfg.training.train_iters
        point = {"optimizer": optimizer, "lr": lr, "weight_decay": cfg.optimizer.weight_decay,
                 "min_lr": cfg.training.min_lr, "curve": curve,
                 "train_seconds": curve["seconds"][-1] if curve["seconds"] else None,
                 "eval_seconds": clock["eval"], "diverged": diverged is not None or final_loss({"curve": curve}) == math.inf}
        if optimizer == "sophia":
            point.update(rho=rho, betas=self.sophia_params["betas"], hessian_interval=self.sophia_params["hessian_interval"],
                         hessian_updates=result.hessian_updates if result else None)
        else:
            point["betas"] = [0.9, 0.95]
        if diverged:
            point["error"] = diverged
        if result is not None:
            point["nonfinite_steps"] = result.nonfinite_steps
        point.update(_win_rates(os.path.join(logs, "metrics.jsonl")))
        shutil.rmtree(logs, ignore_errors=True)
        self._describe(run, cfg)
        del run, fixed
        gc.collect()
        if dist.get_rank() == 0:
            what = f"lr {lr:g}" + (f" rho {rho:g}" if rho is not None else "")
            final = final_loss(point)
            print(f"bench_convergence: {optimizer:6s} {what:22s} final val_loss {final:.4f} "
                  f"({point['train_seconds'] or 0:.0f} s training, {clock['eval']:.0f} s eval)", flush=True)
        return point

    def _describe(self, run, cfg) -> None:
        if hasattr(self, "model"):
            return
        import torch.distributed as dist

        params = sum(p.numel() for p in run.engine.module.parameters())
        # the input embedding and the (untied) output layer: word_embeddings / embed_out
        embedding = sum(p.numel() for n, p in run.engine.module.named_parameters() if "embed" in n.lower())
        if dist.get_world_size() > 1:  # parameters are sharded over TP / PP ranks: count each shard once
            import torch

            counts = torch.tensor([params, embedding], dtype=torch.float64)
            if run.layout.dp > 1:
                counts /= run.layout.dp
            dist.all_reduce(counts)
            params, embedding = int(counts[0]), int(counts[1])
        m, lay = cfg.model, run.layout
        self.model = {"parameters": params, "embedding_and_output_parameters": embedding,
                      "non_embedding_parameters": params - embedding, "num_layers": m.num_layers,
                      "hidden_size": m.hidden_size, "num_attention_heads": m.num_attention_heads,
                      "seq_length": m.seq_length, "vocab_size": run.vocab_size}
        self.layout = {"world_size": lay.world_size, "tp": lay.tp, "pp": lay.pp, "dp": lay.dp,
                       "train_batch_size": lay.train_batch_size, "micro_batch_size": lay.micro_batch_size,
                       "gradient_accumulation_steps": lay.gradient_accumulation_steps,
                       "precision": cfg.engine.resolved_precision, "zero_stage": cfg.engine.zero_stage,
                       "device": str(run.device)}
        self.tokens_per_step = lay.train_batch_size * m.seq_length
        self.eval_tokens = cfg.logging.eval_iters * lay.micro_batch_size * lay.dp * m.seq_length
        sophia = self.config("sophia", 1e-3, 0.05)
        self.hessian_batch = sophia.hessian_batch(lay.world_size)[0]


def _win_rates(path: str) -> dict:
    """Sophia's win rate (share of coordinates not clipped; the authors' health band is 0.1-0.5)
    at each logged step, from the trainer's metrics.jsonl; {} for AdamW or without records."""
    try:
        records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError:
        return {}
    rates = [(r["step"], r["win_rate"]) for r in records if r.get("win_rate") is not None]
    if not rates:
        return {}
    return {"win_rate": {"step": [s for s, _ in rates], "value": [w for _, w in rates]}}


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def tune(bench: Bench, optimizer: str, lrs: List[float], rhos: List[Optional[float]], extend: int) -> List[dict]:
    """The grid lr x rho, then up to `extend` more lrs beyond an edge that holds the best
    (at the best rho): each a factor (the grid's outer lr ratio, else 2) further out."""
    points = [bench.train(optimizer, lr, rho) for rho in rhos for lr in lrs]
    for _ in range(extend):
        best = min(points, key=final_loss)
        same = sorted(p["lr"] for p in points if p.get("rho") == best.get("rho"))
        if final_loss(best) == math.inf or len(same) < 2:
            break
        side = edges([p for p in points if p.get("rho") == best.get("rho")], best, "lr")
        if side == "upper":
            lr = same[-1] * (same[-1] / same[-2])
        elif side == "lower":
            lr = same[0] / (same[1] / same[0])
        else:
            break
        point = bench.train(optimizer, float(f"{lr:.4g}"), best.get("rho"))
        point["extension"] = side
        points.append(point)
    return points


def summarize(optimizer: str, points: List[dict]) -> dict:
    best = min(points, key=final_loss)
    same_rho = [p for p in points if p.get("rho") == best.get("rho")]
    at_edge = {"lr": edges(same_rho, best, "lr")}
    if optimizer == "sophia":
        at_edge["rho"] = edges([p for p in points if p["lr"] == best["lr"]], best, "rho")
    return {"best": best, "at_edge": at_edge, "runs": len(points),
            "diverged": [{"lr": p["lr"], **({"rho": p["rho"]} if "rho" in p else {})} for p in points if p["diverged"]]}


def machine() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception:  # noqa: BLE001 - informational only
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        info["load_average_at_end"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def comparison(a_best: dict, s_best: dict) -> dict:
    """The headline figures from the two best curves: how soon Sophia reaches AdamW's final
    validation loss and, the other way round, how soon AdamW reaches Sophia's (whichever ends
    lower, one of the two is informative)."""
    ratio = steps_to_reach_ratio(a_best["curve"], s_best["curve"])
    reverse = steps_to_reach_ratio(s_best["curve"], a_best["curve"])
    return {"steps_to_adamw_final_loss_ratio": ratio["steps_ratio"],
            "seconds_to_adamw_final_loss_ratio": ratio["seconds_ratio"],
            "sophia_reaches_adamw_final": ratio,
            "adamw_steps_to_sophia_final_loss_ratio": reverse["steps_ratio"],
            "adamw_reaches_sophia_final": reverse}


def report(bench: Bench, adamw: List[dict], sophia: List[dict], started: float) -> dict:
    a, s = summarize("adamw", adamw), summarize("sophia", sophia)
    ratio = steps_to_reach_ratio(a["best"]["curve"], s["best"]["curve"])
    base = bench.base
    warmup_iters = int(round((base.training.warmup or 0) * base.training.decay_iters))
    notes = []
    for name, summary in (("AdamW", a), ("Sophia", s)):
        for knob, side in summary["at_edge"].items():
            if side in ("lower", "upper"):
                notes.append(f"{name}'s best {knob} ({summary['best'][knob]:g}) is at the {side} edge of its grid: "
                             f"the optimum may lie beyond it")
    if ratio["steps_ratio"] is None:
        notes.append("Sophia never reached AdamW's final validation loss within the run: the ratios are null")
    return {
        "benchmark": "convergence: AdamW vs Sophia-G, each tuned on a grid by validation loss",
        "label": bench.args.label,
        "corpus": ({"name": "built-in corpus: Python standard library sources (neox-sophia corpus)",
                    **{k: bench.corpus.get(k) for k in ("tokens", "documents", "text_bytes", "data_path")},
                    "tokenizer_vocab": bench.corpus.get("recipe", {}).get("vocab_size"),
                    "split": bench.args.split}
                   if bench.args.data == "builtin" else {"name": "from the config files", "data_path": base.data.data_path}),
        "regime": REGIME if bench.args.data == "builtin" and bench.model["parameters"] < 50e6 else bench.args.regime,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv else None,
        "configs": bench.args.configs, "overrides": bench.common,
        "model": bench.model, "layout": bench.layout,
        "tokens_per_step": bench.tokens_per_step, "train_iters": base.training.train_iters,
        "tokens_per_run": bench.tokens_per_step * base.training.train_iters,
        "schedule": {"warmup_iters": warmup_iters, "style": base.training.lr_decay_style,
                     "decay_iters": base.training.decay_iters, "min_lr": f"{bench.args.min_lr_ratio} x lr"},
        "eval": {"interval": base.logging.eval_interval, "sequences_per_eval": bench.eval_tokens // base.model.seq_length,
                 "tokens_per_eval": bench.eval_tokens, "fixed_set": True, "split": "validation"},
        "sophia_hessian_batch_sequences": bench.hessian_batch,
        "selection": "lowest final validation loss (last eval) per optimizer",
        "grid": {"adamw": {"lr": _floats(bench.args.adamw_lr), "weight_decay": bench.args.adamw_wd, "betas": [0.9, 0.95]},
                 "sophia": {"lr": _floats(bench.args.sophia_lr), "rho": _floats(bench.args.sophia_rho),
                            "weight_decay": bench.args.sophia_wd, **bench.sophia_params},
                 "extend_edges": bench.args.extend_edges},
        "runs": {"adamw": adamw, "sophia": sophia},
        "best": {"adamw": a, "sophia": s},
        "final_val_loss": {"adamw": final_loss(a["best"]), "sophia": final_loss(s["best"])},
        **comparison(a["best"], s["best"]),
        "train_seconds": {"adamw": a["best"]["train_seconds"], "sophia": s["best"]["train_seconds"]},
        "notes": notes,
        "machine": machine(),
        "total_seconds": time.perf_counter() - started,
    }


def plot(result: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"bench_convergence: matplotlib is not installed; not writing {path}. Install it with:\n"
              f"  {PLOT_INSTALL}", file=sys.stderr)
        return False
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, color in (("adamw", "tab:blue"), ("sophia", "tab:red")):
        best = result["best"][name]["best"]
        c = best["curve"]
        label = f"{'AdamW' if name == 'adamw' else 'Sophia-G'} lr {best['lr']:g}" + (
            f" rho {best['rho']:g}" if name == "sophia" else "")
        by_step.plot(c["step"], c["val_loss"], color=color, label=label)
        by_time.plot(c["seconds"], c["val_loss"], color=color, label=label)
    target = result["final_val_loss"]["adamw"]
    for ax, xlabel in ((by_step, "step"), (by_time, "training seconds (each run as timed; shared machines vary)")):
        ax.axhline(target, color="gray", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
    m = result["model"]
    ratio, reverse = result["steps_to_adamw_final_loss_ratio"], result.get("adamw_steps_to_sophia_final_loss_ratio")
    headline = (f"Sophia reaches AdamW's final loss in {ratio:.2f}x its steps" if ratio is not None
                else "Sophia does not reach AdamW's final loss" + (
                    f" (AdamW reaches Sophia's in {reverse:.2f}x the steps)" if reverse is not None else ""))
    fig.suptitle(f"{m['parameters'] / 1e6:.1f}M params, {result['tokens_per_step']:,} tokens/step, "
                 f"{result['train_iters']} steps: {headline}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    return True


def estimate(bench: Bench, steps: int) -> dict:
    """Time `steps` training steps of one AdamW and one Sophia run (Sophia's include its Hessian
    refreshes) and project the default grid's wall clock."""
    from neox_sophia.training.loop import RunResult, _one_step, setup

    a = bench.args
    per_step = {}
    for name, lr, rho in (("adamw", _floats(a.adamw_lr)[0], None),
                          ("sophia", _floats(a.sophia_lr)[0], _floats(a.sophia_rho)[0])):
        run = setup(bench.config(name, lr, rho))
        result = RunResult(0)
        _one_step(run, 0, result)  # first step: allocations
        _sync()
        t0 = time.perf_counter()
        for step in range(1, steps + 1):
            _one_step(run, step, result)
        _sync()
        per_step[name] = (time.perf_counter() - t0) / steps
        del run
        gc.collect()
    iters = bench.base.training.train_iters
    runs = {"adamw": len(_floats(a.adamw_lr)), "sophia": len(_floats(a.sophia_lr)) * len(_floats(a.sophia_rho))}
    evals = iters // bench.base.logging.eval_interval
    eval_s = evals * per_step["adamw"] / 3 * bench.base.logging.eval_iters / bench.base.layout().gradient_accumulation_steps
    grid = sum(runs[n] * (iters * per_step[n] + eval_s + 5) for n in runs)
    extra = a.extend_edges * sum(iters * per_step[n] + eval_s + 5 for n in runs)
    return {"seconds_per_step": per_step, "runs": runs, "train_iters": iters,
            "projected_grid_seconds": grid, "projected_with_extensions_seconds": grid + extra}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # deepspeed's launcher adds it; LOCAL_RANK is read
    p.add_argument("configs", nargs="*", default=[DEFAULT_CONFIG],
                   help="GPT-NeoX YAML files (default: configs/bench_convergence.yml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="key=value, as for `neox-sophia train`")
    p.add_argument("--steps", type=int, help="train_iters (and lr_decay_iters) for every run")
    p.add_argument("--eval-interval", type=int, help="evaluate every N steps (default: the config's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="cpu hides any GPU; cuda requires one (default: cuda when present)")
    p.add_argument("--precision", choices=["fp32", "bfloat16", "fp16"], help="the config's precision key")
    p.add_argument("--adamw-lr", default=ADAMW_LR, help=f"comma list (default {ADAMW_LR})")
    p.add_argument("--sophia-lr", default=SOPHIA_LR, help=f"comma list (default {SOPHIA_LR})")
    p.add_argument("--sophia-rho", default=SOPHIA_RHO, help=f"comma list (default {SOPHIA_RHO})")
    p.add_argument("--adamw-wd", type=float, default=0.1, help="AdamW weight decay (paper: 0.1)")
    p.add_argument("--sophia-wd", type=float, default=0.2, help="Sophia weight decay (paper: 0.2)")
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="cosine floor as a fraction of lr (paper: 0.05)")
    p.add_argument("--extend-edges", type=int, default=1,
                   help="extra lrs per optimizer beyond a grid edge that holds the best (default 1)")
    p.add_argument("--data", choices=["builtin", "config"], default="builtin",
                   help="builtin: the stdlib corpus in --corpus-dir (made if missing); config: the configs' data keys")
    p.add_argument("--corpus-dir", default=str(ROOT / "data" / "stdlib"))
    p.add_argument("--split", default="949,50,1", help="train,valid,test weights for the built-in corpus")
    p.add_argument("--regime", default="as configured (see the config files)", help="regime note for --data config")
    p.add_argument("--label", default="default", help="a label stored in the JSON (e.g. short)")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "convergence.json"))
    p.add_argument("--plot", default=None, help="PNG path (default: --output with .png); 'none' to skip")
    p.add_argument("--replot", metavar="JSON", help="recompute the comparison and the plot of an earlier "
                                                    "result file (no training); writes it back, and its PNG")
    p.add_argument("--estimate", type=int, nargs="?", const=10, default=None, metavar="STEPS",
                   help="only time STEPS steps (default 10) of each optimizer and project the grid's time")
    return p.parse_args(argv)


def replot(path: str, png: Optional[str]) -> int:
    result = json.loads(Path(path).read_text("utf-8"))
    result.update(comparison(result["best"]["adamw"]["best"], result["best"]["sophia"]["best"]))
    _write_json(result, path)
    png = png or str(Path(path).with_suffix(".png"))
    wrote = png != "none" and plot(result, png)
    print(f"bench_convergence: rewrote {path}" + (f" and {png}" if wrote else ""))
    return 0


def _write_json(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    Path(tmp).write_text(json.dumps(_finite(result), indent=1, allow_nan=False) + "\n", "utf-8")
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(args.replot, args.plot)
    if args.device == "cpu":  # before torch / deepspeed pick an accelerator
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_convergence: --device cuda but torch sees no CUDA device")
    started = time.perf_counter()
    bench = Bench(args)
    if args.estimate:
        projection = estimate(bench, args.estimate)
        if dist.get_rank() == 0:
            print(json.dumps(projection, indent=2))
        return 0
    adamw = tune(bench, "adamw", _floats(args.adamw_lr), [None], args.extend_edges)
    sophia = tune(bench, "sophia", _floats(args.sophia_lr), _floats(args.sophia_rho), args.extend_edges)
    if dist.get_rank() != 0:
        return 0
    result = report(bench, adamw, sophia, started)
    _write_json(result, args.output)
    png = args.plot or str(Path(args.output).with_suffix(".png"))
    wrote_png = png != "none" and plot(result, png)
    best_a, best_s = result["best"]["adamw"]["best"], result["best"]["sophia"]["best"]
    print(f"\nbench_convergence ({result['corpus']['name']}; {result['model']['parameters'] / 1e6:.2f}M params, "
          f"{result['tokens_per_step']:,} tokens/step, {result['train_iters']} steps)")
    print(f"  AdamW   best lr {best_a['lr']:g}: final val_loss {result['final_val_loss']['adamw']:.4f}")
    print(f"  Sophia  best lr {best_s['lr']:g} rho {best_s['rho']:g}: final val_loss {result['final_val_loss']['sophia']:.4f}")
    r = result["sophia_reaches_adamw_final"]
    if r["steps_ratio"] is None:
        reverse = result["adamw_reaches_sophia_final"]
        print("  Sophia never reached AdamW's final validation loss: steps/seconds ratios are null" + (
            f"; AdamW reached Sophia's final loss at step {reverse['step']} (ratio {reverse['steps_ratio']:.3f})"
            if reverse["steps_ratio"] is not None else ""))
    else:
        print(f"  Sophia reached AdamW's final val_loss at step {r['step']}: steps ratio {r['steps_ratio']:.3f}, "
              f"seconds ratio {r['seconds_ratio']:.3f}")
    for note in result["notes"]:
        print(f"  note: {note}")
    print(f"  wrote {args.output}" + (f" and {png}" if wrote_png else ""))
    return 0


def _finite(value):
    """The result with every non-finite float as null (JSON has no inf / nan)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())

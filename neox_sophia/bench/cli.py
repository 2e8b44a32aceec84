"""Convergence benchmark (tools/bench_convergence.py): AdamW against Sophia and its variants.

AdamW and Sophia (the paper's Sophia-G and named variants) on the same GPT-NeoX model, data,
batch, LR schedule (warmup + cosine to 0.05 x lr) and number of steps, each tuned on a grid of the
same size by validation loss (a held-out split); then the
validation-loss curves of the best of each, per-group Sophia statistics and stability.

    python tools/bench_convergence.py                                # the default CPU run (old regime)
    python tools/bench_convergence.py configs/bench_long.yml --corpus gcide --vocab-size 2048 \\
        --variant paper --jobs 2 --output 'benchmarks/long/{corpus}-{variant}.json'
    python tools/bench_convergence.py ... --variant split,hessian_floor \\
        --adamw-from benchmarks/long/gcide-paper.json                 # variants against the same AdamW
    python tools/bench_convergence.py --summarize benchmarks/long/*.json --markdown benchmarks/long/summary.md
    python tools/bench_convergence.py --seeds A-seed1234.json A-seed1235.json ...  # one setting over seeds
    python tools/bench_convergence.py --estimate                     # time a few steps, project the total
    deepspeed --num_gpus 2 tools/bench_convergence.py CONFIG...       # under a launcher (layout from CONFIG)

Fixed per optimizer: AdamW betas 0.9/0.95, wd 0.1 (the paper's baseline); Sophia: the config's
betas/eps/k/Hessian batch (or the paper's 0.965/0.99, 1e-15, 10), wd 0.2, plus the variant's
overrides (neox_sophia.bench.variants); min_lr = 0.05 x lr for both. Data: a built-in corpus
(--corpus stdlib|gcide at --vocab-size, made by the tool if missing) unless --data config.

Every evaluation uses the same held-out sequences (the trainer's first validation pass: eval_iters
batches of train_batch_size sequences, as NeoX counts them), so the curves are smooth and
comparable within one seed (which sequences they are depends on the seed: across seeds only
same-seed pairs compare, which is what --seeds reports); seconds are training seconds
(evaluations excluded). The best point of each optimizer
is its grid run with the lowest final validation loss. A best lr at an edge of its grid is extended
by one more lr beyond that edge (--extend-edges), the same rule for every optimizer and variant; an
edge that remains is reported.

Writes one JSON per corpus x variant (--output, with {corpus} and {variant} filled in) and, with
matplotlib installed, its plot (the same path with .png).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

from neox_sophia.bench import report
from neox_sophia.config.base import ConfigError
from neox_sophia.data.sources import SOURCES
from neox_sophia.bench.curves import comparison
from neox_sophia.bench.runs import SOPHIA_DEFAULTS, Runner, floats, flow, point_overrides, rank, search_all
from neox_sophia.bench.variants import VARIANTS, parse_variants

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = str(ROOT / "configs" / "bench_convergence.yml")
ADAMW_LR = "2e-3,4e-3,8e-3,1.6e-2"
SOPHIA_LR = "2e-3,6e-3"
SOPHIA_RHO = "0.05,0.5"
DEFAULT_VOCAB = 8192


class UsageError(Exception):
    """Bad arguments or inputs: one line, exit code 2."""


class Bench:
    """What every grid point of an invocation shares: the config files, the common overrides
    (data, steps, eval interval, precision), the base config and the Sophia block."""

    def __init__(self, args):
        self.args = args
        self.common = list(args.overrides)
        self.corpus: Optional[dict] = None
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
            raise UsageError(f"train_iters ({t.train_iters}) must be a multiple of eval_interval "
                             f"({log.eval_interval}) and eval_iters ({log.eval_iters}) at least 1, so that the "
                             f"last step is evaluated")
        steps = args.sophia_steps
        if steps is not None and not (0 < steps <= t.train_iters and steps % log.eval_interval == 0):
            raise UsageError(f"--sophia-steps {steps}: must be a multiple of eval_interval ({log.eval_interval}) "
                             f"and at most train_iters ({t.train_iters}), so that Sophia's last step is evaluated")
        params = self.base.optimizer.params  # the config's Sophia block, else the paper's values
        self.sophia_params = {k: getattr(params, k, v) if self.base.optimizer.type == "sophia" else v
                              for k, v in SOPHIA_DEFAULTS.items()}
        if getattr(params, "hessian_batch_size", None):
            self.sophia_params["hessian_batch_size"] = params.hessian_batch_size

    @property
    def sophia_iters(self) -> int:
        """The steps of Sophia's runs: --sophia-steps, else the config's train_iters."""
        return self.args.sophia_steps or self.base.training.train_iters

    def corpus_dir(self) -> str:
        a = self.args
        return a.corpus_dir or str(ROOT / "data" / "bench" / f"{a.corpus}-{a.vocab_size or DEFAULT_VOCAB}")

    def _builtin_data(self) -> List[str]:
        """The corpus in corpus_dir: a complete one there is used (its vocabulary must be
        --vocab-size when that is given), otherwise rank 0 makes it and the others wait."""
        from neox_sophia.data.corpus import corpus_paths, prepare_corpus, read_manifest
        from neox_sophia.data.preprocess import InputError

        a, out = self.args, self.corpus_dir()
        manifest = read_manifest(out)
        if manifest is not None:
            vocab = manifest.get("recipe", {}).get("vocab_size")
            if manifest["corpus"] != a.corpus or (a.vocab_size and vocab != a.vocab_size):
                raise UsageError(f"--corpus-dir {out} holds the {manifest['corpus']} corpus at vocab {vocab}, not "
                                 f"{a.corpus} at {a.vocab_size or 'any vocab'}; pass another --corpus-dir (or none)")
        elif rank() == 0:
            try:
                prepare_corpus(out, a.corpus, vocab_size=a.vocab_size or DEFAULT_VOCAB, log=sys.stderr)
            except InputError as err:
                raise UsageError(f"corpus: {err}") from None
        while read_manifest(out) is None:  # other ranks: rank 0 writes the manifest last
            time.sleep(1)
        paths = corpus_paths(out, a.corpus)
        self.corpus = read_manifest(out)
        self.corpus["data_path"] = paths.data_prefix
        return [f"data_path={paths.data_prefix}", f"vocab_file={paths.tokenizer}", "tokenizer_type=HFTokenizer",
                f"split={flow(a.split)}"]

    def config(self, optimizer: str, lr: float, rho: Optional[float], extra=()):
        from neox_sophia.config import load_config

        a = self.args
        wd = a.adamw_wd if optimizer == "adamw" else a.sophia_wd
        overrides = point_overrides(optimizer, lr, rho, self.sophia_params, wd, a.min_lr_ratio, extra)
        return load_config(a.configs, [*self.common, *overrides], warn=False)

    def fingerprint(self) -> dict:
        return report.adamw_fingerprint(self.config("adamw", 1e-3, None).values, self.corpus_record())

    def corpus_record(self) -> dict:
        if self.args.data != "builtin":
            return {"name": "from the config files", "data_path": self.base.data.data_path}
        c = self.corpus
        described = SOURCES[c["corpus"]].description if c["corpus"] in SOURCES else c["corpus"]
        return {"name": f"built-in corpus: {described} (neox-sophia corpus --source {c['corpus']})",
                "source": c["corpus"],
                **{k: c.get(k) for k in ("tokens", "documents", "text_bytes", "data_path", "recipe")},
                "tokenizer_vocab": c.get("recipe", {}).get("vocab_size"), "split": self.args.split}

    def context(self, description: dict, started: float, adamw_from: Optional[str]) -> dict:
        """What the result files of this invocation share."""
        a, base = self.args, self.base
        model = description["model"]
        return {
            "label": a.label, "corpus": self.corpus_record(),
            "regime": report.REGIME if a.data == "builtin" and model["parameters"] < 50e6 else a.regime,
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv else None,
            "configs": a.configs, "overrides": self.common,
            "model": model, "layout": description["layout"],
            "tokens_per_step": description["tokens_per_step"], "train_iters": base.training.train_iters,
            "sophia_train_iters": self.sophia_iters,
            "tokens_per_run": description["tokens_per_step"] * base.training.train_iters,
            "schedule": {"warmup_iters": int(round((base.training.warmup or 0) * base.training.decay_iters)),
                         "style": base.training.lr_decay_style, "decay_iters": base.training.decay_iters,
                         "min_lr": f"{a.min_lr_ratio} x lr"},
            "eval": {"interval": base.logging.eval_interval, "sequences_per_eval": description["eval_sequences"],
                     "tokens_per_eval": description["eval_sequences"] * model["seq_length"], "fixed_set": True,
                     "split": "validation"},
            "sophia_hessian_batch_sequences": self.config("sophia", 1e-3, 0.05).hessian_batch(
                description["layout"]["world_size"])[0],
            "selection": "lowest final validation loss (last eval) per optimizer",
            "grid": {"adamw": {"lr": floats(a.adamw_lr), "weight_decay": a.adamw_wd, "betas": [0.9, 0.95]},
                     "sophia": {"lr": floats(a.sophia_lr), "rho": floats(a.sophia_rho), "weight_decay": a.sophia_wd,
                                **self.sophia_params},
                     "extend_edges": a.extend_edges},
            "adamw_fingerprint": self.fingerprint(), "adamw_from": adamw_from,
            "jobs": a.jobs, "machine": report.machine(), "total_seconds": time.perf_counter() - started,
        }


def estimate(bench: Bench, steps: int) -> dict:
    """Time `steps` training steps of one AdamW and one Sophia run (Sophia's include its Hessian
    refreshes) and project the grid's wall clock (sequential, one variant)."""
    import gc

    from neox_sophia.training.loop import RunResult, train_step, setup

    a = bench.args
    per_step = {}
    for name, lr, rho in (("adamw", floats(a.adamw_lr)[0], None),
                          ("sophia", floats(a.sophia_lr)[0], floats(a.sophia_rho)[0])):
        run = setup(bench.config(name, lr, rho))
        result = RunResult(0)
        train_step(run, 0, result)  # first step: allocations
        t0 = time.perf_counter()
        for step in range(1, steps + 1):
            train_step(run, step, result)
        per_step[name] = (time.perf_counter() - t0) / steps
        del run
        gc.collect()
    iters = {"adamw": bench.base.training.train_iters, "sophia": bench.sophia_iters}
    runs = {"adamw": len(floats(a.adamw_lr)), "sophia": len(floats(a.sophia_lr)) * len(floats(a.sophia_rho))}

    def one_run(name: str) -> float:  # its steps, its evaluations (forward only, a batch per eval_iter), setup
        evals = iters[name] // bench.base.logging.eval_interval
        return iters[name] * per_step[name] + evals * per_step["adamw"] / 3 * bench.base.logging.eval_iters + 5
    grid = sum(runs[n] * one_run(n) for n in runs)
    extra = a.extend_edges * sum(one_run(n) for n in runs)
    return {"seconds_per_step": per_step, "runs": runs, "train_iters": iters,
            "projected_grid_seconds": grid, "projected_with_extensions_seconds": grid + extra}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # deepspeed's launcher adds it; LOCAL_RANK is read
    p.add_argument("configs", nargs="*", default=[DEFAULT_CONFIG],
                   help="GPT-NeoX YAML files (default: configs/bench_convergence.yml; the long regime: "
                        "configs/bench_long.yml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="key=value, as for `neox-sophia train`")
    p.add_argument("--steps", type=int, help="train_iters (and lr_decay_iters) for every run")
    p.add_argument("--sophia-steps", type=int, metavar="N",
                   help="Sophia's runs train N steps on their own schedule (train_iters and lr_decay_iters N, "
                        "the same warmup fraction) against AdamW's full --steps: the paper's protocol, where "
                        "Sophia at N steps is compared with AdamW at more")
    p.add_argument("--eval-interval", type=int, help="evaluate every N steps (default: the config's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="cpu hides any GPU; cuda requires one (default: cuda when present)")
    p.add_argument("--precision", choices=["fp32", "bfloat16", "fp16"], help="the config's precision key")
    p.add_argument("--variant", action="append", default=[],
                   help="Sophia variants to tune (repeatable or a comma list; default paper): " + ", ".join(VARIANTS))
    p.add_argument("--adamw-from", metavar="JSON", help="reuse the AdamW grid of an earlier result file of the "
                                                        "same corpus and config instead of training it")
    p.add_argument("--jobs", type=int, default=1, help="grid points in N worker processes, each with torch "
                                                       "threads = cores // N (one rank only; default 1)")
    p.add_argument("--threads", type=int, help="torch threads per run (default cores // jobs with --jobs > 1, "
                                               "else torch's); runs agree bit for bit at the same thread count")
    p.add_argument("--adamw-lr", default=ADAMW_LR, help=f"comma list (default {ADAMW_LR})")
    p.add_argument("--sophia-lr", default=SOPHIA_LR, help=f"comma list (default {SOPHIA_LR})")
    p.add_argument("--sophia-rho", default=SOPHIA_RHO, help=f"comma list (default {SOPHIA_RHO})")
    p.add_argument("--adamw-wd", type=float, default=0.1, help="AdamW weight decay (paper: 0.1)")
    p.add_argument("--sophia-wd", type=float, default=0.2, help="Sophia weight decay (paper: 0.2)")
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="cosine floor as a fraction of lr (paper: 0.05)")
    p.add_argument("--extend-edges", type=int, default=1,
                   help="extra lrs per optimizer beyond a grid edge that holds the best (default 1)")
    p.add_argument("--data", choices=["builtin", "config"], default="builtin",
                   help="builtin: the --corpus corpus (made if missing); config: the configs' data keys")
    p.add_argument("--corpus", choices=sorted(SOURCES), default="stdlib",
                   help="built-in corpus: " + "; ".join(f"{s.name}: {s.description}" for s in SOURCES.values()))
    p.add_argument("--vocab-size", type=int,
                   help=f"the built-in corpus's tokenizer vocabulary (default {DEFAULT_VOCAB} when the tool makes it)")
    p.add_argument("--corpus-dir", help="where the built-in corpus is (default data/bench/<corpus>-<vocab>)")
    p.add_argument("--split", default="949,50,1", help="train,valid,test weights for the built-in corpus")
    p.add_argument("--regime", default="as configured (see the config files)", help="regime note for --data config")
    p.add_argument("--label", default="default", help="a label stored in the JSON (e.g. short)")
    p.add_argument("--output", help="result JSON (default benchmarks/convergence.json; required with --merge); "
                                    "{corpus} and {variant} are filled in (needed with several variants)")
    p.add_argument("--plot", default=None, help="PNG path (default: the JSON's path with .png); 'none' to skip")
    p.add_argument("--replot", metavar="JSON", help="recompute the comparison and the plot of an earlier "
                                                    "result file (no training); writes it back, and its PNG")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="one result (--output) from files of the same "
                                                             "corpus, config and variant: their grid points together")
    p.add_argument("--summarize", nargs="+", metavar="JSON", help="print one markdown table over result files")
    p.add_argument("--seeds", nargs="+", metavar="JSON", help="one table of each setting found at several seeds: "
                                                             "each seed's steps ratio against its own AdamW "
                                                             "(with --plot PNG: each seed's lead over the steps)")
    p.add_argument("--markdown", metavar="OUT", help="with --summarize or --seeds: also write the table here")
    p.add_argument("--estimate", type=int, nargs="?", const=10, default=None, metavar="STEPS",
                   help="only time STEPS steps (default 10) of each optimizer and project the grid's time")
    args = p.parse_args(argv)
    if args.output is None and not args.merge:
        args.output = str(ROOT / "benchmarks" / "convergence.json")
    return args


def write_result(result: dict, path: str, png: Optional[str]) -> Optional[str]:
    """The result JSON at ``path`` and its plot at ``png`` (default: the JSON's path with .png;
    'none': no plot); the PNG's path if one was written."""
    from neox_sophia.bench.plots import plot

    report.write_json(result, path)
    png = png or str(Path(path).with_suffix(".png"))
    return png if png != "none" and plot(result, png) else None


def replot(path: str, png: Optional[str]) -> int:
    result = json.loads(Path(path).read_text("utf-8"))
    result.update(comparison(result["best"]["adamw"]["best"], result["best"]["sophia"]["best"]))
    wrote = write_result(result, path, png)
    print(f"bench_convergence: rewrote {path}" + (f" and {wrote}" if wrote else ""))
    return 0


def merge(paths: List[str], path: str, png: Optional[str]) -> int:
    if path is None or os.path.abspath(path) in {os.path.abspath(p) for p in paths}:
        raise UsageError("--merge: name a new result file with --output (the merged files stay as they are)")
    try:
        result = report.merge_files(paths)
    except ValueError as err:
        raise UsageError(str(err)) from None
    report.print_summary(result, path, write_result(result, path, png))
    return 0


def output_path(template: str, corpus: str, variant: str) -> str:
    return template.replace("{corpus}", corpus).replace("{variant}", variant)


def check_args(args) -> list:
    """The variants; UsageError for arguments that cannot work together."""
    try:
        variants = parse_variants(args.variant)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if len(variants) > 1 and "{variant}" not in args.output:
        raise UsageError(f"--output {args.output}: several variants write one file each; put {{variant}} in "
                         f"the path, e.g. --output 'benchmarks/long/{{corpus}}-{{variant}}.json'")
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        raise UsageError(f"--jobs {args.jobs} / --threads {args.threads}: must be at least 1")
    if args.jobs > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--jobs: runs in worker processes of one rank; under a launcher use --jobs 1")
    if args.markdown and not (args.summarize or args.seeds):
        raise UsageError("--markdown: only with --summarize FILES or --seeds FILES")
    return variants


def run_benchmark(args, variants) -> int:
    started = time.perf_counter()
    bench = Bench(args)
    if args.estimate:
        projection = estimate(bench, args.estimate)
        if rank() == 0:
            print(json.dumps(projection, indent=2))
        return 0
    for variant in variants:  # a key the optimizer does not know fails here, before any training
        bench.config("sophia", 1e-3, 0.05, variant.resolved(1e-3))
    adamw_points = None
    if args.adamw_from:
        try:
            adamw_points = report.check_adamw_from(args.adamw_from, bench.fingerprint())
        except ValueError as err:
            raise UsageError(str(err)) from None
    from neox_sophia.training.loop import TrainingError

    runner = Runner(args.configs, bench.common, args.jobs, args.threads)
    try:
        adamw, found = search_all(runner, args, bench.sophia_params, variants, adamw_points)
    except TrainingError as err:  # refused at setup (training errors of a point are its divergence)
        raise UsageError(str(err)) from None
    finally:
        runner.close()
    if rank() != 0:
        return 0
    context = {**bench.context(runner.description, started, args.adamw_from),
               "threads_per_run": runner.threads}
    corpus = bench.corpus["corpus"] if bench.corpus else "config"
    for variant in variants:
        record = variant.record(min(adamw, key=report.final_loss)["lr"] if variant.needs_adamw else None)
        result = report.result_of(context, adamw, record, found[variant.name])
        path = output_path(args.output, corpus, variant.name)
        png = output_path(args.plot, corpus, variant.name) if args.plot else None
        report.print_summary(result, path, write_result(result, path, png))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.summarize and args.seeds:
            raise UsageError("--summarize and --seeds: one table per invocation; run them one after the other")
        if args.summarize or args.seeds:
            try:
                print(report.summarize_files(args.summarize, args.markdown) if args.summarize
                      else report.seeds_files(args.seeds, args.markdown, args.plot), end="")
            except ValueError as err:
                raise UsageError(str(err)) from None
            return 0
        if args.merge:
            return merge(args.merge, args.output, args.plot)
        if args.replot:
            return replot(args.replot, args.plot)
        variants = check_args(args)
        if args.device == "cpu":  # before torch / deepspeed pick an accelerator
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda but torch sees no CUDA device")
        return run_benchmark(args, variants)
    except (UsageError, ConfigError) as err:
        print(f"bench_convergence: error: {err}", file=sys.stderr)
        return 2

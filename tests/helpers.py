"""Helpers shared by several test modules (fixtures are in tests/conftest.py; running a function on
N gloo ranks is tests/distributed.py; the gathered optimizer-state reference is tests/gathered.py).

A test module imports what it shares from here, never from another test module. Workers handed to
run_ranks live here or in their test module: a spawned rank imports them by module name."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yml")

# --- a quick-start run on the tiny corpus (the `corpus` fixture) ------------------------------


PEAK_LR = 2.0e-3
"""optimizer.params.lr of overrides()."""


def overrides(corpus, run_dir, **extra):
    """--set values for a short quick-start run on ``corpus``, saving and logging under ``run_dir``."""
    # 4 sequences per step as 2 micro-batches of 2; the Hessian batch is 2 sequences (half), set
    # explicitly so that it stays the same when a test changes the micro-batch split
    values = {"data_path": corpus.data_prefix, "vocab_file": corpus.tokenizer, "seq_length": 32,
              "max_position_embeddings": 32, "train_micro_batch_size_per_gpu": 2,
              "gradient_accumulation_steps": 2, "train_iters": 12,
              "lr_decay_iters": 12, "log_interval": 1, "eval_interval": 6, "eval_iters": 2,
              "optimizer.params.hessian_interval": 3, "optimizer.params.lr": PEAK_LR,
              "optimizer.params.hessian_batch_size": 2,
              "save": os.path.join(run_dir, "ckpt"), "load": os.path.join(run_dir, "ckpt"),
              "checkpoint_factor": 100, "log_dir": os.path.join(run_dir, "logs")}
    values.update(extra)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]


def as_args(sets):
    return [a for s in sets for a in ("--set", s)]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "logs", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def launcher_free_env(**extra):
    """This environment without any launcher variables an earlier in-process test may have set."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "DS_ACCELERATOR": "cpu", **extra}


def cli(args, env=None, timeout=300):
    """`neox-sophia ARGS` in a subprocess on CPU, output captured."""
    return subprocess.run([sys.executable, "-m", "neox_sophia.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=launcher_free_env(**(env or {})), cwd=ROOT, stdin=subprocess.DEVNULL)


def start_rank(run_dir, rank, world_size, port, sets, name=None):
    """`neox-sophia train` as rank ``rank`` with a launcher's environment but no launcher (as
    under srun or mpirun, which do not tear the job down themselves); stdout/stderr to files."""
    name = name or f"rank{rank}"
    env = launcher_free_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                            LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                            OMP_NUM_THREADS="1")
    out, err = open(os.path.join(run_dir, f"{name}.out"), "w"), open(os.path.join(run_dir, f"{name}.err"), "w")
    return subprocess.Popen([sys.executable, "-m", "neox_sophia.cli", "train", QUICKSTART, *as_args(sets)],
                            stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)


def text(run_dir, name):
    with open(os.path.join(run_dir, name)) as f:
        return f.read()


def wait_for_line(run_dir, name, needle, procs, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if needle in text(run_dir, name):
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank ended before '{needle}':\n" + text(run_dir, name)[-3000:])
        time.sleep(0.2)
    raise AssertionError(f"no '{needle}' in {name} after {timeout} s")


# --- layout invariance: a run at some layout, compared with the single-process run --------------

COMMON = dict(train_iters=8, lr_decay_iters=8, eval_iters=0, gradient_clipping=0.05,
              **{"optimizer.params.hessian_interval": 2})

# Sophia's options beyond the paper together: bias correction, the Hessian floor (set from each
# role's mean h, an all-reduce across ranks), a split optimizer (AdamW on the embedding and the
# norms and biases) and no weight decay on the embedding; at the layouts that shard each piece
# differently: ZeRO-2 partitions, TP shards, and pipeline stages that hold different roles.
OPTIONS = {"optimizer.params.hessian_bias_correction": True, "optimizer.params.hessian_floor": 0.5,
           "optimizer.params.adamw_groups": ["embedding", "norms_biases"], "optimizer.params.adamw_lr": 4.0e-3,
           "embedding_weight_decay": False}


def layout_worker(rank, world_size, sets):
    """One rank of a quick-start run with ``sets``: losses, full weights and gathered optimizer state."""
    from neox_sophia.config import load_config
    from neox_sophia.model.gpt_neox import full_state_dict
    from neox_sophia.training.loop import setup, train_loop
    from tests.gathered import optimizer_state_by_name

    run = setup(load_config([QUICKSTART], sets, warn=False))
    result = train_loop(run)
    return {"loss": result.train_loss, "hessian_updates": result.hessian_updates,
            "weights": full_state_dict(run.engine.module),
            "state": optimizer_state_by_name(run.engine, run.optimizer),
            "offloaded": getattr(run.engine.optimizer, "cpu_offload", False)}  # ZeRO's offload path


def count_off(actual, expected, name, most, beyond):
    """Entries of |actual - expected| above ``beyond`` x the largest |expected|, and the entry
    count, after checking that no entry differs by more than ``most`` (absolute)."""
    diff = (actual - expected).abs()
    assert float(diff.max()) <= most, name
    return int((diff > beyond * float(expected.abs().max())).sum()), diff.numel()


def close(actual, expected, name, tolerance=1e-4):
    """Equal up to ``tolerance`` relative, with an absolute floor of that fraction of the largest entry."""
    floor = tolerance * float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=max(floor, 1e-12), msg=lambda m: f"{name}: {m}")


# --- tiny models (against Hugging Face and the converters) ---------------------------------------

PADDED = 128  # the padded vocabulary of the tiny models
NEOX_SEED, LLAMA_SEED = 7, 5

# name: (num_kv_heads, sliding_window_width, biases, activation)
LLAMA_VARIANTS = {"llama": (None, None, False, "swiglu"), "gqa-biases": (2, None, True, "swiglu"),
                  "mqa-geglu": (1, None, False, "geglu"), "mistral-window": (2, 5, False, "swiglu")}


def tiny_config(gpt_j_residual, rotary_pct, **extra):
    """A 2-layer GPT-NeoX."""
    from neox_sophia.config.model import ModelConfig

    return ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16,
                       max_position_embeddings=32, pos_emb="rotary", rotary_pct=rotary_pct,
                       gpt_j_residual=gpt_j_residual, no_weight_tying=True, **extra)


def neox_tokens():
    return torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(0))


def llama_config(kv_heads, window, biases, activation, **extra):
    """A 2-layer LLaMA-family model (one of LLAMA_VARIANTS' argument tuples)."""
    from neox_sophia.config.model import ModelConfig

    values = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=kv_heads, seq_length=16,
                  max_position_embeddings=32, pos_emb="rotary", norm="rmsnorm", rms_norm_epsilon=1e-5,
                  activation=activation, intermediate_size=3 * 48, no_weight_tying=True,
                  use_bias_in_attn_linear=biases, use_bias_in_mlp=biases, rotary_emb_base=500000,
                  sliding_window_width=window, attention_config=[[["flash"], 2]] if window else None)
    return ModelConfig(**{**values, **extra})


def llama_tokens():
    return torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))


def perturbed(model):
    """Norm weights and biases away from their init (ones, zeros), so a misplaced one shows."""
    generator = torch.Generator().manual_seed(LLAMA_SEED)
    with torch.no_grad():
        for _, param in model.global_named_parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def neox_parameters(layers, hidden, vocab, tied=False, ffn=None):
    """GPT-NeoX parameters written out: embedding, per layer (2 LayerNorms, QKV, dense, MLP),
    final LayerNorm, output layer."""
    ffn = ffn or 4 * hidden
    per_layer = 2 * 2 * hidden + (3 * hidden * hidden + 3 * hidden) + (hidden * hidden + hidden) \
        + (hidden * ffn + ffn) + (ffn * hidden + hidden)
    return vocab * hidden + layers * per_layer + 2 * hidden + (0 if tied else vocab * hidden)


# --- Sophia on a few plain tensors -----------------------------------------------------------------

SHAPES = [(7, 5), (13,), (3, 4, 6), (300,)]
GROUPS = [  # two groups: with and without weight decay, different rho and bs
    dict(idx=[0, 1], lr=3e-2, weight_decay=0.2, rho=0.05, bs=64, betas=(0.965, 0.99)),
    dict(idx=[2, 3], lr=1e-2, weight_decay=0.0, rho=0.02, bs=32, betas=(0.9, 0.95)),
]


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def gradient_stream(steps, seed=1):
    """Deterministic gradients with coordinates on very different scales (some clip, some not)."""
    g = torch.Generator().manual_seed(seed)
    scales = [torch.rand(s, generator=g) * 3 - 2 for s in SHAPES]  # log10 scale in [-2, 1)
    for _ in range(steps):
        yield ([torch.randn(s, generator=g) * 10 ** sc for s, sc in zip(SHAPES, scales)],
               [torch.randn(s, generator=g) * 10 ** sc for s, sc in zip(SHAPES, scales)])


def sophia_groups(params):
    return [dict(params=[params[i] for i in g["idx"]], **{k: v for k, v in g.items() if k != "idx"})
            for g in GROUPS]


def drive(opt, params, steps, k=3, on_step=None):
    """Official order: update every step; Hessian pass after the update when it % k == k-1."""
    for it, (grads, hess_grads) in enumerate(gradient_stream(steps)):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        if it % k == k - 1:
            for p, g in zip(params, hess_grads):
                p.grad = g.clone()
            opt.update_hessian()
        if on_step:
            on_step(it)


def check_flat_partitions_equal_separate_tensors(**options):
    """ZeRO hands the optimizer one flat fp32 partition per group: same numbers, other layout."""
    from neox_sophia.optim import Sophia

    params = make_params()
    flat = [torch.nn.Parameter(torch.cat([params[i].detach().reshape(-1) for i in g["idx"]]))
            for g in GROUPS]
    opt = Sophia(sophia_groups(params), **options)
    opt_flat = Sophia([dict(params=[f], **{k: v for k, v in g.items() if k != "idx"})
                       for f, g in zip(flat, GROUPS)], **options)
    for it, (grads, hess_grads) in enumerate(gradient_stream(25)):
        for which in ("step", "hessian"):
            gs = grads if which == "step" else hess_grads
            if which == "hessian" and it % 3 != 2:
                continue
            for p, g in zip(params, gs):
                p.grad = g
            for f, g in zip(flat, GROUPS):
                f.grad = torch.cat([gs[i].reshape(-1) for i in g["idx"]])
            for o in (opt, opt_flat):
                o.step() if which == "step" else o.update_hessian()
    for f, g in zip(flat, GROUPS):
        for key in ("exp_avg", "hessian"):
            joined = torch.cat([opt.state[params[i]][key].reshape(-1) for i in g["idx"]])
            assert torch.equal(joined, opt_flat.state[f][key])
        assert torch.equal(torch.cat([params[i].detach().reshape(-1) for i in g["idx"]]), f.detach())


def hessian_case(dtype, seed=0):
    """Hessians and estimates where most coordinates are ordinary and a few chunks hold what the
    guard must catch: NaN, inf, a square that overflows, a sum that overflows, values near the
    largest float that still fit."""
    g = torch.Generator().manual_seed(seed)
    big = torch.finfo(dtype).max
    hs = [torch.rand(s, generator=g).to(dtype) for s in [(40, 9), (70,), (5, 5), (0,), (300,)]]
    es = [torch.randn(h.shape, generator=g).to(dtype) for h in hs]
    es[0][3, 4] = float("nan")
    es[1][60] = float("inf")
    es[2][1, 1] = math.sqrt(big) * 20      # e*e overflows
    hs[4][7], es[4][7] = big * 0.999, math.sqrt(big) * 2  # b2*h + (1-b2)*e*e overflows
    hs[4][250], es[4][250] = big * 0.9, 1.0  # huge but finite: must be kept
    return hs, es

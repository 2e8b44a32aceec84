"""End to end on the built-in corpus: Sophia and AdamW train, the Hessian is refreshed and used,
2-rank ZeRO-1/2 matches one process, resume is bit-exact, a save killed midway loses nothing,
and bad input stops with a clear message."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.distributed import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yml")

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from neox_sophia.data.corpus import prepare_builtin_corpus

    return prepare_builtin_corpus(tmp_path_factory.mktemp("corpus"), max_bytes=1_000_000, vocab_size=512,
                                  log=None)


def overrides(corpus, run_dir, **extra):
    # 4 sequences per step as 2 micro-batches of 2; the Hessian batch is 2 sequences (half), set
    # explicitly so that it stays the same when a test changes the micro-batch split
    values = {"data_path": corpus.data_prefix, "vocab_file": corpus.tokenizer, "seq_length": 32,
              "max_position_embeddings": 32, "train_micro_batch_size_per_gpu": 2,
              "gradient_accumulation_steps": 2, "train_iters": 12,
              "lr_decay_iters": 12, "log_interval": 1, "eval_interval": 6, "eval_iters": 2,
              "optimizer.params.hessian_interval": 3, "optimizer.params.lr": 2.0e-3,
              "optimizer.params.hessian_batch_size": 2,
              "save": os.path.join(run_dir, "ckpt"), "load": os.path.join(run_dir, "ckpt"),
              "checkpoint_factor": 100, "log_dir": os.path.join(run_dir, "logs")}
    values.update(extra)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]


def train_worker(rank, world_size, sets):
    from neox_sophia.config import load_config
    from neox_sophia.model.gpt_neox import full_state_dict
    from neox_sophia.training.loop import _resume, setup, train_loop

    run = setup(load_config([QUICKSTART], sets, warn=False))
    start, nonfinite = _resume(run)
    result = train_loop(run, start, nonfinite)
    hessian = [s["hessian"].clone() for s in run.optimizer.state.values() if "hessian" in s]
    return {"loss": result.train_loss, "val": result.val_loss, "hessian_updates": result.hessian_updates,
            "weights": full_state_dict(run.engine.module), "start": start,
            "hessian_abs_sum": float(sum(h.abs().sum() for h in hessian)) if hessian else None}


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "logs", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("optimizer", ["sophia", "adamw"])
def test_quickstart_trains_and_reports(corpus, tmp_path, optimizer):
    extra = {"train_iters": 24, "lr_decay_iters": 24}
    sets = overrides(corpus, str(tmp_path), **extra)
    if optimizer == "adamw":
        sets = [s for s in sets if not s.startswith("optimizer.")]
        sets.append("optimizer={type: adamw, params: {lr: 2.0e-3, betas: [0.9, 0.95]}}")
    out = run_ranks(train_worker, 1, args=(sets,))[0]
    losses = [out["loss"][s] for s in sorted(out["loss"])]
    assert len(losses) == 24 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses
    records = [r for r in read_metrics(str(tmp_path)) if "loss" in r]
    evals = [r for r in read_metrics(str(tmp_path)) if "val_loss" in r]
    assert [r["step"] for r in records] == list(range(1, 25)) and [r["step"] for r in evals] == [6, 12, 18, 24]
    for key in ("step", "loss", "lr", "grad_norm", "clip_frac", "hessian_update", "tokens_per_s", "elapsed_s"):
        assert key in records[0], key
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in records)
    if optimizer == "sophia":
        assert out["hessian_updates"] == 8 and out["hessian_abs_sum"] > 0
        assert [r["step"] for r in records if r["hessian_update"]] == [3, 6, 9, 12, 15, 18, 21, 24]
        assert records[0]["clip_frac"] == 1.0  # h = 0 before the first refresh: every step clips
        assert 0.0 <= records[-1]["clip_frac"] < 1.0  # afterwards the Hessian preconditions some
    else:
        assert out["hessian_abs_sum"] is None and records[0]["clip_frac"] is None


@pytest.mark.parametrize("stage", [1, 2])
def test_two_rank_zero_matches_one_process(corpus, tmp_path, stage):
    reference = run_ranks(train_worker, 1, args=(overrides(corpus, str(tmp_path / "one"), train_iters=7,
                                                           lr_decay_iters=7, eval_iters=0),))[0]
    sets = overrides(corpus, str(tmp_path / "two"), train_iters=7, lr_decay_iters=7, eval_iters=0,
                     train_micro_batch_size_per_gpu=1, zero_optimization={"stage": stage})
    two = run_ranks(train_worker, 2, args=(sets,))
    for step in range(1, 8):
        assert two[0]["loss"][step] == pytest.approx(reference["loss"][step], rel=1e-4, abs=1e-5), step
    assert two[0]["hessian_updates"] == reference["hessian_updates"] == 2
    for name, w in reference["weights"].items():
        torch.testing.assert_close(two[0]["weights"][name], w, rtol=1e-3, atol=1e-4, msg=name)


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(corpus, tmp_path):
    straight = run_ranks(train_worker, 1, args=(overrides(corpus, str(tmp_path / "a")),))[0]
    # Hessian refreshes at steps 3 | cut at 5 | 6, 9, 12
    cut = overrides(corpus, str(tmp_path / "b"), checkpoint_factor=5, keep_last_n_checkpoints=5)
    first = run_ranks(train_worker, 1, args=(cut[:], ))[0]
    assert first["start"] == 0
    # the second half: same config, a fresh process, resuming from step 5
    ckpt = str(tmp_path / "b" / "ckpt")
    for tag in ("global_step10", "global_step12"):
        shutil.rmtree(os.path.join(ckpt, tag), ignore_errors=True)
    with open(os.path.join(ckpt, "latest"), "w") as f:
        f.write("global_step10\n")  # points at a removed checkpoint: resume falls back to step 5
    second = run_ranks(train_worker, 1, args=(cut,))[0]
    assert second["start"] == 5
    for step in range(6, 13):
        assert second["loss"][step] == straight["loss"][step], step
    for name, w in straight["weights"].items():
        assert torch.equal(second["weights"][name], w), name


def launcher_free_env(**extra):
    """This environment without any launcher variables an earlier in-process test may have set."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "DS_ACCELERATOR": "cpu", **extra}


def cli(args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "neox_sophia.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=launcher_free_env(**(env or {})), cwd=ROOT, stdin=subprocess.DEVNULL)


def test_kill_during_save_keeps_the_previous_checkpoint(corpus, tmp_path):
    from neox_sophia.training.checkpoint import complete_tags, resolve_tag

    sets = overrides(corpus, str(tmp_path), checkpoint_factor=4, eval_iters=0)
    args = ["train", QUICKSTART] + [a for s in sets for a in ("--set", s)]
    killed = cli(args, env={"NEOX_SOPHIA_FAULT": "checkpoint_before_marker:8"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckpt = str(tmp_path / "ckpt")
    assert os.path.isdir(os.path.join(ckpt, "global_step8"))  # written, but not marked complete
    assert complete_tags(ckpt) == [(4, "global_step4")] and resolve_tag(ckpt) == "global_step4"
    with open(os.path.join(ckpt, "latest")) as f:
        assert f.read().strip() == "global_step4"
    resumed = cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    assert complete_tags(ckpt)[-1] == (12, "global_step12")


def test_bad_input_is_one_clear_line(corpus, tmp_path):
    base = overrides(corpus, str(tmp_path), eval_iters=0)

    def run(*extra):
        sets = base + list(extra)
        return cli(["train", QUICKSTART] + [a for s in sets for a in ("--set", s)])

    missing = run(f"data_path={tmp_path / 'nope'}")
    assert missing.returncode == 2 and "nope" in missing.stderr and "Traceback" not in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    no_ckpt = run(f"load={empty}")
    assert no_ckpt.returncode == 2 and "no complete checkpoint" in no_ckpt.stderr
    corrupt = tmp_path / "corrupt" / "global_step3"
    corrupt.mkdir(parents=True)
    (corrupt / "complete").write_text("{}")
    (corrupt / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    bad = run(f"load={tmp_path / 'corrupt'}")
    assert bad.returncode == 2 and "could not be read" in bad.stderr and "Traceback" not in bad.stderr
    hutchinson = run("optimizer.params.estimator=hutchinson")
    assert hutchinson.returncode == 2 and "trainer implements 'gnb'" in hutchinson.stderr
    for pipe in (0, 1):  # the plain engine checks the loss, the PipelineEngine the gradients
        diverged = run("optimizer.params.lr=1.0e+30", "max_nonfinite_steps=2", "gradient_clipping=0.0",
                       f"pipe_parallel_size={pipe}")
        assert diverged.returncode == 2, diverged.stderr[-2000:]
        assert "not finite for 2 steps in a row" in diverged.stderr, diverged.stderr[-2000:]


@pytest.mark.parametrize("pipe,world", [(1, 1), (2, 2)])
def test_pipeline_engine_matches_plain_module(corpus, tmp_path, pipe, world):
    """pipe_parallel_size >= 1 trains through DeepSpeed's PipelineEngine, Hessian step included
    (labels sampled in the last stage's loss function): same losses as the plain module, and the
    same global gradient norm (every stage's norms and biases counted, with clipping active)."""
    common = dict(train_iters=7, lr_decay_iters=7, eval_iters=0, gradient_clipping=0.05)
    reference = run_ranks(train_worker, 1, args=(overrides(corpus, str(tmp_path / "plain"), **common),))[0]
    piped = run_ranks(train_worker, world, args=(overrides(corpus, str(tmp_path / "pipe"), pipe_parallel_size=pipe,
                                                           **common),))
    assert piped[0]["hessian_updates"] == 2
    norms = {name: {r["step"]: r["grad_norm"] for r in read_metrics(str(tmp_path / name)) if "loss" in r}
             for name in ("plain", "pipe")}
    for step in range(1, 8):
        assert norms["pipe"][step] == pytest.approx(norms["plain"][step], rel=1e-4), step
    for step in range(1, 8):
        # sign(m) at coordinates where m is ~0 amplifies float reduction-order differences
        assert piped[0]["loss"][step] == pytest.approx(reference["loss"][step], rel=1e-4), step


def test_launch_runs_train_on_two_cpu_ranks_through_the_deepspeed_runner(corpus, tmp_path):
    sets = overrides(corpus, str(tmp_path), train_iters=2, lr_decay_iters=2, eval_iters=0,
                     train_micro_batch_size_per_gpu=1)
    launched = cli(["launch", "--num-gpus", "2", QUICKSTART] + [a for s in sets for a in ("--set", s)])
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "--no_local_rank --module neox_sophia.cli train" in launched.stderr
    assert [r["step"] for r in read_metrics(str(tmp_path)) if "loss" in r] == [1, 2]


@pytest.mark.skipif(shutil.which("mpirun", path=os.path.dirname(sys.executable)) is None,
                    reason="no mpirun next to this Python (the mpich wheel of the test extra provides one)")
def test_train_under_mpirun_matches_one_process(corpus, tmp_path):
    sets = overrides(corpus, str(tmp_path / "mpi"), train_iters=3, lr_decay_iters=3, eval_iters=0,
                     train_micro_batch_size_per_gpu=1)
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable))
    done = subprocess.run([mpirun, "-n", "2", sys.executable, "-m", "neox_sophia.cli", "train", QUICKSTART]
                          + [a for s in sets for a in ("--set", s)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, stdin=subprocess.DEVNULL, env=launcher_free_env())
    assert done.returncode == 0, done.stderr[-3000:]
    one = run_ranks(train_worker, 1, args=(overrides(corpus, str(tmp_path / "one"), train_iters=3, lr_decay_iters=3,
                                                     eval_iters=0),))[0]
    mpi = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "mpi")) if "loss" in r}
    for step in (1, 2, 3):
        assert mpi[step] == pytest.approx(one["loss"][step], rel=1e-5)


@pytest.mark.parametrize("tp,pipe,world,stage", [(2, 0, 2, 0), (2, 1, 4, 1), (2, 2, 4, 1)])
def test_tensor_parallel_sophia_matches_one_process(corpus, tmp_path, tp, pipe, world, stage):
    """Sophia-G with vocab-parallel label sampling: TP=2 (and TP=2 x DP=2 under the PipelineEngine
    with ZeRO-1) trains like one process, Hessian steps included. Clipping at 0.05 is active on
    every step, so the global gradient norm (TP shards summed, replicated norms counted once)
    must be right for the losses to agree; the logged norms are compared too."""
    common = dict(train_iters=6, lr_decay_iters=6, eval_iters=0, gradient_clipping=0.05)
    reference = run_ranks(train_worker, 1, args=(overrides(corpus, str(tmp_path / "one"), **common),))[0]
    dp = world // (tp * max(pipe, 1))
    sets = overrides(corpus, str(tmp_path / "tp"), model_parallel_size=tp, pipe_parallel_size=pipe,
                     train_micro_batch_size_per_gpu=2 // dp, zero_optimization={"stage": stage}, **common)
    out = run_ranks(train_worker, world, args=(sets,))
    assert out[0]["hessian_updates"] == 2
    norms = {name: {r["step"]: r["grad_norm"] for r in read_metrics(str(tmp_path / name)) if "loss" in r}
             for name in ("one", "tp")}
    assert all(n > 0.05 for n in norms["one"].values())  # clipping was active
    for step in range(1, 7):
        assert norms["tp"][step] == pytest.approx(norms["one"][step], rel=1e-4), step
        # sign(m) at coordinates where m is ~0 amplifies float reduction-order differences
        assert out[0]["loss"][step] == pytest.approx(reference["loss"][step], rel=1e-4), step
    weights = {name: w for rank in out for name, w in rank["weights"].items()}  # every stage's blocks
    for name, w in reference["weights"].items():
        torch.testing.assert_close(weights[name], w, rtol=1e-3, atol=2e-3, msg=name)


def test_a_different_micro_batch_split_trains_the_same(corpus, tmp_path):
    common = dict(train_iters=6, lr_decay_iters=6, eval_iters=0)
    reference = run_ranks(train_worker, 1, args=(overrides(corpus, str(tmp_path / "a"), **common),))[0]
    split = run_ranks(train_worker, 1, args=(overrides(corpus, str(tmp_path / "b"), train_micro_batch_size_per_gpu=1,
                                                       gradient_accumulation_steps=4, **common),))[0]
    for step in range(1, 7):
        assert split["loss"][step] == pytest.approx(reference["loss"][step], rel=1e-4), step


def hessian_step_worker(rank, world_size, sets):
    """One training step, then one Hessian step: what the Hessian step may and may not change."""
    from neox_sophia.config import load_config
    from neox_sophia.training.loop import setup
    from neox_sophia.training.steps import hessian_uniforms, pipeline_hessian_step, plain_hessian_step

    run = setup(load_config([QUICKSTART], sets, warn=False))
    from neox_sophia.training.loop import RunResult, _one_step

    _one_step(run, 0, RunResult(0))  # step 0: a real update (k=3: no Hessian step yet)
    snap = lambda: {k: v.detach().clone() for k, v in run.engine.module.named_parameters()}  # noqa: E731
    state = lambda key: [s[key].clone() for s in run.optimizer.state.values()]  # noqa: E731
    before = dict(params=snap(), exp_avg=state("exp_avg"), hessian=state("hessian"),
                  counters=(run.engine.global_steps, run.engine.global_samples, run.engine.micro_steps),
                  lr=run.scheduler.get_last_lr(), sched=run.scheduler.state_dict(),
                  step=[s["step"].clone() for s in run.optimizer.state.values()])
    batches = run.hessian_micro_batches(0)
    fn = pipeline_hessian_step if run.pipeline else plain_hessian_step
    fn(run.engine, run.optimizer, batches, hessian_uniforms(1234, 0, batches, 32), run.vocab_size)
    after_params = snap()
    return {"params_same": all(torch.equal(before["params"][k], after_params[k]) for k in after_params),
            "exp_avg_same": all(torch.equal(a, b) for a, b in zip(before["exp_avg"], state("exp_avg"))),
            "hessian_changed": any(not torch.equal(a, b) for a, b in zip(before["hessian"], state("hessian"))),
            "counters_same": before["counters"] == (run.engine.global_steps, run.engine.global_samples,
                                                    run.engine.micro_steps),
            "lr_same": before["lr"] == run.scheduler.get_last_lr() and before["sched"] == run.scheduler.state_dict(),
            "step_same": all(torch.equal(a, b["step"]) for a, b in zip(before["step"], run.optimizer.state.values())),
            "micro_batches": len(batches)}


@pytest.mark.parametrize("pipe,precision,stage", [(0, "fp32", 0), (0, "bfloat16", 1), (1, "fp32", 1),
                                                  (1, "bfloat16", 0)])
def test_the_hessian_step_changes_only_the_hessian(corpus, tmp_path, pipe, precision, stage):
    """No parameter change (so no weight decay), exp_avg and Sophia's step count untouched, engine
    step/sample/micro-step counters and the LR schedule not advanced; the hessian EMA (in the fp32
    master partition under bf16) moves. Half the accumulation steps by default."""
    sets = [s for s in overrides(corpus, str(tmp_path), eval_iters=0) if "hessian_batch_size" not in s]
    sets += [f"pipe_parallel_size={pipe}", f"precision={precision}", f"zero_optimization={{stage: {stage}}}",
             "gradient_accumulation_steps=4", "train_micro_batch_size_per_gpu=1"]
    out = run_ranks(hessian_step_worker, 1, args=(sets,))[0]
    assert out["micro_batches"] == 2  # half of 4 accumulation steps
    for key in ("params_same", "exp_avg_same", "hessian_changed", "counters_same", "lr_same", "step_same"):
        assert out[key], key


@pytest.mark.gpu
@pytest.mark.parametrize("pipe,stage", [(0, 0), (0, 1), (1, 1)])
def test_the_hessian_step_changes_only_the_hessian_in_fp16(corpus, tmp_path, pipe, stage):
    """fp16 (DeepSpeed refuses it on CPU): the loss scale is removed before update_hessian() sees
    the gradient (DeepSpeed unscales before the optimizer step), and the properties above hold."""
    sets = [s for s in overrides(corpus, str(tmp_path), eval_iters=0) if "hessian_batch_size" not in s]
    sets += [f"pipe_parallel_size={pipe}", "precision=fp16", f"zero_optimization={{stage: {stage}}}",
             "gradient_accumulation_steps=4", "train_micro_batch_size_per_gpu=1"]
    out = run_ranks(hessian_step_worker, 1, args=(sets,), accelerator="cuda")[0]
    for key in ("params_same", "exp_avg_same", "hessian_changed", "counters_same", "lr_same", "step_same"):
        assert out[key], key

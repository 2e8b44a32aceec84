"""End to end on the built-in corpus: Sophia and AdamW train, the Hessian is refreshed and used,
resume is bit-exact, a save killed midway loses nothing, bad input stops with a clear message,
the launchers start ranks, and the Hessian step changes only the Hessian (fp32, bf16, fp16).
Layout invariance (TP x PP x DP, ZeRO, micro-batch split) is tests/test_layouts.py."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.distributed import run_ranks
from tests.helpers import QUICKSTART, ROOT, cli, launcher_free_env, overrides, read_metrics

pytestmark = pytest.mark.distributed


def train_worker(rank, world_size, sets):
    from neox_sophia.config import load_config
    from neox_sophia.model.gpt_neox import full_state_dict
    from neox_sophia.training.loop import resume_from_load, setup, train_loop

    run = setup(load_config([QUICKSTART], sets, warn=False))
    start, nonfinite = resume_from_load(run)
    result = train_loop(run, start, nonfinite)
    hessian = [s["hessian"].clone() for s in run.optimizer.state.values() if "hessian" in s]
    return {"loss": result.train_loss, "val": result.val_loss, "hessian_updates": result.hessian_updates,
            "weights": full_state_dict(run.engine.module), "start": start,
            "hessian_abs_sum": float(sum(h.abs().sum() for h in hessian)) if hessian else None}


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
    fp16 = run("precision=fp16")  # at ZeRO stage 0: DeepSpeed would never apply the loss scale
    assert fp16.returncode == 2 and "zero_optimization.stage to 1" in fp16.stderr
    for pipe in (0, 1):  # the plain engine checks the loss, the PipelineEngine the gradients
        diverged = run("optimizer.params.lr=1.0e+30", "max_nonfinite_steps=2", "gradient_clipping=0.0",
                       f"pipe_parallel_size={pipe}")
        assert diverged.returncode == 2, diverged.stderr[-2000:]
        assert "not finite for 2 steps in a row" in diverged.stderr, diverged.stderr[-2000:]


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

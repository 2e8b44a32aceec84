"""Runs that cannot lose work (docs/operations.md), tried the way a user meets each failure: a second
run on the same save folder, a loss that diverges, a resume with changed settings, a run extended
by raising train_iters, unwritable outputs, a crash in the first save, damaged checkpoint files,
and kill -9 at random moments of the saves (the same command then gives the uninterrupted run's
losses bit for bit). Each ends with nothing lost, or one line (exit 2) naming the file or key."""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch

from tests.distributed import free_port, run_ranks
from tests.helpers import QUICKSTART, as_args, cli, overrides, read_metrics, start_rank, text, wait_for_line

pytestmark = pytest.mark.distributed


def train(sets, env=None):
    return cli(["train", QUICKSTART, *as_args(sets)], env=env)


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def complete_steps(save):
    from neox_sophia.training.checkpoint import complete_tags

    return [step for step, _ in complete_tags(save)]


# --- 1. one run per save folder ----------------------------------------------------------------

def test_a_second_run_on_the_same_save_folder_is_refused_and_a_dead_runs_lock_taken_over(corpus, tmp_path):
    from neox_sophia.training.savelock import LOCK_FILE

    run_dir, save = str(tmp_path), str(tmp_path / "ckpt")
    # long enough never to end by itself on a loaded machine: SIGTERM ends it
    sets = overrides(corpus, run_dir, train_iters=2000, lr_decay_iters=2000, eval_iters=0, checkpoint_factor=1000)
    first = start_rank(run_dir, 0, 1, free_port(), sets)
    wait_for_line(run_dir, "rank0.out", "step    3/2000", [first])
    second = train(sets + ["optimizer.params.lr=1.0e-3"])  # same save, another lr
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"save: {save} is in use by another run (pid {first.pid} on " in second.stderr
    assert "Traceback" not in second.stderr and "step" not in second.stdout  # refused before any setup work
    assert text(run_dir, "logs/rank_00000.log").count("start: rank 0") == 1  # the first run's log untouched
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 0, text(run_dir, "rank0.err")[-3000:]
    stopped = complete_steps(save)[-1]
    assert sorted(losses(run_dir)) == list(range(1, stopped + 1))  # one run's records, each step once
    assert not os.path.exists(os.path.join(save, LOCK_FILE))  # released
    # a lock left by a process that died on this host (kill -9) is taken over with a line
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "ckpt" / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                           "started": 0, "command": "killed"}))
    again = train(sets + [f"train_iters={stopped}"])  # nothing left to train: resumes, ends
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"took over the lock of {save} from a run that is no longer running (pid {dead.pid}" in again.stdout


def test_the_lock_refuses_a_live_holder_another_host_and_an_unreadable_file_and_survives_pid_reuse(tmp_path):
    from neox_sophia.training.savelock import LOCK_FILE, SaveFolderInUse, SaveLock, this_process

    folder = str(tmp_path)
    path = tmp_path / LOCK_FILE
    mine = SaveLock(folder)
    mine.acquire()
    with pytest.raises(SaveFolderInUse, match=rf"in use by another run \(pid {os.getpid()} on "):
        SaveLock(folder).acquire()  # alive on this host
    mine.release()
    assert not path.exists()
    for holder, says in [({**this_process(), "host": "node-17"}, "on node-17"),   # a shared filesystem
                         ({**this_process(), "process_start": -1}, None)]:       # this pid, reused
        path.write_text(json.dumps(holder))
        lock = SaveLock(folder)
        if says:
            with pytest.raises(SaveFolderInUse, match=says):
                lock.acquire()
        else:
            lock.acquire()
            assert lock.took_over == holder and json.loads(path.read_text()) == lock.record
            lock.release()
    path.write_text("{not json")
    with pytest.raises(SaveFolderInUse, match="cannot be read; if no run uses this folder, delete that file"):
        SaveLock(folder).acquire()


# --- 2. divergence ------------------------------------------------------------------------------

ADAMW = "optimizer={type: adamw, params: {lr: 2.0e-3}}"


def test_a_divergence_keeps_the_checkpoint_to_go_back_to(corpus, tmp_path):
    run_dir, save = str(tmp_path), str(tmp_path / "ckpt")
    base = [s for s in overrides(corpus, run_dir, eval_iters=0, checkpoint_factor=1, keep_last_n_checkpoints=1)
            if not s.startswith("optimizer.")] + [ADAMW]
    assert train(base + ["train_iters=4"]).returncode == 0
    # lr 1e30: step 5's loss is still finite (the weights of step 4 give it), its update blows the
    # weights up, and the loss of steps 6, 7, 8 is not finite; saves 5, 6 and 7 happen
    blown = train(base + ["optimizer={type: adamw, params: {lr: 1.0e+30}}", "max_nonfinite_steps=3"])
    assert blown.returncode == 2, blown.stderr[-2000:]
    assert complete_steps(save) == [4, 7]  # keep_last_n_checkpoints 1, and the one to go back to
    assert "no checkpoint written" not in blown.stdout  # a skipped step changes nothing, the weights stay finite
    good = os.path.join(save, "global_step4")
    assert "the loss was not finite for 3 steps in a row (step 8" in blown.stderr
    assert f"{good} is the newest checkpoint whose next step was finite" in blown.stderr
    assert f"--set load={good} and e.g. --set optimizer.params.lr=5e+29" in blown.stderr
    # the advice works: that command (with a sane lr) resumes there and trains to the end, replacing
    # the blown-up checkpoints as it reaches their steps
    resumed = train(base + [f"load={good}"])
    assert resumed.returncode == 0 and f"resumed from {good} at step 4" in resumed.stdout, resumed.stderr[-2000:]
    assert complete_steps(save) == [11, 12]  # the newest, and the newest verified by a finite next step


def nonfinite_save_worker(rank, world_size, sets):
    import contextlib
    import io

    from neox_sophia.config import load_config
    from neox_sophia.training.components import Checkpointing
    from neox_sophia.training.loop import setup, train_loop

    run = setup(load_config([QUICKSTART], sets, warn=False))
    train_loop(run)  # 2 steps, saved at 2
    next(run.engine.module.parameters()).data.view(-1)[0] = float("inf")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        written = Checkpointing(run, 0).save(run, 3, 0)
    return written, printed.getvalue()


def test_no_checkpoint_is_written_from_non_finite_weights(corpus, tmp_path):
    sets = overrides(corpus, str(tmp_path), eval_iters=0, train_iters=2, lr_decay_iters=2, checkpoint_factor=2)
    written, printed = run_ranks(nonfinite_save_worker, 1, args=(sets,))[0]
    assert not written and complete_steps(str(tmp_path / "ckpt")) == [2]
    assert "step 3: no checkpoint written: the weights or optimizer state are not finite (weight " in printed


def test_no_checkpoint_holds_a_non_finite_hessian():
    from neox_sophia.optim.sophia import Sophia
    from neox_sophia.training.checkpoint import nonfinite_tensor

    model = torch.nn.Linear(3, 2)
    optimizer = Sophia(model.parameters(), bs=10)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    assert nonfinite_tensor(model, optimizer) is None
    optimizer.state[model.bias]["hessian"][0] = float("inf")
    assert nonfinite_tensor(model, optimizer) == "optimizer state 'hessian' of param group 0, tensor 1"
    model.weight.data[0, 0] = float("nan")
    assert nonfinite_tensor(model, optimizer) == "weight weight"


# --- 3. the config wins on resume ---------------------------------------------------------------

def resume_worker(rank, world_size, first, second):
    import contextlib
    import io

    from neox_sophia.config import load_config
    from neox_sophia.training.loop import resume_from_load, setup, train_loop

    train_loop(setup(load_config([QUICKSTART], first, warn=False)))
    run = setup(load_config([QUICKSTART], second, warn=False))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        start, nonfinite = resume_from_load(run)
    groups = [{key: group[key] for key in ("rho", "betas", "eps", "bs", "weight_decay")}
              for group in run.optimizer.param_groups]
    train_loop(run, start, nonfinite)
    return {"start": start, "printed": printed.getvalue(), "groups": groups}


@pytest.mark.parametrize("stage", [0, 1])
def test_resume_follows_the_config_and_says_what_changed(corpus, tmp_path, stage):
    from neox_sophia.convert.reader import read_checkpoint

    run_dir = str(tmp_path)
    first = overrides(corpus, run_dir, train_iters=3, eval_iters=0, **{"zero_optimization": {"stage": stage},
                                                                      "optimizer.params.rho": 0.05})
    second = first + ["train_iters=6", "optimizer.params.rho=0.1", "optimizer.params.betas=[0.9, 0.99]",
                      "weight_decay=0.2", "optimizer.params.hessian_batch_size=4", "lr_decay_style=linear"]
    out = run_ranks(resume_worker, 1, args=(first, second))[0]
    assert out["start"] == 3
    assert all(g["rho"] == 0.1 and tuple(g["betas"]) == (0.9, 0.99) and g["bs"] == 4 * 32 for g in out["groups"])
    assert sorted({g["weight_decay"] for g in out["groups"]}) == [0.0, 0.2]  # norms and biases keep none
    lines = [line for line in out["printed"].splitlines() if "resume:" in line]
    for expected in ["optimizer.params.rho 0.05 -> 0.1", "optimizer.params.betas [0.965, 0.99] -> [0.9, 0.99]",
                     "weight_decay 0.1 -> 0.2", "optimizer.params.bs 64 -> 128", "train_iters 3 -> 6",
                     "optimizer.params.hessian_batch_size 2 -> 4", "lr_decay_style cosine -> linear"]:
        assert sum(line.endswith(f"resume: {expected}") for line in lines) == 1, (expected, lines)
    assert len(lines) == 7, lines  # said once each, nothing else
    saved = read_checkpoint(os.path.join(run_dir, "ckpt"), step=6)  # what the next checkpoint records is in force
    assert {g["rho"] for g in saved.param_groups} == {0.1} and saved.config["optimizer"]["params"]["rho"] == 0.1


# --- 9. extending a run does not change its past --------------------------------------------------

def test_raising_train_iters_on_resume_gives_the_longer_run_bit_for_bit(corpus, tmp_path):
    straight = overrides(corpus, str(tmp_path / "a"), eval_iters=0, checkpoint_factor=100)
    assert train(straight).returncode == 0
    short = overrides(corpus, str(tmp_path / "b"), eval_iters=0, checkpoint_factor=100)
    assert train(short + ["train_iters=6"]).returncode == 0  # same lr_decay_iters (12): the schedule is the same
    extended = train(short)
    assert extended.returncode == 0 and "resumed from" in extended.stdout, extended.stderr[-2000:]
    assert losses(str(tmp_path / "b")) == losses(str(tmp_path / "a"))  # steps 1-12, Hessian refreshes at 3, 6, 9, 12
    assert "resume: train_iters 6 -> 12" in extended.stdout


# --- 5. preflight -------------------------------------------------------------------------------

def test_unwritable_outputs_are_refused_before_setup(corpus, tmp_path):
    (tmp_path / "file").write_text("a regular file")
    for key in ("save", "log_dir"):
        sets = overrides(corpus, str(tmp_path), eval_iters=0) + [f"{key}={tmp_path / 'file' / 'sub'}"]
        done = train(sets)
        assert done.returncode == 2, done.stderr[-2000:]
        assert f"{key}: {tmp_path / 'file' / 'sub'} cannot be a folder: {tmp_path / 'file'} is a file" in done.stderr
        assert "Traceback" not in done.stderr and "step" not in done.stdout


def test_too_little_space_for_checkpoints_is_refused_or_warned(monkeypatch, capsys, tmp_path):
    from neox_sophia.config import ConfigError, load_config
    from neox_sophia.plan import checkpoint_bytes
    from neox_sophia.training import preflight

    cfg = load_config([QUICKSTART], [f"save={tmp_path}"], warn=False)
    size = checkpoint_bytes(10 ** 6, "fp32", 0)
    monkeypatch.setattr(preflight, "free_bytes", lambda path: size - 1)
    with pytest.raises(ConfigError, match=rf"save: {tmp_path} has .* GiB free, less than one checkpoint"):
        preflight.check_free_space(cfg, 10 ** 6)
    monkeypatch.setattr(preflight, "free_bytes", lambda path: 2 * size - 1)
    preflight.check_free_space(cfg, 10 ** 6)
    assert "room for fewer than two checkpoints" in capsys.readouterr().err


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    import errno

    from neox_sophia.training import checkpoint as ckpt

    class FullDisk:
        def save_checkpoint(self, directory, tag, **kwargs):
            with open(os.path.join(directory, tag, "part"), "w") as f:
                f.write("x")
            raise OSError(errno.ENOSPC, "No space left on device")

    previous = tmp_path / "global_step2"
    previous.mkdir()
    (previous / "complete").write_text("{}")
    (tmp_path / "latest").write_text("global_step2\n")
    with pytest.raises(ckpt.CheckpointError) as failed:
        ckpt.save(FullDisk(), str(tmp_path), 4, {}, {})
    message = str(failed.value)
    assert message.startswith(f"save: no space left on the device of {tmp_path} while writing global_step4")
    assert f"the previous checkpoint {previous} is intact" in message and "\n" not in message
    assert sorted(os.listdir(tmp_path)) == ["global_step2", "latest"]  # the partial one gave its space back


def data_before_model_worker(rank, world_size, sets):
    import neox_sophia.model as model

    from neox_sophia.config import load_config
    from neox_sophia.data.datasets import DataError
    from neox_sophia.training.loop import setup

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the data was checked")

    model.build_model = refuse
    try:
        setup(load_config([QUICKSTART], sets, warn=False))
    except DataError as e:
        return str(e)
    return None


def test_data_is_checked_before_the_model_is_built(corpus, tmp_path):
    sets = overrides(corpus, str(tmp_path), eval_iters=0) + [f"data_path={tmp_path / 'missing'}"]
    assert "no dataset at prefix" in run_ranks(data_before_model_worker, 1, args=(sets,))[0]


def test_checkpoint_size_estimate_matches_a_written_checkpoint(corpus, tmp_path):
    from neox_sophia.config import load_config
    from neox_sophia.plan import GIB, plan_config

    sets = overrides(corpus, str(tmp_path), eval_iters=0, train_iters=2, lr_decay_iters=2, checkpoint_factor=2)
    assert train(sets).returncode == 0
    written = sum(f.stat().st_size for f in (tmp_path / "ckpt" / "global_step2").iterdir())
    estimate = plan_config(load_config([QUICKSTART], sets, warn=False))["checkpoint_gib"] * GIB
    assert 0.9 < estimate / written < 1.1, (estimate, written)


# --- 6, 8. a crash in the first save; load spelled another way than save --------------------------

def test_a_crash_in_the_first_save_does_not_block_the_same_command(corpus, tmp_path):
    run_dir, save = str(tmp_path), str(tmp_path / "ckpt")
    sets = overrides(corpus, run_dir, eval_iters=0, train_iters=4, lr_decay_iters=4, checkpoint_factor=2)
    killed = train(sets, env={"NEOX_SOPHIA_FAULT": "checkpoint_before_marker:2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert os.path.isdir(os.path.join(save, "global_step2")) and complete_steps(save) == []
    again = train(sets)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"removed {save}/global_step2 (left by a save that did not finish)" in again.stdout
    assert "resumed from" not in again.stdout and complete_steps(save) == [2, 4]
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3, 4]  # each step once


def test_a_first_run_with_load_spelled_differently_from_save_starts(corpus, tmp_path):
    save = str(tmp_path / "ckpt")
    sets = overrides(corpus, str(tmp_path), eval_iters=0, train_iters=1, lr_decay_iters=1, load=save + "/")
    done = train(sets)
    assert done.returncode == 0 and complete_steps(save) == [1], done.stderr[-2000:]


def test_load_and_save_are_compared_as_resolved_paths(tmp_path):
    from neox_sophia.training.loop import first_run

    save = str(tmp_path / "ckpt")
    assert first_run(save + "/", save) and first_run(str(tmp_path / "." / "ckpt"), save)
    os.symlink(save, str(tmp_path / "link"))
    assert first_run(str(tmp_path / "link"), save)
    assert not first_run(str(tmp_path / "other"), save)


def test_what_a_killed_save_leaves_is_cleaned_and_only_that(tmp_path):
    from neox_sophia.training.checkpoint import clean_leftovers, holds_only_leftovers

    def folder(name, *files):
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_text("x")

    folder("global_step2", "complete", "mp_rank_00_model_states.pt", "layout.json.tmp77")
    folder("global_step4", "incomplete", "mp_rank_00_model_states.pt")  # killed while saving
    folder("global_step6", "complete", "incomplete")  # killed between the marker and its cleanup: whole
    folder("global_step8", "mp_rank_00_model_states.pt")  # no marker of ours: a GPT-NeoX checkpoint, say
    (tmp_path / "latest").write_text("global_step6\n")
    (tmp_path / "latest.tmp4242").write_text("global_step8\n")
    assert not holds_only_leftovers(str(tmp_path))
    removed = clean_leftovers(str(tmp_path))
    assert sorted(removed) == sorted(str(tmp_path / p) for p in ("global_step2/layout.json.tmp77", "global_step4",
                                                                  "latest.tmp4242"))
    assert sorted(os.listdir(tmp_path)) == ["global_step2", "global_step6", "global_step8", "latest"]
    first = tmp_path / "first"
    first.mkdir()
    (first / "global_step2").mkdir()
    (first / "global_step2" / "incomplete").write_text("x")
    (first / "neox-sophia.lock").write_text("{}")
    assert holds_only_leftovers(str(first))  # a first run that died in its first save


# --- 7. damaged small files -----------------------------------------------------------------------

def damaged_files_worker(rank, world_size, sets, save, damaged):
    from neox_sophia.config import load_config
    from neox_sophia.training.checkpoint import CheckpointError
    from neox_sophia.training.loop import resume_from_load, setup, train_loop

    run = setup(load_config([QUICKSTART], sets, warn=False))
    train_loop(run)
    messages = {}
    for name in damaged:
        copy = f"{save}-{name}"
        shutil.copytree(save, copy)
        with open(os.path.join(copy, "global_step2", name), "wb") as f:
            f.write(b"\x80not what was written")
        run.cfg.checkpoint.load = copy
        try:
            resume_from_load(run)
        except CheckpointError as e:
            messages[name] = str(e)
    return messages


def test_damaged_small_files_are_named(corpus, tmp_path):
    save = str(tmp_path / "ckpt")
    sets = overrides(corpus, str(tmp_path), eval_iters=0, train_iters=2, lr_decay_iters=2, checkpoint_factor=2)
    damaged = ["rng_rank0.pt", "layout.json", "config.yml"]
    messages = run_ranks(damaged_files_worker, 1, args=(sets, save, damaged))[0]
    for name in damaged:
        path = os.path.join(f"{save}-{name}", "global_step2", name)
        assert messages.get(name, "").startswith(f"{path} could not be read"), (name, messages)
        assert "is damaged: move it out of the way" in messages[name] and "\n" not in messages[name]


# --- kill -9 at random moments of the saves -------------------------------------------------------

def kill_plan(rng):
    """(fault, step) per round, every fault once, in the order of the saves they hit: the ones
    that leave the save complete (latest.tmp written, retention pending, retention half done) at
    steps 2 and 4 (in a random order) and 6; the ones that leave it partial (the folder just made,
    the files written but unmarked, DeepSpeed's file cut in half) each at a random save."""
    completing = rng.sample(["checkpoint_latest_tmp", "checkpoint_before_retention"], 2)
    faults = [(2 * (i + 1), 1, fault) for i, fault in enumerate(completing + ["checkpoint_during_retention"])]
    faults += [(rng.choice([2, 4, 6, 8]), 0, fault)
               for fault in ("checkpoint_start", "checkpoint_before_marker", "file")]
    return [f"file:{step}:1" if fault == "file" else f"{fault}:{step}" for step, _, fault in sorted(faults)]


def test_kill_9_at_random_moments_of_the_saves_then_the_same_command_loses_nothing(corpus, tmp_path):
    """Seeded: each round kills the run (kill -9) at a point of one of its saves (kill_plan), and
    the next round runs the same command; the last one finishes. The losses of every step are the
    uninterrupted run's, bit for bit, each step once, and nothing partial is left."""
    def settings(run_dir):
        return overrides(corpus, run_dir, eval_iters=0, train_iters=8, lr_decay_iters=8, checkpoint_factor=2,
                         keep_last_n_checkpoints=2)

    assert train(settings(str(tmp_path / "straight"))).returncode == 0
    run_dir, save = str(tmp_path / "killed"), str(tmp_path / "killed" / "ckpt")
    outputs = []
    for fault in kill_plan(random.Random(15)):
        killed = train(settings(run_dir), env={"NEOX_SOPHIA_FAULT": fault})
        assert killed.returncode == -9, (fault, killed.stderr[-2000:])
        outputs.append(killed.stdout)
    last = train(settings(run_dir))
    assert last.returncode == 0, last.stderr[-2000:]
    assert losses(run_dir) == losses(str(tmp_path / "straight"))  # bit for bit, steps 1-8
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, 9))
    assert complete_steps(save) == [6, 8] and open(os.path.join(save, "latest")).read().strip() == "global_step8"
    assert sorted(os.listdir(save)) == ["global_step6", "global_step8", "latest"]  # nothing partial, no lock
    said = "\n".join(outputs[1:] + [last.stdout])
    assert "latest.tmp" in said and "(left by a save that did not finish)" in said  # cleaned, with a line
    assert said.count("took over the lock") == len(outputs)  # each kill -9 left its lock behind

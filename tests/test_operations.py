"""The run's operational surface, for real: SIGTERM ends a run at a complete checkpoint it resumes
from (one process, and two ranks of which only one got the signal); a rank that fails stops the
whole job fast with its error shown (ranks started without a launcher, and under deepspeed's);
every rank keeps its own log; wandb and TensorBoard stay optional; the ETA counts evals apart.
See neox_sophia/training/lifecycle.py for the mechanisms."""
import json
import os
import re
import shutil
import signal
import sys
import time

import pytest

from tests.distributed import free_port
from tests.helpers import QUICKSTART, as_args, cli, overrides, read_metrics, start_rank, text, wait_for_line

pytestmark = pytest.mark.distributed


def stopped_step(stdout, save_dir):
    found = re.search(r"received SIGTERM: saved checkpoint at step (\d+) in (\S+)", stdout)
    assert found and found.group(2) == save_dir, stdout[-2000:]
    return int(found.group(1))


def test_sigterm_saves_a_checkpoint_at_the_step_boundary_and_resume_continues(corpus, tmp_path):
    from neox_sophia.training.checkpoint import complete_tags

    run_dir, ckpt = str(tmp_path), str(tmp_path / "ckpt")
    sets = overrides(corpus, run_dir, train_iters=40, lr_decay_iters=40, eval_iters=0, checkpoint_factor=1000)
    proc = start_rank(run_dir, 0, 1, free_port(), sets)
    wait_for_line(run_dir, "rank0.out", "step  3/40", [proc])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, text(run_dir, "rank0.err")[-3000:]
    step = stopped_step(text(run_dir, "rank0.out"), ckpt)
    assert 3 <= step < 40 and complete_tags(ckpt)[-1] == (step, f"global_step{step}")
    assert "received SIGTERM: saved checkpoint" in text(run_dir, "logs/rank_00000.log")
    # the same command again resumes there and trains to the end
    resumed = cli(["train", QUICKSTART, *as_args(sets)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpt}/global_step{step} at step {step}" in resumed.stdout
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, step + 1)) + list(range(step + 1, 41))


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(corpus, tmp_path):
    from neox_sophia.training.checkpoint import complete_tags

    run_dir, ckpt = str(tmp_path), str(tmp_path / "ckpt")
    sets = overrides(corpus, run_dir, train_iters=40, lr_decay_iters=40, eval_iters=0, checkpoint_factor=1000,
                     train_micro_batch_size_per_gpu=1)
    port = free_port()
    ranks = [start_rank(run_dir, r, 2, port, sets) for r in (0, 1)]
    wait_for_line(run_dir, "rank0.out", "step  3/40", ranks)
    ranks[1].send_signal(signal.SIGTERM)  # rank 0 hears of it through the all-reduce at the step boundary
    for r, proc in enumerate(ranks):
        assert proc.wait(timeout=120) == 0, text(run_dir, f"rank{r}.err")[-3000:]
    step = stopped_step(text(run_dir, "rank0.out"), ckpt)
    assert complete_tags(ckpt)[-1] == (step, f"global_step{step}")
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= set(os.listdir(os.path.join(ckpt, f"global_step{step}")))
    for r in (0, 1):
        assert f"received SIGTERM: saved checkpoint at step {step}" in text(run_dir, f"logs/rank_0000{r}.log")
    # both ranks resume from it
    port = free_port()
    ranks = [start_rank(run_dir, r, 2, port, sets, name=f"resumed{r}") for r in (0, 1)]
    for r, proc in enumerate(ranks):
        assert proc.wait(timeout=240) == 0, text(run_dir, f"resumed{r}.err")[-3000:]
    assert f"at step {step}" in text(run_dir, "resumed0.out")
    assert complete_tags(ckpt)[-1] == (40, "global_step40")


def truncated_copy(corpus, where):
    """The corpus with its .idx cut short: what one node with a broken local copy would see."""
    os.makedirs(where)
    prefix = os.path.join(where, os.path.basename(corpus.data_prefix))
    shutil.copy(corpus.data_prefix + ".bin", prefix + ".bin")
    with open(corpus.data_prefix + ".idx", "rb") as f:
        data = f.read()
    with open(prefix + ".idx", "wb") as f:
        f.write(data[:len(data) // 2])
    return prefix


def test_a_failing_rank_stops_the_job_without_a_launcher(corpus, tmp_path):
    run_dir = str(tmp_path)
    sets = overrides(corpus, run_dir, train_iters=40, lr_decay_iters=40, eval_iters=0,
                     train_micro_batch_size_per_gpu=1)
    broken = truncated_copy(corpus, str(tmp_path / "broken"))
    port, began = free_port(), time.time()
    ranks = [start_rank(run_dir, 0, 2, port, sets), start_rank(run_dir, 1, 2, port, sets + [f"data_path={broken}"])]
    codes = [proc.wait(timeout=300) for proc in ranks]
    took = time.time() - began
    assert codes[0] != 0 and codes[1] == 2, codes
    err0, err1 = text(run_dir, "rank0.err"), text(run_dir, "rank1.err")
    assert "neox-sophia train: rank 1 failed: data_path:" in err1 and "truncated" in err1, err1[-3000:]
    # rank 0, stuck in a collective with rank 1, fails at once and names the rank that failed first
    assert re.search(r"rank 0 stopped because rank 1 failed: data_path: .*truncated.*\(here: ", err0), err0[-3000:]
    assert "Traceback" in text(run_dir, "logs/rank_00001.log")
    assert took < 240, took  # two process starts on a loaded 2-core machine, not a collective timeout (30 min)


def test_a_failing_rank_stops_the_job_under_the_deepspeed_launcher(corpus, tmp_path):
    run_dir = str(tmp_path)
    sets = overrides(corpus, run_dir, train_iters=40, lr_decay_iters=40, eval_iters=0,
                     train_micro_batch_size_per_gpu=1)
    os.makedirs(tmp_path / "logs" / "rank_00001.log")  # rank 1 cannot open its log; rank 0 can
    began = time.time()
    launched = cli(["launch", "--num-gpus", "2", "--master-port", str(free_port()), QUICKSTART, *as_args(sets)],
                   timeout=300)
    took = time.time() - began
    assert launched.returncode != 0
    output = launched.stdout + launched.stderr
    assert "neox-sophia train: rank 1 failed: IsADirectoryError" in output, output[-3000:]
    assert took < 240, took  # not a collective timeout (30 min); measured 94 s at load average 18


# --- wandb, TensorBoard, ETA: in process -------------------------------------------------------

class FakeWandb:
    def __init__(self):
        self.init_kwargs, self.logged, self.finished = None, [], False

    def init(self, **kwargs):
        self.init_kwargs = kwargs

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def logging_section(**values):
    from neox_sophia.config.sections import LoggingConfig

    return LoggingConfig(**values)


def test_wandb_logs_from_rank_0_with_the_neox_keys(monkeypatch, tmp_path):
    from neox_sophia.config import load_config
    from neox_sophia.training.metrics import Metrics

    cfg = load_config([QUICKSTART], ["use_wandb=true", "wandb_project=sophia", "wandb_group=sweep",
                                     "wandb_run_name=r1", "wandb_team=lab", "wandb_host=https://wandb.example"],
                      warn=False)
    assert not cfg.ignored  # the wandb keys are implemented, not reported as ignored
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    logging_cfg = cfg.logging
    logging_cfg.log_dir = str(tmp_path)
    assert Metrics(logging_cfg, 1, 10).wandb is None and fake.init_kwargs is None  # rank 0 only
    metrics = Metrics(logging_cfg, 0, 10, {"train_iters": 10})
    record = {"step": 1, "loss": 5.0, "lr": 1e-3, "grad_norm": None, "tokens_per_s": 10.0, "eta_s": 3.0}
    metrics.train(record)
    metrics.eval(2, 4.5)
    metrics.close()
    assert fake.init_kwargs == {"project": "sophia", "group": "sweep", "name": "r1", "entity": "lab",
                                "config": {"train_iters": 10}, "dir": str(tmp_path)}
    assert os.environ["WANDB_BASE_URL"] == "https://wandb.example"
    assert fake.logged == [(1, {"train/loss": 5.0, "train/lr": 1e-3, "train/tokens_per_s": 10.0,
                                "train/eta_s": 3.0}), (2, {"eval/val_loss": 4.5})]
    assert fake.finished


def test_missing_wandb_and_tensorboard_are_one_line_each(monkeypatch, capsys):
    from neox_sophia.training.metrics import Metrics

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    metrics = Metrics(logging_section(use_wandb=True, tensorboard_dir="tb"), 0, 10)
    metrics.train({"step": 1, "loss": 5.0, "lr": 1e-3, "tokens_per_s": 10.0, "eta_s": 1.0})
    metrics.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "pip install tensorboard" in err[0], err
    assert "use_wandb" in err[1] and "pip install wandb" in err[1]


def strict_json(line):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(line, parse_constant=refuse)


def test_metrics_lines_are_strict_json_and_name_what_was_not_finite(tmp_path, capsys):
    from neox_sophia.training.metrics import Metrics

    metrics = Metrics(logging_section(log_dir=str(tmp_path)), 0, 10)
    metrics.train({"step": 1, "loss": float("nan"), "lr": 1e-3, "grad_norm": float("inf"), "tokens_per_s": 10.0,
                   "eta_s": 1.0, "nonfinite_steps": 1})
    metrics.eval(2, float("-inf"))
    metrics.close()
    train, evaluation = [strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert train["loss"] is None and train["grad_norm"] is None and train["lr"] == 1e-3
    assert train["nonfinite"] == {"loss": "nan", "grad_norm": "inf"} and train["nonfinite_steps"] == 1
    assert evaluation == {"step": 2, "val_loss": None, "nonfinite": {"val_loss": "-inf"}}
    assert "loss nan" in capsys.readouterr().out  # the readable line still says what happened


def test_a_run_starting_at_step_s_moves_the_records_it_replays_aside(tmp_path, capsys):
    from neox_sophia.training.metrics import Metrics

    old = [{"step": s, "loss": 5.0 - s / 10} for s in range(1, 8)] + [{"step": 6, "val_loss": 4.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old) + '{"step": 8, "lo')
    metrics = Metrics(logging_section(log_dir=str(tmp_path)), 0, 10, start_step=5)  # resumed at step 5
    metrics.train({"step": 6, "loss": 4.5, "lr": 1e-3, "tokens_per_s": 10.0, "eta_s": 1.0})
    metrics.close()
    kept = [strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 5, 6] and kept[-1]["loss"] == 4.5  # each step once
    replayed = (tmp_path / "metrics.replayed.jsonl").read_text().splitlines()
    assert replayed == [json.dumps(r) for r in old[5:]] + ['{"step": 8, "lo']  # kept, not lost
    assert "moved 4 record(s) of steps after 5" in capsys.readouterr().out


def test_eta_counts_training_steps_apart_from_evals(monkeypatch):
    from neox_sophia.training import metrics

    clock = [100.0]
    monkeypatch.setattr(metrics.time, "time", lambda: clock[0])
    progress = metrics.Progress()
    for _ in range(4):  # 4 steps of 1 s ...
        clock[0] += 1.0
        progress.step()
    with progress.pause("eval"):  # ... and one eval of 10 s
        clock[0] += 10.0
    report = progress.report(tokens_per_step=100, remaining_steps=6, remaining={"eval": 2, "save": 1})
    assert report == {"tokens_per_s": 100.0, "eta_s": 6 * 1.0 + 2 * 10.0}  # saves not measured yet: 0
    assert metrics.format_train_line({"step": 4, "loss": 1.0, "lr": 1e-3, **report}, 10).endswith("ETA 0m26s")


def test_signals_only_set_a_flag_until_a_second_ctrl_c():
    from neox_sophia.training.lifecycle import StopSignals

    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == signal.SIGINT
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # launchers repeat it: still just the flag
        assert signals.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored after the loop
    with pytest.raises(KeyboardInterrupt), StopSignals():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C stops at once

"""Sophia-H in the trainer: its Hessian step against an independent central difference on the
same model, what it may and may not change, and the engines it refuses. Layout invariance
(TP x DP, ZeRO-1/2, micro-batch split) is tests/test_layouts.py."""
import pytest
import torch

from neox_sophia.config import ConfigError, load_config
from neox_sophia.optim.factory import parse_optimizer_block
from tests.distributed import run_ranks
from tests.helpers import QUICKSTART, cli, overrides

CLIP = 1e-4  # far below the norm of u*Hu: clipping it would shrink h by orders of magnitude


def hutchinson_step_worker(rank, world_size, sets):
    """Train step 0, then Sophia-H's Hessian step, then step 1; report what each changed. The
    expected u*Hu is central differences of the mean loss over the same Hessian batch with the
    same probes, taken on the module directly (torch.autograd.grad: no engine, no hooks)."""
    from neox_sophia.model.gpt_neox import global_named_parameters
    from neox_sophia.model.layers import lm_loss
    from neox_sophia.optim.hessian import hutchinson_fd
    from neox_sophia.parallel.probes import parameter_probes
    from neox_sophia.training.components import HESSIAN_REFRESHES
    from neox_sophia.training.loop import RunResult, setup, train_step
    from tests.gathered import optimizer_state_by_name

    run = setup(load_config([QUICKSTART], sets, warn=False))
    engine, optimizer = run.engine, run.optimizer
    train_step(run, 0, RunResult(0))  # a real update (k = 3: no refresh yet)
    named = list(global_named_parameters(engine.module))
    batches = run.hessian_micro_batches(0)

    def mean_loss():
        return sum(lm_loss(engine.module(b.tokens), b.labels, b.loss_mask) for b in batches) / len(batches)

    probes = parameter_probes(named, run.cfg.training.seed, 0).values()
    expected = hutchinson_fd(mean_loss, [p for _, p in named], probes, run.cfg.optimizer.params.hutchinson_fd_eps)
    masters = lambda: [t.clone() for t in getattr(engine.optimizer, "single_partition_of_fp32_groups", [])]  # noqa: E731
    before = dict(params=[p.detach().clone() for _, p in named], masters=masters(),
                  state=optimizer_state_by_name(engine, optimizer), win_rate=optimizer.statistics().win_rate,
                  counters=(engine.global_steps, engine.global_samples, engine.micro_steps),
                  sched=run.scheduler.state_dict(), steps=[s["step"].clone() for s in optimizer.state.values()])
    HESSIAN_REFRESHES["hutchinson"](run, 0)
    state = optimizer_state_by_name(engine, optimizer)
    beta2 = optimizer.param_groups[0]["betas"][1]
    out = {"params_same": all(torch.equal(p, b) for (_, p), b in zip(named, before["params"])),
           "masters_same": all(torch.equal(a, b) for a, b in zip(masters(), before["masters"])),
           "exp_avg_same": all(torch.equal(state[n]["exp_avg"], s["exp_avg"]) for n, s in before["state"].items()),
           "counters_same": before["counters"] == (engine.global_steps, engine.global_samples, engine.micro_steps),
           "lr_same": before["sched"] == run.scheduler.state_dict(),
           "step_same": all(torch.equal(a, s["step"]) for a, s in zip(before["steps"], optimizer.state.values())),
           "clipping_restored": engine.gradient_clipping() == CLIP
           and getattr(engine.optimizer, "clip_grad", CLIP) == CLIP,
           "hessian": {n: s["hessian"] for n, s in state.items()},
           "expected": {n: (1 - beta2) * e.detach() for (n, _), e in zip(named, expected)},
           "win_rate_before": before["win_rate"], "masters": len(before["masters"])}
    train_step(run, 1, RunResult(0))
    out["win_rate_after"] = optimizer.statistics().win_rate
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 2])
def test_the_hutchinson_step_folds_u_hu_into_the_hessian_and_nothing_else(corpus, tmp_path, stage):
    """From h = 0 one refresh gives h = (1 - beta2) * u*Hu: the engine's hooks, data-parallel
    mean and gradient-accumulation rescaling deliver the same u*Hu as central differences taken
    directly (to the fp32 rounding the finite difference amplifies: measured within 4.3e-5 of
    each tensor's largest entry; checked at 2e-4), unclipped although gradient_clipping binds, with
    the clip settings restored after. Parameters (and ZeRO's fp32 master partition), exp_avg,
    step counts, the engine's counters and the LR schedule do not move. Before the refresh every
    coordinate clips (h = 0, win rate 0); the next update uses h (win rate > 0)."""
    sets = [s for s in overrides(corpus, str(tmp_path), eval_iters=0) if "hessian_batch_size" not in s]
    sets += ["optimizer.params.estimator=hutchinson", "optimizer.params.hessian_batch_size=2",
             f"gradient_clipping={CLIP}", f"zero_optimization={{stage: {stage}}}",
             "train_micro_batch_size_per_gpu=1", "gradient_accumulation_steps=4"]
    out = run_ranks(hutchinson_step_worker, 1, args=(sets,))[0]
    for key in ("params_same", "masters_same", "exp_avg_same", "counters_same", "lr_same", "step_same",
                "clipping_restored"):
        assert out[key], key
    assert (out["masters"] > 0) == (stage > 0)  # ZeRO's fp32 master partitions were compared
    for name, expected in out["expected"].items():
        assert expected.abs().max() > 0, name
        floor = 2e-4 * float(expected.abs().max())
        torch.testing.assert_close(out["hessian"][name], expected, rtol=2e-4, atol=floor, msg=name)
    assert out["win_rate_before"] == 0 and out["win_rate_after"] > 0.1


def test_the_trainer_runs_every_estimator():
    from neox_sophia.optim.hessian import ESTIMATORS
    from neox_sophia.training.components import HESSIAN_REFRESHES

    assert set(HESSIAN_REFRESHES) == set(ESTIMATORS)


def _sophia_h(**params):
    return {"type": "sophia", "params": {"estimator": "hutchinson", **params}}


@pytest.mark.parametrize("setting,message", [
    ("pipe_parallel_size=1", "runs on the plain engine only"),
    ("precision=bfloat16", "needs precision fp32, not bfloat16"),
])
def test_sophia_h_refuses_the_pipeline_engine_and_half_precision_at_load(setting, message):
    sets = ["optimizer.params.estimator=hutchinson", setting]
    with pytest.raises(ConfigError, match=message) as error:
        load_config([QUICKSTART], sets, warn=False)
    assert "\n" not in str(error.value) and "optimizer.params.estimator" in str(error.value)
    load_config([QUICKSTART], ["optimizer.params.estimator=gnb", setting], warn=False)  # Sophia-G runs there


def test_sophia_h_has_no_batch_factor():
    """bs is 1 (the paper's Sophia-H: rho is its gamma on the raw Hessian diagonal), whatever the
    Hessian batch; setting bs is refused. Sophia-G keeps the Hessian batch's tokens."""
    from neox_sophia.optim import Sophia

    _, sophia_h = parse_optimizer_block(_sophia_h())
    _, sophia_g = parse_optimizer_block({"type": "sophia", "params": {}})
    groups = lambda: [{"params": [torch.nn.Parameter(torch.zeros(2))]}]  # noqa: E731
    built = sophia_h.build(groups(), bs=4096)
    assert isinstance(built, Sophia) and built.param_groups[0]["bs"] == 1
    assert sophia_g.build(groups(), bs=4096).param_groups[0]["bs"] == 4096
    for params, text in [({"bs": 64}, "remove bs"), ({"hutchinson_fd_eps": 0.0}, "hutchinson_fd_eps")]:
        with pytest.raises(ConfigError, match=text):
            parse_optimizer_block(_sophia_h(**params))


@pytest.mark.distributed
def test_train_and_plan_refuse_what_the_config_refuses(corpus, tmp_path, capsys):
    from neox_sophia.cli import main

    sets = overrides(corpus, str(tmp_path), eval_iters=0) + ["optimizer.params.estimator=hutchinson",
                                                              "pipe_parallel_size=1"]
    args = [QUICKSTART] + [a for s in sets for a in ("--set", s)]
    train = cli(["train"] + args)
    assert train.returncode == 2 and "Traceback" not in train.stderr
    lines = [line for line in train.stderr.splitlines() if "plain engine only" in line]
    assert len(lines) == 1, train.stderr[-2000:]
    assert main(["plan"] + args) == 2
    planned = capsys.readouterr().err.strip()
    assert planned.startswith("neox-sophia plan: ") and lines[0].startswith("neox-sophia train: ")
    assert planned.split(": ", 1)[1] == lines[0].split(": ", 1)[1]  # the same one line

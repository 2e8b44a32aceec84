"""Resharding: a Sophia run saved at one layout resumes at another through a universal
checkpoint (`neox-sophia convert consolidate`), DP 2 -> 1, TP 2 -> 1, PP 2 -> 1 and back.

Each source run trains 8 steps (Hessian refresh every 2) and saves at step 4; the step-4
checkpoint is consolidated offline and a run at the new layout resumes from it. Checked: right
after loading, the new layout's gathered weights, exp_avg and hessian equal the universal
checkpoint's exactly; steps 5-8 match the uninterrupted single-process run (within the layout
tolerance of tests/test_layouts.py: the state after step 4 already differs by float reduction
order between layouts). A DeepSpeed checkpoint loaded at another layout is refused with the
command that converts it.
"""
import os

import pytest
import torch

from tests.distributed import run_ranks
from tests.helpers import COMMON, OPTIONS, QUICKSTART, cli, overrides

pytestmark = pytest.mark.distributed

LAYOUTS = {
    "one": (1, {}),
    "dp2-zero1": (2, dict(train_micro_batch_size_per_gpu=1, zero_optimization={"stage": 1})),
    "dp2-zero2": (2, dict(train_micro_batch_size_per_gpu=1, zero_optimization={"stage": 2})),
    "tp2": (2, dict(model_parallel_size=2)),
    "pp2": (2, dict(pipe_parallel_size=2)),
}


def resume_worker(rank, world_size, sets):
    from neox_sophia.config import load_config
    from neox_sophia.model.gpt_neox import full_state_dict
    from neox_sophia.training.loop import resume_from_load, setup, train_loop
    from tests.gathered import optimizer_state_by_name

    run = setup(load_config([QUICKSTART], sets, warn=False))
    start, nonfinite = resume_from_load(run)
    loaded = None if start == 0 else {"weights": full_state_dict(run.engine.module),
                                      "state": optimizer_state_by_name(run.engine, run.optimizer),
                                      "groups": [{k: g.get(k) for k in ("name", "hessian_updates", "hessian_floor")}
                                                 for g in run.optimizer.param_groups]}
    # Sophia's tokens per Hessian batch
    bs = sorted({g["bs"] for g in run.optimizer.param_groups if g.get("bs") is not None})
    result = train_loop(run, start, nonfinite)
    return {"start": start, "loss": result.train_loss, "loaded": loaded, "bs": bs}


def settings(corpus, run_dir, layout, **extra):
    return overrides(corpus, run_dir, checkpoint_factor=4, **COMMON, **LAYOUTS[layout][1], **extra)


@pytest.fixture(scope="module")
def sources(corpus, tmp_path_factory):
    """name -> (the uninterrupted run's result, the universal checkpoint of its step 4)."""
    from neox_sophia.convert.reader import read_checkpoint
    from neox_sophia.convert.universal import save_universal

    out = {}
    for name in ("one", "dp2-zero1", "tp2", "pp2"):
        run_dir = str(tmp_path_factory.mktemp(name))
        result = run_ranks(resume_worker, LAYOUTS[name][0], args=(settings(corpus, run_dir, name),))[0]
        universal = os.path.join(run_dir, "universal4")
        save_universal(universal, read_checkpoint(os.path.join(run_dir, "ckpt"), step=4))
        out[name] = (result, universal)
    return out


@pytest.mark.parametrize("source,target", [("dp2-zero1", "one"), ("one", "dp2-zero2"), ("tp2", "one"),
                                           ("one", "tp2"), ("pp2", "one"), ("one", "pp2")])
def test_resume_at_another_layout(corpus, sources, tmp_path, source, target):
    from neox_sophia.convert.universal import load_universal

    universal = load_universal(sources[source][1])
    sets = settings(corpus, str(tmp_path), target, load=sources[source][1])
    out = run_ranks(resume_worker, LAYOUTS[target][0], args=(sets,))
    assert out[0]["start"] == 4
    weights = {name: w for rank in out for name, w in rank["loaded"]["weights"].items()}
    state = {name: s for rank in out for name, s in rank["loaded"]["state"].items()}
    assert set(weights) == set(universal.weights)
    for name, w in universal.weights.items():
        assert torch.equal(weights[name], w), name
        for key, value in universal.optimizer[name].items():
            assert torch.equal(state[name][key], value), f"{name}.{key}"
    assert any(float(s["hessian"].abs().max()) > 0 for s in universal.optimizer.values())
    reference = sources["one"][0]["loss"]
    for step in range(5, 9):
        assert out[0]["loss"][step] == pytest.approx(reference[step], rel=1e-5), step


def test_a_deepspeed_checkpoint_at_another_layout_is_refused_with_the_fix(corpus, sources, tmp_path):
    saved = os.path.dirname(sources["tp2"][1])
    sets = settings(corpus, str(tmp_path), "one", load=os.path.join(saved, "ckpt"))
    done = cli(["train", QUICKSTART] + [a for s in sets for a in ("--set", s)])
    assert done.returncode == 2
    assert "model_parallel_size 2 -> 1" in done.stderr and "neox-sophia convert consolidate" in done.stderr


def test_options_beyond_the_paper_reshard(corpus, tmp_path):
    """A split optimizer (AdamW state on some roles, Sophia's on the others) with bias correction
    and a floor: DP 2 (ZeRO-1) -> universal -> one process continues like the uninterrupted run,
    the refresh count (bias correction) and the floors included."""
    from neox_sophia.convert.reader import read_checkpoint
    from neox_sophia.convert.universal import load_universal, save_universal

    reference = run_ranks(resume_worker, 1, args=(settings(corpus, str(tmp_path / "ref"), "one", **OPTIONS),))[0]
    source = str(tmp_path / "src")
    run_ranks(resume_worker, 2, args=(settings(corpus, source, "dp2-zero1", **OPTIONS),))
    universal = os.path.join(source, "universal4")
    save_universal(universal, read_checkpoint(os.path.join(source, "ckpt"), step=4))
    keys = {name: set(entry) for name, entry in load_universal(universal).optimizer.items()}
    assert keys["embed_in.weight"] == {"exp_avg", "exp_avg_sq"} and keys["layers.0.mlp.dense_h_to_4h.weight"] == {
        "exp_avg", "hessian"}
    out = run_ranks(resume_worker, 1, args=(settings(corpus, str(tmp_path / "dst"), "one", load=universal,
                                                     **OPTIONS),))[0]
    assert out["start"] == 4
    groups = {g["name"]: g for g in out["loaded"]["groups"]}
    assert groups["mlp"]["hessian_updates"] == 2 and groups["mlp"]["hessian_floor"] > 0
    for step in range(5, 9):
        assert out["loss"][step] == pytest.approx(reference["loss"][step], rel=1e-5), step


def test_the_default_hessian_batch_is_the_same_at_every_layout(corpus, tmp_path):
    """The default Hessian batch, half the 4-sequence training batch, is 2 global sequences at DP=1
    (one micro-batch of 2) and at DP=2 with micro-batch 2 and no accumulation (one micro-batch per
    rank, 2 real rows on rank 0, 2 padding rows on rank 1), and at TP=2: bs is 2 x 32 tokens at
    each, so a run resumed there from the DP=1 run's universal checkpoint applies the same
    rho*bs*h (h carried over exactly) and its steps 5-8 are the uninterrupted run's."""
    from neox_sophia.convert.reader import read_checkpoint
    from neox_sophia.convert.universal import save_universal

    def sets(run_dir, **extra):
        return [s for s in overrides(corpus, run_dir, checkpoint_factor=4, **COMMON, **extra)
                if "hessian_batch_size" not in s]

    source = run_ranks(resume_worker, 1, args=(sets(str(tmp_path / "one")),))[0]
    universal, saved = str(tmp_path / "universal4"), read_checkpoint(str(tmp_path / "one" / "ckpt"), step=4)
    save_universal(universal, saved)
    hessian = {name: state["hessian"] for name, state in saved.optimizer.items()}
    for name, (world, extra) in [("dp2-micro2", (2, dict(train_micro_batch_size_per_gpu=2,
                                                         gradient_accumulation_steps=1))), ("tp2", LAYOUTS["tp2"])]:
        out = run_ranks(resume_worker, world, args=(sets(str(tmp_path / name), load=universal, **extra),))
        assert out[0]["start"] == 4 and out[0]["bs"] == source["bs"] == [2 * 32], (name, out[0]["bs"])
        state = {n: s for rank in out for n, s in rank["loaded"]["state"].items()}
        assert all(torch.equal(state[n]["hessian"], h) for n, h in hessian.items())
        for step in range(5, 9):
            assert out[0]["loss"][step] == pytest.approx(source["loss"][step], rel=1e-5), (name, step)

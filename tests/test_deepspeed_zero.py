"""Sophia inside DeepSpeed ZeRO-1/2 on 2 CPU ranks (gloo), against one plain process.

ZeRO hands the client optimizer one flat fp32 partition per param group and calls step() with
no arguments. This proves, for stages 1 and 2: each rank holds half of `hessian` (and
`exp_avg`), the Hessian mode works through engine.step() without touching parameters, the
gathered sharded state equals the unsharded optimizer's state, and a checkpoint reloads the
sharded state bit-exact.
"""
import math

import pytest
import torch

from neox_sophia.optim import Sophia
from tests.distributed import run_ranks

pytestmark = pytest.mark.distributed

WORLD = 2
MICRO = 4  # per rank; the global batch is WORLD * MICRO
STEPS = 6
HESSIAN_AFTER = {1, 3, 5}  # a Hessian pass after these steps (every 2)
CLIP = 1.0


def make_model():
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(10, 23), torch.nn.Tanh(), torch.nn.Linear(23, 7))


def make_optimizer(model):
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return Sophia([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                  lr=2e-2, rho=0.05, weight_decay=0.1, bs=WORLD * MICRO)


def batch(step, kind):
    """The global batch of a step; rank r trains on rows [r*MICRO, (r+1)*MICRO)."""
    g = torch.Generator().manual_seed(step * 2 + (kind == "hessian"))
    return torch.randn(WORLD * MICRO, 10, generator=g), torch.randn(WORLD * MICRO, 7, generator=g)


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def ds_config(stage):
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
    }


def sharded_state(engine, sophia):
    parts = engine.optimizer.single_partition_of_fp32_groups
    return {key: [sophia.state[p][key].clone() for p in parts] for key in ("exp_avg", "hessian")}


def worker(rank, world_size, stage, ckpt_dir):
    import deepspeed

    from neox_sophia.training.steps import redirected_step

    deepspeed.init_distributed(dist_backend="gloo")
    model = make_model()
    sophia = make_optimizer(model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=sophia, config=ds_config(stage))
    rows = slice(rank * MICRO, (rank + 1) * MICRO)
    hessian_step_moved = []
    for step in range(STEPS):
        x, y = batch(step, "train")
        engine.backward(loss_fn(engine, x[rows], y[rows]))
        engine.step()
        if step in HESSIAN_AFTER:
            before = [p.detach().clone() for p in engine.module.parameters()]
            x, y = batch(step, "hessian")
            engine.backward(loss_fn(engine, x[rows], y[rows]))
            with redirected_step(engine, sophia, sophia.update_hessian):
                engine.step()
            hessian_step_moved.append(any(not torch.equal(a, b) for a, b in
                                          zip(before, engine.module.parameters())))
    state = sharded_state(engine, sophia)
    paddings = list(engine.optimizer.groups_padding)
    params = [p.detach().clone() for p in engine.module.parameters()]
    engine.save_checkpoint(ckpt_dir, tag="t")

    # A fresh engine from another init reloads the sharded optimizer state bit-exact.
    torch.manual_seed(99)
    other_model = torch.nn.Sequential(torch.nn.Linear(10, 23), torch.nn.Tanh(), torch.nn.Linear(23, 7))
    other_sophia = make_optimizer(other_model)
    other, *_ = deepspeed.initialize(model=other_model, optimizer=other_sophia, config=ds_config(stage))
    other.load_checkpoint(ckpt_dir, tag="t")
    reloaded = sharded_state(other, other_sophia)
    return {"state": state, "paddings": paddings, "params": params,
            "hessian_step_moved": hessian_step_moved,
            "reloaded_equal": all(torch.equal(a, b) for key in state
                                  for a, b in zip(state[key], reloaded[key])),
            "reloaded_params_equal": all(torch.equal(a, b.detach()) for a, b in
                                         zip(params, other.module.parameters()))}


def reference_run():
    """The same training on one process: full batch, torch's global-norm clipping."""
    model = make_model()
    sophia = make_optimizer(model)
    for step in range(STEPS):
        for kind in ("train", "hessian") if step in HESSIAN_AFTER else ("train",):
            x, y = batch(step, kind)
            model.zero_grad()
            loss_fn(model, x, y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            sophia.update_hessian() if kind == "hessian" else sophia.step()
    flat = {key: [torch.cat([sophia.state[p][key].reshape(-1) for p in g["params"]])
                  for g in sophia.param_groups] for key in ("exp_avg", "hessian")}
    return flat, [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_shards_sophia_state_and_matches_one_process(stage, tmp_path):
    ranks = run_ranks(worker, WORLD, args=(stage, str(tmp_path / "ckpt")))
    ref_state, ref_params = reference_run()
    for r in ranks:
        assert r["hessian_step_moved"] == [False] * len(HESSIAN_AFTER)
        assert r["reloaded_equal"] and r["reloaded_params_equal"]
    for key in ("exp_avg", "hessian"):
        for group, ref in enumerate(ref_state[key]):
            parts = [r["state"][key][group] for r in ranks]
            # Each rank holds half: equal-sized partitions, padding only to make them equal.
            assert parts[0].numel() == parts[1].numel() == math.ceil(
                (ref.numel() + sum(r["paddings"][group] for r in ranks)) / WORLD)
            assert parts[0].numel() < ref.numel()
            gathered = torch.cat(parts)[:ref.numel()]
            assert gathered.abs().max() > 0  # the Hessian was really updated
            # Same numbers up to float reduction order (all-reduce mean vs full-batch mean).
            scale = ref.abs().max().item()
            torch.testing.assert_close(gathered, ref, rtol=1e-5, atol=1e-5 * scale)
    for p, q in zip(ranks[0]["params"], ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

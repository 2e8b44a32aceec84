"""What Sophia-G's Hessian step may and may not change, in fp32, bf16 and fp16, through both
engines: parameters, exp_avg, Sophia's step count, the engine's counters and the LR schedule stay;
only the Hessian EMA moves, from the sampled-label gradient after DeepSpeed removed the loss
scale and clipped it at gradient_clipping (as the official code does, before squaring); an fp16
overflow skips that one Hessian update and training goes on.

fp16 on CPU: DeepSpeed's CPU accelerator reports fp16 as unsupported (oneDNN has no fp16 kernels
on this CPU) and refuses to build an fp16 engine. torch itself computes in fp16 on CPU, slowly,
which is all a tiny model needs, so these tests tell DeepSpeed fp16 is supported and run its real
loss-scaling optimizer (ZeRO-1/2 fp16) end to end. The gpu-marked test runs the same on CUDA.
(fp16 without ZeRO is refused by `train`: DeepSpeed 0.19 never applies the loss scale there
but divides the gradients by it; this file's sum(h) check is how that was found.)
"""
import pytest
import torch

from tests.distributed import run_ranks
from tests.helpers import QUICKSTART, overrides

pytestmark = pytest.mark.distributed

CLIP = 1e-4  # far below the sampled-label gradient's norm (~1), so the clip always binds


def allow_fp16_on_cpu() -> None:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        type(accelerator).is_fp16_supported = lambda self: True


def hessian_step_worker(rank, world_size, sets, overflow=False):
    """Train step 0, then the Hessian step (optionally with a non-finite sampled-label loss), then
    train step 1 and a second Hessian step; report what each changed."""
    allow_fp16_on_cpu()
    from neox_sophia.config import load_config
    from neox_sophia.training import steps
    from neox_sophia.training.loop import RunResult, train_step, setup

    run = setup(load_config([QUICKSTART], sets, warn=False))
    train_step(run, 0, RunResult(0))  # step 0: a real update (k=3: no Hessian step yet)
    snap = lambda: {k: v.detach().clone() for k, v in run.engine.module.named_parameters()}  # noqa: E731
    state = lambda key: [s[key].clone() for s in run.optimizer.state.values()]  # noqa: E731
    before = dict(params=snap(), exp_avg=state("exp_avg"), hessian=state("hessian"),
                  counters=(run.engine.global_steps, run.engine.global_samples, run.engine.micro_steps),
                  lr=run.scheduler.get_last_lr(), sched=run.scheduler.state_dict(), step=state("step"))
    assert all(float(h.abs().sum()) == 0 for h in before["hessian"])  # the first refresh starts from h = 0

    def hessian_step(refresh):
        batches = run.hessian_micro_batches(refresh)
        fn = steps.pipeline_hessian_step if run.pipeline else steps.plain_hessian_step
        fn(run.engine, run.optimizer, batches, steps.hessian_uniforms(1234, refresh, batches, 32), run.vocab_size)
        return len(batches)

    sampled_label_loss = steps.sampled_label_loss
    if overflow:
        steps.sampled_label_loss = lambda *args: sampled_label_loss(*args) * float("inf")
    micro_batches = hessian_step(0)
    steps.sampled_label_loss = sampled_label_loss
    overflow = bool(getattr(run.engine.optimizer, "overflow", False))
    after = dict(params=snap(), hessian=state("hessian"))
    out = {"params_same": all(torch.equal(before["params"][k], after["params"][k]) for k in after["params"]),
           "exp_avg_same": all(torch.equal(a, b) for a, b in zip(before["exp_avg"], state("exp_avg"))),
           "hessian_changed": any(not torch.equal(a, b) for a, b in zip(before["hessian"], after["hessian"])),
           "counters_same": before["counters"] == (run.engine.global_steps, run.engine.global_samples,
                                                   run.engine.micro_steps),
           "lr_same": before["lr"] == run.scheduler.get_last_lr() and before["sched"] == run.scheduler.state_dict(),
           "step_same": all(torch.equal(a, b) for a, b in zip(before["step"], state("step"))),
           "micro_batches": micro_batches, "beta2": run.optimizer.param_groups[0]["betas"][1],
           "hessian_sum": float(sum(h.double().sum() for h in after["hessian"])),
           "overflow": overflow, "rejected": float(sum(state("hessian_rejected")))}
    train_step(run, 1, RunResult(0))
    out["next_step_applied"] = any(not torch.equal(after["params"][k], v) for k, v in snap().items())
    hessian_step(1)
    out["next_hessian_changed"] = any(not torch.equal(a, b) for a, b in zip(after["hessian"], state("hessian")))
    return out


def settings(corpus, run_dir, pipe, precision, stage, *extra):
    sets = [s for s in overrides(corpus, run_dir, eval_iters=0) if "hessian_batch_size" not in s]
    return sets + [f"pipe_parallel_size={pipe}", f"precision={precision}", f"zero_optimization={{stage: {stage}}}",
                   "gradient_accumulation_steps=4", "train_micro_batch_size_per_gpu=1", *extra]


UNCHANGED = ("params_same", "exp_avg_same", "counters_same", "lr_same", "step_same")


@pytest.mark.parametrize("pipe,precision,stage", [(0, "fp32", 0), (1, "fp32", 1), (0, "bfloat16", 0),
                                                  (0, "bfloat16", 1), (1, "bfloat16", 0), (0, "fp16", 1),
                                                  (0, "fp16", 2), (1, "fp16", 1)])
def test_the_hessian_step_changes_only_the_hessian(corpus, tmp_path, pipe, precision, stage):
    """Half the accumulation steps by default. From h = 0, one refresh gives
    h = (1 - beta2) * g*g, so sum(h) = (1 - beta2) * |g|^2 = (1 - beta2) * CLIP^2 exactly when the
    sampled-label gradient g was clipped to CLIP, and only if the fp16 loss scale was removed
    first (otherwise the sum is off by the scale squared)."""
    out = run_ranks(hessian_step_worker, 1, args=(settings(corpus, str(tmp_path), pipe, precision, stage,
                                                           f"gradient_clipping={CLIP}"),))[0]
    assert out["micro_batches"] == 2  # half of 4 accumulation steps
    for key in UNCHANGED + ("hessian_changed", "next_step_applied", "next_hessian_changed"):
        assert out[key], key
    assert out["hessian_sum"] == pytest.approx((1 - out["beta2"]) * CLIP ** 2, rel=1e-3)


def test_fp16_hessian_does_not_depend_on_the_loss_scale(corpus, tmp_path):
    """Unclipped, two static loss scales 2^12 and 2^16: the same Hessian EMA (a power of two scales
    fp16 exactly). Measured: equal to 1e-11 relative; at 2^3 the sum is 1.6% lower, gradients
    underflowing in fp16, which is what loss scaling is for."""
    sums = [run_ranks(hessian_step_worker, 1, args=(settings(corpus, str(tmp_path / str(scale)), 0, "fp16", 1,
                                                             "gradient_clipping=0.0",
                                                             f"fp16={{loss_scale: {scale}}}"),))[0]
            for scale in (4096, 65536)]
    assert sums[0]["hessian_sum"] > 0 and not sums[0]["overflow"] and not sums[1]["overflow"]
    assert sums[1]["hessian_sum"] == pytest.approx(sums[0]["hessian_sum"], rel=1e-6)


@pytest.mark.parametrize("pipe,stage", [(0, 1), (0, 2), (1, 1)])
def test_an_fp16_overflow_skips_only_that_hessian_update(corpus, tmp_path, pipe, stage):
    """A non-finite sampled-label loss under dynamic loss scaling: DeepSpeed sees the overflow and
    skips the optimizer call, so update_hessian() never runs (it would have counted rejected
    coordinates); nothing else moves, the next training step applies and the next refresh updates
    the Hessian."""
    out = run_ranks(hessian_step_worker, 1, args=(settings(corpus, str(tmp_path), pipe, "fp16", stage), True))[0]
    for key in UNCHANGED + ("next_step_applied", "next_hessian_changed"):
        assert out[key], key
    assert out["overflow"] and out["rejected"] == 0
    assert not out["hessian_changed"] and out["hessian_sum"] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("pipe,stage", [(0, 1), (0, 2), (1, 1)])
def test_the_fp16_hessian_step_on_cuda(corpus, tmp_path, pipe, stage):
    out = run_ranks(hessian_step_worker, 1, args=(settings(corpus, str(tmp_path), pipe, "fp16", stage,
                                                           f"gradient_clipping={CLIP}"),), accelerator="cuda")[0]
    for key in UNCHANGED + ("hessian_changed", "next_step_applied", "next_hessian_changed"):
        assert out[key], key
    assert out["hessian_sum"] == pytest.approx((1 - out["beta2"]) * CLIP ** 2, rel=1e-3)

"""The compiled single-pass kernels (neox_sophia.optim.fused) give the eager kernels' bits.

Two compiled graphs serve every test here (one step, one EMA; dynamic shapes), so the file's
compile cost is paid once per process; torch caches the compiled code on disk for later ones.
"""
import math

import pytest
import torch

from neox_sophia.optim import Sophia, fused, kernels
from tests.distributed import run_ranks
from tests.helpers import GROUPS, check_flat_partitions_equal_separate_tensors, drive, hessian_case, make_params


@pytest.fixture(autouse=True)
def small_tensors_run_fused(monkeypatch):
    """The test shapes are small; let every tensor of >= 2 elements take the fused path."""
    monkeypatch.setattr(fused, "MIN_NUMEL", 2)


def same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.view(torch.int32) if a.dtype == torch.float32 else a,
                                              b.view(torch.int32) if b.dtype == torch.float32 else b)


def snapshot(opt, params):
    return [t.detach().clone() for p in params for t in (p, opt.state[p]["exp_avg"], opt.state[p]["hessian"],
                                                         opt.state[p]["hessian_rejected"])]


@pytest.mark.parametrize("maximize", [False, True])
def test_fused_equals_eager_bit_for_bit_over_many_steps(maximize):
    """Two groups (b1 0.965 and 0.3: both forms of the momentum), weight decay on one, an lr that
    changes every step, Hessian refreshes every 3 steps."""
    groups = [dict(g) for g in GROUPS]
    groups[1]["betas"] = (0.3, 0.95)
    results = []
    for use_fused in (False, True):
        params = make_params()
        opt = Sophia([dict(params=[params[i] for i in g["idx"]], **{k: v for k, v in g.items() if k != "idx"})
                      for g in groups], fused=use_fused, maximize=maximize)

        def next_lr(it, opt=opt):
            for group, base in zip(opt.param_groups, groups):
                group["lr"] = base["lr"] * (1 + 0.5 * math.sin(it))

        drive(opt, params, 30, on_step=next_lr)
        results.append(snapshot(opt, params))
    assert fused._verified.get(("step", "cpu")) and fused._verified.get(("ema", "cpu"))
    assert all(same_bits(a, b) for a, b in zip(*results))


def test_hessian_scale_and_floor_take_the_same_path():
    results = []
    for use_fused in (False, True):
        p, g, m, h = (torch.randn(999, generator=torch.Generator().manual_seed(s)) for s in range(4))
        h = h.abs() * 1e-6
        for lr in (1e-3, 2e-3):
            kernels.sophia_update([p], [g], [m], [h], lr=lr, beta1=0.9, rho=0.05, bs=512, eps=1e-15,
                                  weight_decay=0.1, hessian_scale=1.7, hessian_floor=2e-6, fused=use_fused)
        results.append((p, m))
    assert all(same_bits(a, b) for a, b in zip(*results))


def test_changing_lr_scale_and_sizes_never_recompile(monkeypatch):
    """After the first call, new learning rates, Hessian scales, tensor sizes and views at other
    offsets (ZeRO partitions) reuse the compiled kernels."""
    import torch._dynamo

    flat = torch.randn(1000)
    kernels.sophia_update([flat.clone()], [flat.clone()], [torch.zeros(1000)], [torch.zeros(1000)], lr=1e-3,
                          beta1=0.9, rho=0.05, bs=512, eps=1e-15, weight_decay=0.1, fused=True)
    kernels.hessian_ema([torch.zeros(1000)], [flat.clone()], [torch.zeros(())], beta2=0.99, square=True, fused=True)
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    for step, numel in enumerate((5, 77, 4099, 300)):
        tensors = list(torch.randn(4 * numel + step)[step:].view(4, numel))  # views at offsets
        kernels.sophia_update(tensors[:1], tensors[1:2], tensors[2:3], [tensors[3].abs()], lr=1e-3 * (step + 1),
                              beta1=0.965, rho=0.04, bs=1000 + step, eps=1e-15, weight_decay=0.1 * step,
                              hessian_scale=1.0 / (1.0 - 0.99 ** (step + 1)), fused=True)
        kernels.hessian_ema([tensors[3]], [tensors[1]], [torch.zeros(())], beta2=0.99 - 0.01 * step,
                            square=step % 2 == 0, fused=True)


def test_flat_partition_equals_per_tensor():
    check_flat_partitions_equal_separate_tensors(fused=True)


@pytest.mark.parametrize("square", [True, False])
def test_hessian_guard_fused_equals_eager(square):
    """NaN, inf, squares and sums that overflow, huge values that fit: same h and same counts."""
    results = []
    for use_fused in (False, True):
        hs, es = hessian_case(torch.float32)
        rejected = [torch.zeros(()) for _ in hs]
        for _ in range(2):
            kernels.hessian_ema(hs, es, rejected, beta2=0.99, square=square, fused=use_fused)
        results.append((hs, [float(r) for r in rejected]))
    (eager_h, eager_count), (fused_h, fused_count) = results
    assert all(same_bits(a, b) for a, b in zip(eager_h, fused_h))
    assert fused_count == eager_count and sum(fused_count) > 0


def test_other_dtypes_and_small_tensors_take_the_eager_path(monkeypatch):
    """bf16 tensors and tensors under MIN_NUMEL run eager even with fused=True, with the eager bits."""
    monkeypatch.setattr(fused, "MIN_NUMEL", 100)
    results = []
    for use_fused in (False, True):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(0)).to(dtype))
                  for s, dtype in (((300,), torch.bfloat16), ((30,), torch.float32), ((400,), torch.float32))]
        opt = Sophia(params, fused=use_fused)
        for it in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(it)).to(p.dtype)
            opt.step()
            opt.update_hessian()
        results.append(snapshot(opt, params))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_a_failed_check_falls_back_to_eager_with_a_warning(monkeypatch):
    monkeypatch.setattr(fused, "_verified", {})
    monkeypatch.setattr(fused, "_unavailable", {})
    monkeypatch.setitem(fused._PROBES, "step", lambda device: "differs on purpose")
    monkeypatch.setattr(fused, "AUTO_CPU_NUMEL", 1)
    params, reference = make_params(), make_params()
    opt, eager = Sophia(params), Sophia(reference, fused=False)
    with pytest.warns(RuntimeWarning, match="fused kernels switched off on cpu: the fused step kernel differs"):
        drive(opt, params, 4)
    drive(eager, reference, 4)
    assert all(torch.equal(a, b) for a, b in zip(params, reference))
    forced = make_params()
    for p in forced:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="fused=True: the fused step kernel differs on purpose; set fused to false"):
        Sophia(forced, fused=True).step()


def test_auto_choice():
    big, small = [torch.zeros(fused.AUTO_CPU_NUMEL)], [torch.zeros(1000)]
    assert fused.use_fused(None, big) and not fused.use_fused(None, small)
    assert not fused.use_fused(None, [t.bfloat16() for t in big]) and not fused.use_fused(False, big)
    assert fused.use_fused(True, small)
    assert fused.unavailable_reason(torch.device("meta")) == "no compiled kernels for meta tensors"


# ------------------------------------------------------------------ under DeepSpeed, bf16 + ZeRO
def _bf16_zero_worker(rank, world_size):
    """The same bf16 ZeRO-1 training twice on this rank, fused and eager; the optimizer sees
    DeepSpeed's fp32 master partitions."""
    import deepspeed

    from neox_sophia.training.steps import redirected_step

    fused.MIN_NUMEL = 2
    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    for use_fused in (True, False):
        torch.manual_seed(1234)
        model = torch.nn.Sequential(torch.nn.Linear(10, 23), torch.nn.Tanh(), torch.nn.Linear(23, 7))
        sophia = Sophia(model.parameters(), lr=2e-2, rho=0.05, bs=8, fused=use_fused)
        engine, *_ = deepspeed.initialize(model=model, optimizer=sophia, config={
            "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9})
        for step in range(6):
            g = torch.Generator().manual_seed(step)
            mine = slice(rank * 4, (rank + 1) * 4)
            x, y = torch.randn(8, 10, generator=g)[mine], torch.randn(8, 7, generator=g)[mine]
            engine.backward(torch.nn.functional.mse_loss(engine(x.bfloat16()).float(), y))
            if step % 2:
                with redirected_step(engine, sophia, sophia.update_hessian):
                    engine.step()
            else:
                engine.step()
        parts = engine.optimizer.single_partition_of_fp32_groups
        out[use_fused] = {"dtypes": [str(p.dtype) for p in parts],
                          "state": [t.clone() for p in parts for t in (p.detach(), sophia.state[p]["exp_avg"],
                                                                        sophia.state[p]["hessian"])]}
    out["fused_ran"] = bool(fused._verified.get(("step", "cpu")) and fused._verified.get(("ema", "cpu")))
    return out


@pytest.mark.distributed
def test_bf16_zero_master_partitions_fused_equals_eager():
    for rank in run_ranks(_bf16_zero_worker, 2):
        assert rank["fused_ran"] and rank[True]["dtypes"] == ["torch.float32"]
        assert all(same_bits(a, b) for a, b in zip(rank[True]["state"], rank[False]["state"]))
        assert any(t.abs().max() > 0 for t in rank[True]["state"][2::3])  # the Hessian was updated


# ------------------------------------------------------------------------------------- on CUDA
@pytest.mark.gpu
def test_fused_equals_eager_on_cuda(monkeypatch):
    """The Triton kernels against the eager CUDA kernels: probe values (inf, NaN, huge, tiny),
    both momentum forms, the guard's cases; then a changing lr and new sizes never recompile."""
    import torch._dynamo

    cuda = torch.device("cuda")
    assert fused._ready("step", cuda) and fused._ready("ema", cuda), fused._unavailable
    for beta1 in (0.965, 0.3):
        eager, compiled = ([fused.probe_values(5000, cuda, seed).abs() if seed == 3
                            else fused.probe_values(5000, cuda, seed) for seed in range(4)] for _ in range(2))
        for tensors, use_fused in ((eager, False), (compiled, True)):
            kernels.sophia_update(tensors[:1], tensors[1:2], tensors[2:3], tensors[3:], lr=6e-4, beta1=beta1, rho=0.05,
                                  bs=4096, eps=1e-15, weight_decay=0.1, fused=use_fused)
        assert all(same_bits(a, b) for a, b in zip(eager, compiled))
    for square in (True, False):
        results = []
        for use_fused in (False, True):
            hs, es = hessian_case(torch.float32)
            hs, es = [h.to(cuda) for h in hs], [e.to(cuda) for e in es]
            rejected = [torch.zeros((), device=cuda) for _ in hs]
            kernels.hessian_ema(hs, es, rejected, beta2=0.99, square=square, fused=use_fused)
            results.append((hs, [float(r) for r in rejected]))
        assert all(same_bits(a, b) for a, b in zip(results[0][0], results[1][0])) and results[0][1] == results[1][1]
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    for step, numel in enumerate((3, 70000, 12345)):
        tensors = [torch.randn(numel, device=cuda) for _ in range(4)]
        kernels.sophia_update(tensors[:1], tensors[1:2], tensors[2:3], [tensors[3].abs()], lr=1e-3 * (step + 1),
                              beta1=0.965, rho=0.04, bs=1000, eps=1e-15, weight_decay=0.1, fused=True)

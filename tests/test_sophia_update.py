"""Sophia's update against the paper's rule written out here, and its invariances."""
import io
import math

import pytest
import torch

from neox_sophia.optim import Sophia, SophiaStatistics
from neox_sophia.optim import kernels, reference
from tests.helpers import (GROUPS, check_flat_partitions_equal_separate_tensors, drive, gradient_stream,
                           hessian_case, make_params, sophia_groups)

EPS = 1e-15


class PaperSophia:
    """The rule as written in neox_sophia.optim.reference, parameter by parameter; options per
    group (bias correction, a floor) as Sophia's param groups give them."""

    def __init__(self, params, groups=GROUPS, bias_correction=False):
        self.p = [p.detach().clone() for p in params]
        self.m = [torch.zeros_like(p) for p in self.p]
        self.h = [torch.zeros_like(p) for p in self.p]
        self.hyper = {i: g for g in groups for i in g["idx"]}
        self.refreshes = 0
        self.bias_correction = bias_correction
        self.floor = {}

    def step(self, grads):
        for i, grad in enumerate(grads):
            c = self.hyper[i]
            scale = reference.bias_correction(c["betas"][1], self.refreshes) if self.bias_correction else 1.0
            self.p[i], self.m[i] = reference.sophia_step(
                self.p[i], self.m[i], self.h[i], grad, lr=c["lr"], beta1=c["betas"][0], rho=c["rho"], bs=c["bs"],
                eps=EPS, weight_decay=c["weight_decay"], hessian_scale=scale, hessian_floor=self.floor.get(i, 0.0))

    def update_hessian(self, grads):
        self.refreshes += 1
        for i, grad in enumerate(grads):
            self.h[i] = reference.hessian_refresh(self.h[i], grad * grad, beta2=self.hyper[i]["betas"][1])


def assert_close_to_scale(actual, expected, rel=1e-5):
    """fp32 agreement up to rounding: the optimizer computes m with lerp, the rule with
    b1*m + (1-b1)*g, which differ by ~1 ulp of the larger term; where the two terms cancel
    that is a large *relative* error of a tiny m, so the bound is relative to the tensor's scale."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("foreach", [True, False])
def test_matches_paper_rule_over_many_steps(foreach):
    params = make_params()
    ref = PaperSophia(params)
    opt = Sophia(sophia_groups(params), eps=EPS, foreach=foreach)
    clip_fracs = []

    def check(it):
        grads, hess_grads = all_grads[it]
        ref.step(grads)
        if it % 3 == 2:
            ref.update_hessian(hess_grads)
        for i, p in enumerate(params):
            st = opt.state[p]
            assert_close_to_scale(st["exp_avg"], ref.m[i])
            assert_close_to_scale(st["hessian"], ref.h[i])
            assert_close_to_scale(p.detach(), ref.p[i])
        clip_fracs.append(opt.statistics().clip_frac)

    all_grads = list(gradient_stream(60))
    drive(opt, params, 60, on_step=check)
    assert opt.state[params[0]]["step"].item() == 60
    # The test exercised both regimes: clipped and Hessian-preconditioned coordinates.
    assert clip_fracs[0] == 1.0  # h = 0 before the first Hessian pass: every coordinate clips
    assert 0.05 < min(clip_fracs[5:]) and max(clip_fracs[5:]) < 0.95


def test_hessian_is_used_not_sign_momentum():
    """Regression: a port that never refreshed h silently became sign momentum."""
    p = torch.nn.Parameter(torch.zeros(4))
    opt = Sophia([p], lr=1.0, rho=1.0, bs=1.0, weight_decay=0.0, betas=(0.0, 0.0))
    p.grad = torch.tensor([0.5, -0.5, 2.0, -3.0])
    opt.update_hessian()  # h = g*g = [0.25, 0.25, 4, 9]
    p.grad = torch.tensor([0.1, -0.1, 1.0, -3.0])
    opt.step()  # m = g; step = m / max(h, |m|)
    torch.testing.assert_close(p.detach(), -torch.tensor([0.4, -0.4, 0.25, -1.0 / 3.0]))


def test_foreach_single_tensor_and_chunked_waves_are_identical(monkeypatch):
    results = []
    for foreach, wave in [(False, None), (True, None), (True, 17)]:
        if wave:
            monkeypatch.setattr(kernels, "CPU_WAVE_NUMEL", wave)
        params = make_params()
        opt = Sophia(sophia_groups(params), foreach=foreach)
        drive(opt, params, 25)
        results.append([t for p in params for t in (p.detach(), opt.state[p]["exp_avg"],
                                                    opt.state[p]["hessian"])])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_flattened_params_give_identical_results():
    check_flat_partitions_equal_separate_tensors()


def test_state_dict_round_trip_continues_identically():
    params_a = make_params()
    opt_a = Sophia(sophia_groups(params_a))
    stream = list(gradient_stream(30))

    def run(opt, params, its):
        for it in its:
            grads, hess_grads = stream[it]
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            if it % 3 == 2:
                for p, g in zip(params, hess_grads):
                    p.grad = g
                opt.update_hessian()

    run(opt_a, params_a, range(14))
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    opt_b = Sophia(sophia_groups(params_b))
    buf.seek(0)
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    run(opt_a, params_a, range(14, 30))
    run(opt_b, params_b, range(14, 30))
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa, pb)
        for key in ("step", "exp_avg", "hessian"):
            assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key])


def test_update_hessian_changes_only_the_hessian():
    params = make_params()
    opt = Sophia(sophia_groups(params))
    drive(opt, params, 4)
    before = {id(p): (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
              for p in params}
    for p in params:
        p.grad = torch.randn_like(p)
    opt.update_hessian()
    for p in params:
        old_p, old_state = before[id(p)]
        assert torch.equal(p.detach(), old_p)  # no update, no weight decay
        assert torch.equal(opt.state[p]["exp_avg"], old_state["exp_avg"])
        assert torch.equal(opt.state[p]["step"], old_state["step"])
        b2 = opt.param_groups[0 if p is params[0] or p is params[1] else 1]["betas"][1]
        torch.testing.assert_close(opt.state[p]["hessian"],
                                   b2 * old_state["hessian"] + (1 - b2) * p.grad * p.grad)


@pytest.mark.parametrize("first", ["step", "update_hessian"])
def test_every_state_key_exists_after_the_first_call(first):
    params = make_params()
    opt = Sophia(sophia_groups(params))
    for p in params:
        p.grad = torch.randn_like(p)
    getattr(opt, first)()
    for p in params:
        assert set(opt.state[p]) == {"step", "exp_avg", "hessian", "hessian_rejected"}


def test_step_with_only_some_param_groups_present():
    """ZeRO swaps param_groups to one group at a time around each step() call."""
    params = make_params()
    opt = Sophia(sophia_groups(params))
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    original = opt.param_groups
    opt.param_groups = [original[1]]
    opt.step()
    opt.param_groups = original
    assert torch.equal(params[0], before[0]) and torch.equal(params[1], before[1])
    assert not torch.equal(params[2], before[2]) and not torch.equal(params[3], before[3])
    assert params[0] not in opt.state


def test_maximize_equals_minimizing_the_negated_gradient():
    a, b = make_params(), make_params()
    opt_a = Sophia(sophia_groups(a), maximize=True)
    opt_b = Sophia(sophia_groups(b))
    for grads, hess in gradient_stream(10):
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g, -g
        opt_a.step()
        opt_b.step()
        for p, q, g in zip(a, b, hess):
            p.grad, q.grad = g, g
        opt_a.update_hessian()
        opt_b.update_hessian()
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("name,value", [
    ("lr", -1e-3), ("lr", float("nan")), ("betas", (1.0, 0.99)), ("betas", (0.9, -0.1)),
    ("betas", (0.9,)), ("rho", 0.0), ("rho", -0.1), ("eps", 0.0), ("bs", 0),
    ("weight_decay", -0.1), ("weight_decay", float("inf")),
])
def test_bad_hyperparameters_name_the_parameter(name, value):
    with pytest.raises(ValueError, match=rf"invalid {name}"):
        Sophia(make_params(), **{name: value})
    opt = Sophia(make_params()[:1])
    with pytest.raises(ValueError, match=rf"invalid {name}"):
        opt.add_param_group({"params": make_params()[1:2], name: value})


def test_sparse_gradients_are_refused_clearly():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = Sophia(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_non_finite_hessian_estimates_never_enter_the_ema():
    p = torch.nn.Parameter(torch.zeros(6))
    opt = Sophia([p], betas=(0.9, 0.5))
    p.grad = torch.ones(6)
    opt.update_hessian()  # h = 0.5
    p.grad = torch.tensor([2.0, float("nan"), float("inf"), -float("inf"), 1e20, 1.0])
    opt.update_hessian()  # 1e20**2 overflows fp32: also rejected
    torch.testing.assert_close(opt.state[p]["hessian"],
                               torch.tensor([2.25, 0.5, 0.5, 0.5, 0.5, 0.75]))
    assert opt.statistics().hessian_rejected == 4
    # Sophia-H estimates go through the same guard.
    opt.update_hessian([torch.tensor([float("nan"), 1, 1, 1, 1, 1.0])])
    assert opt.statistics().hessian_rejected == 5
    assert torch.isfinite(opt.state[p]["hessian"]).all()


def test_hutchinson_estimates_are_used_as_given_and_validated():
    params = make_params()
    opt = Sophia(sophia_groups(params))
    estimates = [torch.full_like(p, -2.0) for p in params]  # u*Hu may be negative
    estimates[1] = None
    opt.update_hessian(estimates)
    assert torch.equal(opt.state[params[0]]["hessian"], torch.full_like(params[0], -2.0 * 0.01))
    assert params[1] not in opt.state
    # A negative h floors the denominator at eps (the paper's max{rho*h, eps}): a full sign step.
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    before = params[0].detach().clone()
    opt.step()
    lr, wd = GROUPS[0]["lr"], GROUPS[0]["weight_decay"]
    torch.testing.assert_close(params[0].detach(), before * (1 - lr * wd) - lr)
    with pytest.raises(ValueError, match="one tensor"):
        opt.update_hessian([torch.zeros(1)])
    with pytest.raises(ValueError, match="shape"):
        opt.update_hessian([torch.zeros(2)] * len(params))


def test_statistics_are_sum_reducible_and_match_definition():
    params = make_params()
    opt = Sophia(sophia_groups(params))
    drive(opt, params, 12)
    unclipped = numel = 0
    h_all = []
    for g in GROUPS:
        for i in g["idx"]:
            st = opt.state[params[i]]
            unclipped += (st["exp_avg"].abs() < g["rho"] * g["bs"] * st["hessian"]).sum().item()
            numel += params[i].numel()
            h_all.append(st["hessian"].reshape(-1).double())
    stats = opt.statistics()
    h = torch.cat(h_all)
    assert stats.numel == numel
    assert math.isclose(stats.hessian_zero_frac, (h == 0).double().mean().item())
    assert math.isclose(stats.win_rate, unclipped / numel)
    assert math.isclose(stats.clip_frac + stats.win_rate, 1.0)
    assert math.isclose(stats.hessian_mean, h.mean().item(), rel_tol=1e-9)
    assert math.isclose(stats.hessian_rms, h.square().mean().sqrt().item(), rel_tol=1e-9)
    # Two "ranks" holding half the groups each: summing their sums gives the whole.
    groups = opt.param_groups
    for i, group in enumerate(groups):
        group["name"] = f"g{i}"  # unnamed groups are named by their index, which slicing changes
    opt.param_groups = groups[:1]
    first = opt.statistics_sums()
    opt.param_groups = groups[1:]
    second = opt.statistics_sums()
    opt.param_groups = groups
    assert set(first) | set(second) == set(opt.statistics_sums())  # one entry per group
    total = sum(first.values()) + sum(second.values())
    assert SophiaStatistics.from_sums(total) == stats


def test_bf16_parameters_keep_an_exact_rejected_count_across_load():
    p = torch.nn.Parameter(torch.zeros(300, dtype=torch.bfloat16))
    opt = Sophia([p])
    p.grad = torch.full_like(p, float("nan"))
    opt.update_hessian()  # 300 rejected: not representable exactly in bf16 (256 + 44)
    q = torch.nn.Parameter(torch.zeros(300, dtype=torch.bfloat16))
    other = Sophia([q])
    other.load_state_dict(opt.state_dict())
    assert other.state[q]["hessian_rejected"].dtype == torch.float32
    assert other.statistics().hessian_rejected == 300
    assert other.state[q]["hessian"].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("square", [True, False])
@pytest.mark.parametrize("wave", [16, 1 << 18])
def test_hessian_guard_fast_path_equals_the_per_coordinate_path(monkeypatch, dtype, square, wave):
    """Chunks proved finite are updated in place without the guard; they must get the same bits
    and counts as when every chunk goes through the per-coordinate repair."""
    results = []
    for everything_slow in (False, True):
        if everything_slow:
            monkeypatch.setattr(kernels, "_surely_finite", lambda hs, es, **_: [False] * len(hs))
        hs, es = hessian_case(dtype)
        rejected = [torch.zeros(()) for _ in hs]
        for _ in range(2):
            kernels.hessian_ema(hs, es, rejected, beta2=0.99, square=square, wave_numel=wave)
        results.append((hs, rejected))
    (fast, fast_rejected), (slow, slow_rejected) = results
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))
    assert [float(r) for r in fast_rejected] == [float(r) for r in slow_rejected]
    assert all(torch.isfinite(h).all() for h in fast)
    assert float(fast[4][250]) > 0.5 * float(torch.finfo(dtype).max)


def test_surely_finite_never_vouches_for_a_chunk_that_overflows():
    hs, es = hessian_case(torch.float32)
    flags = kernels._surely_finite(hs, es, beta2=0.99, square=True)
    assert flags == [False, False, False, True, False]
    ordinary = [torch.rand(50) for _ in range(3)]
    assert kernels._surely_finite(ordinary, [torch.randn(50) for _ in ordinary], beta2=0.99, square=True) \
        == [True] * 3


# --- options beyond the paper ------------------------------------------------------------------

def drive_against(ref, opt, params, steps, after_refresh=None):
    """drive() the optimizer and the reference side by side; the weights agree after every step."""
    all_grads = list(gradient_stream(steps))

    def check(it):
        grads, hess_grads = all_grads[it]
        ref.step(grads)
        if it % 3 == 2:
            ref.update_hessian(hess_grads)
            if after_refresh:
                after_refresh()
        for i, p in enumerate(params):
            assert_close_to_scale(p.detach(), ref.p[i])

    drive(opt, params, steps, on_step=check)


def test_bias_correction_divides_h_by_one_minus_beta2_to_the_refreshes():
    params = make_params()
    ref = PaperSophia(params, bias_correction=True)
    opt = Sophia(sophia_groups(params), eps=EPS, hessian_bias_correction=True)
    drive_against(ref, opt, params, 30)
    assert [g["hessian_updates"] for g in opt.param_groups] == [10, 10]
    assert Sophia.hessian_scale(opt.param_groups[0]) == pytest.approx(1 / (1 - 0.99 ** 10))
    # it changes the trajectory (the paper's rule clips more while h fills)
    plain = make_params()
    drive(Sophia(sophia_groups(plain), eps=EPS), plain, 30)
    assert not torch.equal(plain[0], params[0])


def test_hessian_floor_from_the_group_mean_and_zero_h_steps_shrink_with_m():
    params = make_params()
    ref = PaperSophia(params)
    opt = Sophia(sophia_groups(params), eps=EPS, hessian_floor_ratio=0.5)

    def floors():
        opt.apply_hessian_floor()  # single process: the group means of its own state
        for g in GROUPS:
            mean = torch.cat([ref.h[i].reshape(-1) for i in g["idx"]]).double().mean().item()
            for i in g["idx"]:
                ref.floor[i] = 0.5 * mean

    drive_against(ref, opt, params, 30, after_refresh=floors)
    assert opt.param_groups[0]["hessian_floor"] == pytest.approx(ref.floor[0], rel=1e-6) and ref.floor[0] > 0
    # a coordinate no Hessian batch touched (h = 0) whose gradient stops: the paper's rule keeps
    # stepping by lr*sign(m) while m decays; with a floor the step shrinks with |m|
    steps = {}
    for ratio in (0.0, 1.0):
        p = torch.nn.Parameter(torch.zeros(2))
        o = Sophia([p], lr=0.1, rho=100.0, bs=1, weight_decay=0.0, hessian_floor_ratio=ratio)
        p.grad = torch.tensor([1.0, 0.0])
        o.update_hessian()  # h = (0.01, 0): the second coordinate has no curvature yet
        o.apply_hessian_floor()
        p.grad = torch.tensor([0.0, 1.0])
        o.step()
        p.grad = torch.zeros(2)
        before = p.detach()[1].item()
        for _ in range(50):
            o.step()
        steps[ratio] = before - p.detach()[1].item()
    assert steps[0.0] == pytest.approx(50 * 0.1, rel=1e-6)  # full steps for 50 steps after the gradient stopped
    assert steps[1.0] < 0.1 * steps[0.0]


def test_adamw_groups_are_torch_adamw_and_have_no_hessian():
    params, twins = make_params(), make_params()
    groups = sophia_groups(params)
    groups[1].update(update="adamw", betas=(0.9, 0.95), eps=1e-8)
    opt = Sophia(groups, eps=EPS)
    adamw = torch.optim.AdamW([twins[i] for i in GROUPS[1]["idx"]], lr=GROUPS[1]["lr"], betas=(0.9, 0.95), eps=1e-8,
                              weight_decay=GROUPS[1]["weight_decay"], fused=True)
    for it, (grads, hess_grads) in enumerate(gradient_stream(12)):
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        adamw.step()
        if it % 3 == 2:
            for p, g in zip(params, hess_grads):
                p.grad = g.clone()
            opt.update_hessian()
    for i in GROUPS[1]["idx"]:
        assert torch.equal(params[i], twins[i])  # the same kernel, bit for bit
        assert set(opt.state[params[i]]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(opt.state[params[0]]) == {"step", "exp_avg", "hessian", "hessian_rejected"}
    assert [g["hessian_updates"] for g in opt.param_groups] == [4, 0]
    assert list(opt.statistics_sums()) == ["group0"]  # AdamW groups have no Sophia statistics
    # the reference's AdamW agrees to rounding
    p0 = make_params()[GROUPS[1]["idx"][0]].detach()
    m = v = torch.zeros_like(p0)
    for step, (grads, _) in enumerate(gradient_stream(12), start=1):
        p0, m, v = reference.adamw_step(p0, m, v, grads[GROUPS[1]["idx"][0]], step, lr=GROUPS[1]["lr"], beta1=0.9,
                                        beta2=0.95, eps=1e-8, weight_decay=GROUPS[1]["weight_decay"])
    assert_close_to_scale(params[GROUPS[1]["idx"][0]].detach(), p0)


def test_update_hessian_without_squaring_takes_the_gradient_slot_as_the_estimate():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = Sophia([p], betas=(0.9, 0.5))
    p.grad = torch.tensor([2.0, -1.0, 0.5])
    opt.update_hessian(square=False)
    assert torch.equal(opt.state[p]["hessian"], torch.tensor([1.0, -0.5, 0.25]))
    opt.update_hessian()
    assert torch.equal(opt.state[p]["hessian"], torch.tensor([2.5, 0.25, 0.25]))


def test_group_state_survives_a_state_dict_round_trip():
    params = make_params()
    opt = Sophia(sophia_groups(params), hessian_bias_correction=True, hessian_floor_ratio=0.1)
    drive(opt, params, 9)
    opt.apply_hessian_floor()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    twins = make_params()
    other = Sophia(sophia_groups(twins), hessian_bias_correction=True, hessian_floor_ratio=0.1)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    for a, b in zip(opt.param_groups, other.param_groups):
        assert (a["hessian_updates"], a["hessian_floor"]) == (b["hessian_updates"], b["hessian_floor"]) != (0, 0.0)


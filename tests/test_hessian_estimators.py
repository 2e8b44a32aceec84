"""The Hessian-diagonal estimators against analytic answers."""
import pytest
import torch

from neox_sophia.optim import Sophia
from neox_sophia.optim.hessian import gnb_loss, hutchinson, sample_labels


def test_gnb_estimates_the_gauss_newton_diagonal():
    """Linear softmax model z = W x. For the mean CE over B tokens, the Gauss-Newton matrix is
    mean_i J_i^T (diag(p_i) - p_i p_i^T) J_i, so diag_GN[c, d] = mean_i x_id^2 p_ic (1 - p_ic).
    GNB claims E[B * g_s * g_s] = diag_GN, with g_s the gradient of CE against sampled labels."""
    torch.manual_seed(0)
    B, D, C = 6, 3, 5
    x = torch.randn(B, D, dtype=torch.float64)
    W = torch.randn(C, D, dtype=torch.float64, requires_grad=True)
    probs = torch.softmax(x @ W.detach().T, dim=-1)
    analytic = (probs * (1 - probs)).T @ (x * x) / B  # [C, D]

    gen = torch.Generator().manual_seed(1)
    draws = 3000
    total = torch.zeros_like(W)
    total_sq = torch.zeros_like(W)
    for _ in range(draws):
        est = gnb_loss(x @ W.T, generator=gen)
        (g,) = torch.autograd.grad(est.loss, [W])
        sample = est.num_tokens * g * g
        total += sample
        total_sq += sample * sample
    mean = total / draws
    stderr = ((total_sq / draws - mean * mean) / draws).sqrt()
    assert ((mean - analytic).abs() <= 5 * stderr + 1e-12).all(), (mean, analytic)
    assert (stderr < 0.1 * analytic).all()  # the check is tight, not vacuous


def test_gnb_through_the_optimizer_folds_g_squared():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 7)
    opt = Sophia(model.parameters(), betas=(0.9, 0.5))
    est = gnb_loss(model(torch.randn(3, 4)), generator=torch.Generator().manual_seed(0))
    est.loss.backward()
    opt.update_hessian()
    for p in model.parameters():
        torch.testing.assert_close(opt.state[p]["hessian"], 0.5 * p.grad * p.grad)


def test_sampled_label_frequencies_follow_the_softmax():
    logits = torch.tensor([2.0, 0.5, -1.0, 1.0, 0.0])
    n = 40000
    gen = torch.Generator().manual_seed(3)
    labels = sample_labels(logits.expand(n, -1), torch.rand(n, generator=gen, dtype=torch.float64))
    counts = torch.bincount(labels, minlength=5).double()
    expected = torch.softmax(logits.double(), 0) * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    # 4 degrees of freedom: P(chi2 > 18.47) = 0.001.
    assert chi2 < 18.47, (counts, expected)


def test_padded_columns_and_masked_positions_are_never_sampled():
    gen = torch.Generator().manual_seed(0)
    logits = torch.zeros(4, 50, 10)
    logits[..., 7:] = 30.0  # padding columns would dominate if they were allowed
    mask = torch.ones(4, 50, dtype=torch.long)
    mask[:, ::3] = 0
    est = gnb_loss(logits, loss_mask=mask, generator=gen, vocab_size=7)
    kept = est.labels[mask == 1]
    assert kept.max().item() < 7 and kept.min().item() >= 0
    assert (est.labels[mask == 0] == -100).all()
    assert est.num_tokens == int(mask.sum())
    # The edges of the inverse CDF: u = 0 gives the first class, u -> 1 the last valid one.
    edges = sample_labels(torch.zeros(2, 10), torch.tensor([0.0, 1.0 - 1e-16]), vocab_size=7)
    assert edges.tolist() == [0, 6]


def test_gnb_labels_depend_only_on_the_generator():
    logits = torch.randn(2, 8, 11)
    a = gnb_loss(logits, generator=torch.Generator().manual_seed(5))
    b = gnb_loss(logits.clone(), generator=torch.Generator().manual_seed(5))
    c = gnb_loss(logits, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.labels, b.labels) and not torch.equal(a.labels, c.labels)


def test_gnb_rejects_bad_masks():
    with pytest.raises(ValueError, match="every position is masked"):
        gnb_loss(torch.randn(2, 3, 4), loss_mask=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="loss_mask of shape"):
        gnb_loss(torch.randn(2, 3, 4), loss_mask=torch.ones(3, 2))


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    """levanter's check: 4x4 linear least squares, sum_i (x_i . w - y_i)^2 with X = I: H = 2I."""
    w = torch.randn(4, requires_grad=True)
    x, y = torch.eye(4), torch.randn(4)
    (est,) = hutchinson(((x @ w - y) ** 2).sum(), [w], torch.Generator().manual_seed(0))
    torch.testing.assert_close(est, torch.full((4,), 2.0))


def test_hutchinson_is_unbiased_for_a_full_hessian():
    torch.manual_seed(0)
    a = torch.randn(5, 5)
    hess = a @ a.T + torch.eye(5)
    w = torch.randn(5, requires_grad=True)
    gen = torch.Generator().manual_seed(1)
    draws = 4000
    mean = sum(hutchinson(0.5 * w @ hess @ w, [w], gen)[0] for _ in range(draws)) / draws
    # u*Hu = diag(H) + sum_j!=i u_i u_j H_ij: std of the mean is ||offdiag row|| / sqrt(draws).
    offdiag = (hess - torch.diag(torch.diag(hess))).norm(dim=1)
    assert ((mean - torch.diag(hess)).abs() <= 5 * offdiag / draws ** 0.5).all()


def test_hutchinson_handles_unused_parameters():
    used, unused = torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)
    est = hutchinson((used ** 2).sum(), [used, unused], torch.Generator().manual_seed(0))
    torch.testing.assert_close(est[0], torch.full((3,), 2.0))
    assert torch.equal(est[1], torch.zeros(2))

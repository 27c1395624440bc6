"""uskd_loss against the formula written term by term in numpy, and finite differences."""

import numpy as np
import pytest
import torch
from scipy.special import log_softmax, softmax

from torchsteer.divergence import uskd_loss

D = torch.float64


def _data(seed, n=7, c=6):
    g = torch.Generator().manual_seed(seed)
    zs = 2 * torch.randn(n, c, generator=g, dtype=D)
    zw = 2 * torch.randn(n, c, generator=g, dtype=D)
    y = torch.randint(0, c, (n,), generator=g)
    return zs, zw, y


def _oracle(zs, zw, y, alpha=1.0, beta=0.1, mu=0.005, released=False):
    zs, zw, y = zs.numpy(), zw.numpy(), y.numpy()
    n, c = zs.shape
    s, w, ls, lw = softmax(zs, 1), softmax(zw, 1), log_softmax(zs, 1), log_softmax(zw, 1)
    s_y = s[np.arange(n), y]
    t = s_y**2 + 1 - np.mean(s_y**2)
    loss_t = -np.mean(t * ls[np.arange(n), y])
    loss_non, loss_weak = 0.0, 0.0
    for i in range(n):
        smooth = np.full(c, 0.1 / c)
        smooth[y[i]] += 0.9
        loss_weak += -np.sum(smooth * lw[i]) / n
        st = ls[i] / (1 - ls[i, y[i]] + 1e-6) if released else s[i] / (1 - s_y[i] + 1e-6)
        score = w[i] / (1 - w[i, y[i]] + 1e-6) + st
        ranked = sorted(range(c), key=lambda j: -score[j])  # class order, best first
        zipf = np.array([1.0 / (ranked.index(j) + 1) for j in range(c)])
        others = [j for j in range(c) if j != y[i]]
        lab = zipf[others] / zipf[others].sum()
        loss_non += -np.sum(lab * log_softmax(zs[i, others])) / n
    return alpha * loss_t + beta * loss_non + mu * loss_weak


@pytest.mark.parametrize("released", [False, True])
@pytest.mark.parametrize("weights", [(1.0, 0.1, 0.005), (0.5, 2.0, 1.0)])
def test_matches_the_formula_term_by_term(released, weights):
    zs, zw, y = _data(1)
    a, b, m = weights
    got = uskd_loss(zs, zw, y, alpha=a, beta=b, mu=m, released_rank=released)
    assert float(got) == pytest.approx(_oracle(zs, zw, y, a, b, m, released), rel=1e-12)


def test_the_two_rankings_differ_somewhere():
    # the released ranking (log probabilities) is not the probability ranking in general
    diffs = [
        float(uskd_loss(*_data(s), beta=1.0, alpha=0, mu=0))
        - float(uskd_loss(*_data(s), beta=1.0, alpha=0, mu=0, released_rank=True))
        for s in range(10)
    ]
    assert max(abs(d) for d in diffs) > 1e-6


def test_zipf_labels_follow_the_ranking():
    # weak head and student agree: class order 2, 0, 1, 3 with target 2 -> labels 1/2, 1/3,
    # 1/4 on classes 0, 1, 3, renormalized; the non-target loss is their cross-entropy
    z = torch.tensor([[2.0, 1.0, 5.0, 0.0]], dtype=D)
    y = torch.tensor([2])
    got = uskd_loss(z, z.clone(), y, alpha=0.0, beta=1.0, mu=0.0)
    lab = np.array([1 / 2, 1 / 3, 1 / 4])
    lab = lab / lab.sum()
    want = -np.sum(lab * log_softmax(np.array([2.0, 1.0, 0.0])))
    assert float(got) == pytest.approx(want, rel=1e-12)


def test_gradients_match_finite_differences_with_the_detached_labels_held_fixed():
    # the soft target and the Zipf labels are stop-gradient: finite differences of the loss
    # with them frozen at the point (written here from the formula) are the oracle
    zs, zw, y = _data(2)
    n, c = zs.shape
    s = torch.softmax(zs, 1)
    s_y = s[torch.arange(n), y]
    t = s_y**2 + 1 - (s_y**2).mean()
    w = torch.softmax(zw, 1)
    score = w / (1 - w[torch.arange(n), y, None] + 1e-6) + s / (1 - s_y[:, None] + 1e-6)
    rank = torch.argsort(torch.argsort(score, 1, descending=True), 1)
    keep = torch.ones(n, c, dtype=torch.bool)
    keep[torch.arange(n), y] = False
    lab = (1.0 / (rank + 1).double())[keep].reshape(n, c - 1)
    lab = lab / lab.sum(1, keepdim=True)
    smooth = torch.full((n, c), 0.1 / c, dtype=D)
    smooth[torch.arange(n), y] += 0.9

    def frozen(a, b):
        la = torch.log_softmax(a, 1)
        lt = -(t * la[torch.arange(n), y]).mean()
        ln = -(lab * torch.log_softmax(a[keep].reshape(n, c - 1), 1)).sum(1).mean()
        lw = -(smooth * torch.log_softmax(b, 1)).sum(1).mean()
        return lt + 0.7 * ln + 0.3 * lw

    a, b = zs.clone().requires_grad_(True), zw.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(frozen, (a, b), eps=1e-6, atol=1e-8)
    want = torch.autograd.grad(frozen(a, b), (a, b))
    got = torch.autograd.grad(uskd_loss(a, b, y, beta=0.7, mu=0.3), (a, b))
    for g_got, g_want in zip(got, want, strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda zs, zw, y: uskd_loss(zs, zw[:, :5], y), "Invalid shapes"),
        (lambda zs, zw, y: uskd_loss(zs, zw, y.double()), "Invalid target"),
        (lambda zs, zw, y: uskd_loss(zs, zw, y + 10), "Invalid target"),
        (lambda zs, zw, y: uskd_loss(zs * float("nan"), zw, y), "student_logits"),
        (lambda zs, zw, y: uskd_loss(zs, zw, y, beta=-1.0), "Invalid beta"),
        (lambda zs, zw, y: uskd_loss(zs[:, :1], zw[:, :1], y * 0), "Invalid shapes"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call(*_data(3))

"""KL estimators against exact KL by enumeration, and the double soft-min value."""

from __future__ import annotations

import math

import pytest
import torch

from torchsteer.control.kl import double_softmin, kl_estimate, kl_exact, masked_mean


def _pair(seed, v=6, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(scale * torch.randn(v, generator=g, dtype=torch.float64), 0)
    lq = torch.log_softmax(scale * torch.randn(v, generator=g, dtype=torch.float64), 0)
    return lp, lq


def _expectation(kind, lp, lq):
    """E_{x ~ pi}[k(x)] by enumerating the whole support (each outcome once, weight pi(x))."""
    ks = kl_estimate(lp, lq, kind=kind, reduction="none")
    return (lp.exp() * ks).sum()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_k1_k3_unbiased_by_enumeration(kind, seed):
    lp, lq = _pair(seed)
    exact = (lp.exp() * (lp - lq)).sum()
    assert _expectation(kind, lp, lq).item() == pytest.approx(exact.item(), rel=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_k2_expectation_and_bias(seed):
    lp, lq = _pair(seed)
    exact = (lp.exp() * (lp - lq)).sum()
    half_sq = (lp.exp() * 0.5 * (lp - lq) ** 2).sum()
    assert _expectation("k2", lp, lq).item() == pytest.approx(half_sq.item(), rel=1e-12)
    # second-order accurate: for pi_ref -> pi the relative bias vanishes linearly
    for eps in (1e-1, 1e-2):
        lq_near = torch.log_softmax(lp + eps * (lq - lp), 0)
        ex = (lp.exp() * (lp - lq_near)).sum()
        rel = abs(_expectation("k2", lp, lq_near) - ex) / ex
        assert rel < 10 * eps
    assert not torch.isclose(half_sq, exact)


def test_k3_is_nonnegative_and_zero_at_equality():
    lp, lq = _pair(0)
    assert (kl_estimate(lp, lq, kind="k3", reduction="none") >= 0).all()
    assert kl_estimate(lp, lp, kind="k3").item() == 0.0


def test_token_mask_and_reductions():
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(3, 5, generator=g, dtype=torch.float64)
    logq = -torch.rand(3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    per_tok = torch.expm1(logq - logp) - (logq - logp)
    kept = [per_tok[b, t].item() for b in range(3) for t in range(5) if mask[b, t]]
    assert kl_estimate(logp, logq, mask).item() == pytest.approx(sum(kept) / len(kept))
    seq = [sum(per_tok[b, t].item() for t in range(5) if mask[b, t]) for b in range(3)]
    assert kl_estimate(logp, logq, mask, reduction="sequence").item() == pytest.approx(sum(seq) / 3)
    none = kl_estimate(logp, logq, mask, reduction="none")
    assert (none[mask == 0] == 0).all()
    # padding values do not matter, even non-finite ones masked to zero weight in the mean
    logp2 = logp.clone()
    logp2[0, 4] = -50.0
    assert kl_estimate(logp2, logq, mask).item() == pytest.approx(
        kl_estimate(logp, logq, mask).item()
    )


def test_estimator_gradient_matches_finite_difference():
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    logq = torch.tensor([-1.5, -1.0, -0.7], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: kl_estimate(x, logq, kind="k3"), (logp,))


def test_kl_exact_against_enumeration_and_sequence_structure():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 3, 7, generator=g, dtype=torch.float64)
    b = torch.randn(4, 3, 7, generator=g, dtype=torch.float64)
    got = kl_exact(a, b)
    assert got.shape == (4, 3)
    for i in range(4):
        for t in range(3):
            p = torch.softmax(a[i, t], 0)
            q = torch.softmax(b[i, t], 0)
            want = sum(p[v] * math.log(p[v] / q[v]) for v in range(7))
            assert got[i, t].item() == pytest.approx(float(want), rel=1e-12)


def test_sequence_kl_of_two_token_autoregressive_model_by_enumeration():
    # pi(x1, x2) = pi1(x1) pi2(x2 | x1); sampled-sequence k1 summed over tokens, averaged
    # over the exact sequence distribution, equals the KL between the joint distributions
    v = 4
    g = torch.Generator().manual_seed(3)
    p1, q1 = (
        torch.log_softmax(torch.randn(v, generator=g, dtype=torch.float64), 0) for _ in range(2)
    )
    p2, q2 = (
        torch.log_softmax(torch.randn(v, v, generator=g, dtype=torch.float64), 1) for _ in range(2)
    )
    x1, x2 = torch.meshgrid(torch.arange(v), torch.arange(v), indexing="ij")
    x1, x2 = x1.flatten(), x2.flatten()
    logp = torch.stack([p1[x1], p2[x1, x2]], 1)
    logq = torch.stack([q1[x1], q2[x1, x2]], 1)
    w = logp.sum(1).exp()
    joint_kl = (w * (logp.sum(1) - logq.sum(1))).sum()
    for kind in ("k1", "k3"):
        per_seq = kl_estimate(logp, logq, kind=kind, reduction="none").sum(1)
        assert (w * per_seq).sum().item() == pytest.approx(joint_kl.item(), rel=1e-12)
    # exact per-position KL along the way gives the same (chain rule of KL)
    chain = kl_exact(p1, q1) + (p1.exp() * kl_exact(p2, q2)).sum()
    assert chain.item() == pytest.approx(joint_kl.item(), rel=1e-12)


def test_double_softmin():
    v1 = torch.tensor([0.0, 1.0, -3.0, 1000.0], dtype=torch.float64)
    v2 = torch.tensor([0.0, 2.0, 5.0, 1001.0], dtype=torch.float64)
    a = 0.3
    want = [
        -a * math.log(0.5 * (math.exp(-x / a) + math.exp(-y / a)))
        for x, y in zip(v1.tolist()[:3], v2.tolist()[:3])
    ]
    got = double_softmin(v1, v2, alpha=a)
    assert got[:3].tolist() == pytest.approx(want, rel=1e-12)
    assert torch.isfinite(got).all()  # exp(-1000 / 0.3) would underflow in the naive form
    lo = torch.minimum(v1, v2)
    assert (got >= lo - 1e-12).all() and (got <= lo + a * math.log(2) + 1e-12).all()
    assert double_softmin(v1, v2, alpha=1e-4)[1].item() == pytest.approx(1.0, abs=1e-3)
    assert double_softmin(v1, v2, alpha=1e4)[1].item() == pytest.approx(1.5, abs=1e-3)
    with pytest.raises(ValueError, match="alpha"):
        double_softmin(v1, v2, alpha=0.0)


def test_bad_shapes_and_kind():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="kind"):
        kl_estimate(x, x, kind="k4")
    with pytest.raises(ValueError, match="logp_ref"):
        kl_estimate(x, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="mask"):
        kl_estimate(x, x, mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match="mask"):
        masked_mean(x, torch.ones(3))

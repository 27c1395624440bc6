"""divergence_penalty: value and gradient of each (kind, samples) by exact enumeration."""

from __future__ import annotations

import math

import pytest
import torch

from torchsteer.objectives import PENALTIES, divergence_penalty, rehearsal_prompts


def _kl(a, b):
    return (a.exp() * (a - b)).sum(-1)


def _divergence(kind, lp, lq):
    """Float64 definitions on full distributions (log-probabilities)."""
    if kind == "reverse_kl":
        return _kl(lp, lq)
    if kind == "forward_kl":
        return _kl(lq, lp)
    lm = torch.logaddexp(lp, lq) - math.log(2.0)
    return 0.5 * (_kl(lp, lm) + _kl(lq, lm))


def _setup(seed, v=7, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    theta = scale * torch.randn(v, generator=g, dtype=torch.float64)
    lq = torch.log_softmax(scale * torch.randn(v, generator=g, dtype=torch.float64), 0)
    return theta, lq


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("kind", "samples"), sorted(PENALTIES))
def test_expected_value_and_gradient_are_the_declared_divergence(kind, samples, seed):
    theta, lq = _setup(seed)
    t = theta.clone().requires_grad_(True)
    lp = torch.log_softmax(t, 0)
    pen = divergence_penalty(lp, lq, kind, samples=samples, reduction="none")
    w = (lp if samples == "policy" else lq).exp().detach()  # every outcome, weight = its prob
    expected = (w * pen).sum()
    (g,) = torch.autograd.grad(expected, t)
    sem = PENALTIES[(kind, samples)]
    t2 = theta.clone().requires_grad_(True)
    want = _divergence(sem.value, torch.log_softmax(t2, 0), lq)
    (g_want,) = torch.autograd.grad(want, t2)
    assert expected.item() == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(g, g_want, rtol=1e-11, atol=1e-14)
    assert (pen >= -1e-15).all()  # each per-token value is >= 0


def test_the_three_gradients_differ():
    theta, lq = _setup(5)
    grads = {}
    for kind in ("reverse_kl", "forward_kl", "js"):
        t = theta.clone().requires_grad_(True)
        lp = torch.log_softmax(t, 0)
        pen = divergence_penalty(lp, lq, kind, reduction="none")
        (grads[kind],) = torch.autograd.grad((lp.exp().detach() * pen).sum(), t)
    assert (grads["reverse_kl"] - grads["forward_kl"]).abs().max() > 1e-2
    assert (grads["js"] - grads["forward_kl"]).abs().max() > 1e-2


def test_js_is_bounded_and_zero_at_equality():
    theta, lq = _setup(1, scale=6.0)
    lp = torch.log_softmax(theta, 0)
    for samples, w in (("policy", lp.exp()), ("reference", lq.exp())):
        js = (w * divergence_penalty(lp, lq, "js", samples=samples, reduction="none")).sum()
        assert 0 < js.item() <= math.log(2)
        same = divergence_penalty(lq, lq, "js", samples=samples, reduction="none")
        assert same.abs().max().item() == 0.0


def test_float32_matches_float64_at_large_ratios():
    # |log u| up to 30: u l and (u + 1) softplus(l) are ~1e14 and nearly cancel in the
    # textbook JS form; the computed forms keep float32 within a few ulps of float64
    l64 = torch.tensor([-30.0, -10.0, -1.0, 1.0, 10.0, 30.0], dtype=torch.float64)
    lq64 = torch.full_like(l64, -1.0)
    for kind in ("js", "forward_kl", "reverse_kl"):
        for samples in ("policy", "reference"):
            want = divergence_penalty(l64 + lq64, lq64, kind, samples=samples, reduction="none")
            got = divergence_penalty(
                (l64 + lq64).float(), lq64.float(), kind, samples=samples, reduction="none"
            )
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_masked_tokens_contribute_nothing_even_nan():
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    logq = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    dirty_p, dirty_q = logp.clone(), logq.clone()
    dirty_p[0, 3], dirty_q[0, 4], dirty_p[2, 1] = math.nan, math.inf, -math.inf
    for kind in ("reverse_kl", "forward_kl", "js"):
        for samples in ("policy", "reference"):
            for reduction in ("mean", "sequence", "none"):
                a = dirty_p.clone().requires_grad_(True)
                opts = {"samples": samples, "reduction": reduction}
                got = divergence_penalty(a, dirty_q, kind, mask, **opts)
                b = logp.clone().requires_grad_(True)
                ref = divergence_penalty(b, logq, kind, mask, **opts)
                torch.testing.assert_close(got, ref, rtol=0, atol=0)
                (ga,) = torch.autograd.grad(got.sum(), a)
                (gb,) = torch.autograd.grad(ref.sum(), b)
                assert torch.equal(ga, gb) and (ga[~mask] == 0).all()
    # mean over counted tokens, sequence = per-sequence sum averaged over sequences
    per_tok = divergence_penalty(logp, logq, "forward_kl", reduction="none")
    kept = per_tok[mask]
    mean = divergence_penalty(logp, logq, "forward_kl", mask)
    assert mean.item() == pytest.approx(kept.mean().item(), rel=1e-14)
    seq = divergence_penalty(logp, logq, "forward_kl", mask, reduction="sequence")
    assert seq.item() == pytest.approx((per_tok * mask).sum(1).mean().item(), rel=1e-14)


def test_bad_input_raises():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="kind"):
        divergence_penalty(x, x, "tv")
    with pytest.raises(ValueError, match="samples"):
        divergence_penalty(x, x, "js", samples="teacher")
    with pytest.raises(ValueError, match="reduction"):
        divergence_penalty(x, x, "js", reduction="sum")
    with pytest.raises(ValueError, match="ref_logp shape"):
        divergence_penalty(x, torch.zeros(3, 2), "js")
    with pytest.raises(ValueError, match="mask shape"):
        divergence_penalty(x, x, "js", torch.ones(2, 2))
    with pytest.raises(ValueError, match="logp"):
        divergence_penalty(torch.zeros(2, 3, dtype=torch.long), x, "js")


def test_rehearsal_prompts_is_dph_rl_split():
    got = rehearsal_prompts(torch.tensor([8, 7, 0, 8]), 8)
    assert got.tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="n_correct"):
        rehearsal_prompts(torch.tensor([9]), 8)

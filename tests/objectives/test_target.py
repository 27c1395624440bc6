"""The KL-regularized optimum pi_ref exp(r / beta) / Z, reached by exact policy gradient."""

from __future__ import annotations

import math

import pytest
import torch

from torchsteer.control.kl import kl_estimate
from torchsteer.objectives import divergence_penalty, kl_regularized_target, kl_regularized_value


def _toy(seed, v=6, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.log_softmax(scale * torch.randn(v, generator=g, dtype=torch.float64), 0)
    r = scale * torch.randn(v, generator=g, dtype=torch.float64)
    return ref, r


def _objective(lp, ref, r, beta):
    p = lp.exp()
    return (p * r).sum() - beta * (p * (lp - ref)).sum()


def test_target_in_closed_form_and_its_value():
    ref, r = _toy(0)
    beta = 0.3
    pairs = list(zip(ref.tolist(), r.tolist()))
    z = sum(math.exp(c + d / beta) for c, d in pairs)
    want = [math.exp(a + b / beta) / z for a, b in pairs]
    got = kl_regularized_target(ref, r, beta)
    assert got.exp().tolist() == pytest.approx(want, rel=1e-12)
    # the value beta log Z is the objective at pi*, and pi* beats any perturbation of it
    v = kl_regularized_value(ref, r, beta)
    assert v.item() == pytest.approx(_objective(got, ref, r, beta).item(), rel=1e-12)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        other = torch.log_softmax(got + 0.3 * torch.randn(6, generator=g, dtype=torch.float64), 0)
        assert _objective(other, ref, r, beta) < v


def test_zero_reference_mass_stays_zero_and_batched_rows():
    ref = torch.log(torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64))
    r = torch.tensor([[1.0, 0.0, 100.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    got = kl_regularized_target(ref, r, 0.5).exp()
    assert got[0, 2].item() == 0.0
    assert got[0, :2].tolist() == pytest.approx([1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))])
    row = kl_regularized_target(ref[1], r[1], 0.5)
    torch.testing.assert_close(got[1].log(), row, rtol=1e-14, atol=0)


def _exact_policy_gradient_ascent(ref, r, beta, penalty, steps=2000, lr=2.0):
    """Gradient ascent on softmax logits with the expected loss gradient over all outcomes."""
    theta = ref.clone()
    for _ in range(steps):
        theta.requires_grad_(True)
        lp = torch.log_softmax(theta, 0)
        w = lp.exp().detach()  # x ~ pi, each outcome once with weight pi(x)
        if penalty == "reward":  # REINFORCE with the KL folded into the reward (k1 in r)
            adv = (r - beta * (lp - ref)).detach()
            loss = -(w * adv * lp).sum()
        else:  # the reward's policy gradient plus a per-token penalty used as a loss
            if penalty in ("k2", "k3"):
                pen = kl_estimate(lp, ref, kind=penalty, reduction="none")
            else:
                pen = divergence_penalty(lp, ref, penalty, reduction="none")
            loss = -(w * r * lp).sum() + beta * (w * pen).sum()
        (g,) = torch.autograd.grad(loss, theta)
        theta = (theta - lr * g).detach()
    return torch.log_softmax(theta, 0)


@pytest.mark.parametrize("penalty", ["reward", "k2", "reverse_kl"])
@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_policy_gradient_with_penalty_beta_converges_to_the_target(penalty, beta):
    ref, r = _toy(2, scale=0.5)
    got = _exact_policy_gradient_ascent(ref, r, beta, penalty)
    want = kl_regularized_target(ref, r, beta)
    torch.testing.assert_close(got.exp(), want.exp(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("penalty", ["k3", "forward_kl"])
def test_k3_in_the_loss_converges_to_the_forward_kl_optimum_instead(penalty):
    # the fixed point solves pi (r - E_pi r) + beta (pi_ref - pi) = 0, the stationarity of
    # E_pi[r] - beta KL(pi_ref || pi); it is not pi_ref exp(r / beta) / Z
    ref, r = _toy(2, scale=0.5)
    beta = 0.3
    lp = _exact_policy_gradient_ascent(ref, r, beta, penalty)
    p, q = lp.exp(), ref.exp()
    residual = p * (r - (p * r).sum()) + beta * (q - p)
    assert residual.abs().max().item() < 1e-10
    assert (p - kl_regularized_target(ref, r, beta).exp()).abs().max().item() > 2e-2


def test_bad_input_raises():
    ref, r = _toy(0)
    for kwargs, word in (
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"beta": math.inf}, "beta"),
        ({"rewards": torch.ones(4)}, "rewards shape"),
        ({"rewards": torch.full((6,), math.nan)}, "rewards"),
        ({"ref_logprobs": torch.full((6,), -math.inf)}, "ref_logprobs"),
        ({"ref_logprobs": torch.arange(6)}, "ref_logprobs"),
    ):
        args = {"ref_logprobs": ref, "rewards": r, "beta": 0.5, **kwargs}
        with pytest.raises(ValueError, match=word):
            kl_regularized_target(**args)

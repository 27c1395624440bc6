"""The declared gradient of each KL estimator, checked by exact enumeration (issue 21).

Used as a loss with the sampled tokens held fixed, E_{x ~ pi}[grad k(x)] is computed exactly by
summing over the whole support with the (detached) weights pi(x); the oracle is autograd on
the closed-form float64 KL in the direction that :data:`ESTIMATORS` declares.
"""

from __future__ import annotations

import pytest
import torch

from torchsteer.control.kl import kl_estimate
from torchsteer.control.kl.estimators import ESTIMATORS


def _kl(lp, lq):
    return (lp.exp() * (lp - lq)).sum(-1)


def _oracle_grad(direction, theta, lq):
    theta = theta.detach().clone().requires_grad_(True)
    lp = torch.log_softmax(theta, -1)
    if direction == "zero":
        return torch.zeros_like(theta)
    d = _kl(lp, lq) if direction == "reverse_kl" else _kl(lq, lp)
    (g,) = torch.autograd.grad(d.sum(), theta)
    return g


def _expected_loss_grad(kind, theta, lq):
    """sum_x pi(x) grad_theta k(x): the expected gradient of k used as a loss, x ~ pi."""
    theta = theta.detach().clone().requires_grad_(True)
    lp = torch.log_softmax(theta, -1)
    k = kl_estimate(lp, lq.expand_as(lp), kind=kind, reduction="none")
    (g,) = torch.autograd.grad((lp.exp().detach() * k).sum(), theta)
    return g


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_expected_loss_gradient_is_the_declared_divergence(kind, seed):
    g = torch.Generator().manual_seed(seed)
    theta = 1.5 * torch.randn(6, generator=g, dtype=torch.float64)
    lq = torch.log_softmax(1.5 * torch.randn(6, generator=g, dtype=torch.float64), 0)
    got = _expected_loss_grad(kind, theta, lq)
    want = _oracle_grad(ESTIMATORS[kind].gradient, theta, lq)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # and it is not the other direction: the two KL gradients differ here
    other = {"reverse_kl": "forward_kl", "forward_kl": "reverse_kl", "zero": "reverse_kl"}
    wrong = _oracle_grad(other[ESTIMATORS[kind].gradient], theta, lq)
    assert (got - wrong).abs().max() > 1e-3


def test_declared_values_by_enumeration():
    g = torch.Generator().manual_seed(7)
    lp = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    lq = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    values = {
        "reverse_kl": _kl(lp, lq),
        "half_squared_log_ratio": (lp.exp() * 0.5 * (lp - lq) ** 2).sum(),
    }
    for kind, sem in ESTIMATORS.items():
        est = (lp.exp() * kl_estimate(lp, lq, kind=kind, reduction="none")).sum()
        assert est.item() == pytest.approx(values[sem.value].item(), rel=1e-12)


def test_sequence_sum_of_k2_is_the_per_position_reverse_kl_gradient():
    # two-token autoregressive policy pi(x1) pi(x2 | x1): summed per-token k2 as a loss has the
    # expected gradient sum_t E_{prefix ~ pi}[grad KL(pi_t || ref_t)] (the prefix weights held
    # fixed), and summed k3 the same with the forward KL per position
    v = 3
    g = torch.Generator().manual_seed(11)
    t1 = torch.randn(v, generator=g, dtype=torch.float64)
    t2 = torch.randn(v, v, generator=g, dtype=torch.float64)
    q1 = torch.log_softmax(torch.randn(v, generator=g, dtype=torch.float64), 0)
    q2 = torch.log_softmax(torch.randn(v, v, generator=g, dtype=torch.float64), 1)
    x1, x2 = (a.flatten() for a in torch.meshgrid(torch.arange(v), torch.arange(v), indexing="ij"))
    for kind, flip in (("k2", False), ("k3", True)):
        a1, a2 = t1.clone().requires_grad_(True), t2.clone().requires_grad_(True)
        p1, p2 = torch.log_softmax(a1, 0), torch.log_softmax(a2, 1)
        logp = torch.stack([p1[x1], p2[x1, x2]], 1)
        logq = torch.stack([q1[x1], q2[x1, x2]], 1)
        w = logp.sum(1).exp().detach()
        per_seq = kl_estimate(logp, logq, kind=kind, reduction="none").sum(1)
        got = torch.autograd.grad((w * per_seq).sum(), (a1, a2))
        b1, b2 = t1.clone().requires_grad_(True), t2.clone().requires_grad_(True)
        r1, r2 = torch.log_softmax(b1, 0), torch.log_softmax(b2, 1)
        d1 = _kl(q1, r1) if flip else _kl(r1, q1)
        d2 = _kl(q2, r2) if flip else _kl(r2, q2)
        oracle = d1 + (r1.exp().detach() * d2).sum()
        want = torch.autograd.grad(oracle, (b1, b2))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_docstring_examples_put_an_estimator_with_the_reverse_kl_gradient_in_the_loss():
    # the examples in control/kl/*.py and callbacks/kl_control.py: a kl_estimate on the
    # differentiable logp (a loss term) must be k2, the one whose gradient is the reverse KL;
    # calls on logp.detach() are values (k1 / k3 are the unbiased ones)
    import re
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src" / "torchsteer"
    files = [*sorted((src / "control" / "kl").glob("*.py")), src / "callbacks" / "kl_control.py"]
    calls = []
    for path in files:
        for call in re.findall(r"kl_estimate\((.*)$", path.read_text(), re.M):
            if call.strip():  # not the definition's "def kl_estimate("
                calls.append((path.name, call))
    in_loss = [(n, c) for n, c in calls if not c.split(",")[0].strip().endswith(".detach()")]
    assert in_loss, calls
    for name, call in in_loss:
        kind = re.search(r'kind="(k\d)"', call)
        assert kind is not None and ESTIMATORS[kind.group(1)].gradient == "reverse_kl", (name, call)

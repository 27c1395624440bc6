"""sinkhorn_divergence(overrelax=omega): the safe over-relaxation rule and its solves.

Oracles: the dense float64 log-domain Sinkhorn of test_sinkhorn (primal value from its plan);
central finite differences in float64; the sufficient-decrease inequality D(w) <= theta D(1)
evaluated directly from its definition with numpy (e^x - 1 - x in extended precision).
"""

import numpy as np
import pytest
import torch

from torchsteer.divergence import sinkhorn_divergence
from torchsteer.divergence._sinkhorn_relax import THETA, safe_omega
from torchsteer.divergence.sinkhorn import grid_cost

from .test_sinkhorn import _primal, _reference_plan

D = torch.float64


def _decrease(weights, ell, w):
    """D(w) = sum_i a_i [phi((1 - w) l_i) - phi(l_i)], phi(x) = e^x - 1 - x (longdouble)."""
    a, l_ = np.asarray(weights, np.longdouble), np.asarray(ell, np.longdouble)

    def phi(x):
        return np.expm1(x) - x

    return (a * (phi((1 - w) * l_) - phi(l_))).sum(-1)


@pytest.mark.parametrize("scale", [1e-7, 1e-3, 0.05, 0.5, 3.0])
@pytest.mark.parametrize("omega", [0.3, 1.5, 1.8, 1.95, 1.99])
def test_the_factor_keeps_a_fraction_theta_of_the_exact_decrease(scale, omega):
    g = torch.Generator().manual_seed(int(scale * 1e7) % 1000 + int(omega * 100))
    weights = torch.softmax(torch.randn(50, 40, generator=g, dtype=D), -1)
    ell = scale * torch.randn(50, 40, generator=g, dtype=D)
    w = safe_omega(weights, ell, omega)
    assert w.shape == (50, 1)
    got = _decrease(weights.numpy(), ell.numpy(), w.numpy())
    exact = _decrease(weights.numpy(), ell.numpy(), np.ones((50, 1)))
    assert np.all(got <= THETA * exact + 1e-30)
    # the factor is the target or on the way from it to 1
    vals = w.squeeze(1).numpy()
    assert np.all((vals - 1) * (omega - 1) >= 0) and np.all(np.abs(vals - 1) <= abs(omega - 1))
    if scale <= 1e-3 and omega * (2 - omega) > THETA:  # 1.95 is just outside
        assert np.all(vals == omega)  # near the optimum the target is taken


def test_a_step_that_would_increase_the_objective_is_refused():
    # large log ratios: omega = 1.9 overshoots, D(1.9) > 0 for the pair; the rule backs off
    weights = torch.full((1, 4), 0.25, dtype=D)
    ell = torch.tensor([[-3.0, -3.5, -2.5, -3.0]], dtype=D)  # row sums far too small
    assert _decrease(weights.numpy(), ell.numpy(), np.array([[1.9]]))[0] > 0
    w = float(safe_omega(weights, ell, 1.9))
    assert w < 1.9
    assert (
        _decrease(weights.numpy(), ell.numpy(), np.array([[w]]))[0]
        <= THETA * _decrease(weights.numpy(), ell.numpy(), np.array([[1.0]]))[0]
    )


@pytest.mark.parametrize("omega", [0.7, 1.5, 1.8, 1.95])
@pytest.mark.parametrize("domain", ["scaling", "log"])
def test_value_matches_the_dense_reference(omega, domain):
    g = torch.Generator().manual_seed(5)
    n, eps = 30, 1e-2
    zp, zq = torch.randn(3, n, generator=g, dtype=D), torch.randn(3, n, generator=g, dtype=D)
    C = grid_cost(n)
    got, rep = sinkhorn_divergence(
        zp,
        zq,
        C,
        epsilon=eps,
        tol=1e-10,
        n_iters=20000,
        overrelax=omega,
        domain=domain,
        reduction="none",
        return_report=True,
    )
    assert rep.converged
    a, b = torch.softmax(zp, -1), torch.softmax(zq, -1)
    want = []
    for k in range(3):
        ot = {}
        for name, (x, y) in {"ab": (a[k], b[k]), "aa": (a[k], a[k]), "bb": (b[k], b[k])}.items():
            ot[name] = _primal(_reference_plan(x, y, C, eps), x, y, C, eps)
        want.append(ot["ab"] - 0.5 * ot["aa"] - 0.5 * ot["bb"])
    np.testing.assert_allclose(got.numpy(), np.array(want), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("omega", [1.5, 1.8])
def test_small_epsilon_value_and_gradient_against_finite_differences(omega):
    g = torch.Generator().manual_seed(6)
    z = torch.randn(4, 200, generator=g, dtype=D, requires_grad=True)
    w = torch.randn(4, 200, generator=g, dtype=D)
    eps = 1e-3
    v, rep = sinkhorn_divergence(
        z, w, epsilon=eps, reduction="sum", overrelax=omega, return_report=True
    )
    assert rep.converged
    (grad,) = torch.autograd.grad(v, z)
    kw = dict(epsilon=eps, reduction="sum", tol=1e-12, n_iters=100000)
    ref = sinkhorn_divergence(z.detach(), w, **kw).item()
    assert abs(v.item() - ref) <= 1e-4 * abs(ref)
    d = torch.randn(z.shape, generator=g, dtype=D)
    h = 1e-5
    fd = (
        sinkhorn_divergence(z.detach() + h * d, w, **kw)
        - sinkhorn_divergence(z.detach() - h * d, w, **kw)
    ).item() / (2 * h)
    assert abs(float((grad * d).sum()) - fd) <= 1e-3 * abs(fd)


def test_fewer_iterations_than_plain_sinkhorn_at_small_epsilon():
    g = torch.Generator().manual_seed(7)
    z, w = torch.randn(4, 200, generator=g, dtype=D), torch.randn(4, 200, generator=g, dtype=D)
    its = {}
    for om in (1.0, 1.8):
        _, rep = sinkhorn_divergence(z, w, epsilon=1e-3, overrelax=om, return_report=True)
        assert rep.converged
        its[om] = rep.iterations
    assert its[1.8] < 0.5 * its[1.0]


@pytest.mark.parametrize("bad", [0, 0.0, 2, 2.0, -1.0, float("nan"), True, "fast", None])
def test_bad_overrelax_raises(bad):
    z = torch.randn(2, 10, dtype=D)
    with pytest.raises(ValueError, match="Invalid overrelax"):
        sinkhorn_divergence(z, z.flip(0), overrelax=bad)

"""RegularizedNewton does not depend on the scale of the loss (issue 18 #14).

With ``f`` scaled by ``s``, the gradient, the Hessian and Gauss-Newton scale by ``s`` and
``lambda = |g| / gamma`` too, so the step ``-(H + lambda I)^{-1} g`` and the accept test
``f(x) - f(x + delta) >= |grad f(x + delta)|^2 / (8 lambda)`` are invariant. The oracle is
the float64 run of the same search at ``s = 1``: in float32 at ``s = 1e-20, 1, 1e20`` the
same tries are taken and accepted, and the iterates agree to float32 rounding. (Before the
fix, float32 at ``1e+-20`` rejected every try: ``|g|`` overflowed to inf at ``1e20`` and
CG's inner products under- and overflowed.) The empirical Fisher is not in the list: it is
quadratic in the loss scale (``F(s f) = s^2 F(f)``), so its steps depend on ``s`` by
construction.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from torchsteer.optim.regularized_newton import RegularizedNewton

SCALES = [1e-20, 1.0, 1e20]
MODES = [
    dict(curvature="hessian", solver="cg", cg_tol=1e-4),
    dict(curvature="hessian", solver="lanczos", cg_tol=1e-4),
    dict(curvature="dense"),
    dict(curvature="gauss_newton", solver="cg", cg_tol=1e-4),
    dict(curvature="gauss_newton", solver="cholesky"),
]


def logistic(dtype, seed=0, n=64, d=6):
    """Regularized logistic regression data and a start far from the optimum."""
    g = torch.Generator().manual_seed(seed)
    X = 3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.5, 1.0, -1.0)
    w0 = 2 * torch.randn(d, generator=g, dtype=torch.float64)
    return X.to(dtype), y.to(dtype), w0.to(dtype)


def run(kw, dtype, s, steps=5, gamma0=64.0):
    """``steps`` steps on ``s * f`` (above float32's floor); records and iterates."""
    X, y, w0 = logistic(dtype)
    w = w0.clone().requires_grad_()

    def closure():
        z = X @ w
        f = s * (F.softplus(-y * z).mean() + 0.05 * w.dot(w))
        return (f, z) if kw["curvature"] == "gauss_newton" else f

    opt = RegularizedNewton([w], gamma0=gamma0, **kw)
    recs, xs = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(steps):
            opt.step(closure)
            recs.append(opt.state[w]["record"])
            xs.append(w.detach().double().clone())
    return recs, xs


@pytest.mark.parametrize("kw", MODES, ids=lambda kw: f"{kw['curvature']}-{kw.get('solver')}")
@pytest.mark.parametrize("s", SCALES)
def test_float32_at_any_loss_scale_takes_the_float64_steps(kw, s):
    ref_recs, ref_xs = run(kw, torch.float64, 1.0)
    assert any(r["tries"] > 1 for r in ref_recs)  # the search rejects some tries
    recs, xs = run(kw, torch.float32, s)
    for r, q, x, xq in zip(ref_recs, recs, ref_xs, xs):
        keys = ("tries", "accepted", "reasons", "gamma")  # gamma = 64 * 2^k: exact
        assert [q[k] for k in keys] == [r[k] for k in keys]
        torch.testing.assert_close(xq, x, rtol=2e-4, atol=2e-5)
        assert q["loss"] / s == pytest.approx(r["loss"], rel=1e-5)


@pytest.mark.parametrize("kw", MODES[:3], ids=["cg", "lanczos", "dense"])
def test_float64_steps_do_not_depend_on_the_scale(kw):
    ref_recs, ref_xs = run(kw, torch.float64, 1.0)
    for s in (1e-200, 1e-20, 1e20, 1e200):
        recs, xs = run(kw, torch.float64, s)
        assert [r["tries"] for r in recs] == [r["tries"] for r in ref_recs]
        for x, xs_ in zip(ref_xs, xs):
            torch.testing.assert_close(xs_, x, rtol=1e-12, atol=1e-14)


def test_power_of_two_scales_give_the_same_bits():
    """The normalization is exact: ``s = 2^60`` gives the ``s = 1`` iterates bit for bit."""
    for kw in MODES:
        _, ref_xs = run(kw, torch.float64, 1.0)
        _, xs = run(kw, torch.float64, 2.0**60)
        assert all(torch.equal(a, b) for a, b in zip(ref_xs, xs))

"""Shifted solves ``(H + lambda I) x = b`` against dense float64 solves and CG's closed forms."""

import math

import pytest
import torch

from torchsteer.linalg.shifted_solvers import shifted_cg, shifted_cholesky_solve

DT = torch.float64


def spd(eigs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=gen, dtype=DT))
    b = torch.randn(len(eigs), generator=gen, dtype=DT)
    return Q @ torch.diag(torch.tensor(eigs, dtype=DT)) @ Q.T, b


class Counting:
    def __init__(self, H):
        self.H, self.calls = H, 0

    def __call__(self, v):
        self.calls += 1
        return self.H @ v


def dense(H, b, lam):
    return torch.linalg.solve(H + lam * torch.eye(len(b), dtype=DT), b)


@pytest.mark.parametrize("lam", [0.0, 0.3, 4.0])
def test_cg_and_cholesky_match_dense_solve(lam):
    H, b = spd((0.5, 1.0, 2.0, 3.0, 7.0, 11.0))
    out = shifted_cg(Counting(H), b, lam, tol=1e-13)
    assert out.converged and not out.breakdown
    torch.testing.assert_close(out.x, dense(H, b, lam), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.Hx, H @ out.x, rtol=1e-10, atol=1e-12)
    x, reason = shifted_cholesky_solve(H, b, lam)
    assert reason == ""
    torch.testing.assert_close(x, dense(H, b, lam), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("check_every", "stop"), [(1, 6), (2, 6), (3, 6), (4, 8), (5, 10)])
def test_check_every_sets_the_products_not_the_iterates(check_every, stop):
    """Six distinct eigenvalues: CG meets tol 1e-10 at iteration 6 exactly (not before:
    the residual after k < 6 steps is a degree-k polynomial in H, far from zero on six
    points). The test runs on the device at every iteration and masks every later update;
    the host reads it only at multiples of c = ``check_every``, so ``ceil(6 / c) c``
    products run and the result is that of c = 1 bit for bit (issue 17)."""
    H, b = spd((1.0, 2.0, 3.0, 4.0, 5.0, 6.0))
    mv = Counting(H)
    out = shifted_cg(mv, b, 0.0, tol=1e-10, check_every=check_every)
    ref = shifted_cg(Counting(H), b, 0.0, tol=1e-10, check_every=1)
    assert stop == math.ceil(6 / check_every) * check_every
    assert out.iterations == 6 and mv.calls == stop and out.converged
    assert torch.equal(out.x, ref.x) and torch.equal(out.Hx, ref.Hx)
    assert torch.equal(out.residual_norm, ref.residual_norm)


def test_cg_stops_at_maxiter_even_between_checks():
    H, b = spd((1.0, 2.0, 3.0, 4.0, 5.0, 6.0))
    mv = Counting(H)
    out = shifted_cg(mv, b, 0.0, tol=1e-10, maxiter=3, check_every=2)
    assert out.iterations == 3 and mv.calls == 3 and not out.converged


def test_warm_start_with_known_product_costs_none():
    H, b = spd((0.5, 1.0, 2.0, 3.0, 7.0))
    first = shifted_cg(Counting(H), b, 0.5, tol=1e-13)
    mv = Counting(H)
    second = shifted_cg(mv, b, 2.0, tol=1e-13, x0=first.x, Hx0=first.Hx)
    assert mv.calls == second.iterations
    torch.testing.assert_close(second.x, dense(H, b, 2.0), rtol=1e-10, atol=1e-12)
    mv = Counting(H)
    third = shifted_cg(mv, b, 2.0, tol=1e-13, x0=first.x)  # H x0 unknown: one product
    assert mv.calls == third.iterations + 1


def test_indefinite_breaks_down_and_cholesky_refuses():
    H, b = spd((-2.0, 1.0, 3.0))
    out = shifted_cg(Counting(H), b, 0.5, tol=1e-12)
    assert out.breakdown and not out.converged
    assert shifted_cholesky_solve(H, b, 0.5) == (None, "cholesky")
    assert shifted_cholesky_solve(H, b, 3.0)[1] == ""  # the shift makes it definite


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"tol": -1.0}, "tol"), ({"check_every": 0}, "check_every"), ({"Hx0": torch.ones(3)}, "Hx0")],
)
def test_invalid_arguments(kwargs, match):
    H, b = spd((1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match=match):
        shifted_cg(Counting(H), b, **kwargs)


def test_columns_are_independent_shifted_systems_with_the_same_iterates():
    """A (P, k) right-hand side solves k shifted systems at once: each column's iterates are
    the iterates of that column solved alone (same step sizes), bit for bit up to the
    reduction order of the dot products."""
    H, b = spd((0.5, 1.0, 2.0, 3.0, 7.0, 11.0))
    B = torch.stack([b, 2.0 * b.flip(0), torch.zeros_like(b)], dim=1)
    out = shifted_cg(lambda V: H @ V, B, 0.7, tol=1e-13)
    assert out.converged and out.residual_norm.shape == (3,)
    torch.testing.assert_close(out.x, dense(H, B, 0.7), rtol=1e-10, atol=1e-12)
    assert torch.equal(out.x[:, 2], torch.zeros_like(b))  # a zero column stays zero
    for j in range(2):
        alone = shifted_cg(lambda v: H @ v, B[:, j], 0.7, tol=1e-13, maxiter=out.iterations)
        torch.testing.assert_close(out.x[:, j], alone.x, rtol=1e-12, atol=1e-13)

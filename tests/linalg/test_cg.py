"""Conjugate gradient against torch.linalg.solve on SPD systems."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchsteer.linalg import conjugate_gradient


def spd(n, cond, seed):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    return (
        Q
        @ torch.diag(
            torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
        )
        @ Q.T
    )


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 40), cond=st.floats(1.0, 1e4), seed=st.integers(0, 1000))
def test_cg_matches_solve(n, cond, seed):
    A = spd(n, cond, seed)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    res = conjugate_gradient(lambda x: A @ x, b, tol=1e-12, maxiter=10 * n)
    assert res.converged and not res.breakdown
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-7, atol=1e-9)


def test_batched_columns_are_independent_systems():
    A = spd(10, 100.0, 0)
    B = torch.randn(10, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    B[:, 2] = 0.0  # a zero right-hand side converges at once and stays zero
    res = conjugate_gradient(lambda X: A @ X, B, tol=1e-12)
    torch.testing.assert_close(res.x, torch.linalg.solve(A, B), rtol=1e-8, atol=1e-10)


def test_warm_start_and_check_every():
    A = spd(12, 50.0, 3)
    b = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x = torch.linalg.solve(A, b)
    res = conjugate_gradient(lambda v: A @ v, b, tol=1e-10, x0=x)
    assert res.iterations == 0
    res = conjugate_gradient(lambda v: A @ v, b, tol=1e-12, check_every=5)
    torch.testing.assert_close(res.x, x, rtol=1e-8, atol=1e-10)


def test_indefinite_operator_reports_breakdown():
    A = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    res = conjugate_gradient(lambda v: A @ v, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert res.breakdown and not res.converged


def test_nan_product_is_a_breakdown_not_maxiter_iterations():
    calls = []

    def matvec(v):
        calls.append(1)
        return torch.full_like(v, float("nan"))

    b = torch.ones(50, dtype=torch.float64)
    res = conjugate_gradient(matvec, b)
    assert res.breakdown and not res.converged
    assert res.iterations == 0 and len(calls) == 1
    assert torch.equal(res.x, torch.zeros_like(b))  # the iterate before the bad product


def test_nonfinite_and_bad_arguments_raise():
    with pytest.raises(ValueError, match="Invalid b"):
        conjugate_gradient(lambda v: v, torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="Invalid tol"):
        conjugate_gradient(lambda v: v, torch.ones(2), tol=-1.0)

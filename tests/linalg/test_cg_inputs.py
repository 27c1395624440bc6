"""Bad input to :func:`torchsteer.linalg.conjugate_gradient` (issue 18, the attack rerun): a
``ValueError`` naming the argument, and valid calls unchanged. Oracle for the latter: the
dense float64 solve ``torch.linalg.solve`` and, bitwise, the library's one CG
(:func:`~torchsteer.linalg.shifted_solvers.shifted_cg` at ``lambda = 0``) that it wraps.
"""

from __future__ import annotations

import pytest
import torch

from torchsteer.linalg import conjugate_gradient
from torchsteer.linalg.shifted_solvers import shifted_cg


def _system(n=6):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    return A @ A.T + torch.eye(n, dtype=torch.float64), torch.randn(
        n, generator=g, dtype=torch.float64
    )


def test_b_of_the_wrong_orientation_is_named():
    H, b = _system()
    with pytest.raises(ValueError, match=r"Invalid b or matvec.*\(2, 6\)"):
        conjugate_gradient(lambda v: H @ v, b[:, None].repeat(1, 2).T)


def test_b_of_three_dims_is_named():
    H, b = _system()
    with pytest.raises(ValueError, match=r"Invalid b: shape \(6, 1, 1\)"):
        conjugate_gradient(lambda v: H @ v, b[:, None, None])


def test_matvec_of_wrong_size_is_named():
    _, b = _system()
    with pytest.raises(ValueError, match=r"Invalid matvec: it returned shape \(3,\)"):
        conjugate_gradient(lambda v: v[:3], b)


def test_x0_of_wrong_size_is_named():
    H, b = _system()
    with pytest.raises(ValueError, match=r"Invalid x0: shape \(3,\)"):
        conjugate_gradient(lambda v: H @ v, b, x0=b[:3])


@pytest.mark.parametrize("maxiter", [0, -1, True, 2.5])
def test_maxiter_below_one_is_named(maxiter):
    H, b = _system()
    with pytest.raises(ValueError, match="Invalid maxiter"):
        conjugate_gradient(lambda v: H @ v, b, maxiter=maxiter)


@pytest.mark.parametrize("k", [None, 3])
def test_valid_calls_are_the_shifted_cg_bit_for_bit(k):
    H, b = _system()
    if k is not None:
        b = torch.stack([b, 2 * b, -b], dim=1)
    x0 = torch.zeros_like(b)
    res = conjugate_gradient(lambda v: H @ v, b, tol=1e-12, x0=x0)
    ref = shifted_cg(lambda v: H @ v, b, 0.0, 1e-12, None, x0, None, 1, 0.0)
    assert torch.equal(res.x, ref.x) and res.iterations == ref.iterations
    torch.testing.assert_close(res.x, torch.linalg.solve(H, b), rtol=1e-9, atol=1e-10)

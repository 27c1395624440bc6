"""``truncated_solve`` refuses singular values that are not (negative, NaN, Inf) and
triplets whose shapes do not fit, with a named ValueError (the attack rerun's "negative S
... accepted silently"); the unchecked kernel that Sven calls reads nothing on the host.

Oracle: the float64 least-squares solution of the dense system and ``truncated_solve``'s
own formula ``V diag(1/S) U^T R`` on the kept triplets.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests._sync import SyncCounter
from torchsteer.linalg import gram_solve, truncated_solve
from torchsteer.linalg.truncated import gram_solve_unchecked, truncated_solve_unchecked
from torchsteer.optim._sven_step import SolveConfig, solve_operator

F64 = torch.float64


def _triplets():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(8, 6, generator=g, dtype=F64)
    R = torch.randn(8, generator=g, dtype=F64)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return M, U, S, Vh.mT.contiguous(), R


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("negative", r"Invalid S: .*negative.*singular values"),
        ("nan", r"Invalid S: contains NaN or Inf.*singular values"),
        ("inf", r"Invalid S: contains NaN or Inf.*singular values"),
        ("one negative", r"Invalid S: .*negative.*singular values"),
    ],
)
def test_singular_values_that_are_not_raise_a_named_error(bad, match):
    _, U, S, V, R = _triplets()
    S = {
        "negative": -S,
        "nan": torch.where(torch.arange(6) == 2, math.nan, S),
        "inf": torch.where(torch.arange(6) == 0, math.inf, S),
        "one negative": torch.where(torch.arange(6) == 5, -1e-3, S),
    }[bad]
    with pytest.raises(ValueError, match=match):
        truncated_solve(U, S, V, R)


@pytest.mark.parametrize(
    ("which", "match"),
    [
        ("U 1-d", r"Invalid U: shape \(8,\)"),
        ("V 1-d", r"Invalid V: shape \(6,\)"),
        ("S 2-d", r"Invalid S: shape \(6, 1\)"),
        ("S short", r"Invalid S: shape \(5,\)"),
        ("V columns", r"Invalid V: shape \(6, 5\)"),
        ("R long", r"Invalid R: shape \(9,\)"),
        ("R 2-d", r"Invalid R: shape \(8, 1\)"),
    ],
)
def test_triplets_of_the_wrong_shapes_raise_a_named_error(which, match):
    _, U, S, V, R = _triplets()
    args = {
        "U 1-d": (U[:, 0], S, V, R),
        "V 1-d": (U, S, V[:, 0], R),
        "S 2-d": (U, S[:, None], V, R),
        "S short": (U, S[:5], V, R),
        "V columns": (U, S, V[:, :5], R),
        "R long": (U, S, V, torch.cat([R, R[:1]])),
        "R 2-d": (U, S, V, R[:, None]),
    }[which]
    with pytest.raises(ValueError, match=match):
        truncated_solve(*args)


def test_valid_triplets_give_the_least_squares_step_with_one_host_read():
    M, U, S, V, R = _triplets()
    with SyncCounter() as c:
        sol = truncated_solve(U, S, V, R)
    assert c.total == 1  # the value check of S, one transfer
    torch.testing.assert_close(sol.direction, torch.linalg.lstsq(M, R).solution)
    zero = truncated_solve(U, torch.zeros_like(S), V, R)  # S = 0 is allowed: nothing kept
    assert torch.equal(zero.direction, torch.zeros(6, dtype=F64)) and zero.kept_rank == 0


@pytest.mark.parametrize("kw", [{}, {"rtol": 0.3}, {"damping": 0.1}, {"rank": 3}])
def test_the_unchecked_kernel_gives_the_same_bits_and_reads_nothing(kw):
    _, U, S, V, R = _triplets()
    want = truncated_solve(U, S, V, R, **kw)
    with SyncCounter() as c:
        got = truncated_solve_unchecked(U, S, V, R, **kw)
    assert c.total == 0
    for key in ("direction", "kept_rank", "sigma_max", "sigma_min", "linearized_reduction"):
        assert torch.equal(getattr(got, key), getattr(want, key)), key


def test_sven_s_matrix_free_solve_uses_the_kernel_and_reads_nothing():
    M, _, _, _, R = _triplets()

    class Dense:  # M as products
        shape, dtype, device = M.shape, M.dtype, M.device

        def matmat(self, X):
            return M @ X

        def rmatmat(self, Y):
            return M.mT @ Y

    with SyncCounter() as c:
        sol = solve_operator(Dense(), R, SolveConfig(rank=6, rtol=0.0), torch.Generator())
    assert c.total == 0
    torch.testing.assert_close(sol.direction, torch.linalg.lstsq(M, R).solution)


@pytest.mark.parametrize("shape", [(8, 6), (5, 9)])
@pytest.mark.parametrize("kw", [{}, {"damping": 0.1}, {"gram_dtype": torch.float32}])
def test_the_unchecked_gram_kernel_gives_the_same_bits_and_nan_instead_of_an_error(shape, kw):
    g = torch.Generator().manual_seed(1)
    M = torch.randn(*shape, generator=g, dtype=F64)
    R = torch.randn(shape[0], generator=g, dtype=F64)
    want = gram_solve(M, R, 4, 1e-3, **kw)
    with SyncCounter() as c:
        got = gram_solve_unchecked(M, R, 4, 1e-3, **kw)
    assert c.total == 0
    for key in ("direction", "kept_rank", "sigma_max", "sigma_min", "linearized_reduction"):
        assert torch.equal(getattr(got, key), getattr(want, key)), key
    bad = M.clone()
    bad[1, 2] = math.nan
    with pytest.raises(ValueError, match="Invalid M: contains NaN or Inf"):
        gram_solve(bad, R, 4, 1e-3, **kw)
    with SyncCounter() as c:
        nan = gram_solve_unchecked(bad, R, 4, 1e-3, **kw)
    assert c.total == 0 and torch.isnan(nan.direction).any()

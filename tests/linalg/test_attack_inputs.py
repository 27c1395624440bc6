"""Bad arguments of the public truncated solves, found by the attack rerun
(benchmarks/attack.py): accepted silently (rank 0, rtol -1, damping -1, rtol NaN) or
answered with torch's "size mismatch, got input (6), mat (6x8), vec (5)", an IndexError or
a raw LinAlgError. Each now raises ValueError naming the argument; valid calls give what
they gave (checked against the dense least-squares solution).
"""

from __future__ import annotations

import math

import pytest
import torch

from torchsteer.linalg import (
    gram_solve,
    randomized_svd,
    svd_small,
    truncated_pinv_apply,
    truncated_solve,
)

F64 = torch.float64


def _system():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 6, generator=g, dtype=F64), torch.randn(8, generator=g, dtype=F64)


def test_valid_solves_still_give_the_least_squares_solution():
    M, R = _system()
    want = torch.linalg.lstsq(M, R).solution
    torch.testing.assert_close(gram_solve(M, R, rank=6, rtol=0.0).direction, want)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    torch.testing.assert_close(truncated_solve(U, S, Vh.mT, R).direction, want)
    torch.testing.assert_close(truncated_pinv_apply(U, S, Vh.mT, R), want)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"rank": 0}, "Invalid rank"),
        ({"rtol": -1.0}, "Invalid rtol"),
        ({"rtol": math.nan}, "Invalid rtol"),
        ({"damping": -1.0}, "Invalid damping"),
    ],
)
def test_gram_solve_refuses_bad_settings(kw, match):
    M, R = _system()
    with pytest.raises(ValueError, match=match):
        gram_solve(M, R, **{"rank": 4, "rtol": 0.0, **kw})


def test_gram_solve_names_shapes_and_non_finite_matrices():
    M, R = _system()
    with pytest.raises(ValueError, match=r"Invalid R: shape \(5,\)"):
        gram_solve(M, R[:5], rank=4, rtol=0.0)
    with pytest.raises(ValueError, match="Invalid M: shape"):
        gram_solve(R, R, rank=4, rtol=0.0)
    bad = M.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="Invalid M: contains NaN or Inf"):
        gram_solve(bad, R, rank=4, rtol=0.0)


def test_truncated_solve_and_pinv_name_shapes_and_settings():
    M, R = _system()
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    V = Vh.mT
    with pytest.raises(ValueError, match=r"Invalid R: shape \(3,\)"):
        truncated_solve(U, S, V, R[:3])
    with pytest.raises(ValueError, match=r"Invalid S: shape \(2,\)"):
        truncated_solve(U, S[:2], V, R)
    with pytest.raises(ValueError, match="Invalid rtol"):
        truncated_solve(U, S, V, R, rtol=math.nan)
    with pytest.raises(ValueError, match=r"Invalid r: shape \(3,\)"):
        truncated_pinv_apply(U, S, V, R[:3])


def test_svds_name_a_matrix_that_is_not_2d_or_not_finite():
    M, R = _system()
    with pytest.raises(ValueError, match="Invalid B: shape"):
        svd_small(R)
    with pytest.raises(ValueError, match="Invalid op: shape"):
        randomized_svd(R, 2)
    bad = M.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="Invalid B: contains NaN or Inf"):
        svd_small(bad)

"""Randomized SVD on matrices with a known spectrum; truncated pseudoinverse against NumPy."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchsteer.jacobian import JacobianOperator
from torchsteer.linalg import randomized_svd, svd_small, truncated_pinv_apply


def known_spectrum(n, p, s, seed):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(p, len(s), generator=g, dtype=torch.float64)).Q
    return U @ torch.diag(torch.as_tensor(s, dtype=torch.float64)) @ V.T, U, V


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(20, 60),
    p=st.integers(20, 60),
    k=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    matrix_free=st.booleans(),
)
def test_recovers_top_subspace_with_a_gap(n, p, k, seed, matrix_free):
    m = min(n, p)
    top = np.linspace(10.0, 5.0, k)
    tail = 1e-3 * np.linspace(1.0, 0.1, m - k)
    A, U0, V0 = known_spectrum(n, p, np.concatenate([top, tail]), seed)
    op = JacobianOperator.from_matrix(A) if matrix_free else A
    U, S, V = randomized_svd(
        op,
        k,
        oversample=5,
        power_iters=1,
        generator=torch.Generator().manual_seed(seed),
        exact=None if matrix_free else False,
    )
    torch.testing.assert_close(S, torch.as_tensor(top), rtol=1e-6, atol=1e-6)
    # projectors onto the top-k left/right subspaces agree
    torch.testing.assert_close(U @ U.T, U0[:, :k] @ U0[:, :k].T, rtol=0, atol=1e-5)
    torch.testing.assert_close(V @ V.T, V0[:, :k] @ V0[:, :k].T, rtol=0, atol=1e-5)


def test_exact_path_equals_numpy_svd():
    A = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    U, S, V = randomized_svd(A, 3, oversample=5)  # l >= min(N, P): exact
    s = np.linalg.svd(A.numpy(), compute_uv=False)
    torch.testing.assert_close(S, torch.as_tensor(s[:3]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(U * S @ V.T, U @ U.T @ A, rtol=1e-10, atol=1e-12)


def test_eigh_fallback_when_svd_fails(monkeypatch):
    A = torch.randn(6, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    for B in (A, A.T):
        U, S, V = svd_small(B)
        s = np.linalg.svd(B.numpy(), compute_uv=False)
        torch.testing.assert_close(S, torch.as_tensor(s), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(U * S @ V.T, B, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rtol", [1e-10, 1e-3, 0.3])
def test_truncated_pinv_matches_numpy_pinv(rtol):
    s = [5.0, 2.0, 1.0, 1e-2, 1e-5]
    A, _, _ = known_spectrum(8, 6, s, 3)
    U, S, V = svd_small(A)
    r = torch.randn(8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = np.linalg.pinv(A.numpy(), rcond=rtol) @ r.numpy()
    torch.testing.assert_close(
        truncated_pinv_apply(U, S, V, r, rtol), torch.as_tensor(ref), rtol=1e-8, atol=1e-8
    )
    R = torch.stack([r, 2 * r], 1)
    out = truncated_pinv_apply(U, S, V, R, rtol)
    torch.testing.assert_close(out[:, 1], 2 * out[:, 0])


def test_truncated_pinv_all_zero_spectrum_is_zero():
    U, V = torch.eye(3, 2), torch.eye(4, 2)
    out = truncated_pinv_apply(U, torch.zeros(2), V, torch.ones(3), 1e-3)
    assert torch.equal(out, torch.zeros(4))
    with pytest.raises(ValueError, match="Invalid rtol"):
        truncated_pinv_apply(U, torch.ones(2), V, torch.ones(3), 1.5)


def test_bad_arguments_raise():
    A = torch.ones(4, 4)
    with pytest.raises(ValueError, match="Invalid rank"):
        randomized_svd(A, 0)
    with pytest.raises(ValueError, match="Invalid oversample"):
        randomized_svd(A, 2, oversample=-1)
    bad = A.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        randomized_svd(bad, 2)

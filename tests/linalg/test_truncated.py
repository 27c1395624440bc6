"""The one truncated solve (linalg/truncated.py) against NumPy's pinv and dense closed forms."""

import numpy as np
import pytest
import torch

from torchsteer.linalg import gram_solve, truncated_solve

DT = torch.float64


def matrix(B, P, spectrum, seed=0):
    """An (B, P) matrix U diag(spectrum) V^T with random orthonormal U, V."""
    g = torch.Generator().manual_seed(seed)
    k = len(spectrum)
    U = torch.linalg.qr(torch.randn(B, k, generator=g, dtype=DT)).Q
    V = torch.linalg.qr(torch.randn(P, k, generator=g, dtype=DT)).Q
    R = torch.randn(B, generator=g, dtype=DT)
    return U @ torch.diag(torch.tensor(spectrum, dtype=DT)) @ V.T, R


def triplets(M):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U, S, Vh.T


@pytest.mark.parametrize("rtol", [1e-6, 1e-3, 0.2])
def test_undamped_solve_is_numpy_pinv_with_its_records(rtol):
    M, R = matrix(6, 9, [5.0, 2.0, 0.9, 1e-4, 1e-9])
    U, S, V = triplets(M)
    out = truncated_solve(U, S, V, R, rtol=rtol)
    ref = np.linalg.pinv(M.numpy(), rcond=rtol) @ R.numpy()
    kept = S[(S > rtol * S.max()) & (S > 0)]
    np.testing.assert_allclose(out.direction.numpy(), ref, rtol=1e-8, atol=1e-10)
    assert int(out.kept_rank) == kept.numel()
    torch.testing.assert_close(out.sigma_max, S.max())
    torch.testing.assert_close(out.sigma_min, kept.min())
    red = 1 - (R - M @ out.direction).norm() / R.norm()
    torch.testing.assert_close(out.linearized_reduction, red, rtol=1e-9, atol=1e-12)


def test_rank_cut_is_the_pinv_of_the_best_rank_r_approximation():
    M, R = matrix(7, 5, [4.0, 3.0, 2.0, 1.0, 0.5])
    U, S, V = triplets(M)
    out = truncated_solve(U, S, V, R, rank=2)
    M2 = U[:, :2] @ torch.diag(S[:2]) @ V[:, :2].T
    torch.testing.assert_close(out.direction, torch.linalg.pinv(M2) @ R, rtol=1e-10, atol=1e-12)
    assert int(out.kept_rank) == 2


def test_damped_solve_is_levenberg_marquardt_with_relative_lambda():
    """d = M^T (M M^T + mu S_max^2 I)^-1 R on a full-rank wide M."""
    M, R = matrix(4, 8, [3.0, 1.0, 0.3, 0.05])
    mu = 0.01
    out = truncated_solve(*triplets(M), R, damping=mu)
    lam = mu * torch.linalg.svdvals(M).max() ** 2
    ref = M.T @ torch.linalg.solve(M @ M.T + lam * torch.eye(4, dtype=DT), R)
    torch.testing.assert_close(out.direction, ref, rtol=1e-10, atol=1e-12)
    red = 1 - (R - M @ out.direction).norm() / R.norm()
    torch.testing.assert_close(out.linearized_reduction, red, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("B", "P"), [(5, 12), (12, 5)])
@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_gram_solve_equals_the_triplet_solve_wide_and_tall(B, P, damping):
    M, R = matrix(B, P, [6.0, 2.0, 1.0, 0.4, 0.1], seed=3)
    ref = truncated_solve(*triplets(M), R, rtol=1e-3, damping=damping)
    out = gram_solve(M, R, rank=10, rtol=1e-3, damping=damping)
    torch.testing.assert_close(out.direction, ref.direction, rtol=1e-7, atol=1e-9)
    for name in ("kept_rank", "sigma_max", "sigma_min", "linearized_reduction"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-7, atol=1e-9)


def test_gram_floor_drops_what_the_gram_dtype_cannot_resolve():
    """S = 1e-9 S_max is below 2 sqrt(eps64) S_max = 3e-8: not kept even with rtol = 0; a
    float32 M solved with a float64 Gram keeps what float32's floor (7e-4) would drop."""
    M, R = matrix(4, 6, [1.0, 0.5, 1e-9])
    assert int(gram_solve(M, R, rank=3, rtol=0.0).kept_rank) == 2
    M32, R32 = matrix(4, 6, [1.0, 0.5, 1e-2])
    M32, R32 = M32.float(), R32.float()
    assert int(gram_solve(M32, R32, rank=3, rtol=0.0).kept_rank) == 3
    out = gram_solve(M32, R32, rank=3, rtol=0.0, gram_dtype=DT)
    assert out.direction.dtype == torch.float32
    ref = torch.linalg.pinv(M32.double(), rtol=1e-5) @ R32.double()  # rank 3
    torch.testing.assert_close(out.direction.double(), ref, rtol=1e-4, atol=1e-5)


def test_zero_matrix_keeps_nothing_and_gives_zero():
    M = torch.zeros(3, 5, dtype=DT)
    R = torch.ones(3, dtype=DT)
    for out in (truncated_solve(*triplets(M), R), gram_solve(M, R, rank=3, rtol=0.0)):
        assert torch.equal(out.direction, torch.zeros(5, dtype=DT))
        assert int(out.kept_rank) == 0 and float(out.sigma_min) == 0.0
        assert float(out.linearized_reduction) == 0.0

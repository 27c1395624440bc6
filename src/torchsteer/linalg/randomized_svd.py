"""Randomized SVD (Halko, Martinsson & Tropp 2011) of a matrix or a matrix-free operator.

For A (N x P) and l = rank + oversample:

    Omega ~ N(0, 1)^{P x l}
    Y = A Omega;  repeat power_iters times: Y = A (A^T orth(Y))   (re-orthonormalized)
    Q = orth(Y)                         (N x l, spans the dominant range of A)
    B = Q^T A = (A^T Q)^T               (l x P)
    B = U_b S V^T,  U = Q U_b           (top ``rank`` triplets kept)

Cost: l (1 + 2 power_iters) products with A or A^T, memory O((N + P) l). When the sketch
would not be smaller than the matrix (l >= min(N, P)) and A is a dense tensor, the exact
``torch.linalg.svd`` is used. If an SVD fails to converge (ill-conditioned input on some
LAPACK builds) the small factor is decomposed through ``eigh`` of its l x l Gram matrix.

References:
    Halko, Martinsson, Tropp, "Finding structure with randomness", SIAM Review 53 (2011).
"""

from __future__ import annotations

import torch

from torchsteer.linalg._checks import check_matrix

__all__ = ["randomized_svd", "svd_small"]


def _orth(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q


def svd_small(B: torch.Tensor):
    """Thin SVD ``B = U diag(S) V^T`` (returns U, S, V) with an ``eigh`` fallback.

    The fallback decomposes the smaller Gram matrix (B B^T or B^T B) in float64. A B that
    is not 2-D, or holds NaN/Inf (both decompositions fail), raises ``ValueError``.
    """
    check_matrix("B", B)
    try:
        U, S, Vh = torch.linalg.svd(B, full_matrices=False)
        return U, S, Vh.mT
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        pass
    if not bool(torch.isfinite(B).all()):  # only after the SVD failed
        raise ValueError("Invalid B: contains NaN or Inf")
    B64 = B.double()
    wide = B.shape[0] <= B.shape[1]
    G = B64 @ B64.mT if wide else B64.mT @ B64
    evals, evecs = torch.linalg.eigh(G)
    evals, evecs = evals.flip(0), evecs.flip(1)
    S = evals.clamp_min(0).sqrt()
    inv = torch.where(S > 0, 1.0 / S, torch.zeros_like(S))
    if wide:
        U, V = evecs, (B64.mT @ evecs) * inv
    else:
        V, U = evecs, (B64 @ evecs) * inv
    return U.to(B.dtype), S.to(B.dtype), V.to(B.dtype)


def randomized_svd(
    op,
    rank: int,
    oversample: int = 5,
    power_iters: int = 1,
    generator: torch.Generator | None = None,
    exact: bool | None = None,
):
    """Top ``rank`` singular triplets of ``op``.

    Args:
        op: a dense (N, P) tensor, or any object with ``shape``, ``dtype``, ``device``,
            ``matmat`` and ``rmatmat`` (e.g. :class:`torchsteer.jacobian.JacobianOperator`).
        rank: number of triplets k to return (``min(rank, N, P)`` are returned).
        oversample: extra sketch columns p; the sketch has l = k + p columns.
        power_iters: subspace iterations q; each costs one product with A and one with A^T.
        generator: the random source of Omega (for reproducible steps).
        exact: force (True) or forbid (False) the exact SVD of a dense tensor; by default a
            dense tensor is decomposed exactly when l >= min(N, P).

    Returns:
        U (N, r), S (r,) descending, V (P, r), with r = min(rank, N, P).
    """
    if rank < 1:
        raise ValueError(f"Invalid rank: {rank}")
    if oversample < 0:
        raise ValueError(f"Invalid oversample: {oversample}")
    if power_iters < 0:
        raise ValueError(f"Invalid power_iters: {power_iters}")
    check_matrix("op", op)
    N, P = op.shape
    is_dense = isinstance(op, torch.Tensor)
    if is_dense and not bool(torch.isfinite(op).all()):
        raise ValueError("Invalid matrix: contains NaN or Inf")
    r = min(rank, N, P)
    ell = min(r + oversample, N, P)
    if is_dense and (exact or (exact is None and ell >= min(N, P))):
        U, S, V = svd_small(op)
        return U[:, :r], S[:r], V[:, :r]
    if exact:
        raise ValueError("Invalid exact: True needs a dense tensor")
    if is_dense:
        A = op
        matmat, rmatmat = (lambda X: A @ X), (lambda X: A.mT @ X)
    else:
        matmat, rmatmat = op.matmat, op.rmatmat
    omega = torch.randn(P, ell, generator=generator, dtype=op.dtype, device="cpu").to(op.device)
    Y = matmat(omega)
    for _ in range(power_iters):
        Y = matmat(_orth(rmatmat(_orth(Y))))
    Q = _orth(Y)
    Bt = rmatmat(Q)  # (P, l) = (Q^T A)^T
    Ub, S, V = svd_small(Bt.mT)
    U = Q @ Ub
    return U[:, :r], S[:r], V[:, :r]

"""The truncated (and optionally damped) minimum-norm solve of ``M d ~ R``.

From singular triplets ``M ~ U diag(S) V^T`` (U: (N, k), S: (k,), V: (P, k)) or from the
eigen pairs of the smaller Gram matrix (``M M^T = U S^2 U^T`` or ``M^T M = V S^2 V^T``):

    keep_i = S_i > rtol * S_max  and  S_i > 0             (the first ``rank`` triplets)
    phi_i  = 1 / S_i                                      (damping mu = 0)
    phi_i  = S_i / (S_i^2 + lam),  lam = mu * S_max^2     (relative Levenberg-Marquardt)
    d      = V diag(phi keep) U^T R                       = M^T (M M^T + lam I)^-1 R on the
                                                            kept triplets
    M d    = U diag(S phi keep) U^T R                     (the fitted residuals)

With ``mu = 0``, ``d`` is the minimum-norm least-squares solution in the kept subspace, the
truncated pseudoinverse ``M_k^+ R``. The records of a solve are the kept rank, ``S_max``,
the smallest kept ``S`` (0 when none is kept) and the linearized reduction
``1 - |R - M d| / |R|`` (0 when R = 0). An all-zero spectrum keeps nothing and gives d = 0;
no step synchronizes with the host.

Gram eigenvalues carry an absolute error ~ eps * S_max^2, so :func:`gram_spectrum` never
keeps ``S_i`` below ``2 sqrt(eps) S_max`` of the Gram dtype, whatever ``rtol``.
"""

from __future__ import annotations

import dataclasses

import torch

from torchsteer.linalg._checks import (
    check_matrix,
    check_rank,
    check_rows,
    check_rtol_damping,
    check_singular_values,
    check_triplets,
)

__all__ = [
    "TruncatedSolution",
    "filter_factors",
    "gram_fitted",
    "gram_solve",
    "gram_solve_unchecked",
    "gram_spectrum",
    "keep_mask",
    "row_gram_solve",
    "solve_record",
    "truncated_solve",
    "truncated_solve_unchecked",
]


@dataclasses.dataclass
class TruncatedSolution:
    """The direction ``d`` (P,) of a truncated solve and its records."""

    direction: torch.Tensor
    kept_rank: torch.Tensor
    sigma_max: torch.Tensor
    sigma_min: torch.Tensor  # smallest kept singular value (0 when none is kept)
    linearized_reduction: torch.Tensor  # 1 - |R - M d| / |R|


def _smax(S: torch.Tensor) -> torch.Tensor:
    return S.max() if S.numel() else S.new_zeros(())


def keep_mask(S: torch.Tensor, rtol: float) -> torch.Tensor:
    """The kept triplets: ``S_i > rtol * S_max`` and ``S_i > 0``."""
    return (S > rtol * _smax(S)) & (S > 0)


def filter_factors(S: torch.Tensor, keep: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
    """``phi_i``: ``1 / S_i`` (``damping = 0``) or ``S_i / (S_i^2 + damping S_max^2)`` on the
    kept triplets, 0 elsewhere."""
    if damping == 0.0:
        return torch.where(keep, 1.0 / torch.where(keep, S, torch.ones_like(S)), 0 * S)
    lam = damping * S.max().square()
    return torch.where(keep, S / (S.square() + lam), 0 * S)


def solve_record(S, keep, R, fitted) -> tuple[torch.Tensor, ...]:
    """Kept rank, S_max, smallest kept S and ``1 - |R - fitted| / |R|`` (fitted = M d)."""
    kept_rank = keep.sum().to(S.dtype)
    smax = _smax(S)
    smin = torch.where(keep, S, torch.full_like(S, float("inf"))).min() if S.numel() else smax
    smin = torch.where(kept_rank > 0, smin, torch.zeros_like(smin))
    rest = (R - fitted).norm()
    rnorm = R.norm()
    pos = rnorm > 0
    red = torch.where(pos, 1 - rest / torch.where(pos, rnorm, 1), 0 * rnorm)
    return kept_rank, smax, smin, red


def truncated_solve(
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    R: torch.Tensor,
    rtol: float = 0.0,
    damping: float = 0.0,
    rank: int | None = None,
) -> TruncatedSolution:
    """The truncated direction ``d = V diag(phi keep) U^T R`` from triplets, and its records.

    Args:
        U: (N, k) left singular vectors (orthonormal columns).
        S: (k,) singular values, descending.
        V: (P, k) right singular vectors.
        R: (N,) right-hand side.
        rtol: relative cut-off, ``0 <= rtol < 1``.
        damping: relative Levenberg-Marquardt ``mu >= 0`` (0: the truncated pseudoinverse).
        rank: keep at most the first ``rank`` triplets (None: all k).

    Checked first: the shapes and settings (free), then S finite and ``>= 0`` (one host
    read of S's verdict: a negative "singular value" would flip its direction's sign and a
    NaN poison ``S_max``). :func:`truncated_solve_unchecked` is the same solve without any
    check and without host reads (what Sven calls, on triplets of its own SVD).

    Raises:
        ValueError: shapes that do not fit together, ``rtol``/``damping``/``rank`` out of range,
            or S holding NaN/Inf or a negative entry.
    """
    check_triplets(U, S, V)
    check_rows("R", R, U.shape[0], f"U is {tuple(U.shape)}")
    check_rtol_damping(rtol, damping)
    if rank is not None:
        check_rank(rank)
    check_singular_values(S)
    return truncated_solve_unchecked(U, S, V, R, rtol, damping, rank)


def truncated_solve_unchecked(
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    R: torch.Tensor,
    rtol: float = 0.0,
    damping: float = 0.0,
    rank: int | None = None,
) -> TruncatedSolution:
    """:func:`truncated_solve` without its checks: no host synchronization. The caller
    guarantees the shapes, ``0 <= rtol < 1``, ``damping >= 0``, ``rank >= 1`` and ``S >= 0``
    (singular values of its own SVD); a NaN in S shows as NaN in the result."""
    if rank is not None:
        U, S, V = U[:, :rank], S[:rank], V[:, :rank]
    keep = keep_mask(S, rtol)
    c = U.mT @ R
    inv = filter_factors(S, keep, damping)
    if damping == 0.0:
        fitted = U @ torch.where(keep, c, 0 * c)
    else:  # M d = U diag(S^2 / (S^2 + lam)) U^T R
        fitted = U @ (inv * S * c)
    d = V @ (inv * c)
    return TruncatedSolution(d, *solve_record(S, keep, R, fitted))


def gram_spectrum(G: torch.Tensor, rank: int, rtol: float, damping: float = 0.0):
    """The top ``rank`` eigen pairs of a Gram matrix ``G = M M^T`` (or ``M^T M``).

    Returns ``(vecs, S, keep, inv2)``: eigenvectors, ``S = sqrt(eigenvalues)``, the kept mask
    (``rtol`` floored at ``2 sqrt(eps)``) and ``1 / (S^2 + lam)`` on the kept ones (0
    elsewhere), ``lam = damping * S_max^2``.
    """
    evals, vecs = torch.linalg.eigh(G)
    evals, vecs = evals.flip(0)[:rank].clamp_min(0), vecs.flip(1)[:, :rank]
    S = evals.sqrt()
    floor = 2.0 * torch.finfo(G.dtype).eps ** 0.5
    keep = keep_mask(S, max(rtol, floor))
    shifted = evals if damping == 0.0 else evals + damping * evals.max()
    inv2 = torch.where(keep, shifted.reciprocal(), 0 * evals)  # 1/0 = inf is never picked
    return vecs, S, keep, inv2


def gram_fitted(vecs, S, keep, inv2, c, damping: float = 0.0) -> torch.Tensor:
    """``M d`` from the eigenvectors U of ``M M^T`` and ``c = U^T R``."""
    if damping == 0.0:
        return vecs @ torch.where(keep, c, 0 * c)
    return vecs @ (inv2 * S.square() * c)  # the damped filter S^2 / (S^2 + lam)


def gram_solve(
    M: torch.Tensor,
    R: torch.Tensor,
    rank: int,
    rtol: float,
    gram_dtype: torch.dtype | None = None,
    damping: float = 0.0,
) -> TruncatedSolution:
    """The exact truncated solve through ``eigh`` of the smaller Gram matrix of a dense M.

    ``M M^T`` (B <= P: ``d = M^T U S^-2 U^T R``) or ``M^T M`` (B > P: ``d = V S^-2 V^T M^T
    R``), formed and decomposed in ``gram_dtype`` (default M's dtype); ``d`` and the records
    come back in M's dtype.

    Raises:
        ValueError: M not 2-D, R not (B,), ``rank``/``rtol``/``damping`` out of range, or
            NaN/Inf in M (the Gram matrix's ``eigh`` fails).
    """
    check_matrix("M", M)
    check_rows("R", R, M.shape[0], f"M is {tuple(M.shape)}")
    check_rank(rank)
    check_rtol_damping(rtol, damping)
    try:
        return _gram_solve(M, R, rank, rtol, gram_dtype, damping, clean=False)
    except torch.linalg.LinAlgError as err:  # only when it fails: no check on the way
        if not bool(torch.isfinite(M).all()):
            raise ValueError("Invalid M: contains NaN or Inf") from err
        raise


def gram_solve_unchecked(
    M: torch.Tensor,
    R: torch.Tensor,
    rank: int,
    rtol: float,
    gram_dtype: torch.dtype | None = None,
    damping: float = 0.0,
) -> TruncatedSolution:
    """:func:`gram_solve` without its checks and without host reads (what Sven calls): the
    caller guarantees the shapes and settings. NaN/Inf entries of the Gram matrix are set to
    0 before ``eigh`` (B x B numbers, so that ``eigh`` does not fail on them), so NaN/Inf in
    M or R shows as NaN in ``d`` instead of an error; a finite Gram matrix is unchanged."""
    return _gram_solve(M, R, rank, rtol, gram_dtype, damping, clean=True)


def _gram_solve(M, R, rank, rtol, gram_dtype, damping, clean: bool) -> TruncatedSolution:
    B, P = M.shape
    dtype = M.dtype
    work = M if gram_dtype is None else M.to(gram_dtype)
    Rw = R.to(work.dtype)
    wide = B <= P
    G = work @ work.mT if wide else work.mT @ work
    if clean:
        G = G.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    if wide:
        return _row_gram_solve(G, Rw, lambda y: work.mT @ y, min(rank, B, P), rtol, damping, dtype)
    vecs, S, keep, inv2 = gram_spectrum(G, min(rank, B, P), rtol, damping)
    w = vecs.mT @ (work.mT @ Rw)
    dw = vecs @ (inv2 * w)
    fitted, d = work @ dw, dw.to(dtype)
    rec = solve_record(S, keep, Rw, fitted)
    return TruncatedSolution(d, *(t.to(dtype) for t in rec))


def _row_gram_solve(G, Rw, rmatvec, rank, rtol, damping, dtype) -> TruncatedSolution:
    """The wide solve from ``G = M M^T`` and the product ``y -> M^T y`` alone:
    ``d = M^T U diag(inv2) U^T R``, the records from the eigen pairs (no product with M)."""
    vecs, S, keep, inv2 = gram_spectrum(G, rank, rtol, damping)
    c = vecs.mT @ Rw
    d = rmatvec(vecs @ (inv2 * c)).to(dtype)
    fitted = gram_fitted(vecs, S, keep, inv2, c, damping)
    rec = solve_record(S, keep, Rw, fitted)
    return TruncatedSolution(d, *(t.to(dtype) for t in rec))


def row_gram_solve(
    G: torch.Tensor,
    R: torch.Tensor,
    rmatvec,
    rank: int,
    rtol: float,
    dtype: torch.dtype,
    damping: float = 0.0,
) -> TruncatedSolution:
    """:func:`gram_solve` of a wide M (B <= P) given only ``G = M M^T`` (B, B, in the Gram
    dtype) and ``rmatvec(y) = M^T y`` (for y of G's dtype): for an M that is never formed
    (:class:`~torchsteer.jacobian.factored.FactoredRows`). ``d`` and the records come back in
    ``dtype``. Unchecked, as :func:`gram_solve_unchecked` (the caller guarantees the shapes
    and settings; no host read); NaN/Inf in G fails in ``eigh`` or shows as NaN in ``d``."""
    return _row_gram_solve(G, R.to(G.dtype), rmatvec, min(rank, G.shape[0]), rtol, damping, dtype)

"""Applying a truncated pseudoinverse from singular triplets (the keep rule and the filter of
:mod:`torchsteer.linalg.truncated`, for one or several right-hand sides)."""

from __future__ import annotations

import torch

from torchsteer.linalg._checks import check_rows, check_triplets
from torchsteer.linalg.truncated import filter_factors, keep_mask

__all__ = ["truncated_pinv_apply"]


def truncated_pinv_apply(
    U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, r: torch.Tensor, rtol: float = 0.0
) -> torch.Tensor:
    """``V diag(1/S) U^T r`` over the kept triplets.

    A triplet is kept when ``S_i > rtol * max(S)`` and ``S_i > 0``; an all-zero spectrum gives
    a zero result (no division by zero, no host synchronization). For one right-hand side
    this is the direction of :func:`torchsteer.linalg.truncated.truncated_solve`.

    Args:
        U: (N, k) left singular vectors.
        S: (k,) singular values.
        V: (P, k) right singular vectors.
        r: (N,) or (N, m) right-hand side(s).
        rtol: relative cut-off, ``0 <= rtol < 1``.

    Returns:
        (P,) or (P, m).
    """
    if not 0.0 <= rtol < 1.0:
        raise ValueError(f"Invalid rtol: {rtol}")
    check_triplets(U, S, V)
    check_rows("r", r, U.shape[0], f"U is {tuple(U.shape)}", matrix=True)
    if S.numel() == 0:
        shape = (V.shape[0],) if r.dim() == 1 else (V.shape[0], r.shape[1])
        return torch.zeros(shape, dtype=V.dtype, device=V.device)
    inv = filter_factors(S, keep_mask(S, rtol))
    c = U.mT @ r
    c = c * inv if r.dim() == 1 else c * inv.unsqueeze(1)
    return V @ c

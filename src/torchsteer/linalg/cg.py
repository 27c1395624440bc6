"""Conjugate gradient for symmetric positive-definite systems given as a product."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

__all__ = ["CGResult", "conjugate_gradient"]


@dataclasses.dataclass
class CGResult:
    """Outcome of :func:`conjugate_gradient`.

    Attributes:
        x: the solution (shape of b).
        iterations: iterations run.
        residual_norm: final |b - A x| per column (a tensor).
        converged: every column met the tolerance.
        breakdown: a direction of non-positive curvature (p^T A p <= 0) was met, or the
            product was not finite (NaN): the operator is not positive definite or not
            finite; ``x`` is the iterate before it.
    """

    x: torch.Tensor
    iterations: int
    residual_norm: torch.Tensor
    converged: bool
    breakdown: bool


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    tol: float = 1e-6,
    maxiter: int | None = None,
    x0: torch.Tensor | None = None,
    atol: float = 0.0,
    check_every: int = 1,
) -> CGResult:
    """Solve ``A x = b`` for SPD ``A`` given only ``matvec(x) = A x``.

    Batched: ``b`` may be (n,) or (n, k); the k columns are independent systems, each with its
    own step sizes, and ``matvec`` must accept the same shape. Stops when every column has
    ``|r| <= max(tol |b|, atol)``. The test (a host synchronization) runs every
    ``check_every`` iterations; nothing else synchronizes.

    Returns:
        A :class:`CGResult`.
    """
    if tol < 0 or atol < 0:
        raise ValueError(f"Invalid tol: {tol}, atol: {atol}")
    if check_every < 1:
        raise ValueError(f"Invalid check_every: {check_every}")
    if not torch.isfinite(b).all():
        raise ValueError("Invalid b: contains NaN or Inf")
    vec = b.dim() == 1
    B = b.unsqueeze(1) if vec else b
    n = B.shape[0]
    maxiter = 10 * n if maxiter is None else maxiter

    def A(X):
        Y = matvec(X.squeeze(1) if vec else X)
        return Y.unsqueeze(1) if vec else Y

    X = torch.zeros_like(B) if x0 is None else (x0.unsqueeze(1) if vec else x0).clone()
    R = B - A(X) if x0 is not None else B.clone()
    threshold = torch.clamp(tol * B.norm(dim=0), min=atol)
    Pd = R.clone()
    rs = (R * R).sum(0)
    it, breakdown = 0, False
    res = rs.sqrt()
    converged = bool((res <= threshold).all())
    while not converged and it < maxiter:
        AP = A(Pd)
        pap = (Pd * AP).sum(0)
        active = rs > 0
        if bool((~(pap > 0) & active).any()):  # also NaN: a non-finite product
            breakdown = True
            break
        alpha = torch.where(active, rs / torch.where(active, pap, torch.ones_like(pap)), 0.0)
        X = X + alpha * Pd
        R = R - alpha * AP
        rs_new = (R * R).sum(0)
        beta = torch.where(active, rs_new / torch.where(active, rs, torch.ones_like(rs)), 0.0)
        Pd = R + beta * Pd
        rs = rs_new
        it += 1
        if it % check_every == 0 or it == maxiter:
            res = rs.sqrt()
            converged = bool((res <= threshold).all())
    res = rs.sqrt()
    X = X.squeeze(1) if vec else X
    return CGResult(X, it, res, bool((res <= threshold).all()), breakdown)

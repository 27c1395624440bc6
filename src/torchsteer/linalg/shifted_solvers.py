"""Solves of the shifted system ``(H + lambda I) x = b`` for a symmetric ``H``.

- :func:`shifted_cholesky_solve`: ``x = (H + lambda I)^{-1} b`` from the dense ``H`` by a
  Cholesky factor ``L L^T = H + lambda I``; ``None`` when ``H + lambda I`` is not positive
  definite (the factorization fails) or the result is not finite.
- :func:`shifted_cg`: matrix-free conjugate gradients on ``A = H + lambda I`` given only
  ``H v``. From ``x_0`` (zero, or a warm start whose ``H x_0`` may be passed in, so that a
  re-solve with another ``lambda`` costs no product: ``r_0 = b - H x_0 - lambda x_0``)::

      alpha_k = r_k^T r_k / p_k^T A p_k,   x_{k+1} = x_k + alpha_k p_k,
      H x_{k+1} = H x_k + alpha_k H p_k,  r_{k+1} = r_k - alpha_k A p_k,
      p_{k+1} = r_{k+1} + (r_{k+1}^T r_{k+1} / r_k^T r_k) p_k.

  It stops at ``|r_k| <= tol |b|`` (tested before the first iteration and then after every
  ``check_every``-th one, and at ``maxiter``), and breaks down on non-positive (or NaN)
  curvature ``p_k^T A p_k <= 0``: ``A`` is not positive definite on the Krylov space.

Torch only; nothing here knows an optimizer exists.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import torch

__all__ = ["MatVec", "ShiftedCGResult", "Solution", "shifted_cg", "shifted_cholesky_solve"]


class MatVec(Protocol):
    """A symmetric linear operator given by its product ``v -> H v``."""

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...


@dataclasses.dataclass
class Solution:
    """One shifted solve: ``delta`` (None on failure), why it failed, Krylov iterations."""

    delta: torch.Tensor | None
    ok: bool
    reason: str = ""
    cg_iterations: int = 0


@dataclasses.dataclass
class ShiftedCGResult:
    """Outcome of :func:`shifted_cg`.

    Attributes:
        x: the last iterate (before the breakdown, if one).
        Hx: ``H x`` accumulated along the recurrence (for a warm start without a product).
        iterations: CG iterations run (one product ``H p`` each).
        converged: ``|r| <= tol |b|`` at the end.
        breakdown: non-positive or NaN curvature ``p^T (H + lambda I) p`` was met.
    """

    x: torch.Tensor
    Hx: torch.Tensor
    iterations: int
    converged: bool
    breakdown: bool


def shifted_cholesky_solve(
    H: torch.Tensor, b: torch.Tensor, lam: float
) -> tuple[torch.Tensor | None, str]:
    """``((H + lam I)^{-1} b, "")``; ``(None, "cholesky")`` if ``H + lam I`` is not positive
    definite, ``(None, "nonfinite")`` if the solution is not finite."""
    eye = torch.eye(b.numel(), dtype=b.dtype, device=b.device)
    L, info = torch.linalg.cholesky_ex(H + lam * eye)
    if int(info) != 0:
        return None, "cholesky"
    x = torch.cholesky_solve(b.unsqueeze(1), L).squeeze(1)
    if not bool(torch.isfinite(x).all()):
        return None, "nonfinite"
    return x, ""


def shifted_cg(
    matvec,
    b: torch.Tensor,
    lam: float = 0.0,
    tol: float = 1e-6,
    maxiter: int | None = None,
    x0: torch.Tensor | None = None,
    Hx0: torch.Tensor | None = None,
    check_every: int = 1,
) -> ShiftedCGResult:
    """Conjugate gradients on ``(H + lam I) x = b``, ``matvec(v) = H v`` (see the module).

    Args:
        matvec: ``v -> H v`` for a (P,) vector.
        b: the right-hand side, shape (P,).
        lam: the shift.
        tol: relative residual tolerance (``|r| <= tol |b|``).
        maxiter: most iterations (default ``10 P``).
        x0: warm start (default zero).
        Hx0: ``H x0`` if known (no product for ``r_0``); only with ``x0``.
        check_every: the convergence test runs every ``check_every`` iterations.
    """
    if not tol >= 0:
        raise ValueError(f"Invalid tol: {tol}")
    if not (isinstance(check_every, int) and check_every >= 1):
        raise ValueError(f"Invalid check_every: {check_every}")
    if Hx0 is not None and x0 is None:
        raise ValueError("Invalid Hx0: given without x0")
    maxiter = 10 * b.numel() if maxiter is None else maxiter
    if x0 is None:
        x, Hx = torch.zeros_like(b), torch.zeros_like(b)
    else:
        x = x0.to(b.dtype)
        Hx = matvec(x) if Hx0 is None else Hx0
    r = b - Hx - lam * x
    threshold = tol * float(b.norm())
    p, rs = r, float(r @ r)
    it = 0
    done = math.sqrt(rs) <= threshold
    while not done and it < maxiter:
        Hp = matvec(p)
        Ap = Hp + lam * p
        pap = float(p @ Ap)
        if not pap > 0:  # non-positive (or NaN) curvature along p
            return ShiftedCGResult(x, Hx, it, False, True)
        alpha = rs / pap
        x, Hx, r = x + alpha * p, Hx + alpha * Hp, r - alpha * Ap
        rs, rs_old = float(r @ r), rs
        p = r + (rs / rs_old) * p
        it += 1
        if it % check_every == 0:
            done = math.sqrt(rs) <= threshold
    return ShiftedCGResult(x, Hx, it, math.sqrt(rs) <= threshold, False)

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

  It stops at ``|r_k| <= tol |b|`` (tested on the device at every iteration, read by the
  host every ``check_every`` iterations; see :func:`shifted_cg`), and breaks down on
  non-positive (or NaN) curvature ``p_k^T A p_k <= 0``: ``A`` is not positive definite on
  the Krylov space.

Torch only; nothing here knows an optimizer exists.
"""

from __future__ import annotations

import dataclasses
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
    """Outcome of :func:`shifted_cg` (and of :func:`~torchsteer.linalg.conjugate_gradient`).

    Attributes:
        x: the last iterate (before the breakdown, if one), shaped like ``b``.
        Hx: ``H x`` accumulated along the recurrence (for a warm start without a product).
        iterations: CG iterations run (one product ``H p`` each).
        converged: every column has ``|r| <= max(tol |b|, atol)`` at the end.
        breakdown: non-positive or NaN curvature ``p^T (H + lambda I) p`` was met.
        residual_norm: the recurrence's ``|r|`` at the end, per column (a tensor).
        finite: every entry of ``x`` is finite.
    """

    x: torch.Tensor
    Hx: torch.Tensor
    iterations: int
    converged: bool
    breakdown: bool
    residual_norm: torch.Tensor | None = None
    finite: bool = True


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


def _dot(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``u^T w`` per column: a 0-d tensor for vectors, (k,) for (P, k) matrices."""
    return u @ w if u.dim() == 1 else (u * w).sum(0)


def shifted_cg(
    matvec,
    b: torch.Tensor,
    lam: float = 0.0,
    tol: float = 1e-6,
    maxiter: int | None = None,
    x0: torch.Tensor | None = None,
    Hx0: torch.Tensor | None = None,
    check_every: int = 1,
    atol: float = 0.0,
) -> ShiftedCGResult:
    """Conjugate gradients on ``(H + lam I) x = b``, ``matvec(v) = H v`` (see the module).

    The one CG of the library. ``b`` may be a (P,) vector or a (P, k) matrix whose k columns
    are independent systems, each with its own step sizes (``matvec`` then takes (P, k)); a
    column whose residual is exactly zero stays put.

    Host synchronization: the scalars stay tensors, and the convergence test (in float64)
    and the breakdown test run on the device at every iteration; once either is met every
    later update is masked (``torch.where``), so the iterates, ``iterations`` and the result
    are the same for every ``check_every``. The host reads the tests (one transfer of four
    flags and the iteration count) after every ``check_every``-th iteration, at ``maxiter``
    and, for a warm start (or ``tol >= 1``, ``atol > 0``), before the first: a cold solve
    that stops after k iterations synchronizes ``ceil(k / check_every)`` times (at most
    ``ceil(maxiter / check_every)``) and runs up to ``check_every - 1`` masked products
    past the stop.

    Args:
        matvec: ``v -> H v`` for a (P,) vector (or a (P, k) matrix when ``b`` is one).
        b: the right-hand side, shape (P,) or (P, k).
        lam: the shift.
        tol: relative residual tolerance (``|r| <= tol |b|``).
        maxiter: most iterations (default ``10 P``).
        x0: warm start (default zero), shaped like ``b``.
        Hx0: ``H x0`` if known (no product for ``r_0``); only with ``x0``.
        check_every: the convergence test runs every ``check_every`` iterations.
        atol: absolute residual floor (``|r| <= max(tol |b|, atol)``).
    """
    if not (tol >= 0 and atol >= 0):
        raise ValueError(f"Invalid tol: {tol}, atol: {atol}")
    if not (isinstance(check_every, int) and check_every >= 1):
        raise ValueError(f"Invalid check_every: {check_every}")
    if Hx0 is not None and x0 is None:
        raise ValueError("Invalid Hx0: given without x0")
    maxiter = 10 * b.shape[0] if maxiter is None else maxiter
    if x0 is None:
        x, Hx = torch.zeros_like(b), torch.zeros_like(b)
    else:
        x = x0.to(b.dtype)
        Hx = matvec(x) if Hx0 is None else Hx0
    r = b - Hx - lam * x
    threshold = torch.clamp(tol * torch.linalg.vector_norm(b, dim=0).double(), min=atol)

    def met(rs: torch.Tensor) -> torch.Tensor:  # on the device
        return (rs.double().sqrt() <= threshold).all()

    p, rs = r, _dot(r, r)
    stop = met(rs)  # converged or broken down: every later update is masked
    broken, n = torch.zeros_like(stop), torch.zeros((), dtype=torch.int64, device=b.device)
    it = 0
    # from x = 0 the test can hold at the start only for b = 0 (masked on the device anyway)
    # or tol >= 1 or atol > 0: the read before the first iteration is skipped otherwise
    cold = x0 is None and tol < 1 and atol == 0
    while True:
        if (it % check_every == 0 and not (cold and it == 0)) or it == maxiter:  # one read
            read = torch.stack([stop, broken, ~broken & met(rs), x.isfinite().all()])
            flags = torch.cat([read.to(n), n.reshape(1)]).tolist()
            if flags[0] or it == maxiter:
                break
        Hp = matvec(p)
        Ap = Hp + lam * p
        pap = _dot(p, Ap)
        active = rs > 0
        # non-positive (or NaN) curvature along p: stop at the iterate before it
        broken = broken | (((~(pap > 0) & active).any()) & ~stop)
        stop = stop | broken
        one = torch.ones_like(pap)
        alpha = torch.where(active, rs / torch.where(active, pap, one), 0.0)
        x = torch.where(stop, x, x + alpha * p)
        Hx = torch.where(stop, Hx, Hx + alpha * Hp)
        r_new = torch.where(stop, r, r - alpha * Ap)
        rs_new = torch.where(stop, rs, _dot(r_new, r_new))
        beta = torch.where(active, rs_new / torch.where(active, rs, one), 0.0)
        p = torch.where(stop, p, r_new + beta * p)
        n = n + (~stop).to(n)
        r, rs = r_new, rs_new
        stop = stop | met(rs)
        it += 1
    _, broke, converged, finite, iterations = flags
    return ShiftedCGResult(x, Hx, iterations, bool(converged), bool(broke), rs.sqrt(), bool(finite))

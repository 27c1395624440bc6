"""Lanczos solves of ``(H + lambda I) delta = -g`` for many ``lambda`` from one Krylov basis.

Krylov subspaces are shift-invariant, ``K_k(H + lambda I, g) = K_k(H, g)``: ``k`` Lanczos steps
on ``H`` from ``q_1 = -g / |g|`` give an orthonormal basis ``Q_k`` and the tridiagonal
``T_k = Q_k^T H Q_k`` with ``H Q_k = Q_k T_k + beta_k q_{k+1} e_k^T``, and for *every* lambda
the Galerkin solution in that space (CG's k-th iterate) is::

    delta_k(lambda) = Q_k y,   (T_k + lambda I) y = |g| e_1,
    |residual| = |g + (H + lambda I) delta_k| = beta_k |e_k^T y|.

So after a rejected try of the adaptive search (``lambda`` grows) the next solve starts from
the kept ``Q_k`` and ``T_k`` at no Hessian-vector product, and extends the basis only while the
residual for the new lambda is above the tolerance. The basis is kept orthogonal by a full
(classical Gram-Schmidt) reorthogonalization of every new vector, so the residual formula
holds in floating point as well; plain CG loses that orthogonality on ill-conditioned
systems and then needs more products for the same residual.

Memory: the basis, ``k`` P-vectors for ``k`` Lanczos steps (at most ``maxiter``, and at most
``P``: the basis is then complete); the reorthogonalization costs ``O(k P)`` per step.

References:
    Lanczos, "An iteration method for the solution of the eigenvalue problem of linear
    differential and integral operators", 1950; Saad, "Iterative Methods for Sparse Linear
    Systems", 2003, Sec. 6.6-6.7 (Lanczos for linear systems) and 7.3 (shifted systems).
"""

from __future__ import annotations

import math

import torch

from torchsteer.linalg.shifted_solvers import MatVec, Solution

__all__ = ["LanczosSolver"]


class LanczosSolver:
    """``delta = -(H + lambda I)^{-1} g`` by Lanczos with full reorthogonalization, the basis
    kept across the solves of one step (one ``g``, one ``H``).

    Stops at ``|r| <= tol |g|`` (the residual ``beta_k |e_k^T y|``, exact for an orthonormal
    basis), as :func:`~torchsteer.linalg.shifted_solvers.shifted_cg` does. A ``T_k + lambda I``
    that is not positive definite (``H + lambda I`` indefinite on the Krylov space: CG would
    meet non-positive curvature) is a failed solve; hitting ``maxiter`` basis vectors is not
    (the Galerkin solution is still a descent direction). The small ``k x k`` systems are
    solved by an ``O(k)`` recurrence in Python floats (float64).
    """

    def __init__(self, curvature: MatVec, g: torch.Tensor, tol: float, maxiter: int | None):
        self.curvature = curvature
        self.g = g
        self.tol = tol
        P = g.numel()
        self.maxiter = min(P, 10 * P if maxiter is None else maxiter)
        self.gnorm = float(g.norm())
        self.alpha: list[float] = []
        self.beta: list[float] = []  # beta[j] couples q_{j+1} and q_{j+2}
        self._Q = g.new_empty(min(self.maxiter, 8), P)  # rows 0..k-1: the basis
        self._next = -g / self.gnorm  # q_{k+1}, not yet multiplied by H
        self.invariant = False  # beta_k = 0: the Krylov space is invariant, solves are exact
        self.failed = ""

    @property
    def k(self) -> int:
        return len(self.alpha)

    def _extend(self) -> None:
        """One Lanczos step: one product, ``alpha_k``, ``beta_k`` and ``q_{k+1}``."""
        k, q = self.k, self._next
        if k == self._Q.shape[0]:  # grow the buffer (doubling, capped at maxiter rows)
            grown = self._Q.new_empty(min(self.maxiter, 2 * k), self._Q.shape[1])
            grown[:k] = self._Q
            self._Q = grown
        self._Q[k] = q
        w = self.curvature.matvec(q)
        a = float(q @ w)
        w = w - a * q
        if k:
            w = w - self.beta[-1] * self._Q[k - 1]
        basis = self._Q[: k + 1]
        w = w - basis.T @ (basis @ w)  # full reorthogonalization
        b = float(w.norm())
        self.alpha.append(a)
        self.beta.append(b)
        if not (math.isfinite(a) and math.isfinite(b)):
            self.failed = "nonfinite"
            return
        scale = abs(a) + (self.beta[-2] if k else 0.0)
        if b <= 8 * torch.finfo(w.dtype).eps * scale or b == 0.0:
            self.invariant = True
        else:
            self._next = w / b

    def _small_solve(self, lam: float) -> tuple[list[float], float] | None:
        """``y`` of ``(T_k + lambda I) y = |g| e_1`` and its residual; None if not PD.

        By the LDL^T recurrence of the tridiagonal (``O(k)``, pivots ``d_j > 0`` iff PD):
        ``L z = |g| e_1``, then ``L^T y = D^{-1} z``, whose last entry is ``z_k / d_k``.
        """
        d, z, mult = [], [], []
        for j, a in enumerate(self.alpha):
            if j == 0:
                d.append(a + lam)
                z.append(self.gnorm)
            else:
                m = self.beta[j - 1] / d[-1]
                mult.append(m)
                d.append(a + lam - m * self.beta[j - 1])
                z.append(-m * z[-1])
            if not d[-1] > 0:
                return None
        y = [z[-1] / d[-1]]
        for j in range(len(d) - 2, -1, -1):
            y.append(z[j] / d[j] - mult[j] * y[-1])
        y.reverse()
        res = 0.0 if self.invariant else self.beta[-1] * abs(y[-1])
        return y, res

    def solve(self, lam: float) -> Solution:
        """The solve for ``lam``: from the kept basis, extended only as far as needed."""
        threshold = self.tol * self.gnorm
        it = 0
        while True:
            if self.failed:
                return Solution(None, False, self.failed, it)
            if self.k:
                out = self._small_solve(lam)
                if out is None:  # T_k + lambda I not PD: so is H + lambda I
                    return Solution(None, False, "breakdown", it)
                y, res = out
                if res <= threshold or self.invariant or self.k >= self.maxiter:
                    break
            self._extend()
            it += 1
        y = torch.tensor(y, dtype=self.g.dtype, device=self.g.device)
        delta = self._Q[: self.k].T @ y
        if not bool(torch.isfinite(delta).all()):
            return Solution(None, False, "nonfinite", it)
        return Solution(delta, True, "" if res <= threshold else "maxiter", it)

"""The tries of one RegularizedNewton step from ONE Krylov run (``solver="multishift"``).

The tries of a step differ only in the regularization: with ``c`` the gradient scale, they
solve ``(H/c + lambda_t/c I) delta_t = -g/c`` for ``lambda_t = |g| / (gamma / 2^t)`` (gns) or
``sqrt(2^t M |g|)`` (sqrt), ``t = 0, 1, ...``: the sequence is known before the first solve.
CG from ``delta = 0`` builds the same Krylov space ``K_k(H, g)`` for every shift, so one
multi-shift CG run (:func:`torchsteer.linalg.multishift_cg.multishift_cg`, the first try's
``lambda_0``, the smallest, as its base) gives the k-th CG iterate of every planned try at the
price of the first: a rejected try then costs its trial evaluation and no curvature product.
Each try's direction is, to rounding, that of a separate CG from zero with its own
``lambda``, the same tolerance ``|r| <= tol |g|`` and the same ``maxiter`` (each shift stops
on its own test), which is what the tests check against a dense float64 solve.

Not the warm-started ``solver="cg"``: there a retry restarts CG from the last try's
``delta`` and runs until *its* tolerance, so its later tries' directions differ (by at most
the tolerance); with ``cg_maxiter`` below convergence (the 124M setting) a warm retry costs
``cg_maxiter`` products more. Memory: ``x, r, p, H p`` and two P-vectors per further try in the
run; at most ``shifts`` tries share a run (a later try, or one whose base broke down, starts
a new run with itself as the base).
"""

from __future__ import annotations

from torchsteer.linalg.multishift_cg import multishift_cg
from torchsteer.linalg.shifted_solvers import MatVec, Solution

__all__ = ["MultiShiftSolver"]

SHIFTS = 4  # tries per Krylov run: 2 P-vectors each beyond the first


class MultiShiftSolver:
    """``delta_t = -(H + lambda_t I)^{-1} g`` for the planned ``lambda_t`` of a step's tries.

    :meth:`plan` takes the tries' lambdas in order; :meth:`solve` of the first runs CG for it
    and the next ``shifts - 1`` at once and keeps their solutions; a solve of a kept lambda
    costs nothing (``cg_iterations = 0``), one of an unplanned lambda runs CG for it alone.
    """

    def __init__(
        self, curvature: MatVec, g, tol: float, maxiter: int | None, shifts: int = SHIFTS
    ) -> None:
        self.curvature, self.g, self.tol = curvature, g, tol
        self.maxiter = 10 * g.numel() if maxiter is None else maxiter
        self.shifts = shifts
        self._plan: list[float] = []
        self._kept: dict[float, Solution] = {}

    def plan(self, lams: list[float]) -> None:
        """The lambdas the tries will ask for, in order (floats compared exactly)."""
        self._plan = list(lams)

    def solve(self, lam: float) -> Solution:
        if lam in self._kept:
            return self._kept.pop(lam)
        later = self._plan[self._plan.index(lam) + 1 :] if lam in self._plan else []
        shifts = [lam, *later[: self.shifts - 1]]
        self._kept.clear()  # solutions of tries already passed are not asked for again
        results, products = multishift_cg(
            self.curvature.matvec, -self.g, shifts, self.tol, self.maxiter, consume_b=True
        )
        first = None
        for i, (shift, res) in enumerate(zip(shifts, results)):
            its = products if i == 0 else 0
            if res.unfinished:
                continue  # the base broke down first: solved again with itself as the base
            if res.breakdown:
                sol = Solution(None, False, "breakdown", its)
            elif not res.finite:
                sol = Solution(None, False, "nonfinite", its)
            else:
                sol = Solution(res.x, True, "" if res.converged else "maxiter", its)
            if i == 0:
                first = sol
            else:
                self._kept[shift] = sol
        return first

"""The solves of :class:`RegularizedNewton` and the curvature it takes them on.

The curvature operators are :mod:`torchsteer.jacobian.curvature`'s (built once per optimizer
step from the live autograd graph of the closure's output), here averaged over ranks:

- :class:`HessianCurvature`: ``H v = d/dtheta <grad f, v>``;
- :class:`GaussNewtonCurvature`: ``G v = J^T H_out J v``;
- :class:`EmpiricalFisherCurvature`: ``F v = (1/B) G^T G v``.

A solver then returns ``delta = -(H + lambda I)^{-1} g`` for the ``lambda`` of each try of the
adaptive search: Cholesky of the materialized matrix (:class:`CholeskySolver`), Woodbury with
the B x B Gram of the per-sample gradients (:class:`WoodburySolver`, empirical Fisher only, exact)
or matrix-free conjugate gradients (:class:`CGSolver`); the Cholesky and CG algorithms are
:mod:`torchsteer.linalg.shifted_solvers`, wrapped here in the optimizer's :class:`Solution`.
A solve that fails (Cholesky of an indefinite matrix, CG meeting non-positive curvature, a
non-finite result) says so with ``ok=False``; the optimizer then rejects the try.

Under a process group (DDP, each rank holding a slice of the batch) every product and every
materialized matrix is the mean over ranks (:func:`torchsteer.distributed.all_reduce_mean`),
so the solvers see the curvature of the global batch and compute the same iterates on every
rank. The Woodbury solver never gathers the per-sample gradients: an all-to-all hands rank r
the columns of its 1/R slice of the parameters for all B rows, the B x B Gram is an all-reduce
of the slices' Grams, and each solve all-gathers the slices of the step. Without a process
group the collectives are no-ops and nothing changes.

The closure helpers (:func:`parse_closure_output`, :func:`evaluate_closure`,
:func:`make_curvature`) check what the closure returned for the chosen curvature, take the loss
and its gradients (with the graph the curvature needs) and build the curvature operator.
"""

from __future__ import annotations

import math

import torch

from torchsteer import distributed as tdist
from torchsteer.jacobian.curvature import (
    CurvatureOperator,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
)
from torchsteer.linalg.shifted_solvers import Solution, shifted_cg, shifted_cholesky_solve
from torchsteer.optim._newton_ddp import WoodburySolver  # re-exported

__all__ = [
    "CGSolver",
    "CholeskySolver",
    "EmpiricalFisherCurvature",
    "GaussNewtonCurvature",
    "HessianCurvature",
    "Solution",
    "WoodburySolver",
    "cg_tolerance",
    "eisenstat_walker_tolerance",
    "evaluate_closure",
    "forcing_tolerance",
    "make_curvature",
    "parse_closure_output",
]


class _MeanOverRanks:
    """Products and dense matrices averaged over ranks: the curvature of the global batch
    (each rank holding a slice of it); in one process the local ones, unchanged."""

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return tdist.all_reduce_mean(super().matvec(v))

    def dense(self) -> torch.Tensor:
        return tdist.all_reduce_mean(super().dense())


class HessianCurvature(_MeanOverRanks, HessianOperator):
    """:class:`~torchsteer.jacobian.curvature.HessianOperator`, averaged over ranks."""


class GaussNewtonCurvature(_MeanOverRanks, GGNOperator):
    """:class:`~torchsteer.jacobian.curvature.GGNOperator`, averaged over ranks."""


class EmpiricalFisherCurvature(_MeanOverRanks, EmpiricalFisherOperator):
    """:class:`~torchsteer.jacobian.curvature.EmpiricalFisherOperator`, averaged over ranks
    (its ``per_sample`` rows stay this rank's: the Woodbury solver shards them itself)."""


def _finite(delta: torch.Tensor) -> bool:
    return bool(torch.isfinite(delta).all())


class CholeskySolver:
    """``delta = -(H + lambda I)^{-1} g`` by Cholesky of the materialized ``H + lambda I``."""

    def __init__(self, curvature: CurvatureOperator, g: torch.Tensor) -> None:
        self.H = curvature.dense()
        self.g = g

    def solve(self, lam: float) -> Solution:
        x, reason = shifted_cholesky_solve(self.H, self.g, lam)
        return Solution(None, False, reason) if x is None else Solution(-x, True)


class CGSolver:
    """Matrix-free conjugate gradients on ``(H + lambda I) delta = -g``, warm-started.

    Stops at ``|r| <= tol |g|``; non-positive curvature (``p^T (H + lambda I) p <= 0``) is a
    failed solve. Hitting ``maxiter`` is not: the iterate is still a descent direction, and the
    accept test of the optimizer judges it.

    The solver keeps ``H x`` of its last solution ``x`` (accumulated along the CG recurrence,
    ``H x_{k+1} = H x_k + alpha_k H p_k``), so a warm start from that ``x`` with another
    ``lambda`` costs no product: ``r_0 = -g - H x - lambda x``. A warm start from any other
    vector costs one.
    """

    def __init__(
        self,
        curvature: CurvatureOperator,
        g: torch.Tensor,
        tol: float,
        maxiter: int | None,
        check_every: int = 1,
    ):
        self.curvature = curvature
        self.g = g
        self.tol, self.check_every = tol, check_every
        self.maxiter = 10 * g.numel() if maxiter is None else maxiter
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (x, H x)

    def solve(self, lam: float, x0: torch.Tensor | None = None) -> Solution:
        g, Hx0 = self.g, None
        if x0 is not None and self._last is not None and x0 is self._last[0]:
            x0, Hx0 = self._last  # the last solution: known finite
        elif x0 is not None and not _finite(x0):
            x0 = None
        out = shifted_cg(
            self.curvature.matvec, -g, lam, self.tol, self.maxiter, x0, Hx0, self.check_every
        )
        if out.breakdown:
            self._last = None
            return Solution(None, False, "breakdown", out.iterations)
        if not out.finite:
            self._last = None
            return Solution(None, False, "nonfinite", out.iterations)
        self._last = (out.x, out.Hx)
        return Solution(out.x, True, "" if out.converged else "maxiter", out.iterations)


def forcing_tolerance(grad_norm: float) -> float:
    """SciPy Newton-CG's relative CG tolerance ``min(0.5, sqrt(|g|))`` (superlinear)."""
    return min(0.5, math.sqrt(grad_norm))


def eisenstat_walker_tolerance(grad_norm: float, last: tuple[float, float] | None) -> float:
    """Eisenstat and Walker's choice 2 with their constants (gamma = 0.9, alpha = 2)::

        eta_k = 0.9 (|g_k| / |g_{k-1}|)^2,  max'd with 0.9 eta_{k-1}^2 when that is > 0.1,
        capped at 0.5;

    ``last = (|g_{k-1}|, eta_{k-1})`` of the last accepted step; ``None`` (first step):
    :func:`forcing_tolerance`. Local convergence of q-order 2 for the inexact Newton method.

    References:
        Eisenstat and Walker, "Choosing the forcing terms in an inexact Newton method",
        SIAM J. Sci. Comput. 17(1), 1996.
    """
    if last is None:
        return forcing_tolerance(grad_norm)
    prev_norm, prev_eta = last
    eta = 0.9 * (grad_norm / prev_norm) ** 2
    if 0.9 * prev_eta**2 > 0.1:
        eta = max(eta, 0.9 * prev_eta**2)
    return min(eta, 0.5)


def cg_tolerance(cg_tol, grad_norm: float, last: tuple[float, float] | None) -> float:
    """The relative tolerance of a step's solves for the optimizer's ``cg_tol`` setting."""
    if cg_tol is None:
        return forcing_tolerance(grad_norm)
    if cg_tol == "eisenstat_walker":
        return eisenstat_walker_tolerance(grad_norm, last)
    return cg_tol


# -- the closure: what it returns per curvature, its loss and gradients ----------------------

_EXPECTED = {
    "hessian": "the scalar loss (a tensor with one element)",
    "dense": "the scalar loss (a tensor with one element)",
    "gauss_newton": "a tuple (loss, outputs): the scalar loss and the output tensor it is "
    "computed from",
    "empirical_fisher": "the per-sample losses, a tensor of shape (B,)",
}


def parse_closure_output(out, curvature: str):
    """``(f, aux)`` from what the closure returned; an error says what was expected."""
    if curvature == "gauss_newton":
        ok = (
            isinstance(out, tuple | list)
            and len(out) == 2
            and all(isinstance(t, torch.Tensor) for t in out)
            and out[0].numel() == 1
        )
        if ok:
            return out[0].reshape(()), out[1]
    elif isinstance(out, torch.Tensor):
        if curvature == "empirical_fisher" and out.dim() == 1 and out.numel() >= 1:
            return out.mean(), out
        if curvature in ("hessian", "dense") and out.numel() == 1:
            return out.reshape(()), None
    got = (
        f"a tensor of shape {tuple(out.shape)}"
        if isinstance(out, torch.Tensor)
        else f"a {type(out).__name__}"
        + (f" of length {len(out)}" if isinstance(out, tuple | list) else "")
    )
    raise ValueError(
        f"Invalid closure output for curvature={curvature!r}: expected "
        f"{_EXPECTED[curvature]}, got {got}"
    )


def evaluate_closure(closure, params, curvature: str, graph: bool):
    """Run the closure; ``(f, aux, grads)``, the grads with their graph when ``graph``
    (``create_graph`` for the Hessian, ``retain_graph`` for the other curvatures)."""
    with torch.enable_grad():
        f, aux = parse_closure_output(closure(), curvature)
        if not f.requires_grad:
            raise ValueError(
                "Invalid closure output: the loss does not require grad; compute it from "
                "the parameters with autograd enabled"
            )
        create = graph and curvature in ("hessian", "dense")
        try:
            grads = torch.autograd.grad(
                f, params, create_graph=create, retain_graph=graph, allow_unused=True
            )
        except RuntimeError as err:
            if "second time" not in str(err):
                raise
            raise RuntimeError(
                "RegularizedNewton differentiates the closure's loss itself: the closure "
                "must return the loss without calling backward()"
            ) from err
    return f, aux, grads


def make_curvature(curvature: str, f, aux, grads, params, dtype, group=None) -> CurvatureOperator:
    """The curvature operator of ``curvature`` from one evaluation ``(f, aux, grads)``
    (``group``: the hyperparameters, e.g. Gauss-Newton's ``output_hessian``)."""
    if curvature in ("hessian", "dense"):
        return HessianCurvature(grads, params, dtype)
    if curvature == "gauss_newton":
        closed = (group or {}).get("output_hessian")
        return GaussNewtonCurvature(f, aux, params, dtype, output_hessian=closed)
    return EmpiricalFisherCurvature(aux, params, dtype)

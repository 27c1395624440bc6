"""Sinkhorn divergence between histograms given by logits (SinKD's sample-wise and batch-wise).

With a = softmax(p_logits / T), b = softmax(q_logits / T), a cost C and eps > 0,

    OT_eps(a, b) = min_{P 1 = a, P^T 1 = b}  <P, C> + eps KL(P || a b^T)
                 = <a, f> + <b, g>                    (f, g the optimal dual potentials),

    S_eps(a, b)  = OT_eps(a, b) - OT_eps(a, a) / 2 - OT_eps(b, b) / 2     (debiased=True).

For a symmetric cost with C_ii = 0 that is a metric, S_eps >= 0 with S_eps(a, a) = 0
(Feydy et al. 2019). The envelope theorem gives the exact gradient at the optimum,

    dOT_eps/da = f,   dOT_eps/db = g,   dOT_eps/dC = P,

valid for the KL(P || a b^T) regulariser above. (POT's ``reg_type="KL"`` with
``grad="envelope"`` hands back the potentials of the plain-entropy problem, which differ by
eps log a: the wrong gradient for the inputs.) Through the softmax, dS/dz_a =
a * (phi - <a, phi>) / T with phi = f_ab - f_aa, computed by autograd from these.

* **sample-wise** (``batchwise=False``): one OT problem per row, over the bins, all rows
  sharing one cost C (n, m); the solve for all pairs (and the debiasing pairs (a, a),
  (b, b)) runs as matrix products with exp(-C / eps) (see :mod:`._sinkhorn_solve`).
* **batch-wise** (``batchwise=True``, SinKD, Cui et al. 2024): ONE problem between the B
  rows of p and the B rows of q as point clouds with uniform weights 1/B, the cost
  W_ij = ||a_i - b_j||_1 between the distributions (or ``cost(a, b)``); the gradient flows
  through W. ``released=True`` is SinKD's released loss instead: K = exp(-W / eps),
  ``n_iters`` alternating row / column normalisations to sums 1 (no 1/B marginals, so the
  plan has mass B and the value is about B x the transport cost), value sum P * W,
  differentiated through the iterations.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import _sinkhorn_solve as solver

__all__ = ["SinkhornReport", "sinkhorn_divergence"]

_REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class SinkhornReport:
    """How the solve went: the worst pair's final L1 marginal error, iterations, domain."""

    iterations: int
    marginal_error: float
    converged: bool
    domain: str
    epsilon: float
    tol: float


class _EntropicOT(torch.autograd.Function):
    """OT_eps(a_p, b_p) for every pair over a shared C; envelope gradients f, g, P."""

    @staticmethod
    def forward(ctx, a, b, C, eps, opts, reports):
        a64, b64, C64 = a.detach().double(), b.detach().double(), C.detach().double()
        sol = solver.solve(C64, a64, b64, eps, opts)
        value = solver.dual_value(a64, b64, sol.f, sol.g)
        reports.append(sol)
        ctx.save_for_backward(a64, b64, C64, sol.f, sol.g)
        ctx.eps, ctx.dtypes = eps, (a.dtype, b.dtype, C.dtype)
        return value.to(torch.promote_types(a.dtype, b.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        a64, b64, C64, f, g = ctx.saved_tensors
        w = grad_out.double()
        ga = gb = gC = None
        if ctx.needs_input_grad[0]:
            ga = (w[:, None] * f).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            gb = (w[:, None] * g).to(ctx.dtypes[1])
        if ctx.needs_input_grad[2]:
            gC = solver.weighted_plan(C64, a64, b64, ctx.eps, f, g, w).to(ctx.dtypes[2])
        return ga, gb, gC, None, None, None


class _SymmetricOT(torch.autograd.Function):
    """OT_eps(a_p, a_p) over a symmetric C: 2 <a, f> - eps (sum P - 1); gradients 2 f, P."""

    @staticmethod
    def forward(ctx, a, C, eps, opts, reports):
        a64, C64 = a.detach().double(), C.detach().double()
        sol = solver.solve_symmetric(C64, a64, eps, opts)
        value = 2.0 * (a64 * sol.f).sum(-1) - eps * (sol.g - 1.0)
        reports.append(sol)
        ctx.save_for_backward(a64, C64, sol.f)
        ctx.eps, ctx.dtypes = eps, (a.dtype, C.dtype)
        return value.to(a.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        a64, C64, f = ctx.saved_tensors
        w = grad_out.double()
        ga = gC = None
        if ctx.needs_input_grad[0]:
            ga = (2.0 * w[:, None] * f).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            gC = solver.weighted_plan(C64, a64, a64, ctx.eps, f, f, w).to(ctx.dtypes[1])
        return ga, gC, None, None, None


def _check_logits(z, name):
    if not torch.is_tensor(z) or not z.is_floating_point():
        raise ValueError(f"Invalid {name}: must be a floating tensor")
    if z.ndim == 0 or z.shape[-1] == 0:
        raise ValueError(f"Invalid {name}: shape {tuple(z.shape)} has no bins")
    top = z.detach().amax(-1)
    for bad, what in ((torch.isnan(z.detach()).any(-1), "NaN"), (top == math.inf, "+inf")):
        if bool(bad.any()):
            raise ValueError(f"Invalid {name}: row {int(bad.flatten().nonzero()[0])} holds {what}")
    if bool((top == -math.inf).any()):
        row = int((top == -math.inf).flatten().nonzero()[0])
        raise ValueError(f"Invalid {name}: row {row} is all -inf (an empty histogram)")


def _check_cost(C, n, m, debiased):
    if not torch.is_tensor(C) or not C.is_floating_point():
        raise ValueError("Invalid cost: must be a floating tensor of shape (n, m)")
    if C.ndim != 2 or C.shape != (n, m):
        raise ValueError(f"Invalid cost shape: {tuple(C.shape)} (expected ({n}, {m}))")
    Cd = C.detach()
    if not bool(torch.isfinite(Cd).all()):
        raise ValueError("Invalid cost: holds NaN or inf")
    if bool((Cd < 0).any()):
        raise ValueError(f"Invalid cost: negative entries (min {float(Cd.min()):g})")
    if debiased and not torch.equal(Cd, Cd.t()):
        raise ValueError("Invalid cost: debiased=True needs a symmetric cost")


def grid_cost(n: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """C_ij = (x_i - x_j)^2 / 2 on the grid x_i = i / (n - 1) of [0, 1] (geomloss's p=2)."""
    x = torch.linspace(0.0, 1.0, n, dtype=dtype, device=device)
    return 0.5 * (x[:, None] - x[None, :]) ** 2


def _check_scalars(epsilon, n_iters, tol, temperature, reduction, scaling):
    eps = float(epsilon)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"Invalid epsilon: {epsilon!r} (must be finite and > 0)")
    if isinstance(n_iters, bool) or int(n_iters) != n_iters or n_iters < 1:
        raise ValueError(f"Invalid n_iters: {n_iters!r} (must be a positive integer)")
    if not (math.isfinite(float(tol)) and tol > 0):
        raise ValueError(f"Invalid tol: {tol!r} (must be finite and > 0)")
    if not (math.isfinite(float(temperature)) and temperature > 0):
        raise ValueError(f"Invalid temperature: {temperature!r} (must be finite and > 0)")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"Invalid reduction: {reduction!r}; expected one of {_REDUCTIONS}")
    if scaling is not None and not (0.0 < float(scaling) < 1.0):
        raise ValueError(f"Invalid scaling: {scaling!r} (must be in (0, 1) or None)")
    return eps


def _relax_option(overrelax):
    """None for ``"auto"``, else the target omega in (0, 2)."""
    if isinstance(overrelax, str) and overrelax == "auto":
        return None
    ok = isinstance(overrelax, (int, float)) and not isinstance(overrelax, bool)
    if not ok or not 0.0 < float(overrelax) < 2.0:
        raise ValueError(f"Invalid overrelax: {overrelax!r} (must be 'auto' or in (0, 2))")
    return float(overrelax)


def _reduce(values, reduction):
    if reduction == "sum":
        return values.sum()
    return values.mean() if reduction == "mean" else values


def sinkhorn_divergence(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    cost: torch.Tensor | Callable | None = None,
    *,
    epsilon: float = 1e-2,
    n_iters: int = 1000,
    debiased: bool = True,
    batchwise: bool = False,
    tol: float = 1e-6,
    temperature: float = 1.0,
    reduction: str = "mean",
    scaling: float | None = 0.5,
    released: bool = False,
    return_report: bool = False,
    domain: str = "auto",
    overrelax: float | str = "auto",
):
    """Sinkhorn divergence S_eps(softmax(p_logits / T), softmax(q_logits / T)).

    Args:
        p_logits, q_logits: sample-wise ``(..., n)`` and ``(..., m)`` with the same leading
            shape, one OT problem per row over the bins; batch-wise ``(B, V)`` each.
            Both may require grad.
        cost: sample-wise, a tensor ``(n, m)`` shared by all rows (non-negative, finite;
            symmetric when ``debiased``); None is ``(x_i - x_j)^2 / 2`` on the grid
            x = linspace(0, 1, n) (needs n = m). Batch-wise, None is SinKD's
            ``cdist(a, b, p=1)`` or a callable ``cost(a, b) -> (B, B)``, differentiated.
        epsilon: the entropic regularisation eps > 0 (in the units of the cost).
        n_iters: the most Sinkhorn iterations at eps (after eps-scaling); with
            ``released=True`` the exact number of normalisations.
        debiased: subtract OT_eps(a, a) / 2 + OT_eps(b, b) / 2.
        batchwise: SinKD's batch-wise form (uniform 1/B marginals).
        tol: stop when every pair's L1 marginal error is <= tol.
        temperature: T > 0 dividing both logits.
        reduction: sample-wise ``"mean"``, ``"sum"`` or ``"none"`` (leading shape).
        scaling: eps-scaling factor per annealing stage from max C down to eps, None: off.
        released: batch-wise only: SinKD's released loss (see the module docstring).
        return_report: also return a :class:`SinkhornReport`.
        domain: ``"auto"`` (scaling domain while max C / eps <= 600, else log), ``"log"``,
            ``"scaling"``.
        overrelax: the over-relaxation of the iterations at eps. ``"auto"``: w = 1 for 16
            iterations, then raised to the SOR optimum of the measured rate (a heuristic,
            no guarantee, back to 1 if the error grows). A float omega in (0, 2): that
            target, taken at a half-step only where it keeps a tenth of the plain step's
            decrease of the dual (else halved towards 1), so convergence is guaranteed
            (:mod:`._sinkhorn_relax`); 1.0 is plain Sinkhorn.

    Returns the value in the inputs' dtype (solved in float64), or ``(value, report)``.
    A solve that stops at ``n_iters`` above ``tol`` warns (RuntimeWarning).

    Raises:
        ValueError: non-tensor or non-float logits, shape or bins mismatch, NaN / +inf logits
            or an all -inf row, bad cost (shape, NaN, negative, asymmetric when debiased),
            epsilon <= 0, n_iters < 1, tol <= 0, T <= 0, bad reduction / scaling / domain,
            ``overrelax`` neither ``"auto"`` nor a number in (0, 2), ``released`` without
            ``batchwise``.
    """
    eps = _check_scalars(epsilon, n_iters, tol, temperature, reduction, scaling)
    if domain not in ("auto", "log", "scaling"):
        raise ValueError(f"Invalid domain: {domain!r}; expected 'auto', 'log' or 'scaling'")
    _check_logits(p_logits, "p_logits")
    _check_logits(q_logits, "q_logits")
    if p_logits.shape[:-1] != q_logits.shape[:-1]:
        raise ValueError(
            f"Invalid shapes: p_logits {tuple(p_logits.shape)}, q_logits "
            f"{tuple(q_logits.shape)} (leading shapes differ)"
        )
    if p_logits.device != q_logits.device:
        raise ValueError(f"Invalid devices: {p_logits.device} and {q_logits.device}")
    if released and not batchwise:
        raise ValueError("Invalid released=True: SinKD's released loss is batch-wise only")
    a = torch.softmax(p_logits / temperature, dim=-1)
    b = torch.softmax(q_logits / temperature, dim=-1)
    omega = _relax_option(overrelax)
    opts = solver.Options(
        tol=float(tol), max_iter=int(n_iters), scaling=scaling, domain=domain, omega=omega
    )
    reports: list = []
    if batchwise:
        value = _batchwise(a, b, cost, eps, int(n_iters), debiased, released, opts, reports)
    else:
        value = _samplewise(a, b, cost, eps, debiased, reduction, opts, reports)
    report = _report(reports, eps, float(tol), int(n_iters), released)
    if not report.converged:
        warnings.warn(
            f"sinkhorn_divergence: marginal error {report.marginal_error:.3g} > tol {tol:g} "
            f"after n_iters={n_iters} at epsilon={eps:g}; raise n_iters or epsilon",
            RuntimeWarning,
            stacklevel=2,
        )
    return (value, report) if return_report else value


def _samplewise(a, b, cost, eps, debiased, reduction, opts, reports):
    lead, n, m = a.shape[:-1], a.shape[-1], b.shape[-1]
    if cost is None:
        if n != m:
            raise ValueError(f"Invalid bins: p has {n}, q has {m} (the default cost needs n = m)")
        cost = grid_cost(n, dtype=torch.float64, device=a.device)
    elif callable(cost) and not torch.is_tensor(cost):
        raise ValueError("Invalid cost: a callable cost is for batchwise=True only")
    _check_cost(cost, n, m, debiased)
    if cost.device != a.device:
        raise ValueError(f"Invalid cost device: {cost.device} (logits on {a.device})")
    A, Bq = a.reshape(-1, n), b.reshape(-1, m)
    pairs = A.shape[0]
    values = _EntropicOT.apply(A, Bq, cost, eps, opts, reports)
    if debiased:
        # the symmetric pairs (a, a) and (b, b) in one solve over the same C
        sym = _SymmetricOT.apply(torch.cat([A, Bq]), cost, eps, opts, reports)
        values = values - 0.5 * sym[:pairs] - 0.5 * sym[pairs:]
    return _reduce(values.reshape(lead), reduction)


def _batchwise(a, b, cost, eps, n_iters, debiased, released, opts, reports):
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"Invalid shapes for batchwise: {tuple(a.shape)}, {tuple(b.shape)} "
            "(expected two (B, V) of the same shape)"
        )
    if cost is None:

        def cost(x, y):
            return torch.cdist(x, y, p=1)

    elif not callable(cost) or torch.is_tensor(cost):
        raise ValueError("Invalid cost: batchwise=True takes a callable cost(a, b) or None")
    B = a.shape[0]
    W = cost(a, b)
    if not torch.is_tensor(W) or W.shape != (B, B):
        raise ValueError(f"Invalid cost: cost(a, b) must return ({B}, {B})")
    if released:
        P = torch.exp(-W / eps)
        for _ in range(n_iters):
            P = P / P.sum(dim=1, keepdim=True)
            P = P / P.sum(dim=0, keepdim=True)
        return (P * W).sum()
    w = torch.full((1, B), 1.0 / B, dtype=torch.float64, device=a.device)

    def ot(C):
        _check_cost(C, B, B, False)
        return _EntropicOT.apply(w, w, C, eps, opts, reports)[0]

    value = ot(W)
    if debiased:
        for Wxx in (cost(a, a), cost(b, b)):
            Wxx = 0.5 * (Wxx + Wxx.t())  # symmetric to rounding; exactly, for the solver
            _check_cost(Wxx, B, B, True)
            value = value - 0.5 * _SymmetricOT.apply(w, Wxx, eps, opts, reports)[0]
    return value.to(a.dtype)


def _report(reports, eps, tol, n_iters, released):
    if released:
        return SinkhornReport(n_iters, math.nan, True, "released", eps, tol)
    err = max(float(s.marginal_error.max()) for s in reports)
    its = max(s.iterations for s in reports)
    dom = "log" if any(s.domain == "log" for s in reports) else "scaling"
    return SinkhornReport(its, err, err <= tol, dom, eps, tol)

"""Entropic OT between many histogram pairs over ONE cost matrix: the Sinkhorn solver.

For a pair (a, b) of histograms (a in the n-simplex, b in the m-simplex), a cost C (n, m)
and epsilon > 0, the problem solved is

    OT_eps(a, b) = min_{P >= 0, P 1 = a, P^T 1 = b}  <P, C> + eps KL(P || a b^T),

with KL(P || Q) = sum P log(P / Q) - P + Q. Its dual is

    OT_eps(a, b) = max_{f, g}  <a, f> + <b, g> - eps <a b^T, exp((f + g^T - C) / eps) - 1>,

the optimal plan is P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps), and the Sinkhorn
iterations alternate the two exact block maximisations

    f_i = -eps log sum_j b_j exp((g_j - C_ij) / eps)      (then P 1 = a exactly)
    g_j = -eps log sum_i a_i exp((f_i - C_ij) / eps)      (then P^T 1 = b exactly).

The dual objective at the last half-step, <a, f> + <b, g> - eps (sum P - 1), is a lower
bound of OT_eps whose error is quadratic in the error of the potentials.

Two domains, the same iterations:

* **scaling**: U = exp(f / eps), V = exp(g / eps), K = exp(-C / eps) is shared by all
  pairs, so a half-step for all B pairs is ONE matrix product K (b * V)^T of
  (n, m) x (m, B). The potentials have oscillation <= max C, so in float64 this is safe while
  max C / eps <= ``SCALING_LIMIT`` (600: every K entry, U and V stay inside
  [e^-650, e^650]); every iteration is checked, and a non-finite or zero scaling sends the
  solve to the log domain from the last good potentials.
* **log**: the same maps as chunked logsumexps over (pairs, n, m), memory
  O(chunk * n * m); any eps.

eps-scaling: the solve anneals eps_k = max(eps, max C * scaling^k), ``stage_iters``
iterations per stage, then iterates at eps until the L1 error of the column marginal
(the row marginal is exact after each f-update) is <= tol for every pair, or ``max_iter``.
Everything is float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._sinkhorn_relax import relaxed_scaling, safe_omega

SCALING_LIMIT = 600.0
_CHUNK_ENTRIES = 1 << 22  # 32 MB of float64 per logsumexp temporary


@dataclass
class Solution:
    """Potentials (pairs, n) / (pairs, m) at eps, float64, and how they were reached."""

    f: torch.Tensor
    g: torch.Tensor
    iterations: int
    marginal_error: torch.Tensor  # (pairs,) L1 error of P^T 1 - b before the last f-update
    domain: str


def _softmin_rows(C, w, h, eps, out):
    """out[p, i] = -eps log sum_j w[p, j] exp((h[p, j] - C[i, j]) / eps), chunked over p."""
    n, m = C.shape
    logw = torch.log(w)
    chunk = max(1, _CHUNK_ENTRIES // max(n * m, 1))
    for s in range(0, w.shape[0], chunk):
        z = (logw[s : s + chunk] + h[s : s + chunk] / eps).unsqueeze(1) - C / eps
        out[s : s + chunk] = -eps * torch.logsumexp(z, dim=-1)
    return out


class _Relax:
    """Over-relaxation f <- (1 - w) f + w T(f) (Thibault et al. 2017; Lehmann et al. 2021).

    Sinkhorn is block Gauss-Seidel on the dual; near the optimum it contracts linearly at
    rate rho, and relaxation by w has the SOR rate lambda, the largest root of
    (lambda + w - 1)^2 = lambda w^2 rho, smallest (w - 1) at w* = 2 / (1 + sqrt(1 - rho)).
    w = 1 for ``warmup`` iterations, then every ``period`` iterations the measured rate
    lambda of the marginal error gives rho = (lambda + w - 1)^2 / (lambda w^2) and w is
    raised to w* (capped at 1.95). Back to w = 1 for good if the error grows above 10x
    its best.

    ``safe=omega``: instead, the fixed target omega, checked at every half-step by the
    sufficient-decrease rule of :mod:`._sinkhorn_relax` (per pair; convergence guaranteed).
    """

    def __init__(self, enabled, warmup=16, period=8, updates=2, safe=None):
        self.enabled, self.warmup, self.period, self.w = enabled, warmup, period, 1.0
        self.history, self.best, self.off, self.updates = [], math.inf, False, updates
        self.safe = safe

    def fresh(self):
        return _Relax(self.enabled, safe=self.safe)

    def update(self, err):
        if not self.enabled or self.off or self.safe is not None:
            return
        self.best = min(self.best, err)
        if self.w > 1.0 and err > 10.0 * self.best:
            self.w, self.off = 1.0, True
            return
        self.history.append(err)
        k, p = len(self.history), self.period
        if k < self.warmup or (k - self.warmup) % p or not self.history[k - 1 - p] > 0:
            return
        if self.updates <= 0:
            return
        self.updates -= 1
        lam = (err / self.history[k - 1 - p]) ** (1.0 / p)
        w = self.w
        if not 0.0 < lam < 1.0 or lam <= w - 1.0 + 1e-3:
            return
        rho = min((lam + w - 1.0) ** 2 / (lam * w * w), 1.0)
        self.w = max(w, min(1.95, 2.0 / (1.0 + math.sqrt(1.0 - rho))))


def _log_solve(C, a, b, eps, f, g, tol, max_iter, check_every, relax):
    """Log-domain iterations from (f, g); returns f (rows exact), g, iterations, error."""
    Ct = C.t()
    err = torch.full((a.shape[0],), math.inf, dtype=a.dtype, device=a.device)
    it = 0
    while it < max_iter:
        w = relax.w
        fT = _softmin_rows(C, b, g, eps, torch.empty_like(f))
        if relax.safe is not None:  # (f - fT) / eps: the logs of the row-marginal ratios
            f_new = f - safe_omega(a, (f - fT) / eps, relax.safe) * (f - fT)
        else:
            f_new = fT if w == 1.0 else (1.0 - w) * f + w * fT
        gT = _softmin_rows(Ct, a, f_new, eps, torch.empty_like(g))
        it += 1
        if it % check_every == 0 or it == max_iter:
            # marginals of the plan (f_new, g): rows a e^{(f_new - fT)/eps}, cols b e^{(g - gT)/eps}
            err = (a * torch.expm1((f_new - fT) / eps)).abs().sum(-1)
            err = err + (b * torch.expm1((g - gT) / eps)).abs().sum(-1)
            relax.update(float(err.max()))
        if relax.safe is not None:
            g = g - safe_omega(b, (g - gT) / eps, relax.safe) * (g - gT)
        else:
            g = gT if w == 1.0 else (1.0 - w) * g + w * gT
        f = f_new
        if float(err.max()) <= tol:
            break
    f = _softmin_rows(C, b, g, eps, torch.empty_like(f))
    return f, g, it, err


def _scaling_solve(C, a, b, eps, f, g, tol, max_iter, check_every, relax):
    """Scaling-domain iterations; returns (f, g, iterations, error, ok)."""
    K = torch.exp(-C / eps)
    U, V = torch.exp(f / eps), torch.exp(g / eps)
    err = torch.full((a.shape[0],), math.inf, dtype=a.dtype, device=a.device)
    it = 0
    while it < max_iter:
        w = relax.w
        R = (b * V) @ K.t()  # (pairs, n): (K (b V))_i
        if relax.safe is not None:  # log(U R): the logs of the row-marginal ratios
            U_new = relaxed_scaling(a, U, torch.log(U * R), relax.safe)
        else:
            U_new = 1.0 / R if w == 1.0 else U ** (1.0 - w) * R ** (-w)
        S = (a * U_new) @ K  # (pairs, m): (K^T (a U))_j
        if relax.safe is not None:
            V_new = relaxed_scaling(b, V, torch.log(V * S), relax.safe)
        else:
            V_new = 1.0 / S if w == 1.0 else V ** (1.0 - w) * S ** (-w)
        it += 1
        check = it % check_every == 0 or it == max_iter
        if check:
            good = bool(torch.isfinite(U_new).all() and torch.isfinite(V_new).all())
            good = good and bool((U_new > 0).all() and (V_new > 0).all())
            if not good:
                return eps * torch.log(U), eps * torch.log(V), it - 1, err, False
            # the marginals of the plan (U_new, V): rows a U_new R, columns b V S
            err = (a * (U_new * R - 1.0)).abs().sum(-1) + (b * (V * S - 1.0)).abs().sum(-1)
            relax.update(float(err.max()))
        U, V = U_new, V_new
        if check and float(err.max()) <= tol:
            break
    U_last = 1.0 / ((b * V) @ K.t())
    if not bool(torch.isfinite(U_last).all() and (U_last > 0).all()):
        return eps * torch.log(U), eps * torch.log(V), it, err, False
    return eps * torch.log(U_last), eps * torch.log(V), it, err, True


def _balance(f, g):
    """(f + s, g - s) with s per pair so that max f = max g (same plan, same dual value)."""
    s = 0.5 * (g.amax(-1, keepdim=True) - f.amax(-1, keepdim=True))
    return f + s, g - s


@dataclass(frozen=True)
class Options:
    """How a solve runs: at eps until every pair's L1 marginal error is <= ``tol`` (tested
    every ``check_every`` iterations) or ``max_iter`` iterations, after eps-scaling by
    ``scaling`` per stage (None: off) with ``stage_iters`` iterations each; ``domain``
    ``"auto"``, ``"scaling"`` or ``"log"``; ``relax``: the adaptive over-relaxation of
    :class:`_Relax` at eps; ``omega``: instead, that fixed target with the safe rule of
    :mod:`._sinkhorn_relax`."""

    tol: float
    max_iter: int
    scaling: float | None = 0.5
    stage_iters: int = 2
    domain: str = "auto"
    check_every: int = 1
    relax: bool = True
    omega: float | None = None


def solve(C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, opts: Options) -> Solution:
    """Sinkhorn potentials for the pairs (a[p], b[p]) over the shared cost C (float64)."""
    pairs, n = a.shape
    m = b.shape[1]
    f = torch.zeros(pairs, n, dtype=C.dtype, device=C.device)
    g = torch.zeros(pairs, m, dtype=C.dtype, device=C.device)
    cmax = float(C.max()) if C.numel() else 0.0

    def step(e, tol_e, iters, every, final, carry):
        f, g, used = carry
        relax = _Relax(opts.relax and final, safe=opts.omega if final else None)
        f, g, it, err, used = _stage(
            C, a, b, e, f, g, cmax, tol_e, iters, opts.domain, every, used, relax
        )
        return (f, g, used), it, err

    (f, g, used), it, err = _anneal(step, (f, g, "scaling"), cmax, eps, opts)
    return Solution(f, g, it, err, used)


def _schedule(cmax, eps, scaling):
    out = []
    if scaling is not None and cmax > eps:
        e = cmax
        while e > eps:
            out.append(e)
            e *= scaling
    return out


def _anneal(step, carry, cmax, eps, opts):
    """eps-scaling: ``step(e, tol, iters, check_every, final, carry) -> (carry, it, err)``
    for every annealing stage e of :func:`_schedule` (``opts.stage_iters`` iterations, no
    stopping test, ``final=False``), then at eps to ``opts.tol`` or ``opts.max_iter``
    (``final=True``); returns the last step's ``(carry, it, err)``."""
    for e in _schedule(cmax, eps, opts.scaling):  # annealing stages: a few iterations each
        carry, _, _ = step(e, -1.0, opts.stage_iters, 1, False, carry)
    return step(eps, opts.tol, opts.max_iter, opts.check_every, True, carry)


def _stage(C, a, b, eps, f, g, cmax, tol, iters, domain, check_every, used, relax):
    f, g = _balance(f, g)
    if domain == "scaling" or (domain == "auto" and cmax / eps <= SCALING_LIMIT):
        f2, g2, it, err, ok = _scaling_solve(C, a, b, eps, f, g, tol, iters, check_every, relax)
        if ok:
            return f2, g2, it, err, used
        if domain == "scaling":
            raise FloatingPointError(
                f"Sinkhorn: the scaling domain over/underflowed at epsilon={eps:g} "
                f"(max C / epsilon = {cmax / eps:.3g}); use domain='log'"
            )
        f, g, iters = f2, g2, max(iters - it, 1)
    relax = relax.fresh()
    f, g, it2, err = _log_solve(C, a, b, eps, f, g, tol, iters, check_every, relax)
    return f, g, it2, err, "log"


def dual_value(a, b, f, g):
    """<a, f> + <b, g>: the dual value when f is exact for the rows (then sum P = 1)."""
    return (a * f).sum(-1) + (b * g).sum(-1)


def weighted_plan(C, a, b, eps, f, g, weights):
    """sum_p weights[p] P_p, the gradient of sum_p weights[p] OT_eps(a_p, b_p) w.r.t. C."""
    n, m = C.shape
    out = torch.zeros(n, m, dtype=C.dtype, device=C.device)
    chunk = max(1, _CHUNK_ENTRIES // max(n * m, 1))
    la, lb = torch.log(a), torch.log(b)
    for s in range(0, a.shape[0], chunk):
        z = (la[s : s + chunk] + f[s : s + chunk] / eps).unsqueeze(-1) + (
            lb[s : s + chunk] + g[s : s + chunk] / eps
        ).unsqueeze(1)
        out += (weights[s : s + chunk, None, None] * torch.exp(z - C / eps)).sum(0)
    return out


def solve_symmetric(C: torch.Tensor, a: torch.Tensor, eps: float, opts: Options) -> Solution:
    """OT_eps(a, a) for a symmetric C: the averaged map f <- (f + T_a(f)) / 2 with
    T_a(f)_i = -eps log sum_j a_j exp((f_j - C_ij) / eps) (Feydy et al. 2019), which
    converges in a few iterations. ``marginal_error`` is the L1 error of P 1 - a with
    P = diag(a e^{f/eps}) K diag(a e^{f/eps}); ``f`` is the final iterate, ``g`` its mass
    sum P. One matrix product per iteration for all histograms; the averaged map needs no
    relaxation (``opts.relax`` is not used)."""
    cmax = float(C.max()) if C.numel() else 0.0

    def step(e, tol_e, iters, every, final, carry):
        f, it, err, mass_dom = _sym_stage(C, a, e, carry[0], cmax, tol_e, iters, opts.domain, every)
        return (f, mass_dom), it, err

    (f, (mass, used)), it, err = _anneal(step, (torch.zeros_like(a), None), cmax, eps, opts)
    return Solution(f, mass, it, err, used)


def _sym_stage(C, a, eps, f, cmax, tol, iters, domain, check_every):
    if domain == "scaling" or (domain == "auto" and cmax / eps <= SCALING_LIMIT):
        K = torch.exp(-C / eps)
        U = torch.exp(f / eps)
        err = torch.full((a.shape[0],), math.inf, dtype=a.dtype, device=a.device)
        ok, it = True, 0
        while it < iters:
            R = (a * U) @ K  # K symmetric
            it += 1
            if it % check_every == 0 or it == iters:
                err = (a * (U * R - 1.0)).abs().sum(-1)
                if not bool(torch.isfinite(err).all()):
                    ok = False
                    break
                if float(err.max()) <= tol:
                    break
            U = torch.sqrt(U / R)
        if ok:
            R = (a * U) @ K
            mass = (a * U * R).sum(-1)
            if bool(torch.isfinite(mass).all() and (U > 0).all()):
                return eps * torch.log(U), it, err, (mass, "scaling")
        if domain == "scaling":
            raise FloatingPointError(
                f"Sinkhorn: the scaling domain over/underflowed at epsilon={eps:g}; use 'log'"
            )
    err = torch.full((a.shape[0],), math.inf, dtype=a.dtype, device=a.device)
    it = 0
    while it < iters:
        fT = _softmin_rows(C, a, f, eps, torch.empty_like(f))
        it += 1
        if it % check_every == 0 or it == iters:
            err = (a * torch.expm1((f - fT) / eps)).abs().sum(-1)
            if float(err.max()) <= tol:
                break
        f = 0.5 * (f + fT)
    fT = _softmin_rows(C, a, f, eps, torch.empty_like(f))
    mass = (a * torch.exp((f - fT) / eps)).sum(-1)
    return f, it, err, (mass, "log")

"""Multi-shift conjugate gradients: ``(A + s_i I) x_i = b`` for several shifts from ONE run.

Krylov spaces are shift-invariant, ``K_k(A + s I, b) = K_k(A, b)``, and CG started at ``x = 0``
on ``A_0 = H + sigma_0 I`` (the *base* shift) builds residuals ``r_k`` that span them. The
residual of CG on a shifted system ``A_0 + s I`` (``s = sigma - sigma_0``), also started at
zero, lies in ``K_{k+1}`` and is orthogonal to ``K_k``, so it is collinear with the base
residual: ``r_k^s = zeta_k^s r_k``. With the base CG's scalars::

    alpha_k = r_k^T r_k / p_k^T A_0 p_k,   beta_k = r_{k+1}^T r_{k+1} / r_k^T r_k,
    x_{k+1} = x_k + alpha_k p_k,  r_{k+1} = r_k - alpha_k A_0 p_k,  p_{k+1} = r_{k+1} + beta_k p_k,

each shift follows by scalar recurrences and two vectors of its own (Jegerlehner 1996;
Frommer 2003), ``zeta_0 = zeta_{-1} = 1``, ``alpha_{-1} = 1``, ``beta_{-1} = 0``::

    zeta_{k+1} = zeta_k zeta_{k-1} alpha_{k-1} / D_k,
    D_k        = alpha_k beta_{k-1} (zeta_{k-1} - zeta_k) + zeta_{k-1} alpha_{k-1} (1 + s alpha_k),
    alpha_k^s  = alpha_k zeta_{k+1} / zeta_k,       beta_k^s = (zeta_{k+1} / zeta_k)^2 beta_k,
    x_{k+1}^s  = x_k^s + alpha_k^s p_k^s,          p_{k+1}^s = zeta_{k+1} r_{k+1} + beta_k^s p_k^s,

with ``x_0^s = 0`` and ``p_0^s = b``. In exact arithmetic ``x_k^s`` *is* the k-th iterate of a
separate CG on ``(A_0 + s I) x = b`` from zero, its residual norm is ``|zeta_k^s| |r_k|``, and
its curvature ``p_k^{sT} (A_0 + s I) p_k^s = |r_k^s|^2 / alpha_k^s``. So every shift keeps the
stopping rule and the breakdown test of :func:`~torchsteer.linalg.shifted_solvers.shifted_cg`
on its own: shift ``i`` stops (its ``x`` frozen) at the first ``k`` with
``|zeta_k^s| |r_k| <= tol |b|``; it breaks down (stops at the iterate before) when
``alpha_k^s`` is not positive; all stop at ``maxiter``. The base runs while any shift is
active, one product ``H p_k`` per iteration for all of them. If the base itself meets
non-positive (or NaN) curvature the run ends: the base reports the breakdown and the shifts
still running report ``unfinished`` (their iterate is that of a CG that has not stopped; a
caller that needs them solves again with one of them as the base).

The scalars are host floats (float64), two reads per iteration (``p^T A_0 p`` and
``r^T r``, inner products in the working dtype as in ``shifted_cg``); the vectors are
updated in place. Memory: ``x, r, p, A_0 p`` for the base and ``x^s, p^s`` per further shift
(``p^s`` freed when the shift stops).

References:
    Jegerlehner, "Krylov space solvers for shifted linear systems", arXiv:hep-lat/9612014,
    1996; Frommer, "BiCGStab(l) for families of shifted linear systems", Computing 70, 2003;
    Saad, "Iterative Methods for Sparse Linear Systems", 2003, Sec. 7.3.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

__all__ = ["MultiShiftResult", "multishift_cg"]


@dataclasses.dataclass
class MultiShiftResult:
    """One shift's outcome: ``x``, iterations it ran, and how it stopped."""

    x: torch.Tensor
    iterations: int
    converged: bool
    breakdown: bool
    unfinished: bool  # the base broke down while this shift was still running
    residual_norm: float
    finite: bool = True


def multishift_cg(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    shifts: Sequence[float],
    tol: float = 1e-6,
    maxiter: int | None = None,
    consume_b: bool = False,
) -> tuple[list[MultiShiftResult], int]:
    """CG on ``(H + shifts[i] I) x = b`` for every shift at once, ``matvec(v) = H v``.

    ``shifts[0]`` is the base (the system CG runs on; put the hardest, the smallest shift,
    first); see the module for the recurrences. ``b`` is a (P,) vector; with ``consume_b``
    it becomes the residual's storage (one P-vector less; the caller must not read it after).

    Returns:
        ``(results, products)``: a :class:`MultiShiftResult` per shift, in the order of
        ``shifts``, and the products ``H p`` the run took (its iterations).
    """
    if not (tol >= 0):
        raise ValueError(f"Invalid tol: {tol}")
    if b.dim() != 1:
        raise ValueError(f"Invalid b: expected a vector, got shape {tuple(b.shape)}")
    if not shifts or not all(math.isfinite(s) for s in shifts):
        raise ValueError(f"Invalid shifts: {list(shifts)} (at least one, all finite)")
    maxiter = 10 * b.numel() if maxiter is None else maxiter
    n = len(shifts)
    base = float(shifts[0])
    rel = [float(s) - base for s in shifts]
    threshold = tol * float(torch.linalg.vector_norm(b).double())
    r = b if consume_b else b.clone()
    p = b.clone()
    xs = [torch.zeros_like(b) for _ in range(n)]
    ps: list[torch.Tensor | None] = [None] + [b.clone() for _ in range(n - 1)]
    zeta, zeta_prev = [1.0] * n, [1.0] * n
    alpha_prev, beta_prev = 1.0, 0.0
    rs = float(r @ r)
    res = math.sqrt(rs)
    active = [res > threshold for _ in range(n)]
    final = [res] * n  # each shift's residual norm where it stopped
    iters, broke, unfinished = [0] * n, [False] * n, [False] * n
    it = 0
    while any(active) and it < maxiter:
        Ap = matvec(p)
        Ap.add_(p, alpha=base)
        pap = float(p @ Ap)
        if not pap > 0 or not math.isfinite(rs / pap):  # the base meets non-positive curvature
            if active[0]:
                broke[0] = True
            for i in range(1, n):
                unfinished[i] = active[i]
            break
        alpha = rs / pap
        new_zeta = list(zeta)
        for i in range(1, n):
            if not active[i]:
                continue
            den = alpha * beta_prev * (zeta_prev[i] - zeta[i]) + zeta_prev[i] * alpha_prev * (
                1.0 + rel[i] * alpha
            )
            z = zeta[i] * zeta_prev[i] * alpha_prev / den if den != 0 else math.nan
            a_s = alpha * z / zeta[i]
            if not (a_s > 0 and math.isfinite(a_s)):  # this shift's own breakdown
                broke[i], active[i], ps[i] = True, False, None
                final[i] = abs(zeta[i]) * res
                continue
            xs[i].add_(ps[i], alpha=a_s)
            iters[i] += 1
            new_zeta[i] = z
        if active[0]:
            xs[0].add_(p, alpha=alpha)
            iters[0] += 1
        r.add_(Ap, alpha=-alpha)
        del Ap
        rs_new = float(r @ r)
        beta = rs_new / rs if rs > 0 else 0.0
        for i in range(1, n):
            if active[i]:
                ratio = new_zeta[i] / zeta[i]
                ps[i].mul_(ratio * ratio * beta).add_(r, alpha=new_zeta[i])
        p.mul_(beta).add_(r)
        zeta_prev, zeta = zeta, new_zeta
        alpha_prev, beta_prev, rs = alpha, beta, rs_new
        res = math.sqrt(max(rs, 0.0))
        it += 1
        for i in range(n):
            if active[i]:
                final[i] = abs(zeta[i]) * res
                if final[i] <= threshold:
                    active[i], ps[i] = False, None
    out = []
    for i in range(n):
        norm = final[i]
        out.append(
            MultiShiftResult(
                xs[i],
                iters[i],
                converged=not broke[i] and not unfinished[i] and norm <= threshold,
                breakdown=broke[i],
                unfinished=unfinished[i],
                residual_norm=norm,
                finite=bool(torch.isfinite(xs[i]).all()),
            )
        )
    return out, it

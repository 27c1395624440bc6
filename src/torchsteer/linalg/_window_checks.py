"""The accuracy checks of one M-FAC window step (:meth:`GradientWindow.add_and_coefficients`).

With ``A = m λ I + K`` (``K = G G^T`` the stored Gram), ``M ≈ A^{-1}`` and the gradient
``g`` just written in row ``j``, the step's coefficients are ``x = m M e_j`` and
``F^{-1} g = u = G^T x``. Each check is O(m) to O(m^2) and all their scalars come to the host
in one transfer (:func:`coefficients`):

1. **the solve** (:func:`solved`): the residual ``r = A x - m e_j`` changes ``g^T u`` by at
   most ``|g| |r| / (2 √(m λ))``; above ``PASS_TOLERANCE`` of ``g^T u`` the inverse has drifted
   and is recomputed;
2. **the second pass** (:func:`pass_error`): ``G^T x`` summed in a dtype of unit roundoff
   ``ε`` errs by about ``ε √m Σ_i |x_i| |g_i|``, so ``g^T u`` by ``|g|`` times that;
3. **the Gram row** (:func:`gram_error`): the stored ``K`` differs from the exact Gram of
   the stored rows by ``E`` with ``|E_ji| ≈ ε √d |g_j| |g_i|`` (a dot product of length
   ``d`` in the window's compute dtype). Since the exact ``g^T u = (K_exact x)_j`` and the
   computed one is ``(K x)_j``, the error is ``(E x)_j``:

   .. math::  |(E x)_j| \\approx ε \\sqrt{d}\\, |g_j|
              \\Bigl(\\textstyle\\sum_i x_i^2 |g_i|^2\\Bigr)^{1/2}

   taking the rounding errors ``E_ji`` as independent (their root-mean-square sum). Nearly
   dependent gradients make ``x`` large (``~1/λ``) in directions ``G^T`` nearly annihilates,
   and this error then exceeds ``g^T u`` itself: the step goes uphill although every other
   check holds. Above ``GRAM_TOLERANCE`` the window computes its Gram in float64. Measured
   (float32, 1 thread): where a Gram row's actual error exceeded 1 % of ``g^T u`` (near-
   duplicate gradients, m = 256 and 1024) the estimate was at least 0.56; in training an MLP
   on digits (d = 4,810 and 38,090) it was at most 4e-4, against an actual error of at most
   1e-5, so the threshold fires only where the step is at risk, up to blocks of ~1e9.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from torchsteer.linalg.gradient_window import GradientWindow

__all__ = [
    "GRAM_TOLERANCE",
    "PASS_TOLERANCE",
    "Checks",
    "CheckedSteps",
    "NonFiniteGradientError",
    "check_gradient",
    "coefficient_values",
    "coefficients",
    "gram_error",
    "nonfinite_error",
    "pass_error",
    "solved",
]

PASS_TOLERANCE = 1e-2  # relative error of g^T u allowed to the solve and to the second pass
GRAM_TOLERANCE = 1e-1  # the Gram rows' estimated (root-mean-square) relative error of g^T u


class NonFiniteGradientError(ValueError):
    """A gradient with NaN/Inf entries (or a squared norm overflowing the window dtype)."""


def check_gradient(g: torch.Tensor, dim: int, dtype: torch.dtype, compute: torch.dtype) -> None:
    """Raise ``ValueError`` unless ``g`` has shape ``(dim,)``, and
    :class:`NonFiniteGradientError` unless it can enter a window of ``dtype`` computed in
    ``compute``: one pass, ``g . g`` is finite iff ``g`` has no NaN/Inf and its squared norm
    does not overflow. Host sync (an accept/reject test)."""
    if g.shape != (dim,):
        raise ValueError(f"Invalid gradient shape: {tuple(g.shape)}, expected ({dim},)")
    gw = g.to(dtype).to(compute)
    if not bool(torch.isfinite(torch.dot(gw, gw))):
        raise nonfinite_error(dtype)


def nonfinite_error(dtype: torch.dtype) -> NonFiniteGradientError:
    """The error of a gradient refused by :func:`check_gradient` (not raised)."""
    return NonFiniteGradientError(
        "Invalid gradient: contains NaN/Inf or its squared norm overflows "
        f"{dtype}; the window was left unchanged"
    )


class Checks(NamedTuple):
    """The scalars of one step's checks, read from the device in one transfer."""

    kjj: float  # K_jj = |g|^2
    xkx: float  # x^T K x = |F^{-1} g|^2
    gu: float  # (K x)_j = g^T u
    rnorm: float  # |A x - m e_j|
    spread: float  # sum_i |x_i| sqrt(K_ii)
    spread2: float  # (sum_i x_i^2 K_ii)^(1/2)


def coefficients(w: GradientWindow, j: int) -> tuple[torch.Tensor, torch.Tensor, Checks]:
    """``x = m M e_j``, ``K x`` and the checks' scalars (one host synchronization)."""
    x, kx, values = coefficient_values(w, j)
    return x, kx, Checks(*values.tolist())


def coefficient_values(w: GradientWindow, j: int, first=(), x=None) -> tuple[torch.Tensor, ...]:
    """:func:`coefficients` with the checks' scalars as an unread float64 device tensor,
    after the 0-d float64 tensors ``first``; ``x``: ``m M e_j`` if already known."""
    x = w.ngrads * w.inverse[:, j] if x is None else x
    kx = torch.mv(w.gram, x)
    residual = kx + w._shift * x
    residual[j] -= w.ngrads
    norms = w.gram.diagonal().clamp(min=0.0).sqrt()
    spread, spread2 = torch.dot(x.abs(), norms), (x * norms).norm()
    values = [w.gram[j, j], torch.dot(x, kx), kx[j], residual.norm(), spread, spread2]
    return x, kx, torch.stack([*first, *values])


def solved(w: GradientWindow, j: int, x: torch.Tensor, kx: torch.Tensor, c: Checks) -> bool:
    """Check 1: the change ``|g| |u - u*|`` of ``g^T u`` that the residual ``r`` can cause is
    at most ``PASS_TOLERANCE * g^T u`` (always true for ``g = 0``, where ``u = 0``). First by
    the bound ``|u - u*| <= |r| / (2 √(m λ))`` (O(m)); when that is not enough, by the
    estimate ``|u - u*|^2 = δ^T K δ`` with ``δ = A^{-1} r ≈ M r`` (two more O(m^2) products)."""
    if c.kjj == 0.0:
        return True
    if not c.gu > 0.0:
        return False
    limit = PASS_TOLERANCE * c.gu / c.kjj**0.5  # allowed |u - u*|
    if c.rnorm / (2.0 * w._shift**0.5) <= limit:
        return True
    residual = kx + w._shift * x
    residual[j] -= w.ngrads
    delta = torch.mv(w.inverse, residual)
    return float(torch.dot(delta, torch.mv(w.gram, delta))) <= limit**2


def _relative(w: GradientWindow, c: Checks, terms: int, spread: float) -> float:
    """``ε √terms |g| spread / g^T u`` in the compute dtype (0 in float64)."""
    if w.compute_dtype == torch.float64 or c.kjj == 0.0:
        return 0.0
    eps = torch.finfo(w.compute_dtype).eps  # stored values are exact: sums round
    error = eps * max(terms, 1) ** 0.5 * spread * c.kjj**0.5
    return error / c.gu if c.gu > 0.0 else float("inf")


def pass_error(w: GradientWindow, c: Checks) -> float:
    """Check 2: the relative error of ``g^T u`` that the pass ``G^T x`` in the window dtype
    may make (a sum of ``m`` terms). Duplicate gradients make ``x`` large (``~1/λ``) in
    directions that ``G^T`` annihilates, so the sum cancels and float32 loses everything."""
    return _relative(w, c, w.ngrads, c.spread)


def gram_error(w: GradientWindow, c: Checks) -> float:
    """Check 3: the relative error of ``g^T u`` that a Gram row computed in the compute dtype
    (dot products of length ``d``) may make, whichever dtype the stored row was computed in
    (the root-mean-square estimate of the module docstring)."""
    return _relative(w, c, w.dim, c.spread2)


class CheckedSteps:
    """The host-decided checks of a window step, mixed into ``GradientWindow``: checks 1-2
    with their refreshes, and the Gram's precision mode (check 3)."""

    def _checked_coefficients(self, j: int, first=None) -> tuple[torch.Tensor, Checks]:
        """Checks 1 and 2 of :meth:`add_and_coefficients`, refreshing ``M`` as they ask;
        ``first``: ``coefficients(self, j)`` already computed (``M`` unchanged since)."""
        x, kx, c = coefficients(self, j) if first is None else first
        if not c.xkx <= c.kjj * (1.0 + 1e-3) / self.damp**2:
            self.refresh(robust=True)
            x, kx, c = coefficients(self, j)
        for robust in (False, True):  # Cholesky; if still off, the clamped eigh
            if solved(self, j, x, kx, c):
                break
            self.accuracy_refreshes += 1
            self.refresh(robust=robust)
            x, kx, c = coefficients(self, j)
        return x, c

    def _gram_precision(self, error: float) -> bool:
        """Switch the Gram to float64 when ``error`` exceeds ``GRAM_TOLERANCE`` (recompute it
        and ``M``; returns ``True``: the coefficients must be recomputed); switch back after
        ``m`` calm steps in a row (``error`` below ``GRAM_TOLERANCE / 10``)."""
        if self.compute_dtype == torch.float64:
            return False
        if not self.float64_gram:
            if not error > GRAM_TOLERANCE:
                return False
            self.float64_gram, self.calm_steps = True, 0
            self.gram_rebuilds += 1
            self._recompute_gram()
            self.refresh()
            return True
        self.calm_steps = self.calm_steps + 1 if error <= GRAM_TOLERANCE / 10 else 0
        if self.calm_steps >= self.ngrads:
            self.float64_gram, self.calm_steps = False, 0
        return False

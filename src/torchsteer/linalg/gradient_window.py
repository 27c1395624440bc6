"""The M-FAC window algebra: inverse empirical Fisher over a ring buffer of gradients.

A ring buffer ``G`` (``m x d``) holds the last ``m`` gradients (rows start as zeros) and

.. math::

    F = \\lambda I + \\tfrac{1}{m} G^\\top G, \\qquad
    F^{-1} v = \\tfrac{1}{\\lambda}\\bigl(v - G^\\top (m\\lambda I + K)^{-1} G v\\bigr),
    \\qquad K = G G^\\top .

The divisor is the capacity ``m`` even while the window fills. The Gram ``K`` and the inverse
``M = (m lambda I + K)^{-1}`` are kept in float64. Replacing row ``j`` changes row and column
``j`` of ``K`` (one pass ``G g``, O(m d)) and ``M`` follows by a bordered-inverse (Schur
complement) update in O(m^2): remove index ``j``, then add it back with the new column. ``M``
is recomputed from ``K`` by Cholesky every ``refresh_every`` replacements (default ``m``, so
O(m^2) amortized). When rounding breaks the update (the Schur complement falls below half
its exact lower bound ``m lambda``, or the product exceeds ``||g|| / lambda``; this happens on
nearly dependent float32 gradients with ``1e-7 |g|^2 > m lambda``), ``M`` is recomputed by a
symmetric eigendecomposition with the Gram's eigenvalues clamped at 0.

For the gradient just written (row ``j``), ``G g = K e_j`` and ``(mλI + K)^{-1} K e_j =
e_j - m λ M e_j``, so

.. math::  F^{-1} g = m\\, G^\\top M e_j ,

one more pass over ``G`` and no cancellation between ``g`` and ``G^T c`` (the primal form
loses ``|g|^2 / (m λ)`` in relative accuracy). With duplicate (exactly dependent) gradients
``x = m M e_j`` is ~1/λ in directions that ``G^T`` annihilates: the pass ``G^T x`` then
cancels, and in float32 it is noise (uphill steps). Each step therefore checks, in O(m) to
O(m^2) (:mod:`~torchsteer.linalg._window_checks`), the solve's residual (a drifted ``M`` is
refreshed), the predicted error of a window-dtype pass (:attr:`~GradientWindow.pass_error`;
above ``PASS_TOLERANCE`` the pass is accumulated in float64, :meth:`~GradientWindow.combine`)
and that of the Gram rows (:attr:`~GradientWindow.gram_error`: *nearly* dependent gradients,
whose float32 Gram rounding exceeds ``m λ``; above ``GRAM_TOLERANCE`` the Gram is recomputed
and kept in float64). On independent gradients none fires and the numerics are unchanged: a
normal step costs exactly the two passes ``G g`` and ``G^T x`` plus O(d + m^2).

**Column shards** (distributed M-FAC): with ``reduce`` given, the window holds only a slice of
the ``d`` columns (``dim`` is the slice's length) and ``reduce`` sums a float64 tensor over the
shards (an all-reduce). Every product that contracts over ``d`` -- the Gram row ``G g``, ``G v``
in :meth:`solve`, the Gram in :meth:`rebuild` -- is a partial product reduced over the shards
(``m`` numbers a step; ``m^2`` in a rebuild), so ``K`` and ``M`` are the same on every shard and
the m x m algebra runs replicated. Vectors in and out (``g``, ``v``, ``F^{-1} g``, the inverse
diagonal) are the shard's slice. The finiteness test of a gradient is the reduced ``|g|^2``, so
every shard takes the same decision.

**Reduced-precision storage**: a float16/bfloat16 window stores ``G`` in that dtype but
computes in float32 (:attr:`~GradientWindow.compute_dtype`): the passes ``G g`` and ``G^T x``
upcast column blocks of about 4 M numbers to float32 (temporaries of 16 MB), the Gram and
``M`` stay float64 and ``F^{-1} g`` comes out in float32. The result is the exact product of
the *stored* (rounded) gradients up to float32 rounding. Float32 and float64 windows compute
in their own dtype, unchanged.

**Host synchronization**: :meth:`add_and_coefficients` decides on the host (a few reads a
step). :meth:`~torchsteer.linalg._window_device.DeviceStep.device_add` runs the same step
with every decision a device tensor (the ring position too, :attr:`ring`) and returns a
report to read in one transfer, then :meth:`~torchsteer.linalg._window_device.DeviceStep.
resolve` (bit for bit the host-decided step), or not to read (``MFAC(capturable=True)``):
see :mod:`~torchsteer.linalg._window_device`.

**Shared storage**: ``buffers=(grads, gram, inverse)`` lets a window live in given tensors
(e.g. column views of one larger window and slices of stacked Gram/inverse tensors, as
:class:`~torchsteer.linalg.blocked_window.BlockedGradientWindow` does); they are reset in
place.

References:
    Frantar, Kurtic, Alistarh. "M-FAC: Efficient Matrix-Free Approximations of Second-Order
    Information." NeurIPS 2021. arXiv:2107.03356.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from torchsteer.linalg import _window_checks as checks
from torchsteer.linalg._window_checks import (
    PASS_TOLERANCE,
    NonFiniteGradientError,
    nonfinite_error,
)
from torchsteer.linalg._window_device import DeviceStep
from torchsteer.linalg._window_host import HostStep

__all__ = ["PASS_TOLERANCE", "GradientWindow", "NonFiniteGradientError", "nonfinite_error"]

_STATE_KEYS = ("grads", "gram", "inverse", "index", "count", "since_refresh", "damp")
_GRAM_KEYS = ("float64_gram", "calm_steps")  # optional: older saves computed in float32


class GradientWindow(checks.CheckedSteps, DeviceStep, HostStep):
    """Ring buffer of ``m`` gradients with the inverse empirical Fisher products.

    ``F = damp * I + (1/m) G^T G`` with ``G`` the ``m x d`` window (empty rows are zeros).

    Args:
        ngrads: window capacity ``m``.
        dim: gradient length ``d``.
        damp: ``lambda`` > 0.
        dtype: dtype of the window ``G`` (the Gram and the m x m inverse are float64).
        device: device of all buffers.
        refresh_every: recompute the m x m inverse by Cholesky after this many O(m^2)
            updates (default ``ngrads``).
        reduce: for a column shard of a larger window, a function summing a float64 tensor
            over the shards (e.g. ``torchsteer.distributed.all_reduce_sum``); ``None`` for a
            whole window (one process).
        buffers: ``(grads, gram, inverse)`` tensors of shapes ``(m, dim)`` (``dtype``),
            ``(m, m)`` and ``(m, m)`` (float64) to hold the window instead of new ones;
            they are overwritten (zeros, zeros, ``I / (m lambda)``).

    Memory: ``m * d`` numbers of ``dtype`` for ``G`` (``m`` copies of the model) plus two
    ``m x m`` float64 matrices.

    References:
        Frantar, Kurtic, Alistarh. "M-FAC: Efficient Matrix-Free Approximations of
        Second-Order Information." NeurIPS 2021. arXiv:2107.03356.
    """

    def __init__(
        self,
        ngrads: int,
        dim: int,
        damp: float = 1e-5,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        refresh_every: int | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(ngrads, int) or ngrads < 1:
            raise ValueError(f"Invalid ngrads: {ngrads}")
        if not isinstance(dim, int) or dim < (0 if reduce is not None else 1):
            raise ValueError(f"Invalid dim: {dim}")  # a shard (``reduce``) may hold no column
        if not (float(damp) > 0.0 and float(damp) < float("inf")):
            raise ValueError(f"Invalid damp: {damp}")
        if not dtype.is_floating_point:
            raise ValueError(f"Invalid dtype: {dtype}")
        refresh_every = ngrads if refresh_every is None else refresh_every
        if not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"Invalid refresh_every: {refresh_every}")
        self.ngrads, self.dim, self.damp = ngrads, dim, float(damp)
        self.refresh_every = refresh_every
        self.reduce = reduce
        if buffers is None:
            self.grads = torch.zeros(ngrads, dim, dtype=dtype, device=device)
            self.gram = torch.zeros(ngrads, ngrads, dtype=torch.float64, device=device)
            self.inverse = torch.eye(ngrads, dtype=torch.float64, device=device) / self._shift
        else:
            self.grads, self.gram, self.inverse = buffers
            shapes = ((ngrads, dim), (ngrads, ngrads), (ngrads, ngrads))
            if tuple(tuple(b.shape) for b in buffers) != shapes or self.grads.dtype != dtype:
                raise ValueError(f"Invalid buffers: expected shapes {shapes}, dtype {dtype}")
            self.grads.zero_()
            self.gram.zero_()
            self.inverse.copy_(torch.eye(ngrads, dtype=torch.float64) / self._shift)
        # index: next row to write; count: rows written (<= m); since_refresh (a device
        # tensor, ``ring``, with a host mirror); capturable: state_dict gives ring views
        self._init_ring(self.grads.device)
        self.capturable = False
        self.robust_refreshes = 0  # diagnostics: times rounding forced the eigh fallback
        self.accuracy_refreshes = 0  # diagnostics: refreshes forced by the solve check
        self.float64_passes = 0  # diagnostics: second passes accumulated in float64
        self.pass_error = 0.0  # predicted relative error of a window-dtype pass G^T x
        self.gram_error = 0.0  # predicted relative error of a compute-dtype Gram row
        self.float64_gram = False  # Gram rows computed in float64 (nearly dependent rows)
        self.calm_steps = 0  # steps in a row with a small gram_error, in float64_gram mode
        self.gram_rebuilds = 0  # diagnostics: times the Gram was recomputed in float64

    # ------------------------------------------------------------------ helpers
    @property
    def _shift(self) -> float:
        return self.ngrads * self.damp

    @property
    def dtype(self) -> torch.dtype:
        return self.grads.dtype

    @property
    def device(self) -> torch.device:
        return self.grads.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the passes over ``G``: float32 for a float16/bfloat16 window, else
        the window's dtype."""
        return torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype

    @property
    def fusable(self) -> bool:
        """Whether a caller may do the pass ``G^T x`` itself in the window dtype (``addmv``)
        after :meth:`add_and_coefficients`: the predicted error is small and the window is
        not stored in reduced precision; else use :meth:`combine`."""
        return self.pass_error <= PASS_TOLERANCE and self.compute_dtype == self.dtype

    def _chunks(self):
        """Column ranges of about 4 M window numbers, for the upcasting passes."""
        block = max(1, (1 << 22) // self.ngrads)
        return ((s, min(s + block, self.dim)) for s in range(0, self.dim, block))

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``G v`` in :attr:`compute_dtype` (reduced-precision storage: upcast by blocks)."""
        if self.compute_dtype == self.dtype:
            return torch.mv(self.grads, v.to(self.dtype))
        out = torch.zeros(self.ngrads, dtype=torch.float32, device=self.device)
        v = v.to(torch.float32)
        for a, b in self._chunks():
            out.addmv_(self.grads[:, a:b].to(torch.float32), v[a:b])
        return out

    def _check_vector(self, v: torch.Tensor, name: str) -> None:
        if v.shape != (self.dim,):
            raise ValueError(f"Invalid {name} shape: {tuple(v.shape)}, expected ({self.dim},)")

    def check_gradient(self, g: torch.Tensor) -> None:
        """Raise :class:`NonFiniteGradientError` unless ``g`` can enter the window.

        One pass: ``g . g`` (in the window dtype) is finite iff ``g`` has no NaN/Inf and its
        squared norm does not overflow that dtype. Host sync (an accept/reject test).
        """
        checks.check_gradient(g, self.dim, self.dtype, self.compute_dtype)

    def refresh(self, robust: bool = False) -> None:
        """Recompute ``M = (m lambda I + K)^{-1}`` from the Gram by Cholesky (O(m^3)).

        With ``robust`` (or when Cholesky fails) by a symmetric eigendecomposition with the
        eigenvalues of ``K`` clamped at 0, so that ``||M|| <= 1 / (m lambda)`` even when
        rounding has made the stored ``K`` indefinite.
        """
        a = self._shifted_gram()
        lower, info = torch.linalg.cholesky_ex(a)
        if not robust and int(info) == 0:
            self.inverse.copy_(torch.cholesky_inverse(lower))
        else:
            self.robust_refreshes += 1
            evals, evecs = torch.linalg.eigh(self.gram)
            scale = 1.0 / (evals.clamp(min=0.0) + self._shift)
            self.inverse.copy_((evecs * scale) @ evecs.t())
        self.since_refresh = 0

    def _shifted_gram(self) -> torch.Tensor:
        eye = torch.eye(self.ngrads, dtype=torch.float64, device=self.device)
        return self.gram + self._shift * eye

    def _update_inverse(self, j: int, column: torch.Tensor) -> None:
        """Replace index ``j`` of ``M`` after row/column ``j`` of ``A = m λ I + K`` changed.

        ``column`` is the new column ``A e_j``. Bordered-inverse update, O(m^2).
        """
        m_ = self.inverse
        mcol = m_[:, j].clone()
        mjj = float(mcol[j])
        if not mjj > 0.0:  # cannot happen in exact arithmetic (M is positive definite)
            self.refresh(robust=True)
            return
        b = column.clone()
        cjj = float(b[j])
        b[j] = 0.0
        bb = torch.mv(m_, b)  # B b with B = A_{-j,-j}^{-1} = M - M e_j e_j^T M / M_jj
        bb.add_(mcol, alpha=-float(torch.dot(mcol, b)) / mjj)
        bb[j] = 0.0
        s = cjj - float(torch.dot(b, bb))  # Schur complement, >= m λ in exact arithmetic
        if not s > 0.5 * self._shift:
            # Rounding dominates: a float32 Gram row of nearly dependent gradients whose
            # error (~1e-7 |g|^2) exceeds m λ. Fall back to the clamped eigendecomposition.
            self.refresh(robust=True)
            return
        if self.since_refresh + 1 >= self.refresh_every:
            self.refresh()
            return
        s = max(s, self._shift)  # rounding of an exactly dependent row: A_jj raised to fit
        # M <- B + (B b)(B b)^T / s, then column/row j <- (-B b / s, 1 / s)
        m_.addmm_(torch.stack((mcol, bb), dim=1), torch.stack((mcol / -mjj, bb / s), dim=0))
        bb.mul_(-1.0 / s)
        bb[j] = 1.0 / s
        m_[:, j] = bb
        m_[j, :] = bb
        self.since_refresh += 1

    # ------------------------------------------------------------------ dynamic
    def add(self, g: torch.Tensor, *, checked: bool = False) -> int:
        """Write ``g`` into the next ring slot; update the Gram and inverse. Returns the slot.

        Raises :class:`NonFiniteGradientError` (window unchanged) for NaN/Inf; ``checked``:
        the caller has already run :meth:`check_gradient` (or an equivalent test).
        """
        j = self.index
        if self.reduce is None:
            if not checked:
                self.check_gradient(g)
            row = self.grads[j]
            row.copy_(g)
            k = self._gram_row(row)  # G g: one pass over the window
        else:
            k = self._reduced_gram_row(g, j)
            self.grads[j].copy_(g)
        self.gram[j, :] = k
        self.gram[:, j] = k
        column = k.clone()
        column[j] += self._shift
        self._update_inverse(j, column)
        self.index = (j + 1) % self.ngrads
        self.count = min(self.count + 1, self.ngrads)
        return j

    def _reduced_gram_row(self, g: torch.Tensor, j: int) -> torch.Tensor:
        """``G g`` over all shards, with ``g`` in row ``j`` (not yet written): one all-reduce
        of ``m`` numbers that carries the finiteness test (entry ``j`` is ``|g|^2``)."""
        self._check_vector(g, "gradient")
        gw = g.to(self.dtype)
        partial = self._gram_row(gw)
        gc = gw.to(torch.float64 if self.float64_gram else self.compute_dtype)
        partial[j] = torch.dot(gc, gc).to(torch.float64)
        k = self.reduce(partial)
        if not bool(torch.isfinite(k[j])):  # NaN/Inf anywhere in g makes |g|^2 non-finite
            raise NonFiniteGradientError(
                "Invalid gradient: contains NaN/Inf or its squared norm overflows "
                f"{self.dtype}; the window was left unchanged"
            )
        return k

    def _gram_row(self, v: torch.Tensor) -> torch.Tensor:
        """``G v`` as float64: in :attr:`compute_dtype` (one pass), or with
        :attr:`float64_gram` accumulated in float64 over column blocks of about 4 M numbers."""
        if not self.float64_gram:
            return self._matvec(v).to(torch.float64)
        out = torch.zeros(self.ngrads, dtype=torch.float64, device=self.device)
        v = v.to(torch.float64)
        for a, b in self._chunks():
            out.addmv_(self.grads[:, a:b].to(torch.float64), v[a:b])
        return out

    def add_and_coefficients(self, g: torch.Tensor, *, checked: bool = False) -> torch.Tensor:
        """Write ``g`` into the window; return ``x`` (float64, length m) with
        ``F^{-1} g = G^T x``, namely ``x = m M e_j`` (``j`` the slot just written).

        Lets a caller fuse the second pass ``G^T x`` with its own update (``addmv``) when
        :attr:`pass_error` is at most :data:`PASS_TOLERANCE`; above it, call :meth:`combine`.

        Two checks in O(m^2), with ``A = m λ I + K``, ``k = G g = K e_j`` and the product
        ``K x`` (float64):

        1. the bound ``||F^{-1} g||^2 = x^T K x <= K_jj / λ^2``; a violation means rounding
           broke ``M``: it is recomputed by the clamped eigendecomposition;
        2. the solve itself: the residual ``r = A x - m e_j`` gives ``u - u* = G^T A^{-1} r``
           and ``||G^T A^{-1}|| = max_σ √σ / (σ + m λ) <= 1 / (2 √(m λ))``, so the change
           of ``g^T u = k^T x = (K x)_j`` is at most ``|g| |r| / (2 √(m λ))``. Above
           ``PASS_TOLERANCE * g^T u`` (or ``g^T u <= 0``: an ascent direction, impossible
           for the exact ``F^{-1}``) ``M`` has drifted -- e.g. duplicate gradients, where
           ``A`` has condition ``1 + k |g|^2 / (m λ)`` and the O(m^2) updates lose it -- and
           is recomputed by Cholesky, then by the clamped eigendecomposition if that is not
           enough (O(m^3), only on such steps).

        Then the Gram's own rounding (:func:`~torchsteer.linalg._window_checks.gram_error`):
        above ``GRAM_TOLERANCE`` (nearly dependent gradients) the Gram is recomputed in
        float64 from the stored rows (O(m^2 d), once), the checks run again, and later rows
        are computed in float64 (:attr:`float64_gram`) until ``m`` steps in a row predict an
        error below a tenth of the tolerance. On independent gradients it never fires.
        """
        j = self.add(g, checked=checked)
        x, c = self._checked_coefficients(j)
        self.gram_error = checks.gram_error(self, c)
        if self._gram_precision(self.gram_error):
            x, c = self._checked_coefficients(j)
        self.pass_error = checks.pass_error(self, c)
        return x

    def combine(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``G^T x`` in :attr:`compute_dtype`: one pass in that dtype when :attr:`pass_error`
        (of the last :meth:`add_and_coefficients`) is at most ``PASS_TOLERANCE`` (a reduced-
        precision window upcasts column blocks to float32), else accumulated in float64 over
        column blocks of about 4 M numbers (float64 temporaries of ``m x block``), so the
        cancellation between the rows is exact to float64. ``out``: a ``(dim,)`` tensor of
        :attr:`compute_dtype` to write into (returned)."""
        if out is None:
            out = torch.empty(self.dim, dtype=self.compute_dtype, device=self.device)
        if self.pass_error <= PASS_TOLERANCE and self.compute_dtype == self.dtype:
            return torch.mv(self.grads.t(), x.to(self.dtype), out=out)
        work = torch.float32
        if self.pass_error > PASS_TOLERANCE:
            self.float64_passes += 1
            work = torch.float64
        x = x.to(work)
        for a, b in self._chunks():
            out[a:b] = torch.mv(self.grads[:, a:b].to(work).t(), x)
        return out

    def add_and_solve(self, g: torch.Tensor) -> torch.Tensor:
        """Write ``g`` into the window, then return ``F^{-1} g`` (dtype of ``g``).

        Uses ``F^{-1} g = m G^T M e_j``: two passes over ``G`` in all, the Gram row and this
        product (:meth:`combine`).
        """
        x = self.add_and_coefficients(g)
        return self.combine(x).to(g.dtype)

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """``F^{-1} v`` for the current window (nothing added), O(m d). (A shard: ``v`` and
        the result are the shard's slice; one all-reduce of ``m`` numbers.)"""
        self._check_vector(v, "vector")
        gv = self._matvec(v).to(torch.float64)
        if self.reduce is not None:
            gv = self.reduce(gv)
        c = torch.mv(self.inverse, gv).to(self.compute_dtype)
        if self.compute_dtype == self.dtype:
            gtc = torch.mv(self.grads.t(), c)
        else:
            gtc = torch.empty(self.dim, dtype=torch.float32, device=self.device)
            for a, b in self._chunks():
                gtc[a:b] = torch.mv(self.grads[:, a:b].to(torch.float32).t(), c)
        return (v - gtc.to(v.dtype)) / self.damp

    # ------------------------------------------------------------------ static
    @classmethod
    def from_gradients(
        cls, grads: torch.Tensor, damp: float = 1e-5, *, dtype: torch.dtype | None = None
    ) -> GradientWindow:
        """A full window built from a fixed ``(m, d)`` set: ``K = G G^T`` (O(d m^2)) and
        ``M`` by Cholesky (O(m^3)). The divisor is ``m``, the number of rows."""
        if grads.dim() != 2:
            raise ValueError(f"Invalid grads shape: {tuple(grads.shape)}, expected (m, d)")
        if not bool(torch.isfinite(grads).all()):
            raise NonFiniteGradientError("Invalid grads: contains NaN/Inf")
        m, d = grads.shape
        window = cls(m, d, damp, dtype=dtype or grads.dtype, device=grads.device)
        window.grads.copy_(grads)
        window.rebuild(count=m)
        return window

    def rebuild(self, count: int | None = None, block_size: int | None = None) -> None:
        """Recompute the Gram from the stored rows in float64 (O(d m^2), in column blocks of
        about 4 M numbers) and the inverse by Cholesky; the ring restarts at row 0.

        Use after writing ``self.grads`` directly (``count`` rows are then considered written;
        default all ``m``).
        """
        count = self.ngrads if count is None else count
        if not 0 <= count <= self.ngrads:
            raise ValueError(f"Invalid count: {count}")
        self._recompute_gram(block_size)
        self.refresh()
        self.count, self.index = count, count % self.ngrads

    def _recompute_gram(self, block_size: int | None = None) -> None:
        """``K = G G^T`` in float64 from the stored rows (reduced over the shards)."""
        block = block_size or max(1, (1 << 22) // self.ngrads)
        self.gram.zero_()
        for start in range(0, self.dim, block):
            gb = self.grads[:, start : start + block].to(torch.float64)
            self.gram.addmm_(gb, gb.t())
        if self.reduce is not None:
            self.gram.copy_(self.reduce(self.gram))

    def _cholesky(self) -> torch.Tensor:
        a = self._shifted_gram()
        lower, info = torch.linalg.cholesky_ex(a)
        if int(info) != 0:  # rounding made K indefinite: factor the clamped version
            evals, evecs = torch.linalg.eigh(self.gram)
            a = (evecs * (evals.clamp(min=0.0) + self._shift)) @ evecs.t()
            lower = torch.linalg.cholesky(a)
        return lower

    def inverse_diagonal(self, block_size: int | None = None) -> torch.Tensor:
        """``diag(F^{-1})_q = (1 - |L^{-1} G_{:,q}|^2) / lambda`` with ``L L^T = m λ I + K``.

        O(d m^2) in column blocks of the window (float64 temporaries of ``m x block_size``,
        default about 4 M numbers); returns float64.
        """
        lower = self._cholesky()
        block = block_size or max(1, (1 << 22) // self.ngrads)
        out = torch.empty(self.dim, dtype=torch.float64, device=self.device)
        for start in range(0, self.dim, block):
            gb = self.grads[:, start : start + block].to(torch.float64)
            z = torch.linalg.solve_triangular(lower, gb, upper=False)
            out[start : start + block] = (1.0 - z.square().sum(0)) / self.damp
        return out

    def obs_saliency(self, weights: torch.Tensor) -> torch.Tensor:
        """Optimal-brain-surgeon saliency ``w_q^2 / (2 [F^{-1}]_qq)`` (float64)."""
        self._check_vector(weights, "weights")
        return weights.to(torch.float64).square() / (2.0 * self.inverse_diagonal())

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """References to the buffers (not copies) and the ring position as int64 tensors."""
        return {
            "grads": self.grads,
            "gram": self.gram,
            "inverse": self.inverse,
            **self.ring_state(self.capturable),
            "damp": torch.tensor(self.damp, dtype=torch.float64),
            "float64_gram": torch.tensor(int(self.float64_gram), dtype=torch.int64),
            "calm_steps": torch.tensor(self.calm_steps, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take over the buffers of ``state`` (moved to this window's device, dtypes kept)."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"Invalid window state: missing {missing}")
        m, d = self.ngrads, self.dim
        if tuple(state["grads"].shape) != (m, d) or tuple(state["gram"].shape) != (m, m):
            raise ValueError(
                f"Invalid window state: grads {tuple(state['grads'].shape)}, expected {(m, d)}"
            )
        if float(state["damp"]) != self.damp:
            raise ValueError(f"Invalid window state: damp {float(state['damp'])} != {self.damp}")
        mode, calm = (int(state.get(k, 0)) for k in _GRAM_KEYS)  # absent: float32 rows
        if mode not in (0, 1) or calm < 0:
            raise ValueError(f"Invalid window state: float64_gram {mode}, calm_steps {calm}")
        dev = self.device
        self.grads = state["grads"].to(device=dev)
        self.gram = state["gram"].to(device=dev, dtype=torch.float64)
        self.inverse = state["inverse"].to(device=dev, dtype=torch.float64)
        self.index = int(state["index"])
        self.count = int(state["count"])
        self.since_refresh = int(state["since_refresh"])
        self.float64_gram, self.calm_steps = bool(mode), calm
        self.pending.fill_(False)
        self.since_bound, self.unchecked = self.since_refresh, 0

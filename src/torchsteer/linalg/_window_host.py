"""The default (not capturable) M-FAC window step: one read, host-decided repairs.

:meth:`~torchsteer.linalg._window_device.DeviceStep.device_step` takes every decision on
the device because a capturable step may not be read. A default step is read every time,
so the host knows the ring position ``(j, count, since_refresh)`` exactly before it starts
and the refresh schedule ``due = (since + 1 >= refresh_every)`` with it. :meth:`host_step`
(mixed into :class:`~torchsteer.linalg.gradient_window.GradientWindow`) runs the
host-decided step of :meth:`GradientWindow.add_and_coefficients` with its reads gathered
into one: with ``ok = finite(g^T g)`` (a 0-d device bool) and ``k = G g``,

.. math::

    G_j \\leftarrow g \\ (\\text{the old row kept}), \\qquad
    K_{j\\cdot},\\ K_{\\cdot j} \\leftarrow \\mathrm{where}(ok,\\ k,\\ \\cdot), \\qquad
    v = M' e_j = (-B b / s,\\ 1 / s), \\qquad x = m v,

with ``B b``, the Schur complement ``s`` and ``M_jj`` of the bordered-inverse update, at the
host index ``j`` (views: no ``index_select``/``index_copy``, no ring arithmetic on the
device; :attr:`ring` is written only when a capturable step needs it). ``M`` itself is not
written before the read. The report is one float64 row ``(ok, M_jj, s, K_jj, x^T K x,
g^T u, |r|, spread, spread2)`` -- the raw scalars of
:func:`~torchsteer.linalg._window_checks.coefficients`, computed from ``x`` -- and
:meth:`settle` decides on the host exactly as the host-decided code: a non-finite ``g``
puts the kept row back (the Gram was masked, ``M`` untouched); the clamped-eigh refresh
when ``M_jj <= 0`` or ``s <= m λ / 2``; the Cholesky refresh when due; else
``M <- B + (B b)(B b)^T / s`` with the host's numbers, column and row ``j <- v``, and
checks 1-3 with the coefficients already computed (``_checked_coefficients(first=...)``).
The only pass over ``d`` numbers beyond the host-decided step's is the copy of the kept row.
"""

from __future__ import annotations

import torch

from torchsteer.linalg import _window_checks as checks

__all__ = ["HostStep"]


class HostStep:
    """The one-read step of a window whose host ring mirror is exact (not capturable)."""

    _staged: tuple[torch.Tensor, ...] | None = None
    _saved_row: torch.Tensor | None = None  # row j as it was before the step wrote g

    def host_add(self, g: torch.Tensor) -> torch.Tensor:
        """:meth:`host_step` with ``ok`` the finiteness of ``g`` (its shape checked)."""
        from torchsteer.linalg._window_device import finite

        self._check_vector(g, "gradient")
        return self.host_step(g, finite(g, self.dtype, self.compute_dtype))

    def host_step(self, g: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """Write ``g`` where ``ok``; return the report row (module docstring), unread."""
        j, shift = self._host[0], self._shift
        gram, inv = self.gram, self.inverse
        row, saved = self.grads[j], self._saved_row
        if saved is None or saved.dtype != self.dtype or saved.shape[0] != self.dim:
            saved = self._saved_row = torch.empty_like(row)  # reused: no O(d) allocation
        saved.copy_(row)  # put back by settle if g is not finite
        row.copy_(g)
        k = self._gram_row(row)
        gj, gcol = gram[j], gram[:, j]
        torch.where(ok, k, gj, out=gj)
        torch.where(ok, k, gcol, out=gcol)
        # the bordered-inverse update of GradientWindow._update_inverse
        mcol = inv[:, j].clone()
        mjj = mcol[j]
        b = k.clone()
        cjj = b[j] + shift
        b[j] = 0.0
        bb = torch.addcmul(torch.mv(inv, b), mcol, -torch.dot(mcol, b) / mjj)
        bb[j] = 0.0
        s = cjj - torch.dot(b, bb)
        head = (ok.to(torch.float64), mjj, s)
        if self._host[2] + 1 >= self.refresh_every:  # due: settle refreshes M
            self._staged = None
            return torch.cat((torch.stack(head), s.new_zeros(6)))  # rows of a blocked window
        # column j of the updated M, v = (-B b / s, 1 / s), gives x = m M e_j and the
        # checks before M is written (settle writes it where the step is taken)
        r = s.clamp(min=shift).reciprocal()  # -1 / s and 1 / s as torch divides by a tensor
        v = bb * r.neg()
        v[j] = r
        x = self.ngrads * v
        x, kx, report = checks.coefficient_values(self, j, head, x)
        self._staged = (x, kx, mcol, bb, v)
        return report

    def settle(self, row: list[float]) -> torch.Tensor | None:
        """The host-decided tail of the step after its report ``row`` was read: ``None``
        for a non-finite gradient (nothing changed), else the step's ``x``."""
        staged, self._staged = self._staged, None
        if not row[0]:
            self.grads[self._host[0]].copy_(self._saved_row)  # the window as it was
            return None
        mjj, s = row[1], row[2]
        j, count, since = self._host
        first = None  # refreshed: M changed, the coefficients with it
        if not mjj > 0.0 or not s > 0.5 * self._shift:
            self.refresh(robust=True)  # rounding broke M, or dominates the Schur complement
        elif since + 1 >= self.refresh_every:
            self.refresh()
        else:  # M <- B + (B b)(B b)^T / s, then column/row j <- v (_update_inverse)
            x, kx, mcol, bb, v = staged
            s, inv = max(s, self._shift), self.inverse
            inv.addmm_(torch.stack((mcol, bb), dim=1), torch.stack((mcol / -mjj, bb / s)))
            inv[:, j] = v
            inv[j, :] = v
            since, first = since + 1, (x, kx, checks.Checks(*row[3:]))
        since = since if first is not None else 0
        self._host = [(j + 1) % self.ngrads, min(count + 1, self.ngrads), since]
        self._ring_stale = True
        self.since_bound = since
        x, c = self._checked_coefficients(j, first)
        self.gram_error = checks.gram_error(self, c)
        if self._gram_precision(self.gram_error):
            x, c = self._checked_coefficients(j)
        self.pass_error = checks.pass_error(self, c)
        return x

"""The sync-free step of an M-FAC window: every decision of a step taken on the device.

:meth:`GradientWindow.add_and_coefficients` decides on the host: the finiteness test, the
bordered-inverse update's Schur complement, the refresh schedule and the accuracy checks of
:mod:`~torchsteer.linalg._window_checks` each read a number from the device. The methods
here (mixed into :class:`~torchsteer.linalg.gradient_window.GradientWindow`) run the same
arithmetic with every decision a 0-d device tensor:

.. math::

    ok = \\operatorname{finite}(g^\\top g), \\qquad
    G_j \\leftarrow \\mathrm{where}(ok,\\ g,\\ G_j), \\qquad
    K_{j\\cdot} = K_{\\cdot j} \\leftarrow \\mathrm{where}(ok,\\ G g,\\ K_{j\\cdot}),

    M \\leftarrow \\mathrm{where}\\bigl(ok \\wedge good \\wedge \\lnot due,\\
    B + \\tfrac{(B b)(B b)^\\top}{\\max(s, m\\lambda)} \\text{ (bordered)},\\ M\\bigr),
    \\qquad good = (M_{jj} > 0) \\wedge (s > m\\lambda / 2),\\quad
    due = (\\text{since} + 1 \\ge \\text{refresh\\_every}),

and the ring position ``(index, count, since_refresh)`` lives in a device tensor advanced
by the same masks (:attr:`ring`). The coefficients ``x = m M e_j`` and the checks' scalars
(``x^T K x``, ``g^T u = (K x)_j``, the residual, the spreads) are computed as
:func:`~torchsteer.linalg._window_checks.coefficients` does, and the three checks become
flags: ``trouble = ok ∧ (¬good ∨ x^T K x > K_jj (1 + 10^{-3}) / λ^2 ∨ ¬solved ∨
gram_error > GRAM_TOLERANCE ∨ pass_error > PASS_TOLERANCE)``, where ``solved`` is check 1's
O(m) bound ``|r| / (2 √(m λ)) <= PASS_TOLERANCE g^T u / |g|`` alone (its O(m^2) estimate runs
on the host, in :meth:`~DeviceStep.resolve`, only where the bound fails: on independent
gradients it never did, m = 32 to 1024). On independent gradients no
flag is set and the window's buffers equal the host-decided step's up to float rounding
(the same operations; an ``add`` with a tensor coefficient where the host passed a number).

:meth:`~DeviceStep.device_step` returns ``x``, a report (one float64 row of :data:`FIELDS`)
and ``apply`` (0/1, device): the caller either reads the report in **one** transfer and
calls :meth:`~DeviceStep.resolve`, which runs the host-side tail of the original step
exactly where a flag asks for it (a refresh, the checked coefficients, the float64 Gram), so
a read step equals :meth:`add_and_coefficients`; or it does not read, and applies
``x * apply``: a step the device flags (or one after a flagged step, ``pending``) is
*held* -- its gradient is in the window, the parameters do not move -- until the next read
repairs the window (float64 Gram if the Gram check fired, then the clamped-eigh refresh).
:meth:`~DeviceStep.must_check` says when a read cannot be put off: a refresh may be due
(the host's upper bound on ``since_refresh``), the Gram is in float64 mode (its calm-step
count), a check fired in one of the last ``m`` reads (:attr:`hot`: a window in trouble is
read every step until ``m`` calm reads in a row), or ``check_every`` steps have gone unread.
The written row is picked from a reused ``(2, d)`` buffer ``[G_j, g]`` by ``index_select``
with the index ``ok`` (plain copies: a ``where`` over ``d`` numbers costs 5-8 copies on the
CPU); the row index is a device tensor, so no view of it can be taken on the host.
"""

from __future__ import annotations

import torch

from torchsteer.linalg import _window_checks as checks
from torchsteer.linalg._window_checks import GRAM_TOLERANCE, PASS_TOLERANCE

__all__ = ["FIELDS", "DeviceStep", "finite"]

FIELDS = ("ok", "good", "due", "trouble", "pending", "pending_gram", "pass_error",
          "gram_error", "j", "index", "count", "since")  # fmt: skip
_F = {name: i for i, name in enumerate(FIELDS)}


def finite(g: torch.Tensor, dtype: torch.dtype, compute: torch.dtype) -> torch.Tensor:
    """``g . g`` in ``compute`` (of ``g`` stored in ``dtype``) is finite: a 0-d device bool."""
    gw = g.to(dtype).to(compute)
    return torch.isfinite(torch.dot(gw, gw))


class DeviceStep:
    """The ring position as a device tensor with a host mirror, and the sync-free step."""

    def _init_ring(self, device) -> None:
        self.ring = torch.zeros(3, dtype=torch.int64, device=device)  # index, count, since
        # a held step since the last read: [any flag, the Gram check]
        self.pending = torch.zeros(2, dtype=torch.bool, device=device)
        self._host: list[int | None] = [0, 0, 0]  # the ring as the host last knew it
        self._ring_stale = False  # a host step moved _host, not ring (written when needed)
        self.since_bound = 0  # host upper bound on since_refresh (exact after a read)
        self.unchecked = 0  # steps since the last read
        self.repairs = 0  # diagnostics: reads that repaired the window after held steps
        self.hot = 0  # reads still to make every step after a check fired
        self._row: torch.Tensor | None = None  # [row j, g], a reused (2, dim) buffer

    def _get(self, i: int) -> int:
        if self._host[i] is None:
            self._host[i] = int(self.ring[i])  # a sync: only outside an unread step
        return self._host[i]

    def _device_ring(self) -> torch.Tensor:
        """:attr:`ring`, first written from the host mirror after host steps (no read)."""
        if self._ring_stale:
            self.ring.copy_(torch.tensor(self._host, dtype=torch.int64))
            self._ring_stale = False
        return self.ring

    def _set(self, i: int, value: int) -> None:
        self.ring[i].fill_(int(value))
        self._host[i] = int(value)

    index = property(lambda self: self._get(0), lambda self, v: self._set(0, v))
    count = property(lambda self: self._get(1), lambda self, v: self._set(1, v))
    since_refresh = property(lambda self: self._get(2), lambda self, v: self._set(2, v))

    def ring_state(self, on_device: bool) -> dict[str, torch.Tensor]:
        """``index``, ``count``, ``since_refresh``: views of :attr:`ring` (``on_device``:
        they follow the window without a read) or new CPU int64 tensors (the host values)."""
        if on_device:
            ring = self._device_ring()
            return {k: ring[i] for i, k in enumerate(("index", "count", "since_refresh"))}
        return {"index": torch.tensor(self.index, dtype=torch.int64),
                "count": torch.tensor(self.count, dtype=torch.int64),
                "since_refresh": torch.tensor(self.since_refresh, dtype=torch.int64)}  # fmt: skip

    def must_check(self, check_every: int) -> bool:
        """Whether this step's report must be read (see the module docstring)."""
        return (self.float64_gram or self.hot > 0 or self.unchecked + 1 >= check_every
                or self.since_bound + 1 >= self.refresh_every)  # fmt: skip

    def note_unread(self) -> None:
        """Host bookkeeping after a step whose report was not read."""
        self._host = [None, None, None]
        self.since_bound += 1
        self.unchecked += 1
        self.pass_error = 0.0  # an applied step's was at most PASS_TOLERANCE (else held)

    def device_add(self, g: torch.Tensor):
        """:meth:`device_step` with ``ok`` the finiteness of ``g`` (its shape checked)."""
        self._check_vector(g, "gradient")
        return self.device_step(g, finite(g, self.dtype, self.compute_dtype))

    def device_step(self, g: torch.Tensor, ok: torch.Tensor):
        """Write ``g`` where ``ok``; return ``(x, report, hold)`` (module docstring), no sync.
        ``g`` has shape ``(dim,)``; ``ok`` is :func:`finite` of the whole gradient."""
        m, shift, f64 = self.ngrads, self._shift, torch.float64
        ring, gram, inv = self._device_ring(), self.gram, self.inverse
        j1 = ring[0:1].clone()
        e = torch.arange(m, device=ring.device) == ring[0]
        pair = self._row  # [row j as it was, g]: the written row is one of them, by ok
        if pair is None or pair.dtype != self.dtype or pair.shape[1] != self.dim:
            pair = self._row = self.grads.new_empty(2, self.dim)  # reused: no O(d) allocation
        torch.index_select(self.grads, 0, j1, out=pair[0:1])
        pair[1].copy_(g)
        new = pair.index_select(0, ok.to(torch.int64).reshape(1))  # copies (where is slower)
        self.grads.index_copy_(0, j1, new)
        k = self._gram_row(new[0])
        row = torch.where(ok, k, gram.index_select(0, j1)[0])
        col = torch.where(ok, k, gram.index_select(1, j1)[:, 0])
        gram.index_copy_(0, j1, row[None])
        gram.index_copy_(1, j1, col[:, None])
        # the bordered-inverse update of GradientWindow._update_inverse, both branches
        column = torch.where(e, k + shift, k)
        mcol = inv.index_select(1, j1)[:, 0]
        mjj, cjj = mcol.index_select(0, j1)[0], column.index_select(0, j1)[0]
        b = torch.where(e, 0.0, column)
        bb = torch.addcmul(torch.mv(inv, b), mcol, -torch.dot(mcol, b) / mjj)  # = add_(alpha)
        bb = torch.where(e, 0.0, bb)
        s = cjj - torch.dot(b, bb)
        good = (mjj > 0.0) & (s > 0.5 * shift)
        due = ring[2] + 1 >= self.refresh_every
        sc = s.clamp(min=shift)
        take = ok & good & ~due  # in place, O(m^2): a masked rank-2 update adds exact zeros
        left = torch.where(take, torch.stack((mcol, bb), dim=1), 0.0)
        inv.addmm_(left, torch.where(take, torch.stack((mcol / -mjj, bb / sc)), 0.0))
        v = torch.where(e, 1.0 / sc, bb * (-1.0 / sc))
        inv.index_copy_(1, j1, torch.where(take, v, mcol)[:, None])
        inv.index_copy_(0, j1, torch.where(take, v, inv.index_select(0, j1)[0])[None])
        since = torch.where(take, ring[2] + 1, torch.where(ok, 0, ring[2]))
        index = torch.where(ok, (ring[0] + 1) % m, ring[0])
        count = torch.where(ok, (ring[1] + 1).clamp(max=m), ring[1])
        j = ring[0].to(f64)
        ring.copy_(torch.stack((index, count, since)))
        x, flags = self._device_checks(j1, e)
        xkx_bad, unsolved, gram_bad, pass_bad, pass_err, gram_err = flags
        trouble = ok & (~good | xkx_bad | unsolved | gram_bad | pass_bad)
        pending = self.pending.clone()
        apply = (ok & ~(trouble | due | pending[0])).to(f64)
        self.pending.copy_(pending | torch.stack((trouble, ok & gram_bad)))
        report = torch.stack([t.to(f64) for t in (ok, good, due, trouble, pending[0], pending[1],
                              pass_err, gram_err, j, index, count, since)])  # fmt: skip
        return x, report, apply

    def _device_checks(self, j1: torch.Tensor, e: torch.Tensor):
        """``x = m M e_j`` and the flags of checks 1-3 (``_window_checks``) as tensors."""
        m, shift, gram = self.ngrads, self._shift, self.gram
        x = m * self.inverse.index_select(1, j1)[:, 0]
        kx = torch.mv(gram, x)
        residual = kx + shift * x
        residual = torch.where(e, residual - m, residual)
        norms = gram.diagonal().clamp(min=0.0).sqrt()
        spread, spread2 = torch.dot(x.abs(), norms), (x * norms).norm()
        kjj, gu = gram.diagonal().index_select(0, j1)[0], kx.index_select(0, j1)[0]
        xkx_bad = ~(torch.dot(x, kx) <= kjj * (1.0 + 1e-3) / self.damp**2)
        # check 1 by its O(m) bound only: where it fails, a read runs ``solved`` (with its
        # O(m^2) estimate) on the host, an unread step is held
        close = residual.norm() / (2.0 * shift**0.5) <= PASS_TOLERANCE * gu / kjj.sqrt()
        unsolved = ~((kjj == 0.0) | ((gu > 0.0) & close))
        zero = torch.zeros((), dtype=torch.float64, device=gram.device)
        if self.compute_dtype == torch.float64:
            pass_err = gram_err = zero
        else:
            eps = torch.finfo(self.compute_dtype).eps
            scale = torch.where(gu > 0.0, eps * kjj.sqrt() / gu, float("inf"))
            pass_err = torch.where(kjj == 0.0, zero, max(m, 1) ** 0.5 * spread * scale)
            gram_err = torch.where(kjj == 0.0, zero, max(self.dim, 1) ** 0.5 * spread2 * scale)
        gram_bad = gram_err > GRAM_TOLERANCE if not self.float64_gram else zero > 0.0
        return x, (xkx_bad, unsolved, gram_bad, pass_err > PASS_TOLERANCE, pass_err, gram_err)

    def _repair(self, gram: bool) -> None:
        """After held steps: the float64 Gram if its check fired, then the clamped eigh."""
        self.repairs += 1
        self.pending.fill_(False)
        if gram:  # float64 rows from now on (until m calm steps)
            self._gram_precision(float("inf"))
        self.refresh(robust=True)
        self.since_bound = 0

    def flush(self) -> None:
        """Repair now if a step since the last read was held (one read; outside a step,
        e.g. before a checkpoint, so that a resumed run continues as the live one)."""
        if self.unchecked:
            flags = self.pending.tolist()
            if flags[0]:
                self._repair(flags[1])

    def resolve(self, row: list[float], x: torch.Tensor) -> torch.Tensor:
        """After a read report ``row`` with ``ok``: the host-side tail of the original step
        (a refresh, the checked coefficients, the Gram precision) where a flag asks; returns
        the step's ``x``. A pending (held) step first repairs the window."""
        r = dict(zip(FIELDS, row))
        j = int(r["j"])
        self._host = [int(r["index"]), int(r["count"]), int(r["since"])]
        self.unchecked = 0
        self.pending.fill_(False)  # this step's flags are handled here
        fired = r["pending"] or not r["good"] or r["trouble"]
        redo = fired or r["due"]
        self.hot = self.ngrads if fired else max(self.hot - 1, 0)  # m calm reads in a row
        if r["pending"]:  # held steps since the last read: repair, then check this one
            self._repair(bool(r["pending_gram"]))
        elif not r["good"]:
            self.refresh(robust=True)
        elif r["due"]:
            self.refresh()
        if redo:
            x, c = self._checked_coefficients(j)
            self.gram_error = checks.gram_error(self, c)
            if self._gram_precision(self.gram_error):
                x, c = self._checked_coefficients(j)
            self.pass_error = checks.pass_error(self, c)
        else:
            self.gram_error, self.pass_error = r["gram_error"], r["pass_error"]
            self._gram_precision(self.gram_error)  # float64 mode: the calm-step count
        self.since_bound = self.since_refresh
        return x

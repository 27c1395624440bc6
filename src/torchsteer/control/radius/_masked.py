"""The radius limiter's decisions as device tensors: no host synchronization in a step.

Every decision of a step is a 0-d tensor on the parameters' device, applied with
``torch.where`` (never read by the host in ``nonfinite="skip"``)::

    ok    = finite(g) & finite(r) & finite(|p|)     (g: the gradients before the step)
    s     = min(1, r_max / r)  "limit";  r_max / r (1 at r = 0)  "rho_set";  1  "monitor"
    theta = where(ok, where(s == 1, theta_new, theta_old + s p), theta_old)
    state = where(ok, state_new, state_old)         (every tensor of the optimizer's state)

A skipped step (``ok`` false) leaves the parameters and the optimizer's state bit for bit as
they were before it (``where`` selects, so the NaN of a bad step never mixes in), and a step
with ``s = 1`` leaves the optimizer's ``theta_new`` bit for bit. :class:`StateSnapshot`
copies the tensors of the optimizer's state for the stepped parameters into buffers kept
from step to step before the base step (one foreach copy; memory: the size of that state,
2 P for Adam). When the base step changes the state's structure (its first step creates
the state; an optimizer that keeps Python numbers in it) the device cannot undo that, and
the limiter reads ``ok`` once (a host sync) for that step: a steady-state step has none.
"""

from __future__ import annotations

import math

import torch

__all__ = ["StateSnapshot", "device_scale", "gradients_finite"]


def gradients_finite(named) -> torch.Tensor | None:
    """``max_i |g_i|`` finite for every gradient present, a 0-d bool tensor (NaN and Inf
    propagate through the infinity norm, which cannot overflow); ``None`` without gradients.
    Mixed dtypes or devices are compared on the CPU (a transfer)."""
    grads = [p.grad for _, p in named if p.grad is not None]
    grads = [g.coalesce().values() if g.is_sparse else g for g in grads]
    grads = [g for g in grads if g.numel() > 0]
    if not grads:
        return None
    norms = torch._foreach_norm(grads, ord=math.inf)
    if len({(n.dtype, n.device) for n in norms}) > 1:
        norms = [n.double().cpu() for n in norms]
    return torch.stack(norms).isfinite().all()


def device_scale(mode: str, r_max: float, r: torch.Tensor) -> torch.Tensor:
    """The step's scale ``s`` from the measured ``r`` (0-d float64), on ``r``'s device."""
    one = torch.ones_like(r)
    if mode == "monitor":
        return one
    ratio = torch.div(torch.full_like(r, r_max), r)  # (float / tensor would round twice)
    if mode == "rho_set":
        return torch.where(r == 0, one, ratio)
    return torch.where(r <= r_max, one, ratio)  # r = 0 is <= r_max


def _where_into(ok: torch.Tensor, t: torch.Tensor, saved: torch.Tensor) -> None:
    torch.where(ok.to(t.device), t, saved, out=t)


class StateSnapshot:
    """The optimizer's state of the stepped parameters, taken before the base step."""

    def __init__(self) -> None:
        self.entries: list[tuple[torch.Tensor, str, object]] = []  # (param, key, live value)
        self.buffers: list[torch.Tensor] = []  # copies of the tensor values, kept
        self.others: dict[tuple[int, str], object] = {}
        self.params: list[torch.Tensor] = []
        self.optimizer = None

    @torch.no_grad()
    def take(self, optimizer, params) -> None:
        self.optimizer, self.params = optimizer, params
        entries, live = [], []
        for p in params:
            st = optimizer.state.get(p)
            for k, v in (st or {}).items():
                entries.append((p, k, v))
                if isinstance(v, torch.Tensor):
                    live.append(v)
        bufs = self.buffers
        if len(bufs) != len(live) or any(
            b.shape != t.shape or (b.dtype, b.device) != (t.dtype, t.device)
            for b, t in zip(bufs, live)
        ):
            bufs = self.buffers = [t.detach().clone() for t in live]
        elif bufs:
            torch._foreach_copy_(bufs, [t.detach() for t in live])
        self.entries = entries

    def unchanged_structure(self) -> bool:
        """After the base step: the same keys, the same tensor objects (updated in place)
        and the same Python values, so a device ``where`` can undo the step (host-only
        check)."""
        state, n = self.optimizer.state, 0
        for p in self.params:
            st = state.get(p)
            n += len(st) if st else 0
        if n != len(self.entries):
            return False
        for p, k, v in self.entries:
            st = state.get(p)
            if st is None or k not in st:
                return False
            now = st[k]
            if isinstance(v, torch.Tensor) and now is not v:
                return False
            if not isinstance(v, torch.Tensor) and (
                isinstance(now, torch.Tensor) or not _same(now, v)
            ):
                return False
        return True

    @torch.no_grad()
    def restore_where(self, ok: torch.Tensor) -> None:
        """``state = where(ok, state_new, state_old)`` on the device (structure unchanged)."""
        tensors = [v for _, _, v in self.entries if isinstance(v, torch.Tensor)]
        for t, saved in zip(tensors, self.buffers):
            _where_into(ok, t, saved)

    @torch.no_grad()
    def restore(self) -> None:
        """The state exactly as taken (entries the step created are removed)."""
        if self.optimizer is None:
            return
        state = self.optimizer.state
        for p in self.params:
            if p in state:
                del state[p]
        saved = iter(self.buffers)
        for p, k, v in self.entries:
            if isinstance(v, torch.Tensor):
                v.copy_(next(saved))
            state[p][k] = v


def _same(a, b) -> bool:
    try:
        return bool(a == b) or (a != a and b != b)
    except Exception:  # an object without a plain equality
        return a is b

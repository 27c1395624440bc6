"""The KL controllers' tensor path: statistics given as tensors stay on their device.

When ``update`` gets a tensor statistic, the controllers' arithmetic runs on 0-d float64
tensors (the same IEEE operations as on Python floats: ``clamp(x, lo, hi)`` is
``min(max(x, lo), hi)``), the state becomes those tensors and the returned coefficient is
one. The validity check ``ok`` (every statistic finite, the entropy >= 0) is a device tensor:
``nonfinite="raise"`` reads it (one host sync per update, with the values for the message);
``"skip"`` never reads it and masks the update, ``state = where(ok, state_new, state_old)``.
PID's delay line while it is still filling changes length, which the device cannot mask:
those updates (the first ``delay``) read ``ok`` once.
"""

from __future__ import annotations

from collections import deque

import torch

__all__ = ["clamp", "divide", "maximum", "device_statistic", "masked_state"]


def clamp(x, lo: float, hi: float):
    if isinstance(x, torch.Tensor):
        return torch.clamp(x, lo, hi)
    return min(max(x, lo), hi)


def maximum(floor: float, x):
    """``max(floor, x)``."""
    if isinstance(x, torch.Tensor):
        return torch.clamp(x, min=floor)
    return max(floor, x)


def divide(a: float, b):
    """``a / b`` correctly rounded also for a tensor ``b`` (``float / tensor`` is
    ``b.reciprocal() * a`` in torch: one rounding more)."""
    if isinstance(b, torch.Tensor):
        return torch.div(torch.as_tensor(a, dtype=b.dtype, device=b.device), b)
    return a / b


def device_statistic(name: str, value, *, required: bool, nonneg: bool = False):
    """``(value as a 0-d float64 tensor, ok)`` without a host read; ``(None, None)`` when
    absent and not required. Shapes and types are checked on the host."""
    if value is None:
        if required:
            raise ValueError(f"Invalid {name}: None (this controller needs it)")
        return None, None
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(float(value), dtype=torch.float64)
    if value.numel() != 1:
        raise ValueError(f"Invalid {name}: a tensor of shape {tuple(value.shape)}, not a scalar")
    if value.is_complex():
        raise ValueError(f"Invalid {name}: a complex tensor")
    x = value.detach().reshape(()).to(torch.float64)
    ok = x.isfinite() & (x >= 0) if nonneg else x.isfinite()
    return x, ok


def masked_state(ctl, ok: torch.Tensor, old: dict) -> bool:
    """``where(ok, new, old)`` for every state attribute of ``ctl``; False (nothing done)
    when a history changed length (the caller then decides on the host)."""
    for k, before in old.items():
        now = getattr(ctl, k)
        if isinstance(now, deque) and len(now) != len(before):
            return False
    for k, before in old.items():
        now = getattr(ctl, k)
        if isinstance(now, deque):
            mixed = [_where(ok, a, b) for a, b in zip(now, before)]
            setattr(ctl, k, deque(mixed, maxlen=now.maxlen))
        else:
            setattr(ctl, k, _where(ok, now, before))
    return True


def _where(ok, new, old):
    if not isinstance(new, torch.Tensor) and not isinstance(old, torch.Tensor):
        if new == old:
            return new
        new = torch.as_tensor(new, dtype=torch.float64, device=ok.device)
    t = new if isinstance(new, torch.Tensor) else old
    return torch.where(ok.to(t.device), new, old)

"""The parameter update of an M-FAC step, ``v = momentum v + (1 - momentum) u``,
``w = w - lr v`` with ``u = F^{-1} g = G^T x``, optionally masked on the device.

``mask`` is ``None`` (apply) or a 0-d float64 device tensor, 1 (apply) or 0 (leave the
parameters and momentum buffers as they are): ``x`` is multiplied by it (exact: ``x * 1 = x``,
and ``G^T 0 = 0`` for the finite window), the momentum factor becomes
``where(mask, momentum, 1)`` and the update ``lr * (mask * v)``, so an applied step is the
unmasked one bit for bit and a masked one moves nothing, without a host synchronization.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["apply_fused", "apply_vector", "updated"]


def updated(param_groups: list[dict]) -> Iterator[tuple[torch.Tensor, int, float, float]]:
    """``(parameter, its first column in the window, lr, momentum)`` for every parameter
    with a gradient, in window order."""
    offset = 0
    for group in param_groups:
        for p in group["params"]:
            if p.grad is not None:
                yield p, offset, group["lr"], group["momentum"]
            offset += p.numel()


def _factor(momentum: float, mask: torch.Tensor | None) -> float | torch.Tensor:
    return momentum if mask is None else torch.where(mask > 0.0, momentum, 1.0)


def _masked(v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return v if mask is None else v * mask


def apply_fused(opt, window, x: torch.Tensor, mask: torch.Tensor | None) -> None:
    """``u = G^T x``, one column block of ``G`` per parameter, fused into the update: the
    second pass over the window writes straight into the parameter (or its buffer)."""
    coeffs = _masked(x, mask).to(window.dtype)
    for p, offset, lr, momentum in updated(opt.param_groups):
        block = window.grads[:, offset : offset + p.numel()].t()
        if momentum != 0.0:
            buf = opt._momentum_buffer(p)
            _addmv(buf.mul_(_factor(momentum, mask)), block, coeffs, 1.0 - momentum)
            p.add_(_masked(buf, mask), alpha=-lr)
        else:
            _addmv(p, block, coeffs, -lr)


def apply_vector(opt, u: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Apply a whole ``u = F^{-1} g`` (every column; already masked): the momentum EMA and
    ``w -= lr v``."""
    for p, offset, lr, momentum in updated(opt.param_groups):
        piece = u[offset : offset + p.numel()].view_as(p)
        if momentum != 0.0:
            buf = opt._momentum_buffer(p).mul_(_factor(momentum, mask))
            buf.add_(piece.to(buf.dtype), alpha=1.0 - momentum)
            p.add_(_masked(buf, mask), alpha=-lr)
        else:
            p.add_(piece.to(p.dtype), alpha=-lr)


def _addmv(out: torch.Tensor, block: torch.Tensor, x: torch.Tensor, alpha: float) -> None:
    """``out += alpha * block @ x`` in place; fused when ``out`` is contiguous in the
    window dtype, else through a temporary of ``out``'s size."""
    if out.dtype == block.dtype and out.is_contiguous():
        out.view(-1).addmv_(block, x, alpha=alpha)
    else:
        out.add_(torch.mv(block, x).view_as(out).to(out.dtype), alpha=alpha)

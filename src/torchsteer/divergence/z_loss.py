"""The Z-loss of de Brebisson & Vincent (2016) and the PaLM log-partition penalty.

Z-loss (spherical family, shift- and scale-invariant): with mu, sigma the mean and
(population) standard deviation of the logits o of a row and z = (o - mu) / sigma,

    L = softplus(a (b - z_y)) / a,    a > 0.

It is *not* PaLM's "z-loss" (log Z)^2, which is :func:`logz_penalty`
(PaLM adds 1e-4 * (log Z)^2 to the loss; the coefficient is the caller's).
"""

from __future__ import annotations

import math

import torch

__all__ = ["logz_penalty", "z_loss"]


def _reduce(values, mask, reduction):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"Invalid reduction: {reduction!r}")
    if mask is not None:
        if tuple(mask.shape) != tuple(values.shape):
            raise ValueError(
                f"Invalid mask shape: {tuple(mask.shape)} (expected {tuple(values.shape)})"
            )
        values = torch.where(mask.bool(), values, torch.zeros_like(values))
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    count = values.numel() if mask is None else int(mask.bool().sum())
    return total / max(count, 1)


def _check(logits):
    if not torch.is_tensor(logits) or not logits.is_floating_point() or logits.ndim == 0:
        raise ValueError("Invalid logits: a floating tensor (..., V) is required")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("Invalid logits: NaN or Inf")


def z_loss(logits, target, *, a: float, b: float, mask=None, reduction: str = "mean"):
    """Z-loss per row of ``logits`` (..., V) with integer ``target`` (...); a > 0, b real.

    Raises:
        ValueError: NaN/Inf logits, a <= 0, non-finite b, a row of constant logits (sigma = 0,
            z undefined), a target out of range or of the wrong shape.
    """
    _check(logits)
    if not (math.isfinite(a) and a > 0) or not math.isfinite(b):
        raise ValueError(f"Invalid a, b: {a!r}, {b!r} (a > 0 and b finite)")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"Invalid target shape: {tuple(target.shape)}")
    if bool(((target < 0) | (target >= logits.shape[-1])).any()):
        raise ValueError("Invalid target: out of range")
    o = logits.double() if logits.dtype == torch.float64 else logits.float()
    mu = o.mean(-1, keepdim=True)
    sigma = (o - mu).pow(2).mean(-1, keepdim=True).sqrt()
    if bool((sigma == 0).any()):
        raise ValueError("Invalid logits: a row of constant logits (standard deviation 0)")
    zy = ((o - mu) / sigma).gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    return _reduce(torch.nn.functional.softplus(a * (b - zy)) / a, mask, reduction)


def logz_penalty(logits, *, mask=None, reduction: str = "mean"):
    """(log Z)^2 per row, log Z = logsumexp(logits, -1) (PaLM's auxiliary loss, without 1e-4)."""
    _check(logits)
    o = logits.double() if logits.dtype == torch.float64 else logits.float()
    return _reduce(torch.logsumexp(o, -1) ** 2, mask, reduction)

"""Projected gradient descent (PGD) attacks for the adversarial-training benchmarks.

PGD maximizes the loss inside a norm ball around the input,

.. math::

    x^{t+1} = \\Pi_{\\|x - x_0\\| \\le \\epsilon,\\; x \\in [lo, hi]}
        \\left(x^t + \\alpha\\, d(\\nabla_x \\ell(f(x^t), y))\\right),

with :math:`d(g) = \\operatorname{sign}(g)` for :math:`\\ell_\\infty` and
:math:`d(g) = g / \\|g\\|_2` (per example) for :math:`\\ell_2`; a fixed number of steps,
optionally from a uniform random start inside the ball. A benchmark helper, not core API.

References:
    Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to
    Adversarial Attacks", ICLR 2018.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["pgd_attack", "project"]

_NORMS = ("linf", "l2")
MAX_STEPS = 10_000


def _flat_norm(v: torch.Tensor) -> torch.Tensor:
    """Per-example l2 norm, shaped to broadcast against ``v``."""
    n = v.flatten(1).norm(dim=1)
    return n.view(-1, *([1] * (v.ndim - 1)))


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project perturbations ``delta`` (batch first) onto the ``norm`` ball of radius ``eps``."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    scale = (eps / _flat_norm(delta).clamp(min=1e-12)).clamp(max=1.0)
    return delta * scale


def _random_start(x: torch.Tensor, eps: float, norm: str, generator) -> torch.Tensor:
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return (2 * u - 1) * eps
    # uniform in the l2 ball: a Gaussian direction, radius eps * U^(1/d)
    g = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    d = x[0].numel()
    u = torch.rand((x.shape[0],), generator=generator, dtype=x.dtype, device=x.device)
    radius = (eps * u.pow(1.0 / d)).view(-1, *([1] * (x.ndim - 1)))
    return g / _flat_norm(g).clamp(min=1e-12) * radius


def pgd_attack(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    alpha: float | None = None,
    norm: str = "linf",
    random_start: bool = False,
    bounds: tuple[float, float] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PGD adversarial examples of ``x`` (detached; the model's gradients are not touched).

    Args:
        model: maps a batch to logits.
        x, y: inputs (batch first) and targets.
        eps: radius of the ball (>= 0).
        steps: number of ascent steps, in [0, MAX_STEPS].
        alpha: step size; default ``2.5 * eps / steps`` (Madry et al.).
        norm: ``"linf"`` or ``"l2"``.
        random_start: start from a uniform point of the ball instead of ``x``.
        bounds: the input domain ``(lo, hi)`` to clamp into, or ``None``.
        loss_fn: ``loss_fn(logits, y)`` summed over the batch; default cross-entropy (sum).
        generator: random generator of the random start.
    """
    if norm not in _NORMS:
        raise ValueError(f"Invalid norm: {norm!r}; expected one of {_NORMS}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"Invalid eps: {eps}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_STEPS:
        raise ValueError(f"Invalid steps: {steps}")
    if alpha is None:
        alpha = 2.5 * eps / max(steps, 1)
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"Invalid alpha: {alpha}")
    if bounds is not None and not bounds[0] < bounds[1]:
        raise ValueError(f"Invalid bounds: {bounds}")
    if loss_fn is None:

        def loss_fn(logits, target):
            return F.cross_entropy(logits, target, reduction="sum")

    x0 = x.detach()
    delta = _random_start(x0, eps, norm, generator) if random_start else torch.zeros_like(x0)
    delta = _clip_domain(x0, delta, bounds)
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(model(x0 + delta), y)
            (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            if norm == "linf":
                step = grad.sign()
            else:
                step = grad / _flat_norm(grad).clamp(min=1e-12)
            delta = project(delta.detach() + alpha * step, eps, norm)
            delta = _clip_domain(x0, delta, bounds)
    return (x0 + delta).detach()


def _clip_domain(x0: torch.Tensor, delta: torch.Tensor, bounds) -> torch.Tensor:
    """Keep ``x0 + delta`` in ``bounds`` (this keeps delta in the ball: both are convex)."""
    if bounds is None:
        return delta
    return (x0 + delta).clamp(bounds[0], bounds[1]) - x0

"""The numbers a RegularizedNewton step reads from the device, each set in one transfer.

At the start of a step (one transfer): whether the loss and the gradient are finite,
``f(x)``, the gradient scale ``c = 4^k`` (``4^k <= max_i |g_i| < 4^(k+1)``, ``k`` clamped so
that ``c`` and ``1/c`` are normal numbers of ``g``'s dtype; 0 for ``g = 0``) and
``|g| = |g / c| c`` (no over- or underflow). At each trial point ``x_new = x0 + delta`` (one
transfer per accept test): whether ``x_new == x0`` (below resolution), ``f(x_new)``, the
per-tensor sums of ``(grad f(x_new) / c)^2`` (added in Python in parameter order) and, for
the resolution test after a rejection, ``|delta|`` and ``|x0|``. Every value is converted to
float64 exactly, so the step sees the same floats as when they were read one by one.
The per-step record is built from these numbers: reading it costs nothing more.
"""

from __future__ import annotations

import math

import torch

from torchsteer import distributed as tdist
from torchsteer.jacobian import flatten_like, unflatten
from torchsteer.optim._newton_solvers import evaluate_closure

__all__ = ["evaluate_trial", "start_numbers"]


def start_numbers(loss: torch.Tensor, g: torch.Tensor, flag: torch.Tensor | None = None):
    """``(finite, f0, c, |g|, g / c)`` with one transfer (``g / c`` stays on the device).

    ``flag``: the count of ranks that rejected their closure output (from the step's
    all-reduce, :mod:`~torchsteer.optim._newton_global`), read in the same transfer; when it
    is not 0 this rank raises ``ValueError`` too."""
    f64 = torch.float64
    top = g.abs().max().to(f64) if g.numel() else torch.zeros((), dtype=f64, device=g.device)
    bound = int(math.log2(torch.finfo(g.dtype).max)) // 2 - 4  # float32: 4^59; float64: 4^507
    _, e = torch.frexp(torch.where(top.isfinite(), top, 1.0))
    k = torch.div(e - 1, 2, rounding_mode="floor").clamp(-bound, bound)
    c = torch.where(top == 0, 0.0, torch.ldexp(torch.ones_like(top), 2 * k))
    g_c = g * torch.where(c == 0, 1.0, 1.0 / c).to(g.dtype)
    gnorm = g_c.norm().to(f64) * c
    finite = torch.isfinite(loss).all() & torch.isfinite(g).all()
    numbers = [finite.to(f64), loss.detach().to(f64).reshape(()), c, gnorm]
    if flag is not None:
        numbers.append(flag.to(f64).reshape(()))
    read = torch.stack(numbers).tolist()
    if flag is not None and read[4] != 0.0:
        raise ValueError(
            "Invalid input on another rank: its closure output was rejected, so every rank "
            "raises (nothing changed)"
        )
    return bool(read[0]), read[1], read[2], read[3], g_c


def evaluate_trial(start, curvature: str, x_new: torch.Tensor, x0, delta):
    """``(same, f, |grad f / c|^2, |delta|, |x0|, evaluation)`` at ``x_new`` (see
    :meth:`RegularizedNewton._trial` for the evaluation kept with ``keep``)."""
    closure, params, keep = start.closure, start.params, start.keep
    work, inv = start.work, start.inv
    saved = [p.data for p in params]
    values = unflatten(x_new, params)
    if keep:
        values = [v.clone() for v in values]
    try:
        for p, v in zip(params, values):
            p.data = v
        f_t, aux_t, grads_t = evaluate_closure(closure, params, curvature, graph=keep)
    finally:
        for p, d in zip(params, saved):
            p.data = d
    f64, ev = torch.float64, None
    if tdist.is_distributed():  # the global f and gradient: one all-reduce of P + 1 numbers
        flat = flatten_like(grads_t, params, f64)
        packed = tdist.all_reduce_mean(torch.cat([flat, f_t.detach().double().reshape(1)]))
        sums = [((t * inv) ** 2).sum() for t in unflatten(packed[:-1], params)]
        f_read = packed[-1]
        if keep:
            ev = (f_t, aux_t, grads_t, packed[:-1].to(work), packed[-1].to(f_t.dtype))
    else:
        sums = [((t.detach().double() * inv) ** 2).sum() for t in grads_t if t is not None]
        f_read = f_t.detach().reshape(())
        if keep:
            ev = (f_t, aux_t, grads_t, flatten_like(grads_t, params, work), f_t.detach())
    head = [(x_new == x0).all().to(f64), f_read.to(f64)]
    norms = [delta.norm().to(f64), x0.norm().to(f64)]
    read = torch.stack([*head, *(s.to(f64) for s in sums), *norms]).tolist()
    return bool(read[0]), read[1], sum(read[2:-2]), read[-2], read[-1], ev

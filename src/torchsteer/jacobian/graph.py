"""Derivative products from a live autograd graph: the graph path.

What a ``torch.optim`` user already has is a closure that returns a tensor with its autograd
graph (per-sample losses ``(B,)``, logits, a scalar loss). These functions take that output
and the parameter tensors and compute the same products as
:mod:`torchsteer.jacobian.functional`, with ``torch.autograd.grad``:

- :func:`graph_vjp`: ``J^T u``; batched over a leading dimension of ``u`` with
  ``is_grads_batched=True``.
- :func:`graph_jvp`: ``J v`` by the double-VJP trick: with ``g(u) = J^T u`` (linear in u,
  built with ``create_graph=True``), ``J v = d/du <g(u), v>``. Batched over columns of v.
- :func:`graph_jacobian`: the dense (N, P) Jacobian, rows chunked.
- :func:`~torchsteer.jacobian.curvature.graph_hvp` (in :mod:`.curvature`, the Hessian
  operator's one product): ``H v = d/dtheta <grad f, v>``.

Every function keeps the graph (``retain_graph=True``) so several products can be taken from
one forward pass. Parameters that do not influence the output get zero rows, not ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["graph_jacobian", "graph_jvp", "graph_vjp"]

Tensors = Sequence[torch.Tensor]


def _zeros_for_none(grads, params: Tensors, batch: int | None = None):
    out = []
    for g, p in zip(grads, params):
        if g is None:
            shape = p.shape if batch is None else (batch, *p.shape)
            g = torch.zeros(shape, dtype=p.dtype, device=p.device)
        out.append(g)
    return out


def _check_graph(output: torch.Tensor) -> None:
    if not output.requires_grad:
        raise ValueError(
            "Invalid output: it does not require grad (no autograd graph to differentiate; "
            "compute it from the parameters with autograd enabled)"
        )


def _flat_batched(grads: Tensors, batch: int) -> torch.Tensor:
    return torch.cat([g.reshape(batch, -1) for g in grads], dim=1)


def graph_vjp(
    output: torch.Tensor, params: Tensors, u: torch.Tensor, batched: bool = False
) -> list[torch.Tensor]:
    """``J^T u`` for ``output = f(params)`` with a live graph.

    Args:
        output: the tensor the closure returned.
        params: the parameter tensors (leaves requiring grad).
        u: cotangent shaped like ``output``, or ``(k, *output.shape)`` with ``batched=True``.
        batched: treat the first dimension of ``u`` as a batch of k cotangents.

    Returns:
        One tensor per parameter (with a leading k when batched).
    """
    _check_graph(output)
    expected = output.shape if not batched else (u.shape[0], *output.shape)
    if u.shape != expected:
        raise ValueError(f"Invalid cotangent: shape {tuple(u.shape)}, expected {tuple(expected)}")
    grads = torch.autograd.grad(
        output, params, u, retain_graph=True, allow_unused=True, is_grads_batched=batched
    )
    return _zeros_for_none(grads, params, u.shape[0] if batched else None)


def graph_jvp(
    output: torch.Tensor, params: Tensors, v: Tensors, batched: bool = False
) -> torch.Tensor:
    """``J v`` by the double-VJP trick (two reverse passes, no forward mode needed).

    Args:
        output: the tensor the closure returned.
        params: the parameter tensors.
        v: one tangent tensor per parameter, or with a leading batch k when ``batched``.

    Returns:
        ``J v`` shaped like ``output`` (``(k, *output.shape)`` when batched).
    """
    _check_graph(output)
    if len(v) != len(params):
        raise ValueError(f"Invalid v: {len(v)} tangents for {len(params)} parameters")
    for i, (vi, p) in enumerate(zip(v, params)):
        if tuple(vi.shape[1:] if batched else vi.shape) != tuple(p.shape):
            raise ValueError(
                f"Invalid v[{i}]: shape {tuple(vi.shape)}, its parameter {tuple(p.shape)}"
                + (" (with a leading batch dimension)" if batched else "")
            )
    dummy = torch.zeros_like(output, requires_grad=True)
    g = torch.autograd.grad(output, params, dummy, create_graph=True, allow_unused=True)
    pairs = [(gi, vi) for gi, vi in zip(g, v) if gi is not None]
    if not pairs:
        shape = output.shape if not batched else (v[0].shape[0], *output.shape)
        return torch.zeros(shape, dtype=output.dtype, device=output.device)
    gs, vs = zip(*pairs)
    (jv,) = torch.autograd.grad(
        gs, dummy, vs, retain_graph=True, allow_unused=True, is_grads_batched=batched
    )
    if jv is None:  # the output does not depend on the parameters through a differentiable path
        shape = output.shape if not batched else (v[0].shape[0], *output.shape)
        return torch.zeros(shape, dtype=output.dtype, device=output.device)
    return jv


def graph_jacobian(
    output: torch.Tensor, params: Tensors, chunk_size: int | None = None
) -> torch.Tensor:
    """The dense Jacobian of ``output`` (flattened to N entries) as an (N, P) matrix.

    One batched backward (``is_grads_batched``) per chunk of ``chunk_size`` rows (all N rows
    at once by default).
    """
    flat = output.reshape(-1)
    n = flat.numel()
    step = n if chunk_size is None else max(1, int(chunk_size))
    eye = torch.eye(n, dtype=output.dtype, device=output.device)
    rows = []
    for start in range(0, n, step):
        basis = eye[start : start + step]
        grads = graph_vjp(flat, params, basis, batched=True)
        rows.append(_flat_batched(grads, basis.shape[0]))
    return torch.cat(rows, dim=0)

"""Derivative products from a live autograd graph: the graph path.

What a ``torch.optim`` user already has is a closure that returns a tensor with its autograd
graph (per-sample losses ``(B,)``, logits, a scalar loss). These functions take that output
and the parameter tensors and compute the same products as
:mod:`torchsteer.jacobian.functional`, with ``torch.autograd.grad``:

- :func:`graph_vjp`: ``J^T u``; batched over a leading dimension of ``u`` with
  ``is_grads_batched=True``.
- :func:`graph_jvp`: ``J v`` by the double-VJP trick: with ``g(u) = J^T u`` (linear in u,
  built with ``create_graph=True``), ``J v = d/du <g(u), v>``. Batched over columns of v.
- :class:`GraphJVP`: the same products from one linearization: g's graph is built at the
  first product and kept, so each later product is one reverse pass, not two.
- :func:`graph_jacobian`: the dense (N, P) Jacobian, rows chunked.
- :func:`~torchsteer.jacobian.curvature.graph_hvp` (in :mod:`.curvature`, the Hessian
  operator's one product): ``H v = d/dtheta <grad f, v>``.

Every function keeps the graph (``retain_graph=True``) so several products can be taken from
one forward pass. Parameters that do not influence the output get zero rows, not ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.graph import get_gradient_edge

__all__ = ["GraphJVP", "graph_jacobian", "graph_jvp", "graph_vjp"]

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


class GraphJVP:
    """``J v`` products from one linearization of a live graph (the double-VJP trick, the
    first reverse pass taken once).

    With ``g(u) = J^T u`` (linear in u), ``J v = d/du <g(u), v>``: the Jacobian-vector
    product is the VJP of g with cotangent v. The first reverse pass, ``g(u)`` at a dummy
    ``u = 0`` with ``create_graph=True``, does not depend on v; it is taken at the first
    product and kept, so every product after it is one reverse pass through the kept graph
    of g (``torch.autograd.grad(g, u, v, retain_graph=True)``), and a linearization that is
    never multiplied costs nothing. Its results are bit for bit those of building g afresh
    for each product (the same graph, the same cotangents).

    Memory: the kept graph of g holds what g's derivative needs (about one cotangent per
    saved activation of the forward graph, the cotangents of ``u = 0`` flowing back through
    it); g's own values (P numbers) are not kept, only its gradient edges. It lives as long
    as this object (and ``output``'s graph), or until :meth:`release`.

    Args:
        output: the tensor the closure returned.
        params: the parameter tensors (leaves requiring grad).

    Raises:
        ValueError: at a product, if ``output`` has no graph or a tangent has the wrong shape.
    """

    def __init__(self, output: torch.Tensor, params: Tensors) -> None:
        self.output = output
        self.params = list(params)
        self._linearization = None  # (u, edges of g, indices of the params g depends on)

    def release(self) -> None:
        """Free the kept graph of g (the next product builds it again: one pass more)."""
        self._linearization = None

    def _linearize(self):
        with torch.enable_grad():
            dummy = torch.zeros_like(self.output, requires_grad=True)
            g = torch.autograd.grad(
                self.output, self.params, dummy, create_graph=True, allow_unused=True
            )
        keep = [i for i, gi in enumerate(g) if gi is not None]
        # the edges alone (not g's values); a g without a graph stays a tensor, and the
        # product raises autograd's own error for it, as the two-pass product did
        edges = [get_gradient_edge(g[i]) if g[i].requires_grad else g[i] for i in keep]
        return dummy, edges, keep

    def __call__(self, v: Tensors, batched: bool = False) -> torch.Tensor:
        """``J v`` for one tangent per parameter (with a leading k when ``batched``): shaped
        like ``output`` (``(k, *output.shape)`` when batched)."""
        params, output = self.params, self.output
        _check_graph(output)
        if len(v) != len(params):
            raise ValueError(f"Invalid v: {len(v)} tangents for {len(params)} parameters")
        for i, (vi, p) in enumerate(zip(v, params)):
            if tuple(vi.shape[1:] if batched else vi.shape) != tuple(p.shape):
                raise ValueError(
                    f"Invalid v[{i}]: shape {tuple(vi.shape)}, its parameter {tuple(p.shape)}"
                    + (" (with a leading batch dimension)" if batched else "")
                )
        if self._linearization is None:
            self._linearization = self._linearize()
        dummy, edges, keep = self._linearization
        jv = None
        if edges:
            (jv,) = torch.autograd.grad(
                edges,
                dummy,
                [v[i] for i in keep],
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=batched,
            )
        if jv is None:  # the output does not depend on the parameters (differentiably)
            shape = output.shape if not batched else (v[0].shape[0], *output.shape)
            return torch.zeros(shape, dtype=output.dtype, device=output.device)
        return jv


def graph_jvp(
    output: torch.Tensor, params: Tensors, v: Tensors, batched: bool = False
) -> torch.Tensor:
    """``J v`` by the double-VJP trick (two reverse passes, no forward mode needed): one
    product of a fresh :class:`GraphJVP` (its first pass and the product's).

    Args:
        output: the tensor the closure returned.
        params: the parameter tensors.
        v: one tangent tensor per parameter, or with a leading batch k when ``batched``.

    Returns:
        ``J v`` shaped like ``output`` (``(k, *output.shape)`` when batched).
    """
    return GraphJVP(output, params)(v, batched)


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

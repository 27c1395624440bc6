"""Curvature matrices of a live autograd graph as linear operators (the graph path).

Each operator is built once from what a closure returned (its loss or outputs, with their
graph) and gives products with one symmetric P x P matrix over the flat parameter vector,
in the style of curvlinops' linear operators (``matvec``, ``@``, ``shape``, ``dense``):

- :class:`HessianOperator`: ``H v = d/dtheta <grad f, v>``, a VJP through the gradient ``g``
  of ``f`` (built once with ``create_graph=True``; each product reuses it).
- :class:`GGNOperator`: the generalized Gauss-Newton ``G v = J^T H_out J v`` for
  ``loss = l(z(theta))``: ``J`` the Jacobian of the outputs ``z``, ``H_out`` the Hessian of the
  loss in output space. Positive semi-definite whenever ``l`` is convex in ``z``.
- :class:`EmpiricalFisherOperator`: ``F v = (1/B) G^T G v`` for per-sample losses ``(B,)``,
  ``G`` the (B, P) per-sample gradients (``F`` uses the loss's own gradients, not the model's
  sampled ones: the *empirical* Fisher).

The forward products ``J v`` (``G v``) of the last two come from one linearization of the
graph (:class:`~torchsteer.jacobian.graph.GraphJVP`): ``g(u) = J^T u`` is built with its graph
at the operator's first product and kept while the operator lives, so each product after
the first costs one reverse pass for ``J v``, one for ``H_out`` (Gauss-Newton only) and one
for ``J^T u``: 3 reverse passes for Gauss-Newton (4 at the first), 2 for the empirical Fisher
(3 at the first), instead of 4 and 3 every time. ``release()`` frees the kept graph (about the
size of the forward graph's saved activations) when products pause, e.g. before a caller builds
another graph; the next product rebuilds it.

Products and dense matrices are those of the one process that holds the graph; a caller that
splits the batch over processes averages them itself (``RegularizedNewton`` does: the mean over
ranks of the local products is the product of the global batch). ``products`` counts P-vector
products (a dense matrix costs P of them; the per-sample gradients B). The vectors are in
``dtype`` (the solver's working precision); the parameters keep theirs.

The functional path's products of the same matrices are :func:`~torchsteer.jacobian.hvp` and
:func:`~torchsteer.jacobian.ggn_vp`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from torchsteer.jacobian.graph import GraphJVP, graph_jacobian, graph_vjp
from torchsteer.jacobian.output_hessian import SoftmaxCrossEntropyHessian
from torchsteer.jacobian.params import flatten_like, unflatten

__all__ = [
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "graph_hvp",
]


class CurvatureOperator:
    """A symmetric P x P matrix given by its products with flat parameter vectors."""

    def __init__(self, params: Sequence[torch.Tensor], dtype: torch.dtype) -> None:
        self.params = list(params)
        self.dtype = dtype
        self.products = 0

    @property
    def shape(self) -> tuple[int, int]:
        P = sum(p.numel() for p in self.params)
        return (P, P)

    def _split(self, v: torch.Tensor) -> list[torch.Tensor]:
        return [t.to(p.dtype) for t, p in zip(unflatten(v, self.params), self.params)]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """The product with a (P,) vector, in ``dtype``."""
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        """The (P, P) matrix, in ``dtype``."""
        raise NotImplementedError

    def release(self) -> None:
        """Free what the products keep between them (the next product rebuilds it)."""

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        """``A @ v`` for a (P,) vector or ``A @ V`` column by column for a (P, k) matrix."""
        if V.dim() == 1:
            return self.matvec(V)
        return torch.stack([self.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)


class HessianOperator(CurvatureOperator):
    """The exact Hessian of ``f`` from its gradients ``grads`` (built with
    ``torch.autograd.grad(f, params, create_graph=True)``).

    Example:
        >>> w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> grads = torch.autograd.grad((w**3).sum(), [w], create_graph=True)
        >>> HessianOperator(grads, [w], torch.float64).dense()  # diag(6 w)
        tensor([[ 6.,  0.],
                [ 0., 12.]], dtype=torch.float64)
    """

    @torch.enable_grad()
    def __init__(self, grads, params, dtype: torch.dtype) -> None:
        super().__init__(params, dtype)
        self.flat_grad = torch.cat(
            [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]
        )
        self.linear = not self.flat_grad.requires_grad  # f is linear: H = 0

    @torch.enable_grad()
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1
        if self.linear:
            return torch.zeros_like(v)
        u = v.to(self.flat_grad.dtype)
        return flatten_like(graph_vjp(self.flat_grad, self.params, u), self.params, self.dtype)

    @torch.enable_grad()
    def dense(self) -> torch.Tensor:
        P = self.flat_grad.numel()
        self.products += P
        if self.linear:
            return torch.zeros(P, P, dtype=self.dtype, device=self.flat_grad.device)
        H = graph_jacobian(self.flat_grad, self.params).to(self.dtype)
        return 0.5 * (H + H.T)


class GGNOperator(CurvatureOperator):
    """``J^T H_out J`` for ``loss = l(outputs(theta))``; ``H_out u`` by autograd (the double
    backward of ``l``), or with ``output_hessian="cross_entropy"`` in closed form
    (:class:`~torchsteer.jacobian.output_hessian.SoftmaxCrossEntropyHessian`, checked once).

    Raises:
        ValueError: if the loss does not depend on the outputs, or is not the mean softmax
            cross-entropy of the outputs under ``output_hessian="cross_entropy"``.
    """

    @torch.enable_grad()
    def __init__(
        self, loss, outputs, params, dtype: torch.dtype, output_hessian: str | None = None
    ) -> None:
        super().__init__(params, dtype)
        self.outputs = outputs
        closed = output_hessian == "cross_entropy"  # H_out in closed form: no double backward
        (g_out,) = torch.autograd.grad(
            loss, outputs, create_graph=not closed, retain_graph=True, allow_unused=True
        )
        if g_out is None:
            raise ValueError(
                "Invalid closure output for curvature='gauss_newton': the loss does not depend "
                "on the returned outputs; return (loss, outputs) with loss computed from outputs"
            )
        self.g_out = g_out
        self.closed = SoftmaxCrossEntropyHessian(outputs, g_out) if closed else None
        self.linear = not closed and not g_out.requires_grad  # linear in the outputs: H_out = 0
        self.jvp = GraphJVP(outputs, params)  # J v: linearized at the first product

    @torch.enable_grad()
    def _hout(self, u: torch.Tensor) -> torch.Tensor:
        if self.linear:
            return torch.zeros_like(u)
        if self.closed is not None:
            return self.closed(u)
        (h,) = torch.autograd.grad(self.g_out, self.outputs, u, retain_graph=True)
        return h

    @torch.enable_grad()
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1
        jv = self.jvp(self._split(v))
        u = self._hout(jv)
        return flatten_like(graph_vjp(self.outputs, self.params, u), self.params, self.dtype)

    def release(self) -> None:
        self.jvp.release()

    @torch.enable_grad()
    def dense(self) -> torch.Tensor:
        J = graph_jacobian(self.outputs, self.params).to(self.dtype)
        self.products += J.shape[1]
        if self.linear:
            return torch.zeros(J.shape[1], J.shape[1], dtype=self.dtype, device=J.device)
        if self.closed is not None:
            eye = torch.eye(self.outputs.numel(), dtype=self.outputs.dtype, device=J.device)
            H_out = torch.stack([self._hout(e.view_as(self.outputs)).reshape(-1) for e in eye])
        else:
            H_out = graph_jacobian(self.g_out, [self.outputs])
        H_out = H_out.to(self.dtype)
        G = J.T @ (0.5 * (H_out + H_out.T)) @ J
        return 0.5 * (G + G.T)


class EmpiricalFisherOperator(CurvatureOperator):
    """``(1/B) G^T G`` with ``G`` the per-sample gradients of the losses ``(B,)``."""

    @torch.enable_grad()
    def __init__(self, losses, params, dtype: torch.dtype) -> None:
        super().__init__(params, dtype)
        self.losses = losses
        self.batch = losses.numel()
        self.jvp = GraphJVP(losses, params)  # G v: linearized at the first product

    @torch.enable_grad()
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1
        gv = self.jvp(self._split(v))
        out = flatten_like(graph_vjp(self.losses, self.params, gv), self.params, self.dtype)
        return out / self.batch

    def release(self) -> None:
        self.jvp.release()

    @torch.enable_grad()
    def per_sample(self) -> torch.Tensor:
        """The (B, P) per-sample gradients ``G`` of the losses."""
        self.products += self.batch
        return graph_jacobian(self.losses, self.params).to(self.dtype)

    @torch.enable_grad()
    def dense(self) -> torch.Tensor:
        G = self.per_sample()
        return G.T @ G / self.batch


def graph_hvp(loss: torch.Tensor, params: Sequence[torch.Tensor], v: Sequence[torch.Tensor]):
    """``H v`` for a scalar ``loss`` with a live graph (reverse-over-reverse): one product of
    :class:`HessianOperator`, per parameter (a list shaped like ``params``, in their dtypes)."""
    if loss.numel() != 1:
        raise ValueError(f"Invalid loss: expected a scalar, got shape {tuple(loss.shape)}")
    params = list(params)
    with torch.enable_grad():
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    dtype = functools.reduce(torch.promote_types, (p.dtype for p in params))
    op = HessianOperator(grads, params, dtype)
    flat_v = flatten_like(list(v), params, op.dtype)
    return op._split(op.matvec(flat_v))

"""A matrix-free Jacobian: ``J V`` and ``J^T U`` without forming J.

``JacobianOperator`` has the shape (N, P) of the flattened Jacobian, its dtype and device,
and two batched products on flat columns:

- ``matmat(V)``: (P, k) -> (N, k), k JVPs;
- ``rmatmat(U)``: (N, k) -> (P, k), k VJPs.

Build it from a function of the parameter dict (:meth:`from_function`, products vmapped over
columns with ``torch.func``), from a live autograd graph (:meth:`from_graph`, batched
backward passes), or from a dense matrix (:meth:`from_matrix`, for tests). ``to_scipy()``
wraps it as a ``scipy.sparse.linalg.LinearOperator`` (float64 NumPy in and out) for
debugging with SciPy's solvers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import torch
from torch.func import jvp as _jvp
from torch.func import vjp as _vjp
from torch.func import vmap

from torchsteer.jacobian.graph import GraphJVP, graph_vjp

__all__ = ["JacobianOperator"]


def _columns_to_batched(V: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """(P, k) flat columns -> per-parameter tensors with a leading k."""
    k = V.shape[1]
    parts = V.split([t.numel() for t in like], dim=0)
    return [p.T.reshape(k, *t.shape) for p, t in zip(parts, like)]


def _batched_to_columns(parts: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """Per-parameter tensors with a leading k -> (P, k) flat columns."""
    return torch.cat([p.reshape(k, -1) for p in parts], dim=1).T


@dataclasses.dataclass
class JacobianOperator:
    """The (N, P) Jacobian as two products on flat columns.

    Attributes:
        shape: (N, P).
        dtype, device: of the products.
        matmat: ``V (P, k) -> J V (N, k)``.
        rmatmat: ``U (N, k) -> J^T U (P, k)``.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    _matmat: Callable[[torch.Tensor], torch.Tensor]
    _rmatmat: Callable[[torch.Tensor], torch.Tensor]

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``J V`` for V of shape (P, k) (or (P,))."""
        vec = V.dim() == 1
        V2 = V.unsqueeze(1) if vec else V
        if V2.shape[0] != self.shape[1]:
            raise ValueError(f"Invalid V: {tuple(V.shape)}, expected ({self.shape[1]}, k)")
        out = self._matmat(V2)
        return out.squeeze(1) if vec else out

    def rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        """``J^T U`` for U of shape (N, k) (or (N,))."""
        vec = U.dim() == 1
        U2 = U.unsqueeze(1) if vec else U
        if U2.shape[0] != self.shape[0]:
            raise ValueError(f"Invalid U: {tuple(U.shape)}, expected ({self.shape[0]}, k)")
        out = self._rmatmat(U2)
        return out.squeeze(1) if vec else out

    def dense(self) -> torch.Tensor:
        """The full (N, P) matrix (P products; for tests and small problems)."""
        return self.matmat(torch.eye(self.shape[1], dtype=self.dtype, device=self.device))

    @property
    def T(self) -> JacobianOperator:
        """The transposed operator (P, N)."""
        return JacobianOperator(
            (self.shape[1], self.shape[0]), self.dtype, self.device, self._rmatmat, self._matmat
        )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_matrix(cls, M: torch.Tensor) -> JacobianOperator:
        """Wrap a dense (N, P) matrix."""
        if M.dim() != 2:
            raise ValueError(f"Invalid matrix: expected 2 dimensions, got {tuple(M.shape)}")
        return cls(tuple(M.shape), M.dtype, M.device, lambda V: M @ V, lambda U: M.T @ U)

    @classmethod
    def from_function(
        cls,
        f: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
        params: Mapping[str, torch.Tensor],
    ) -> JacobianOperator:
        """The Jacobian of ``f(params)`` (outputs flattened) at ``params``, via ``torch.func``.

        The forward pass and the VJP closure are computed once here; each ``matmat`` runs k
        forward-mode JVPs batched by ``vmap``.
        """
        p = {k: v.detach() for k, v in params.items()}
        names = list(p)

        def flat_f(q):
            return f(q).reshape(-1)

        out, vjp_fn = _vjp(flat_f, p)
        like = [p[k] for k in names]

        def matmat(V):
            tangents = _columns_to_batched(V, like)

            def one(*tan):
                return _jvp(flat_f, (p,), (dict(zip(names, tan)),))[1]

            return vmap(one)(*tangents).T

        def rmatmat(U):
            grads = vmap(vjp_fn)(U.T.contiguous())[0]
            return _batched_to_columns([grads[k] for k in names], U.shape[1])

        n, P = out.numel(), sum(t.numel() for t in like)
        return cls((n, P), out.dtype, out.device, matmat, rmatmat)

    @classmethod
    def from_graph(cls, output: torch.Tensor, params: Sequence[torch.Tensor]) -> JacobianOperator:
        """The Jacobian of a closure's output (flattened) from its live autograd graph.

        ``matmat`` uses the double-VJP trick on one linearization
        (:class:`~torchsteer.jacobian.graph.GraphJVP`: the graph of ``g(u) = J^T u`` built at
        the first ``matmat`` and kept while the operator lives, so each later ``matmat`` is one
        batched reverse pass), ``rmatmat`` a batched backward; the graph is retained, so the
        operator can be applied any number of times.
        """
        flat = output.reshape(-1)
        params = list(params)
        jvp = GraphJVP(flat, params)

        def matmat(V):
            return jvp(_columns_to_batched(V, params), batched=True).T

        def rmatmat(U):
            grads = graph_vjp(flat, params, U.T.contiguous(), batched=True)
            return _batched_to_columns(grads, U.shape[1])

        P = sum(t.numel() for t in params)
        return cls((flat.numel(), P), output.dtype, output.device, matmat, rmatmat)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 NumPy arrays in and out)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def mm(X):
            X = np.asarray(X).reshape(self.shape[1], -1)
            return (
                self.matmat(torch.as_tensor(X, dtype=self.dtype, device=self.device))
                .cpu()
                .double()
                .numpy()
            )

        def rmm(X):
            X = np.asarray(X).reshape(self.shape[0], -1)
            return (
                self.rmatmat(torch.as_tensor(X, dtype=self.dtype, device=self.device))
                .cpu()
                .double()
                .numpy()
            )

        return LinearOperator(
            self.shape,
            matvec=lambda x: mm(x).ravel(),
            rmatvec=lambda x: rmm(x).ravel(),
            matmat=mm,
            rmatmat=rmm,
            dtype=np.float64,
        )

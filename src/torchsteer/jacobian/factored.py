"""The per-sample Jacobian kept as layer factors: its Gram matrix without the (B, P) matrix.

For an ``nn.Linear`` weight ``W`` (out, in) called once, row ``a`` of its block of the
per-sample Jacobian is ``vec(sum_t g_{a,t} x_{a,t}^T)`` (:mod:`.captured`: ``x`` the layer's
inputs, ``g`` the output gradients of one backward, ``t`` over the positions of sample a).
Two products are all a truncated solve through the Gram matrix needs, and neither needs the
block itself (the "ghost norm" identity of per-sample gradient norms, Goodfellow 2015):

    (J_W J_W^T)_{ab} = sum_{t,s} (g_{a,t} . g_{b,s}) (x_{a,t} . x_{b,s})
                     = ((g g^T) * (x x^T))_{ab}                         (one position: T = 1)
    J_W^T v          = sum_a v_a sum_t g_{a,t} x_{a,t}^T = (v g)^T x     (rows (a, t) flattened)

The Gram block costs ``B^2 T^2 (in + out)`` multiply-adds and the transposed product
``B T in out``, where forming the block costs ``B T in out`` and its Gram ``B^2 in out``. A
Linear is kept as factors when ``in out >= 1024`` (below that the few small operations per
factor cost more than they save: on MLPs of width 16 and 32, B = 128, one thread, slower at
16, 0.94x at 32, 0.53x at 64; ``benchmarks/results/closure_path.md``) and, over T > 1
positions, when ``8 T^2 (in + out) <= in out``: the (B T, B T) kernels' product and blocked
sum cost far more than their multiply-adds (the Gram block alone, B = 128, one thread:
T = 1, 32 x 32: 0.05 ms factored against 0.44 dense; T = 2, 32 x 32: 0.64 against 0.44;
T = 2, 64 x 64: 0.74 against 1.66; T = 4, 64 x 64: 1.64 against 1.67). An MLP's layers are
factored; GPT-2's 768 x 768 layers at T = 128 never.
Every other block (biases, norms, embeddings, convolutions, a weight used twice, a Linear
over too many positions) stays dense rows ``J_rest``, and

    J J^T = sum_W J_W J_W^T + J_rest J_rest^T,      J^T v = [J_W^T v ..., J_rest^T v]

in parameter order. ``diag(s) J`` (a row scale, Sven's ``kappa != 2``) scales both sides:
``diag(s) J J^T diag(s)`` and ``J^T (s v)``. The identities are exact; the rounding differs
from the dense Gram's (another order of the same sums).
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["MIN_FACTORED", "FactoredRows", "worth_factoring"]


MIN_FACTORED = 1024  # in * out below which the factors' own few operations cost more


def worth_factoring(positions: int, fan_in: int, fan_out: int) -> bool:
    """Whether a Linear over ``positions`` per sample is cheaper as factors (see above):
    ``in out >= MIN_FACTORED`` and, over T > 1 positions, ``8 T^2 (in + out) <= in out``."""
    area = fan_in * fan_out
    if area < MIN_FACTORED:
        return False
    if positions == 1:
        return fan_in + fan_out <= area
    return 8 * positions * positions * (fan_in + fan_out) <= area


@dataclasses.dataclass
class FactoredRows:
    """``diag(row_scale) J`` for a (B, P) per-sample Jacobian ``J`` held as factors.

    ``factors``: ``(offset, x, g)`` per factored weight, ``x`` (B, T, in) and ``g`` (B, T, out),
    the weight's coordinates ``offset .. offset + out * in`` of the parameter vector (row-major
    ``(out, in)``, as ``W.flatten()``). ``rest``: the dense rows of all other coordinates, and
    ``rest_slices``: ``(offset, start, n)`` placing ``rest[:, start : start + n]`` at
    coordinates ``offset .. offset + n``.
    """

    shape: tuple[int, int]
    factors: list[tuple[int, torch.Tensor, torch.Tensor]]
    rest: torch.Tensor
    rest_slices: list[tuple[int, int, int]]
    row_scale: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.rest.dtype

    @property
    def device(self) -> torch.device:
        return self.rest.device

    def scaled(self, s: torch.Tensor) -> FactoredRows:
        """``diag(s) M`` (rows scaled; a 0-d ``s`` scales all; the factors are shared)."""
        s = s.expand(self.shape[0]) if s.dim() == 0 else s
        scale = s if self.row_scale is None else self.row_scale * s
        return dataclasses.replace(self, row_scale=scale)

    def max_abs(self) -> torch.Tensor:
        """A bound of ``max |M_ai|`` (0-d), exact when every factor has one position:
        ``|s_a| max(max_i |rest_ai|, max_W sum_t max|g_{a,t}| max|x_{a,t}|)``, as
        ``|sum_t g_t x_t^T| <= sum_t |g_t| |x_t|^T`` entrywise. NaN/Inf in a factor or in
        ``rest`` shows as NaN/Inf (max propagates NaN)."""
        B = self.shape[0]
        bound = self.rest.abs().amax(1) if self.rest.shape[1] else self.rest.new_zeros(B)
        for _, x, g in self.factors:
            per = (g.abs().amax(2) * x.abs().amax(2).to(g.dtype)).sum(1)
            bound = torch.maximum(bound, per)
        if self.row_scale is not None:
            bound = bound * self.row_scale.abs().to(bound.dtype)
        return bound.amax() if B else bound.new_zeros(())

    def gram(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``M M^T`` (B, B), formed in ``dtype`` (default M's)."""
        dtype = dtype or self.dtype
        B = self.shape[0]
        rest = self.rest.to(dtype)
        G = rest @ rest.mT
        for _, x, g in self.factors:
            x, g = x.to(dtype), g.to(dtype)
            T = x.shape[1]
            if T == 1:
                G.addcmul_(g[:, 0] @ g[:, 0].mT, x[:, 0] @ x[:, 0].mT)
                continue
            xf, gf = x.reshape(B * T, -1), g.reshape(B * T, -1)
            kx = (xf @ xf.mT).view(B, T, B, T)
            G.add_((kx * (gf @ gf.mT).view(B, T, B, T)).sum((1, 3)))
        if self.row_scale is not None:
            s = self.row_scale.to(dtype)
            G = s.unsqueeze(1) * G * s.unsqueeze(0)
        return G

    def rmatvec(self, v: torch.Tensor) -> torch.Tensor:
        """``M^T v`` (P,), computed in v's dtype."""
        if self.row_scale is not None:
            v = v * self.row_scale.to(v.dtype)
        out = v.new_empty(self.shape[1])
        for offset, x, g in self.factors:
            x, g = x.to(v.dtype), g.to(v.dtype)
            B, T = x.shape[:2]
            vg = (g * v.view(B, 1, 1)).reshape(B * T, -1)
            n = g.shape[2] * x.shape[2]
            out[offset : offset + n] = (vg.mT @ x.reshape(B * T, -1)).reshape(-1)
        if self.rest_slices:
            r = self.rest.to(v.dtype).mT @ v
            for offset, start, n in self.rest_slices:
                out[offset : offset + n] = r[start : start + n]
        return out

    def dense(self) -> torch.Tensor:
        """``M`` as a (B, P) matrix (the fallback of a solve that needs the entries)."""
        B, P = self.shape
        J = self.rest.new_empty(B, P)
        for offset, x, g in self.factors:
            n = g.shape[2] * x.shape[2]
            block = J[:, offset : offset + n].view(B, g.shape[2], x.shape[2])
            torch.bmm(g.mT, x, out=block)
        for offset, start, n in self.rest_slices:
            J[:, offset : offset + n] = self.rest[:, start : start + n]
        if self.row_scale is not None:
            J.mul_(self.row_scale.to(J.dtype).unsqueeze(1))
        return J

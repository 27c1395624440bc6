"""The algebra of one Sven step, free of optimizer bookkeeping.

Given per-sample losses ``l`` (B,) and their Jacobian ``J = dl/dtheta`` (a dense (B, P)
matrix or a matrix-free operator), this module forms the residual system and solves it:

    l_g = mean of l over consecutive micro-batches of m rows        (m = 1: l_g = l)
    R   = l_g^(kappa/2),   D = (kappa/2) l_g^(kappa/2 - 1)          (D = 0 where l_g = 0)
    M   = diag(D) J_g[:, S]                                         (S: the kept coordinates)
    d   = V_k diag(1/S_k) U_k^T R   over the triplets with S_i > rtol * S_max and S_i > 0

With ``damping = mu > 0`` (Levenberg-Marquardt, relative to the top of the spectrum) the
filter ``1/S_i`` becomes ``S_i / (S_i^2 + mu S_max^2)``: ``d = M^T (M M^T + lam I)^-1 R``
restricted to the kept triplets, ``lam = mu S_max^2``; ``mu = 0`` is the step above.

``d`` is the step before the learning rate. The dense exact solve uses the smaller Gram
matrix (``M M^T`` or ``M^T M``) and ``eigh``; the randomized one uses
:func:`torchsteer.linalg.randomized_svd` on the matrix or the operator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch.func import functional_call, grad_and_value, vmap

from torchsteer.jacobian import unwrap_model
from torchsteer.jacobian.per_sample import linear_per_sample_jacobian
from torchsteer.linalg import randomized_svd

__all__ = [
    "ResidualOperator",
    "Solution",
    "gram_spectrum",
    "group_rows",
    "per_sample_values_and_jacobian",
    "residuals",
    "reuse_buffer",
    "solve_dense",
    "solve_operator",
]


@dataclasses.dataclass
class Solution:
    """The step direction ``d`` (P_sel,) and what the optimizer records about it."""

    direction: torch.Tensor
    kept_rank: torch.Tensor
    sigma_max: torch.Tensor
    sigma_min: torch.Tensor  # smallest kept singular value (0 when none is kept)
    linearized_reduction: torch.Tensor  # 1 - |R - M d| / |R|


# Modules whose parameters torch's expanded weights differentiate per sample in one backward.
_EXPANDED_WEIGHT_MODULES = (
    torch.nn.Linear,
    torch.nn.Conv1d,
    torch.nn.Conv2d,
    torch.nn.Conv3d,
    torch.nn.Embedding,
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
)


def _expanded_weights_apply(model: torch.nn.Module, params: dict[str, torch.Tensor]) -> bool:
    """Whether every trainable parameter sits in a supported module and all are optimized."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if trainable != {id(p) for p in params.values()}:
        return False
    owners = (m for m in model.modules() if next(m.parameters(recurse=False), None) is not None)
    return all(type(m) in _EXPANDED_WEIGHT_MODULES for m in owners)


def _per_sample_expanded(model, loss_fn, inputs, targets, params):
    """One forward and one backward with torch's expanded weights (``grad_sample``)."""
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

    n = inputs.shape[0]
    try:
        with torch.enable_grad():
            out = call_for_per_sample_grads(model, batch_size=n, loss_reduction="sum")(inputs)
            values = loss_fn(out, targets).reshape(n, -1).sum(1)
            values.sum().backward()
        jac = torch.cat([p.grad_sample.reshape(n, -1) for p in params.values()], dim=1)
    finally:
        for p in params.values():
            if hasattr(p, "grad_sample"):
                del p.grad_sample
    return values.detach(), jac


def _per_sample_linear(model, loss_fn, inputs, targets, params, out):
    """The core's outer-product path (every parameter in an ``nn.Linear``), or None."""
    n = inputs.shape[0]

    def summed(output, target):
        return loss_fn(output, target).reshape(n, -1).sum(1)

    return linear_per_sample_jacobian(
        model, summed, inputs, targets, params, out=out, return_values=True
    )


def per_sample_values_and_jacobian(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    params: dict[str, torch.Tensor],
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample losses (B,) and their gradients (B, P), samples independent.

    Networks whose parameters are all weights and biases of ``nn.Linear`` layers get the
    rows as outer products from one forward and one backward of the batch
    (:func:`torchsteer.jacobian.per_sample.linear_per_sample_jacobian`, written into ``out``
    when given, a (B, P) buffer of the parameters' dtype). Otherwise, when every parameter
    lives in a module torch's expanded weights support (Linear, Conv, Embedding, LayerNorm,
    GroupNorm) they come from one forward and backward with ``grad_sample``; otherwise from
    ``vmap(grad_and_value)`` over single samples. All cost O(B) single-sample passes, with no
    B^2 term as in a batched backward.
    """
    model = unwrap_model(model)
    found = _per_sample_linear(model, loss_fn, inputs, targets, params, out)
    if found is not None:
        return found
    if _expanded_weights_apply(model, params):
        try:
            return _per_sample_expanded(model, loss_fn, inputs, targets, params)
        except RuntimeError:  # a function expanded weights cannot handle: use vmap
            pass
    bufs = dict(model.named_buffers())
    p = {k: v.detach() for k, v in params.items()}

    def sample_loss(q, x, y):
        out = functional_call(model, {**q, **bufs}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0)).sum()

    grads, values = vmap(grad_and_value(sample_loss), in_dims=(None, 0, 0))(p, inputs, targets)
    n = inputs.shape[0]
    jac = torch.cat([grads[k].reshape(n, -1) for k in params], dim=1)
    return values, jac


def reuse_buffer(buf, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """``buf`` if it holds at least (rows, cols) of ``like``'s dtype and device, else a new one.

    Reusing the Jacobian's buffer spares the page faults of a fresh B x P allocation every
    step; it grows to the largest batch seen (a short last batch uses its first rows).
    """
    ok = (
        buf is not None
        and buf.shape[0] >= rows
        and buf.shape[1] == cols
        and buf.dtype == like.dtype
        and buf.device == like.device
    )
    return buf if ok else torch.empty(rows, cols, dtype=like.dtype, device=like.device)


def group_rows(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Mean over consecutive groups of ``size`` rows (the last group may be shorter)."""
    if size is None or size <= 1:
        return x
    n = x.shape[0]
    full = (n // size) * size
    parts = []
    if full:
        parts.append(x[:full].reshape(n // size, size, *x.shape[1:]).mean(dim=1))
    if full < n:
        parts.append(x[full:].mean(dim=0, keepdim=True))
    return torch.cat(parts, dim=0)


def ungroup_rows(u: torch.Tensor, n: int, size: int | None) -> torch.Tensor:
    """The adjoint of :func:`group_rows`: (G, k) -> (n, k)."""
    if size is None or size <= 1:
        return u
    counts = torch.full((u.shape[0],), float(size), dtype=u.dtype, device=u.device)
    counts[-1] = n - size * (u.shape[0] - 1)
    return (u / counts.unsqueeze(1)).repeat_interleave(counts.long(), dim=0)


def residuals(losses: torch.Tensor, kappa: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``R = l^(kappa/2)`` and the row scale ``D = dR/dl`` (0 where l = 0 and kappa < 2)."""
    if kappa == 2.0:
        return losses, torch.ones_like(losses)
    half = kappa / 2.0
    R = losses.pow(half)
    positive = losses > 0
    safe = torch.where(positive, losses, torch.ones_like(losses))
    D = torch.where(positive, half * safe.pow(half - 1.0), torch.zeros_like(losses))
    return R, D


def _keep(S: torch.Tensor, rtol: float) -> torch.Tensor:
    smax = S.max() if S.numel() else S.new_zeros(())
    return (S > rtol * smax) & (S > 0)


def _record(S, keep, R, fitted) -> tuple[torch.Tensor, ...]:
    """Kept rank, S_max, smallest kept S and ``1 - |R - fitted| / |R|`` (fitted = M d)."""
    kept_rank = keep.sum().to(S.dtype)
    smax = S.max() if S.numel() else S.new_zeros(())
    smin = torch.where(keep, S, torch.full_like(S, float("inf"))).min() if S.numel() else smax
    smin = torch.where(kept_rank > 0, smin, torch.zeros_like(smin))
    rest = (R - fitted).norm()
    rnorm = R.norm()
    red = torch.where(rnorm > 0, 1 - rest / torch.where(rnorm > 0, rnorm, 1), 0 * rnorm)
    return kept_rank, smax, smin, red


def _solve_triplets(U, S, V, R, rtol, damping: float = 0.0) -> Solution:
    keep = _keep(S, rtol)
    c = U.mT @ R
    if damping == 0.0:
        inv = torch.where(keep, 1.0 / torch.where(keep, S, torch.ones_like(S)), 0 * S)
        fitted = U @ torch.where(keep, c, 0 * c)
    else:  # S / (S^2 + lam); M d = U diag(S^2 / (S^2 + lam)) U^T R
        lam = damping * S.max().square()
        inv = torch.where(keep, S / (S.square() + lam), 0 * S)
        fitted = U @ (inv * S * c)
    d = V @ (inv * c)
    return Solution(d, *_record(S, keep, R, fitted))


def gram_spectrum(G: torch.Tensor, r: int, rtol: float, damping: float = 0.0):
    """Top ``r`` eigenvectors of a Gram matrix, ``S = sqrt(eigenvalues)``, the kept mask and
    ``1 / (S^2 + lam)`` on the kept ones (0 elsewhere), ``lam = damping * S_max^2``."""
    evals, vecs = torch.linalg.eigh(G)
    evals, vecs = evals.flip(0)[:r].clamp_min(0), vecs.flip(1)[:, :r]
    S = evals.sqrt()
    # Gram eigenvalues carry an absolute error ~ eps * S_max^2: below 2 sqrt(eps) S_max, noise.
    floor = 2.0 * torch.finfo(G.dtype).eps ** 0.5
    keep = _keep(S, max(rtol, floor))
    shifted = evals if damping == 0.0 else evals + damping * evals.max()
    inv2 = torch.where(keep, 1.0 / torch.where(keep, shifted, torch.ones_like(evals)), 0 * evals)
    return vecs, S, keep, inv2


def _solve_gram(
    M, R, rank: int, rtol: float, gram_dtype: torch.dtype | None, damping: float = 0.0
) -> Solution:
    """Exact truncated solve through ``eigh`` of the smaller Gram matrix (in ``gram_dtype``)."""
    B, P = M.shape
    dtype = M.dtype
    work = M if gram_dtype is None else M.to(gram_dtype)
    Rw = R.to(work.dtype)
    wide = B <= P
    G = work @ work.mT if wide else work.mT @ work
    vecs, S, keep, inv2 = gram_spectrum(G, min(rank, B, P), rtol, damping)
    if wide:  # vecs = U:  d = M^T U S^-2 U^T R,  U^T R projected
        c = vecs.mT @ Rw
        d = (work.mT @ (vecs @ (inv2 * c))).to(dtype)
        if damping == 0.0:
            fitted = vecs @ torch.where(keep, c, 0 * c)
        else:
            fitted = vecs @ (inv2 * S.square() * c)
    else:  # vecs = V:  d = V S^-2 V^T M^T R,  U^T R = S^-1 V^T M^T R
        w = vecs.mT @ (work.mT @ Rw)
        dw = vecs @ (inv2 * w)
        fitted, d = work @ dw, dw.to(dtype)
    rec = _record(S, keep, Rw, fitted)
    return Solution(d, *(t.to(dtype) for t in rec))


def solve_dense(
    M: torch.Tensor,
    R: torch.Tensor,
    rank: int,
    rtol: float,
    randomized: bool,
    oversample: int,
    power_iters: int,
    generator: torch.Generator,
    gram_dtype: torch.dtype | None = None,
    damping: float = 0.0,
) -> Solution:
    """The truncated minimum-norm direction for a dense M (B, P)."""
    if not randomized:
        return _solve_gram(M, R, rank, rtol, gram_dtype, damping)
    U, S, V = randomized_svd(M, rank, oversample, power_iters, generator, exact=False)
    return _solve_triplets(U, S, V, R, rtol, damping)


def solve_operator(
    op, R, rank, rtol, oversample, power_iters, generator, exact, damping: float = 0.0
) -> Solution:
    """The truncated direction from a matrix-free M; ``exact`` sketches all min(B, P) columns.

    With a sketch as wide as the row space (l >= rank M) the range is captured exactly, so
    the result equals the exact truncated SVD up to rounding.
    """
    if exact:
        width = min(op.shape)
        U, S, V = randomized_svd(op, width, 0, 0, generator)
        U, S, V = U[:, :rank], S[:rank], V[:, :rank]
    else:
        U, S, V = randomized_svd(op, rank, oversample, power_iters, generator)
    return _solve_triplets(U, S, V, R, rtol, damping)


@dataclasses.dataclass
class ResidualOperator:
    """``M = diag(D) G J[:, S]`` as products, from the loss Jacobian operator ``base``.

    ``G`` averages micro-batches of rows, ``S`` (``cols``) selects coordinates; products run
    in ``dtype`` (fp32 for bf16 parameters) while ``base`` runs in the parameters' dtype.
    """

    base: object
    scale: torch.Tensor  # D, one per (grouped) row
    microbatch: int | None
    cols: torch.Tensor | None
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int]:
        p = self.base.shape[1] if self.cols is None else self.cols.numel()
        return (self.scale.numel(), p)

    @property
    def device(self) -> torch.device:
        return self.scale.device

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self.cols is not None:
            full = V.new_zeros(self.base.shape[1], V.shape[1])
            full[self.cols] = V
            V = full
        out = self.base.matmat(V.to(self.base.dtype)).to(self.dtype)
        return self.scale.unsqueeze(1) * group_rows(out, self.microbatch)

    def rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        U = ungroup_rows(self.scale.unsqueeze(1) * U, self.base.shape[0], self.microbatch)
        out = self.base.rmatmat(U.to(self.base.dtype)).to(self.dtype)
        return out if self.cols is None else out[self.cols]

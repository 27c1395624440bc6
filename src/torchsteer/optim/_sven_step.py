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

``d`` is the step before the learning rate. The solve itself (keep rule, filter, records)
is :mod:`torchsteer.linalg.truncated` (its unchecked kernel, no host read); here it is fed:
the dense exact solve uses the smaller Gram matrix (``M M^T`` or ``M^T M``) and ``eigh``,
the randomized one :func:`torchsteer.linalg.randomized_svd` on the matrix or the operator.
Every solver takes its settings as one :class:`SolveConfig`.

**Scale.** ``d = M^+ R`` is unchanged when M and R are scaled together, and scales as
``s_R / s_M`` when they are scaled apart (``(s_M M)^+ (s_R R) = (s_R / s_M) M^+ R``; the
relative damping and the keep rule see the same ratios). The solves form ``M M^T`` and
``|R|^2``, which overflow float32 at entries near 1e19 and underflow near 1e-19. R (B
numbers) is brought to ``max |R| ~ 1`` by a power of two when it leaves ``[2^-16, 2^16]``.
M is solved as it is first; only when that solve fails, or gives a non-finite step or
``S_max`` outside ``[2^-30, 2^30]`` (:func:`plausible`), is M looked at: NaN/Inf in it is a
non-finite Jacobian (:class:`NonFinite`), otherwise it is scaled to ``max |M|`` in [0.5, 1)
by a power of two and solved again (:class:`CheckedOperator` for the matrix-free path), and
``d`` and the singular values are scaled back (:func:`unscale`). Powers of two are exact,
and a well-scaled step pays nothing: it is bit for bit the unscaled one. (That is the
matrix-free and the DDP path, and the dense path in one process when the step reads its
verdict, e.g. ``nonfinite="raise"``; a masked step decides on ``max |M|`` on the device,
with no host read: :mod:`torchsteer.optim._sven_device`.)
"""

from __future__ import annotations

import dataclasses
import math

import torch

from torchsteer.jacobian.factored import FactoredRows
from torchsteer.linalg import randomized_svd
from torchsteer.linalg.truncated import TruncatedSolution as Solution
from torchsteer.linalg.truncated import (
    gram_solve,
    gram_solve_unchecked,
    row_gram_solve,
    truncated_solve_unchecked,
)

__all__ = [
    "CheckedOperator",
    "NonFinite",
    "ResidualOperator",
    "Solution",
    "SolveConfig",
    "group_rows",
    "max_abs",
    "plausible",
    "power_of_two_scale",
    "residuals",
    "reuse_buffer",
    "solve_dense",
    "solve_operator",
    "solve_rows",
    "unscale",
]

_BAND = 16  # |log2 max|x|| up to which nothing is rescaled


class NonFinite(Exception):
    """A step rejected for NaN/Inf; ``args[0]`` names where ("per-sample losses", ...)."""


def power_of_two_scale(amax: float, dtype: torch.dtype, band: int = _BAND) -> float:
    """The factor ``2^-e`` with ``amax = m 2^e``, ``0.5 <= m < 1``, that brings ``amax`` into
    [0.5, 1); 1.0 when ``2^-band <= amax <= 2^band`` or ``amax = 0`` (``band = 0``: whenever
    ``amax`` is not in [0.5, 1); kept representable in ``dtype``). Raises
    :class:`NonFinite` (the Jacobian) when ``amax`` is NaN/Inf."""
    if not math.isfinite(amax):
        raise NonFinite("Jacobian")
    if amax == 0.0 or (band > 0 and 2.0**-band <= amax <= 2.0**band):
        return 1.0
    limit = math.frexp(torch.finfo(dtype).max)[1] - 2
    return math.ldexp(1.0, max(-limit, min(limit, -math.frexp(amax)[1])))


def max_abs(x: torch.Tensor | FactoredRows) -> torch.Tensor:
    """``max |x|`` as a 0-d tensor (NaN if x holds one, 0 for an empty x); one fast pass.
    For :class:`~torchsteer.jacobian.factored.FactoredRows`, its bound
    (:meth:`~torchsteer.jacobian.factored.FactoredRows.max_abs`)."""
    if isinstance(x, FactoredRows):
        return x.max_abs()
    if x.numel() == 0:
        return x.new_zeros(())
    low, high = torch.aminmax(x)
    return torch.maximum(-low, high)


def plausible(sol: Solution) -> bool:
    """A finite step and ``S_max`` 0 or in ``[2^-30, 2^30]``: no sign of over/underflow."""
    smax = sol.sigma_max.reshape(()).to(torch.float64)
    finite, smax = torch.stack([torch.isfinite(sol.direction).all().to(smax), smax]).tolist()
    ok = finite == 1.0 and math.isfinite(smax)  # one sync for both checks
    return ok and (smax == 0.0 or 2.0**-30 <= smax <= 2.0**30)


def unscale(sol: Solution, scale_m: float, scale_r: float) -> Solution:
    """The solution of ``(M, R)`` from that of ``(scale_m M, scale_r R)``: ``d`` times
    ``scale_m / scale_r``, singular values divided by ``scale_m`` (rank, reduction kept)."""
    if scale_m == 1.0 and scale_r == 1.0:
        return sol
    return dataclasses.replace(
        sol,
        direction=sol.direction * (scale_m / scale_r),
        sigma_max=sol.sigma_max / scale_m,
        sigma_min=sol.sigma_min / scale_m,
    )


class CheckedOperator:
    """``scale M`` as products of the operator ``op`` (M), ``scale`` a power of two that brings
    the first product's ``max |.|`` into [0.5, 1); a product holding NaN/Inf raises
    :class:`NonFinite` ("Jacobian")."""

    def __init__(self, op) -> None:
        self.op, self.shape, self.dtype, self.device = op, op.shape, op.dtype, op.device
        self.scale: float | None = None

    def _checked(self, Y: torch.Tensor) -> torch.Tensor:
        amax = float(max_abs(Y))  # NaN/Inf anywhere in Y shows in its max
        if not math.isfinite(amax):
            raise NonFinite("Jacobian")
        if self.scale is None:
            self.scale = power_of_two_scale(amax, Y.dtype, band=0)
        return Y if self.scale == 1.0 else Y * self.scale

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self._checked(self.op.matmat(V))

    def rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        return self._checked(self.op.rmatmat(U))


@dataclasses.dataclass(frozen=True)
class SolveConfig:
    """The settings of one truncated solve.

    ``rank`` triplets at most, cut at ``rtol * S_max``, relative Levenberg-Marquardt
    ``damping``; ``exact_svd``: dense, ``eigh`` of the Gram matrix (in ``gram_dtype``, default
    the algebra dtype) rather than a randomized SVD; matrix-free, a sketch of all
    ``min(B, P)`` columns. ``oversample`` and ``power_iters`` shape the randomized sketch.
    """

    rank: int
    rtol: float
    oversample: int = 10
    power_iters: int = 2
    gram_dtype: torch.dtype | None = None
    damping: float = 0.0
    exact_svd: bool = True


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


def solve_dense(
    M: torch.Tensor,
    R: torch.Tensor,
    config: SolveConfig,
    generator: torch.Generator | None,
    clean: bool = True,
) -> Solution:
    """The truncated minimum-norm direction for a dense M (B, P), through the unchecked
    kernels (Sven checks its settings): the exact path reads nothing on the host, and NaN/Inf
    in M or R shows as NaN in ``d``; :func:`~torchsteer.linalg.randomized_svd` checks M.
    ``clean=False``: the exact path is :func:`~torchsteer.linalg.gram_solve` as it is (an
    over/underflowed Gram matrix fails in ``eigh``, a NaN/Inf M is a ``ValueError`` after
    one read): the solve of 06f44c7, for a step that reads its verdict anyway."""
    cfg = config
    if cfg.exact_svd:
        solve = gram_solve_unchecked if clean else gram_solve
        return solve(M, R, cfg.rank, cfg.rtol, cfg.gram_dtype, cfg.damping)
    U, S, V = randomized_svd(M, cfg.rank, cfg.oversample, cfg.power_iters, generator, exact=False)
    return truncated_solve_unchecked(U, S, V, R, cfg.rtol, cfg.damping)


def solve_rows(M, R: torch.Tensor, config: SolveConfig, generator, clean: bool = False):
    """:func:`solve_dense` for a dense M; for a wide M held as
    :class:`~torchsteer.jacobian.factored.FactoredRows` (exact SVD) the same solve from its
    Gram matrix and ``M^T y``, M never formed
    (:func:`~torchsteer.linalg.truncated.row_gram_solve`); ``clean`` as in
    :func:`solve_dense` (NaN/Inf of the Gram matrix set to 0: no failure, no host read)."""
    if not isinstance(M, FactoredRows):
        return solve_dense(M, R, config, generator, clean=clean)
    G = M.gram(config.gram_dtype)
    G = G.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0) if clean else G
    return row_gram_solve(G, R, M.rmatvec, config.rank, config.rtol, M.dtype, config.damping)


def solve_operator(op, R: torch.Tensor, config: SolveConfig, generator) -> Solution:
    """The truncated direction from a matrix-free M; ``exact_svd`` sketches all min(B, P)
    columns.

    With a sketch as wide as the row space (l >= rank M) the range is captured exactly, so
    the result equals the exact truncated SVD up to rounding.
    """
    cfg = config
    if cfg.exact_svd:
        U, S, V = randomized_svd(op, min(op.shape), 0, 0, generator)
        return truncated_solve_unchecked(U, S, V, R, cfg.rtol, cfg.damping, rank=cfg.rank)
    U, S, V = randomized_svd(op, cfg.rank, cfg.oversample, cfg.power_iters, generator)
    return truncated_solve_unchecked(U, S, V, R, cfg.rtol, cfg.damping)


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

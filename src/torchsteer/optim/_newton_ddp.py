"""The sharded solve of :class:`RegularizedNewton` under DDP: Woodbury with the empirical Fisher.

With ``F = (1/B) G^T G`` (``G`` the B x P per-sample gradients), the push-through identity gives
``(F + lambda I)^{-1} g = (g - G^T (B lambda I + G G^T)^{-1} G g) / lambda``: one B x B
Cholesky per ``lambda``. Every collective is one of :mod:`torchsteer.distributed` (Shard,
column_bounds, rows_to_columns, all_reduce_sum, all_gather_cat); without a process group they
are not called and the solve is the single-process one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from torchsteer import distributed as tdist
from torchsteer.linalg.shifted_solvers import Solution

if TYPE_CHECKING:
    from torchsteer.optim._newton_solvers import EmpiricalFisherCurvature

__all__ = ["WoodburySolver"]


def _finite(delta: torch.Tensor) -> bool:
    return bool(torch.isfinite(delta).all())


class WoodburySolver:
    """Exact solve with ``F = (1/B) G^T G`` through the B x B Gram ``K = G G^T``::

    (F + lambda I)^{-1} g = (g - G^T (B lambda I + K)^{-1} G g) / lambda

    Under a process group the rows of ``G`` live on their ranks (``B_r`` each, ``B = sum``).
    Rank r receives, by one all-to-all, the columns of its slice of the parameters for all rows
    (``B x P/R``, split by :func:`~torchsteer.distributed.column_bounds`: no rank holds all
    of ``G``); ``K`` and ``G g`` are then one all-reduce of
    ``B (B + 1)`` numbers, and each solve all-gathers the P/R-slices of the step. With unequal
    ``B_r`` the rows are weighted by ``sqrt(B / (R B_r))``, so that ``F`` is the mean over
    ranks of the ranks' own Fishers, as the gradient is the mean of the ranks' gradients.
    """

    def __init__(self, curvature: EmpiricalFisherCurvature, g: torch.Tensor) -> None:
        G = curvature.per_sample()
        self.g = g
        self.sharded = tdist.is_distributed()
        if self.sharded:
            shard = tdist.Shard.create(G.shape[0], g.device)
            R, P = shard.world, g.numel()
            if len(set(shard.rows)) > 1:
                G = G * math.sqrt(shard.total / (R * G.shape[0]))
            bounds = tdist.column_bounds(P, R)
            self.widths = [bounds[s + 1] - bounds[s] for s in range(R)]
            lo, hi = bounds[shard.rank], bounds[shard.rank + 1]
            G = tdist.rows_to_columns(G, shard, bounds)  # (B, hi - lo): this rank's columns
            self.g = g[lo:hi]
            B = G.shape[0]
            KG = tdist.all_reduce_sum(torch.cat([G @ G.T, (G @ self.g).unsqueeze(1)], dim=1))
            self.K, self.Gg = KG[:, :B], KG[:, B]
        else:
            self.K = G @ G.T
            self.Gg = G @ g
        self.G = G
        self.eye = torch.eye(self.K.shape[0], dtype=g.dtype, device=g.device)

    def solve(self, lam: float) -> Solution:
        if not lam > 0:
            return Solution(None, False, "lambda")
        B = self.K.shape[0]
        L, info = torch.linalg.cholesky_ex(self.K + (B * lam) * self.eye)
        if int(info) != 0:
            return Solution(None, False, "cholesky")
        z = torch.cholesky_solve(self.Gg.unsqueeze(1), L).squeeze(1)
        delta = -(self.g - self.G.T @ z) / lam
        if self.sharded:  # the slices of every rank, in one all-gather
            delta = tdist.all_gather_cat(delta, 0, self.widths)
        if not _finite(delta):
            return Solution(None, False, "nonfinite")
        return Solution(delta, True)

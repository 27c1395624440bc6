"""Sven across DDP ranks: each rank holds the residual rows of its own samples, none all of M.

Rank r holds the rows M_r (B_r x P) of its B_r samples, M = [M_0; ...; M_{R-1}] (B x P),
and the step is the one-process step on M:

* The per-sample losses (B numbers) are all-gathered first, so the mean loss, the NaN/Inf
  check and the residuals R are global and every rank takes the same decisions.
* Randomized SVD (dense or matrix-free): every rank draws the same Omega (P x l) from the
  same generator state; ``M X`` is the all-gather of the (B_r x l) sketches ``M_r X``, and
  ``M^T Y`` the all-reduce of the (P x l) products ``M_r^T Y_r``. The small factors (QR of
  the B x l sketch, SVD of the l x P product) are then the same on every rank.
* Dense exact, B <= P: an all-to-all redistributes the columns, rank r then holds
  ``M[:, C_r]`` (B x P/R); the Gram matrix ``M M^T = sum_r M[:, C_r] M[:, C_r]^T`` is an
  all-reduce of B x B; every rank solves the same eigen problem, forms
  ``d[C_r] = M[:, C_r]^T w`` and the direction is all-gathered (P numbers).
* Dense exact, B > P: ``M^T M = sum_r M_r^T M_r`` and ``M^T R``, one all-reduce of P x (P+1).

The row layout is :class:`torchsteer.distributed.Shard` (with one process the one-rank shard,
whose gather and local are the identity) and the column split is
:func:`torchsteer.distributed.column_bounds`, the one rule every sharded solver uses. With one
process none of the exchanges runs: Sven keeps its one-process solves.
"""

from __future__ import annotations

import torch

from torchsteer import distributed as dist
from torchsteer.distributed import Shard
from torchsteer.linalg.truncated import gram_fitted, gram_spectrum, solve_record
from torchsteer.optim._sven_step import Solution, SolveConfig, group_rows

__all__ = ["RowShardedOperator", "group", "grouped", "solve_gram_sharded"]


def grouped(shard: Shard, size: int | None) -> Shard:
    """The row counts after each rank averages its micro-batches of ``size`` rows."""
    if size is None or size <= 1:
        return shard
    return Shard(tuple(-(-n // size) for n in shard.rows), shard.rank)


def group(shard: Shard, x: torch.Tensor, size: int | None) -> torch.Tensor:
    """:func:`group_rows` applied to every rank's rows of the gathered ``x``."""
    if shard.world == 1:
        return group_rows(x, size)
    parts = [group_rows(p, size) for p in torch.split(x, list(shard.rows)) if p.numel()]
    return torch.cat(parts)


class RowShardedOperator:
    """The whole M (B x P) as products, from this rank's rows (a tensor or an operator).

    ``matmat`` returns all B rows of ``M X`` on every rank (an all-gather of B_r x l blocks);
    ``rmatmat`` takes all B rows of Y and returns ``M^T Y`` (an all-reduce of P x l).
    """

    def __init__(self, local, shard: Shard) -> None:
        self.local, self.shard = local, shard
        self.shape = (shard.total, local.shape[1])
        self.dtype, self.device = local.dtype, local.device

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        dense = isinstance(self.local, torch.Tensor)
        return self.shard.gather(self.local @ X if dense else self.local.matmat(X))

    def rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        Y = self.shard.local(Y)
        dense = isinstance(self.local, torch.Tensor)
        return dist.all_reduce_sum(self.local.mT @ Y if dense else self.local.rmatmat(Y))


def solve_gram_sharded(
    M: torch.Tensor, R: torch.Tensor, config: SolveConfig, shard: Shard
) -> Solution:
    """The exact truncated direction from this rank's rows M (B_r, P) and all residuals R (B,).

    The same algebra as the one-process ``eigh`` of the smaller Gram matrix
    (:func:`torchsteer.linalg.truncated.gram_solve`, with the same relative
    Levenberg-Marquardt ``damping``); see the module docstring for what is communicated.
    """
    rtol, damping, gram_dtype = config.rtol, config.damping, config.gram_dtype
    B, P = shard.total, M.shape[1]
    dtype = M.dtype
    work = M if gram_dtype is None else M.to(gram_dtype)
    Rw = R.to(work.dtype)
    r = min(config.rank, B, P)
    if B <= P:
        bounds = dist.column_bounds(P, shard.world)
        widths = [bounds[s + 1] - bounds[s] for s in range(shard.world)]
        Mc = dist.rows_to_columns(work, shard, bounds)
        vecs, S, keep, inv2 = gram_spectrum(dist.all_reduce_sum(Mc @ Mc.mT), r, rtol, damping)
        c = vecs.mT @ Rw
        d = dist.all_gather_cat(Mc.mT @ (vecs @ (inv2 * c)), 0, widths)
        fitted = gram_fitted(vecs, S, keep, inv2, c, damping)
    else:
        local = torch.cat([work.mT @ work, (work.mT @ shard.local(Rw)).unsqueeze(1)], dim=1)
        both = dist.all_reduce_sum(local)
        vecs, S, keep, inv2 = gram_spectrum(both[:, :P], r, rtol, damping)
        d = vecs @ (inv2 * (vecs.mT @ both[:, P]))
        fitted = shard.gather(work @ d)
    rec = solve_record(S, keep, Rw, fitted)
    return Solution(d.to(dtype), *(t.to(dtype) for t in rec))

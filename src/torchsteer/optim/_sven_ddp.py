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

Without a process group (one process) none of this runs: Sven keeps its one-process code.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as tdist

from torchsteer import distributed as dist
from torchsteer.optim._sven_step import Solution, _record, gram_spectrum, group_rows

__all__ = ["RowShardedOperator", "Shard", "solve_gram_sharded"]


@dataclasses.dataclass(frozen=True)
class Shard:
    """How many rows every rank holds (rank order) and which rank this is."""

    rows: tuple[int, ...]
    rank: int

    @classmethod
    def create(cls, n_local: int, device: torch.device) -> Shard | None:
        """The row counts of all ranks (one all-gather); None without a process group."""
        if not dist.is_distributed():
            return None
        sizes = dist.all_gather(torch.tensor([n_local], device=device))
        return cls(tuple(int(s) for s in sizes), dist.rank())

    @property
    def offset(self) -> int:
        return sum(self.rows[: self.rank])

    @property
    def total(self) -> int:
        return sum(self.rows)

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor that holds the rows of all ranks."""
        return x[self.offset : self.offset + self.rows[self.rank]]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of every rank, concatenated in rank order (``x``: this rank's rows)."""
        buf = x.new_zeros((max(self.rows), *x.shape[1:]))
        buf[: x.shape[0]] = x
        return torch.cat([p[:n] for p, n in zip(dist.all_gather(buf), self.rows, strict=True)])

    def grouped(self, size: int | None) -> Shard:
        """The row counts after each rank averages its micro-batches of ``size`` rows."""
        if size is None or size <= 1:
            return self
        return Shard(tuple(-(-n // size) for n in self.rows), self.rank)

    def group(self, x: torch.Tensor, size: int | None) -> torch.Tensor:
        """:func:`group_rows` applied to every rank's rows of the gathered ``x``."""
        parts = [group_rows(p, size) for p in torch.split(x, list(self.rows)) if p.numel()]
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


def _column_sizes(P: int, world: int) -> tuple[int, ...]:
    return tuple(P // world + (1 if s < P % world else 0) for s in range(world))


def _to_columns(M: torch.Tensor, shard: Shard, cols: tuple[int, ...]) -> torch.Tensor:
    """All-to-all: this rank's rows (B_r, P) -> every rank's rows of its columns (B, P_r)."""
    in_splits = [M.shape[0] * p for p in cols]
    send = M.new_empty(M.numel())  # one copy: each column block row-major, in rank order
    for chunk, block in zip(torch.split(send, in_splits), torch.split(M, list(cols), dim=1)):
        chunk.view_as(block).copy_(block)
    out_splits = [n * cols[shard.rank] for n in shard.rows]
    recv = send.new_empty(sum(out_splits))
    tdist.all_to_all_single(recv, send, out_splits, in_splits)
    # rank s sent its (B_s, P_r) block row-major: stacked in rank order they are (B, P_r)
    return recv.view(shard.total, cols[shard.rank])


def solve_gram_sharded(
    M: torch.Tensor,
    R: torch.Tensor,
    rank: int,
    rtol: float,
    gram_dtype: torch.dtype | None,
    shard: Shard,
    damping: float = 0.0,
) -> Solution:
    """The exact truncated direction from this rank's rows M (B_r, P) and all residuals R (B,).

    The same algebra as the one-process ``eigh`` of the smaller Gram matrix (with the same
    relative Levenberg-Marquardt ``damping``); see the module docstring for what is
    communicated.
    """
    B, P = shard.total, M.shape[1]
    dtype = M.dtype
    work = M if gram_dtype is None else M.to(gram_dtype)
    Rw = R.to(work.dtype)
    r = min(rank, B, P)
    if B <= P:
        cols = _column_sizes(P, len(shard.rows))
        Mc = _to_columns(work, shard, cols)
        vecs, S, keep, inv2 = gram_spectrum(dist.all_reduce_sum(Mc @ Mc.mT), r, rtol, damping)
        c = vecs.mT @ Rw
        d = Shard(cols, shard.rank).gather(Mc.mT @ (vecs @ (inv2 * c)))
        if damping == 0.0:
            fitted = vecs @ torch.where(keep, c, 0 * c)
        else:  # the damped filter S^2 / (S^2 + lam) on the kept directions
            fitted = vecs @ (inv2 * S.square() * c)
    else:
        local = torch.cat([work.mT @ work, (work.mT @ shard.local(Rw)).unsqueeze(1)], dim=1)
        both = dist.all_reduce_sum(local)
        vecs, S, keep, inv2 = gram_spectrum(both[:, :P], r, rtol, damping)
        d = vecs @ (inv2 * (vecs.mT @ both[:, P]))
        fitted = shard.gather(work @ d)
    rec = _record(S, keep, Rw, fitted)
    return Solution(d.to(dtype), *(t.to(dtype) for t in rec))

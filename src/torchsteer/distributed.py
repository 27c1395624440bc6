"""Collectives that are exact no-ops when ``torch.distributed`` is not initialized.

Every part of torchsteer that must agree across ranks (Sven's sketches, the radius
maximum, KL statistics, DRO normalizers) reduces through these helpers, so the same code
runs in one process and under DDP. Without an initialized process group each function
returns its input unchanged (``all_gather`` returns it as the only element); no copy is
made and nothing is synchronized.

Besides the reductions it holds the two layouts the optimizers exchange data in, so that no
module outside this one calls ``torch.distributed``:

- **rows**: rank r holds ``rows[r]`` consecutive rows of a (B, P) matrix (its own samples);
  :class:`Shard` records the counts, and with one process it is the one-rank shard
  ``Shard((B,), 0)``, whose ``gather`` and ``local`` are the identity, so the algebra needs no
  ``if sharded`` branch.
- **columns**: rank r holds columns ``[bounds[r], bounds[r + 1])`` for all B rows, with
  ``bounds = column_bounds(P, R)`` (the first ``P mod R`` ranks one column more);
  :func:`rows_to_columns` is the all-to-all from the first layout to the second, and
  :func:`all_gather_cat` with ``sizes`` joins the slices of a P-vector back.

Example::

    from torchsteer import distributed as dist
    spread = dist.all_reduce_max(local_spread)      # max over ranks
    total = dist.all_reduce_sum(local_sum)          # sum over ranks
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as tdist

__all__ = [
    "Shard",
    "agree",
    "all_gather",
    "all_gather_cat",
    "all_reduce_max",
    "all_reduce_mean",
    "all_reduce_sum",
    "broadcast",
    "column_bounds",
    "is_distributed",
    "rank",
    "rows_to_columns",
    "world_size",
]


def is_distributed() -> bool:
    """True when a process group is initialized with more than one process."""
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def _all_reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    """``op`` over ranks into a new tensor (the input is not modified)."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    tdist.all_reduce(out, op=op)
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (returns a new tensor; the input is not modified)."""
    return _all_reduce(tensor, tdist.ReduceOp.SUM)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks."""
    if not is_distributed():
        return tensor
    return all_reduce_sum(tensor) / world_size()


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum over ranks."""
    return _all_reduce(tensor, tdist.ReduceOp.MAX)


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Tensors of equal shape from every rank, in rank order."""
    if not is_distributed():
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(world_size())]
    tdist.all_gather(out, tensor.detach().contiguous())
    return out


def all_gather_cat(
    tensor: torch.Tensor, dim: int = 0, sizes: tuple[int, ...] | list[int] | None = None
) -> torch.Tensor:
    """Concatenate along ``dim`` tensors from every rank; sizes along ``dim`` may differ.

    ``sizes`` (every rank's size along ``dim``, rank order) spares the all-gather of the
    sizes when the caller knows them. The parts are padded to the largest for one all-gather.
    """
    if not is_distributed():
        return tensor
    if sizes is None:
        size = torch.tensor([tensor.shape[dim]], device=tensor.device)
        sizes = [int(s) for s in all_gather(size)]
    shape = list(tensor.shape)
    shape[dim] = max(sizes)
    buf = tensor.new_zeros(shape)
    buf.narrow(dim, 0, tensor.shape[dim]).copy_(tensor.detach())
    parts = [part.narrow(dim, 0, n) for part, n in zip(all_gather(buf), sizes, strict=True)]
    return torch.cat(parts, dim=dim)


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """The value of rank ``src`` on every rank (in place under DDP; returned either way)."""
    if not is_distributed():
        return tensor
    tdist.broadcast(tensor, src=src)
    return tensor


def agree(ok: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``ok`` is true on every rank (one all-reduce of a flag).

    Call it before the first collective of a step whose input a rank may reject, then raise
    on every rank when it is false: a rank that raised alone would leave the others waiting in
    a collective it never joins.
    """
    if not is_distributed():
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    return bool(all_reduce_max(flag).item() == 0.0)


def column_bounds(P: int, R: int | None = None) -> tuple[int, ...]:
    """The ``R + 1`` bounds of the column slices of ``P`` columns over ``R`` ranks.

    Rank ``r`` owns columns ``[bounds[r], bounds[r + 1])``; the first ``P mod R`` ranks own
    ``P // R + 1`` columns, the others ``P // R``. ``R`` defaults to :func:`world_size`.
    """
    R = world_size() if R is None else R
    if P < 0 or R < 1:
        raise ValueError(f"Invalid column split: P={P}, R={R}")
    bounds = [0]
    for s in range(R):
        bounds.append(bounds[-1] + P // R + (1 if s < P % R else 0))
    return tuple(bounds)


@dataclasses.dataclass(frozen=True)
class Shard:
    """How many rows every rank holds (rank order) and which rank this is.

    With one process it is ``Shard((n,), 0)``: :meth:`gather` and :meth:`local` return their
    input, so code written for the sharded case is the one-process code.
    """

    rows: tuple[int, ...]
    rank: int

    @classmethod
    def create(
        cls, n_local: int, device: torch.device | str = "cpu", error: Exception | None = None
    ) -> Shard:
        """The row counts of all ranks (one all-gather under a process group).

        ``error``: this rank rejected its input. The same all-gather carries it (the count
        ``-1``), so every rank learns it before any other collective and raises: this rank
        ``error`` itself, the others a ``ValueError`` naming the rank(s). Without a process
        group ``error`` is raised as it is.
        """
        if not is_distributed():
            if error is not None:
                raise error
            return cls((int(n_local),), 0)
        sizes = all_gather(torch.tensor([-1 if error is not None else n_local], device=device))
        rows = tuple(int(s) for s in sizes)
        if error is not None:
            raise error
        bad = [r for r, n in enumerate(rows) if n < 0]
        if bad:
            raise ValueError(
                f"Invalid input on rank {', '.join(map(str, bad))}: it rejected its batch, so "
                "every rank raises (nothing changed)"
            )
        return cls(rows, rank())

    @property
    def world(self) -> int:
        return len(self.rows)

    @property
    def offset(self) -> int:
        return sum(self.rows[: self.rank])

    @property
    def total(self) -> int:
        return sum(self.rows)

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor that holds the rows of all ranks."""
        if self.world == 1:
            return x
        return x[self.offset : self.offset + self.rows[self.rank]]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of every rank, concatenated in rank order (``x``: this rank's rows)."""
        if self.world == 1:
            return x
        return all_gather_cat(x, 0, self.rows)


def rows_to_columns(M: torch.Tensor, shard: Shard, bounds: tuple[int, ...]) -> torch.Tensor:
    """All-to-all: this rank's rows ``(B_r, P)`` -> all ``B`` rows of its columns.

    Returns ``M_all[:, bounds[r]:bounds[r + 1]]`` (``B x width_r``, rows in rank order), where
    ``M_all`` stacks every rank's rows. One process: ``M`` sliced (a view when it is all of it).
    """
    r, R = shard.rank, shard.world
    if len(bounds) != R + 1 or bounds[-1] != M.shape[1]:
        raise ValueError(f"Invalid bounds {bounds} for {R} ranks and {M.shape[1]} columns")
    widths = [bounds[s + 1] - bounds[s] for s in range(R)]
    if R == 1:
        return M
    in_splits = [M.shape[0] * w for w in widths]
    send = M.new_empty(M.numel())  # one copy: each column block row-major, in rank order
    for chunk, block in zip(torch.split(send, in_splits), torch.split(M, widths, dim=1)):
        chunk.view_as(block).copy_(block)
    out_splits = [n * widths[r] for n in shard.rows]
    recv = send.new_empty(sum(out_splits))
    tdist.all_to_all_single(recv, send, out_splits, in_splits)
    # rank s sent its (B_s, width_r) block row-major: stacked in rank order they are (B, width_r)
    return recv.view(shard.total, widths[r])

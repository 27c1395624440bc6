"""Collectives that are exact no-ops when ``torch.distributed`` is not initialized.

Every part of torchsteer that must agree across ranks (Sven's sketches, the radius
maximum, KL statistics, DRO normalizers) reduces through these helpers, so the same code
runs in one process and under DDP. Without an initialized process group each function
returns its input unchanged (``all_gather`` returns it as the only element); no copy is
made and nothing is synchronized.

Example::

    from torchsteer import distributed as dist
    spread = dist.all_reduce_max(local_spread)      # max over ranks
    total = dist.all_reduce_sum(local_sum)          # sum over ranks
"""

from __future__ import annotations

import torch
import torch.distributed as tdist

__all__ = [
    "all_gather",
    "all_gather_cat",
    "all_reduce_max",
    "all_reduce_mean",
    "all_reduce_sum",
    "broadcast",
    "is_distributed",
    "rank",
    "world_size",
]


def is_distributed() -> bool:
    """True when a process group is initialized with more than one process."""
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (returns a new tensor; the input is not modified)."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks."""
    if not is_distributed():
        return tensor
    return all_reduce_sum(tensor) / world_size()


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum over ranks."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    tdist.all_reduce(out, op=tdist.ReduceOp.MAX)
    return out


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Tensors of equal shape from every rank, in rank order."""
    if not is_distributed():
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(world_size())]
    tdist.all_gather(out, tensor.detach().contiguous())
    return out


def all_gather_cat(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate along ``dim`` tensors from every rank; sizes along ``dim`` may differ."""
    if not is_distributed():
        return tensor
    size = torch.tensor([tensor.shape[dim]], device=tensor.device)
    sizes = [int(s) for s in all_gather(size)]
    shape = list(tensor.shape)
    padded = []
    biggest = max(sizes)
    shape[dim] = biggest
    buf = tensor.new_zeros(shape)
    buf.narrow(dim, 0, tensor.shape[dim]).copy_(tensor.detach())
    for i, part in enumerate(all_gather(buf)):
        padded.append(part.narrow(dim, 0, sizes[i]))
    return torch.cat(padded, dim=dim)


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """The value of rank ``src`` on every rank (in place under DDP; returned either way)."""
    if not is_distributed():
        return tensor
    tdist.broadcast(tensor, src=src)
    return tensor

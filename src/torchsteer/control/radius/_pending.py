"""What :meth:`RadiusLimiter.before_step` hands :meth:`RadiusLimiter.after_step`, one frozen
record per direction (``"update"``: the theta_old buffers of every optimizer that steps in
this step; ``"neg_grad"``: the measurement along ``-lr g`` and the learning rates to
restore)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from torchsteer.control.radius._buffers import FlatBuffers, TensorBuffers

__all__ = ["PendingNegGrad", "PendingUpdate"]


@dataclass(frozen=True)
class PendingUpdate:
    """``before_step`` of ``direction="update"``: theta_old is in ``buffers`` (flat or per
    tensor), one entry per optimizer of this step (two optimizers under Lightning's manual
    optimization step one after the other); ``after_step`` takes ``p`` from all of them,
    measures the combined update and rescales it. ``skip``: a gradient was NaN or Inf (the
    optimizers were kept from stepping); ``after_step`` restores theta_old and records a
    skipped step."""

    optimizers: tuple[torch.optim.Optimizer, ...]
    buffers: tuple[FlatBuffers | TensorBuffers, ...]
    skip: bool = False

    def has(self, optimizer) -> bool:
        return any(o is optimizer for o in self.optimizers)

    def joined(self, optimizer, buffers, skip: bool) -> PendingUpdate:
        """This step with one more optimizer."""
        return replace(
            self,
            optimizers=(*self.optimizers, optimizer),
            buffers=(*self.buffers, buffers),
            skip=self.skip or skip,
        )

    def restore(self) -> None:
        """theta_old back into every optimizer's parameters."""
        for bufs in self.buffers:
            bufs.restore()


@dataclass(frozen=True)
class PendingNegGrad:
    """``before_step`` of ``direction="neg_grad"``: measured along ``-lr g`` and every group's
    lr scaled by ``scale``; ``after_step`` restores ``lrs`` and records the measurement."""

    optimizer: torch.optim.Optimizer
    lrs: tuple[float, ...]
    r: float
    rho: float
    tau: float
    scale: float

    def has(self, optimizer) -> bool:
        return optimizer is self.optimizer

    def restore_lrs(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            group["lr"] = lr

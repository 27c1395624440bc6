"""What :meth:`RadiusLimiter.before_step` hands :meth:`RadiusLimiter.after_step`, one frozen
record per direction (``"update"``: the theta_old buffers; ``"neg_grad"``: the measurement
along ``-lr g`` and the learning rates to restore)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from torchsteer.control.radius._buffers import FlatBuffers, TensorBuffers

__all__ = ["PendingNegGrad", "PendingUpdate"]


@dataclass(frozen=True)
class PendingUpdate:
    """``before_step`` of ``direction="update"``: theta_old is in ``buffers`` (flat or per
    tensor); ``after_step`` takes ``p`` from them, measures and rescales."""

    buffers: FlatBuffers | TensorBuffers


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

    def restore_lrs(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            group["lr"] = lr

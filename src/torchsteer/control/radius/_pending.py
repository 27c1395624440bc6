"""What :meth:`RadiusLimiter.before_step` hands :meth:`RadiusLimiter.after_step`, one frozen
record per direction (``"update"``: the theta_old buffers of every optimizer that steps in
this step and the optimizers' state; ``"neg_grad"``: the measurement along ``-lr g`` and
the learning rates to restore)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from torchsteer.control.radius._buffers import FlatBuffers, TensorBuffers
from torchsteer.control.radius._masked import StateSnapshot

__all__ = ["PendingNegGrad", "PendingUpdate"]


@dataclass(frozen=True)
class PendingUpdate:
    """``before_step`` of ``direction="update"``: theta_old is in ``buffers`` (flat or per
    tensor) and the optimizer's state in ``snapshots``, one entry per optimizer of this step
    (two optimizers under Lightning's manual optimization step one after the other);
    ``after_step`` takes ``p`` from all of them, measures the combined update and rescales
    it. ``grads_ok``: the gradients checked before the step were all finite (a 0-d bool
    tensor on the device, None when none were checked)."""

    optimizers: tuple[torch.optim.Optimizer, ...]
    buffers: tuple[FlatBuffers | TensorBuffers, ...]
    snapshots: tuple[StateSnapshot, ...]
    grads_ok: torch.Tensor | None = None

    def has(self, optimizer) -> bool:
        return any(o is optimizer for o in self.optimizers)

    def joined(self, optimizer, buffers, snapshot, grads_ok) -> PendingUpdate:
        """This step with one more optimizer."""
        ok = self.grads_ok
        if grads_ok is not None:
            ok = grads_ok if ok is None else ok & grads_ok.to(ok.device)
        return replace(
            self,
            optimizers=(*self.optimizers, optimizer),
            buffers=(*self.buffers, buffers),
            snapshots=(*self.snapshots, snapshot),
            grads_ok=ok,
        )

    def restore(self) -> None:
        """theta_old and the optimizers' state back, exactly."""
        for bufs in self.buffers:
            bufs.restore()
        for snap in self.snapshots:
            snap.restore()

    def state_unchanged(self) -> bool:
        return all(snap.unchanged_structure() for snap in self.snapshots)


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

"""Label-aware distillation losses: NKD's normalized KD and PS-KD's self-distillation targets.

**NKD** (Yang et al. 2023, "From Knowledge Distillation to Self-Knowledge Distillation: A
Unified Approach with Normalized Loss and Customized Soft Labels"). With ``p = softmax(z_t)``,
``q = softmax(z_s)`` and the label ``y``, the KD cross-entropy splits into a target part and a
non-target part, ``p_hat``, ``q_hat`` being the distributions over the classes ``i != y``
renormalized (softmax of the non-target logits)::

    -sum_i p_i log q_i = -p_y log q_y - (1 - p_y) log(1 - q_y)
                         - (1 - p_y) sum_{i != y} p_hat_i log q_hat_i

NKD drops the ``(1 - p_y)`` factors and the middle term and weights the normalized
non-target part, at temperature T::

    L = -p_y log q_y  -  gamma T^2 sum_{i != y} p_hat_i^T log q_hat_i^T

(``p_y`` at temperature 1, detached, as in the released ``nkd.py``; defaults ``gamma = 1.5``,
``T = 1``). Computed in log space: ``log q_hat`` is the log-softmax of the logits with the
target entry at ``-inf``. USKD's customized soft labels (Zipf labels from a weak head) are
left out here.

**PS-KD** (Kim et al. 2021, "Self-Knowledge Distillation with Progressive Refinement of
Targets"): at epoch t of T the target of sample x is its own prediction of the last epoch,
mixed with the label::

    target_t(x) = (1 - alpha_t) onehot(y) + alpha_t q_{t-1}(x),   alpha_t = alpha_T t / T

(``alpha_T = 0.8``), and the loss is the cross-entropy ``-sum_i target_i log q_i``.
:class:`PSKDTargets` keeps the per-sample prediction memory (a state dict that resumes).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["PSKDTargets", "nkd_loss", "ps_kd_alpha", "soft_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_logits(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> None:
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"Invalid logits: student {tuple(student.shape)}, teacher {tuple(teacher.shape)} "
            "(expected the same (N, C))"
        )
    if student.shape[1] < 2:
        raise ValueError("Invalid logits: NKD needs at least 2 classes")
    if target.shape != student.shape[:1] or target.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"Invalid target: {tuple(target.shape)} {target.dtype} (expected (N,) ints)"
        )
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= student.shape[1]):
        raise ValueError(f"Invalid target: labels outside [0, {student.shape[1]})")


def _reduce(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.mean()


def nkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 1.5,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """NKD's normalized KD loss (module docstring); fp32 (or fp64) compute for any input dtype.

    Example:
        >>> z_s, z_t = torch.randn(4, 10), torch.randn(4, 10)
        >>> nkd_loss(z_s, z_t, torch.tensor([1, 0, 3, 9])).shape
        torch.Size([])
    """
    _check_logits(student_logits, teacher_logits, target)
    if not (gamma >= 0 and gamma < float("inf")):
        raise ValueError(f"Invalid gamma: {gamma}")
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"Invalid temperature: {temperature}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"Invalid reduction: {reduction!r}")
    work = torch.promote_types(student_logits.dtype, torch.float32)
    zs, zt = student_logits.to(work), teacher_logits.detach().to(work)
    y = target.long().unsqueeze(1)
    p_y = torch.softmax(zt, dim=1).gather(1, y).squeeze(1)
    log_q_y = torch.log_softmax(zs, dim=1).gather(1, y).squeeze(1)
    is_y = torch.zeros_like(zs, dtype=torch.bool).scatter_(1, y, True)
    neg_inf = torch.tensor(float("-inf"), dtype=work, device=zs.device)
    log_q_hat = torch.log_softmax(torch.where(is_y, neg_inf, zs / temperature), dim=1)
    p_hat = torch.softmax(torch.where(is_y, neg_inf, zt / temperature), dim=1)
    cross = (p_hat * torch.where(is_y, 0.0, log_q_hat)).sum(1)  # sum_{i != y} p_hat log q_hat
    per_row = -p_y * log_q_y - gamma * temperature**2 * cross
    return _reduce(per_row, reduction)


def ps_kd_alpha(epoch: int, total_epochs: int, alpha_T: float = 0.8) -> float:
    """PS-KD's schedule ``alpha_t = alpha_T t / T`` (``t = 0`` the first epoch: the label)."""
    if not (isinstance(total_epochs, int) and total_epochs >= 1):
        raise ValueError(f"Invalid total_epochs: {total_epochs}")
    if not (isinstance(epoch, int) and 0 <= epoch <= total_epochs):
        raise ValueError(f"Invalid epoch: {epoch} (0 .. {total_epochs})")
    if not 0.0 <= alpha_T <= 1.0:
        raise ValueError(f"Invalid alpha_T: {alpha_T}")
    return alpha_T * epoch / total_epochs


def soft_cross_entropy(
    logits: torch.Tensor, target_probs: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """``-sum_i target_i log softmax(logits)_i`` per row, reduced."""
    if logits.shape != target_probs.shape:
        raise ValueError(
            f"Invalid target_probs: {tuple(target_probs.shape)} (logits {tuple(logits.shape)})"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"Invalid reduction: {reduction!r}")
    work = torch.promote_types(logits.dtype, torch.float32)
    logq = torch.log_softmax(logits.to(work), dim=-1)
    t = target_probs.detach().to(work)
    per_row = -(torch.where(t > 0, t * logq, 0.0)).sum(-1)
    return _reduce(per_row, reduction)


class PSKDTargets:
    """The per-sample prediction memory of PS-KD and its targets.

    ``targets(indices, labels, alpha)`` gives ``(1 - alpha) onehot(y) + alpha q_prev`` for the
    samples ``indices`` of the data set (a sample not yet seen takes its label alone);
    ``update(indices, logits)`` stores this epoch's predictions ``softmax(logits)`` for the
    next epoch. Read all targets of an epoch before its updates land, or update after the
    loss as in the release (each sample is seen once per epoch, so the order is the same).

    Example:
        >>> memory = PSKDTargets(n_samples=100, n_classes=10)
        >>> idx, y, z = torch.arange(4), torch.tensor([1, 2, 3, 4]), torch.randn(4, 10)
        >>> t = memory.targets(idx, y, alpha=ps_kd_alpha(3, 10))
        >>> loss = soft_cross_entropy(z, t)
        >>> memory.update(idx, z)
    """

    def __init__(self, n_samples: int, n_classes: int, dtype: torch.dtype = torch.float32):
        if not (isinstance(n_samples, int) and n_samples >= 1):
            raise ValueError(f"Invalid n_samples: {n_samples}")
        if not (isinstance(n_classes, int) and n_classes >= 2):
            raise ValueError(f"Invalid n_classes: {n_classes}")
        self.probs = torch.zeros(n_samples, n_classes, dtype=dtype)
        self.seen = torch.zeros(n_samples, dtype=torch.bool)

    def _check_indices(self, indices: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(indices).long().reshape(-1).cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.probs.shape[0]):
            raise ValueError(f"Invalid indices: outside [0, {self.probs.shape[0]})")
        return idx

    def targets(self, indices, labels: torch.Tensor, alpha: float) -> torch.Tensor:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Invalid alpha: {alpha}")
        idx = self._check_indices(indices)
        labels = torch.as_tensor(labels).long().reshape(-1).cpu()
        C = self.probs.shape[1]
        if labels.shape != idx.shape or (
            labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < C
        ):
            raise ValueError(f"Invalid labels: expected {tuple(idx.shape)} ints in [0, {C})")
        onehot = F.one_hot(labels, C).to(self.probs.dtype)
        prev = torch.where(self.seen[idx, None], self.probs[idx], onehot)
        return (1 - alpha) * onehot + alpha * prev

    def update(self, indices, logits: torch.Tensor) -> None:
        idx = self._check_indices(indices)
        if logits.shape != (idx.numel(), self.probs.shape[1]):
            raise ValueError(
                f"Invalid logits: {tuple(logits.shape)}, "
                f"expected ({idx.numel()}, {self.probs.shape[1]})"
            )
        probs = torch.softmax(logits.detach().float(), dim=1).to(self.probs.dtype).cpu()
        if not bool(torch.isfinite(probs).all()):
            raise ValueError("Invalid logits: contains NaN or Inf")
        self.probs[idx] = probs
        self.seen[idx] = True

    def state_dict(self) -> dict[str, Any]:
        return {"probs": self.probs.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        probs, seen = state.get("probs"), state.get("seen")
        if not isinstance(probs, torch.Tensor) or probs.shape != self.probs.shape:
            raise ValueError(f"Invalid state: probs of shape {tuple(self.probs.shape)} expected")
        if (
            not isinstance(seen, torch.Tensor)
            or seen.shape != self.seen.shape
            or seen.dtype != torch.bool
        ):
            raise ValueError(
                f"Invalid state: seen, a bool tensor of shape {tuple(self.seen.shape)}"
            )
        self.probs = probs.to(self.probs.dtype).clone()
        self.seen = seen.clone()

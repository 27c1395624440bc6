"""USKD: NKD's normalized loss with customized soft labels, no teacher (Yang et al. 2023).

With s = softmax(z_s) the student, w = softmax(z_w) a weak head's prediction (a linear layer
on an intermediate feature, the user's module), y the label, C classes, N the batch:

* target part: the soft target t_i = s_{i,y}^2 + 1 - mean_batch(s_y^2) (detached),
  L_t = -mean_i t_i log s_{i,y};
* non-target part: classes ranked per row by the score w_j / (1 - w_y) + s_j / (1 - s_y)
  (descending; the target included), Zipf labels 1 / (rank + 1), the target dropped and the
  rest renormalized to z^_j (detached), L_non = -mean_i sum_{j != y} z^_j log s^_j with
  s^ = softmax over the non-target logits;
* weak supervision: L_weak = -mean_i sum_j (0.9 onehot(y) + 0.1 / C)_j log w_j;

    L = alpha L_t + beta L_non + mu L_weak      (alpha, beta, mu = 1, 0.1, 0.005).

As in the released ``uskd.py`` (yzd-v/cls_KD), hard labels only. ``released_rank=True``
ranks as the release does, by w_j / (1 - w_y) + log s_j / (1 - log s_y) (its student term
holds log probabilities: the variable was reassigned before the ranking).
"""

from __future__ import annotations

import math

import torch

__all__ = ["uskd_loss"]


def _check(zs, zw, y, alpha, beta, mu):
    for z, name in ((zs, "student_logits"), (zw, "weak_logits")):
        if not (torch.is_tensor(z) and z.is_floating_point() and z.ndim == 2):
            raise ValueError(f"Invalid {name}: must be a floating tensor (N, C)")
        if not bool(torch.isfinite(z.detach()).all()):
            raise ValueError(f"Invalid {name}: holds NaN or inf")
    if zs.shape != zw.shape or zs.shape[1] < 2:
        raise ValueError(
            f"Invalid shapes: student {tuple(zs.shape)}, weak {tuple(zw.shape)} "
            "(must match, C >= 2)"
        )
    if not torch.is_tensor(y) or y.dtype not in (torch.int32, torch.int64):
        raise ValueError("Invalid target: must be an integer tensor (N,)")
    if y.shape != zs.shape[:1] or bool(((y < 0) | (y >= zs.shape[1])).any()):
        raise ValueError(f"Invalid target: shape {tuple(y.shape)} or labels outside [0, C)")
    for v, name in ((alpha, "alpha"), (beta, "beta"), (mu, "mu")):
        if not (math.isfinite(float(v)) and v >= 0):
            raise ValueError(f"Invalid {name}: {v!r} (must be finite and >= 0)")


def uskd_loss(
    student_logits: torch.Tensor,
    weak_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 0.1,
    mu: float = 0.005,
    released_rank: bool = False,
) -> torch.Tensor:
    """USKD's loss (module docstring), a batch mean; gradients reach both logits.

    Raises:
        ValueError: non-float, non-finite or mismatched logits (N, C) with C < 2, labels
            that are not integers in [0, C), negative or non-finite weights.
    """
    zs, zw, y = student_logits, weak_logits, target
    _check(zs, zw, y, alpha, beta, mu)
    n, c = zs.shape
    y = y.long().unsqueeze(1)
    ls, lw = torch.log_softmax(zs, 1), torch.log_softmax(zw, 1)
    ls_y = ls.gather(1, y)
    with torch.no_grad():
        s_y2 = ls_y.exp() ** 2
        t = s_y2 + 1.0 - s_y2.mean()
    loss_t = -(t * ls_y).mean()
    smooth = torch.full_like(zw, 0.1 / c).scatter_add(1, y, torch.full_like(ls_y, 0.9))
    loss_weak = -(smooth.detach() * lw).sum(1).mean()
    with torch.no_grad():
        w, s = lw.exp(), ls.exp()
        w_y, s_y = w.gather(1, y), s.gather(1, y)
        if released_rank:
            score = w / (1 - w_y + 1e-6) + ls / (1 - ls_y + 1e-6)
        else:
            score = w / (1 - w_y + 1e-6) + s / (1 - s_y + 1e-6)
        order = torch.argsort(score, dim=1, descending=True, stable=True)
        rank = order.argsort(1)  # rank[i, j]: position of class j in row i's order
        zipf = 1.0 / (rank + 1).to(zs.dtype)
        keep = torch.ones_like(zs, dtype=torch.bool).scatter_(1, y, False)
        labels = zipf[keep].reshape(n, c - 1)
        labels = labels / labels.sum(1, keepdim=True)
    ls_non = torch.log_softmax(zs[keep].reshape(n, c - 1), 1)
    loss_non = -(labels * ls_non).sum(1).mean()
    return alpha * loss_t + beta * loss_non + mu * loss_weak

"""Sparse (top-k) knowledge distillation: a teacher stored as its k most likely tokens.

The teacher is given per row by a support S (k token indices) and log p_S, its log
probabilities there at temperature 1 (what an offline teacher stores). Two targets:

``tail="renormalize"``: probability-domain temperature scaling on the support,

    p~_i = p_i^{1/T} / sum_{j in S} p_j^{1/T}   (i in S),

which for S = the whole vocabulary is softmax(z_t / T) (p^{1/T} is exp(z_t / T) up to a
per-row constant), and the student restricted to the same support, q~ = softmax(z_s[S] / T);
the loss is D_f(p~ || q~) over the k entries (KL restricted to the teacher's top-k, as in
OstQuant's KL-Top, is ``kind="kl"``).

``tail="bucket"`` (T = 1 only): the k entries plus one tail category holding the rest of the
mass, teacher (p_S, 1 - sum p_S) and student (q_S, 1 - sum q_S) with q = softmax(z_s) over
the whole vocabulary; the loss is D_f between these (k + 1)-point distributions, which is
at most D_f(p || q) (data processing). The softened tail sum_{v not in S} p_v^{1/T} is not
determined by p_S, so the bucket target is not defined for T != 1 and raises.
"""

from __future__ import annotations

import math

import torch

from .f_divergence import f_divergence

__all__ = ["sparse_kd"]

_TAILS = ("renormalize", "bucket")


def _check(zs, idx, lp, tail, temperature):
    if not (torch.is_tensor(zs) and zs.is_floating_point() and zs.ndim >= 1):
        raise ValueError("Invalid student_logits: must be a floating tensor (..., V)")
    if not torch.is_tensor(idx) or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError("Invalid teacher_indices: must be an integer tensor (..., k)")
    if not torch.is_tensor(lp) or not lp.is_floating_point():
        raise ValueError("Invalid teacher_logprobs: must be a floating tensor (..., k)")
    if idx.shape != lp.shape or idx.shape[:-1] != zs.shape[:-1] or idx.shape[-1] < 1:
        raise ValueError(
            f"Invalid shapes: student {tuple(zs.shape)}, teacher_indices {tuple(idx.shape)}, "
            f"teacher_logprobs {tuple(lp.shape)} (shape mismatch)"
        )
    vocab, k = zs.shape[-1], idx.shape[-1]
    if k > vocab or bool(((idx < 0) | (idx >= vocab)).any()):
        raise ValueError(f"Invalid teacher_indices: outside [0, {vocab}) or k={k} > V")
    if k > 1 and bool((idx.sort(-1).values.diff(dim=-1) == 0).any()):
        raise ValueError("Invalid teacher_indices: a row repeats an index")
    if bool(torch.isnan(lp).any() | (lp > 1e-6).any()):
        raise ValueError("Invalid teacher_logprobs: NaN or > 0 (must be log probabilities)")
    if tail not in _TAILS:
        raise ValueError(f"Invalid tail: {tail!r}; expected one of {_TAILS}")
    if tail == "bucket":
        if float(temperature) != 1.0:
            raise ValueError(
                "Invalid temperature for tail='bucket': the softened tail mass is not "
                "determined by the top-k probabilities (use T = 1 or tail='renormalize')"
            )
        if k == vocab:
            raise ValueError("Invalid tail='bucket': k == V leaves no tail")
        if bool((torch.logsumexp(lp.double(), -1) > 1e-6).any()):
            raise ValueError("Invalid teacher_logprobs: the top-k mass exceeds 1")


def sparse_kd(
    student_logits: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    kind: str = "kl",
    *,
    tail: str = "renormalize",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
    **kind_args,
) -> torch.Tensor:
    """D_f between a top-k teacher and the student (see the module docstring).

    Args:
        student_logits: ``(..., V)``.
        teacher_indices: ``(..., k)`` integer token ids of the teacher's support, distinct
            per row.
        teacher_logprobs: ``(..., k)`` the teacher's log probabilities there (temperature 1;
            ``-inf`` allowed); a constant.
        kind, temperature, mask, reduction, kind_args: as :func:`.f_divergence` (over the k
            or k + 1 entries).
        tail: ``"renormalize"`` or ``"bucket"`` (T = 1 only).

    Raises:
        ValueError: shape mismatch, indices out of range or repeated, log probabilities
            that are NaN or positive (or a top-k mass above 1 for the bucket), an unknown
            tail, T != 1 with the bucket, and everything :func:`.f_divergence` raises for.
    """
    zs, idx, lp = student_logits, teacher_indices, teacher_logprobs
    _check(zs, idx, lp, tail, temperature)
    idx, lp = idx.long(), lp.detach()
    zs_k = zs.gather(-1, idx)
    if tail == "renormalize":
        return f_divergence(
            zs_k, lp, kind, temperature=temperature, mask=mask, reduction=reduction, **kind_args
        )
    cdt = torch.float64 if torch.float64 in (zs.dtype, lp.dtype) else torch.float32
    z = zs.to(cdt)
    lse = torch.logsumexp(z, -1, keepdim=True)
    rest = torch.logsumexp(z.scatter(-1, idx, -math.inf), -1, keepdim=True)
    student = torch.cat([zs_k.to(cdt) - lse, rest - lse], -1)
    mass = torch.logsumexp(lp.to(cdt), -1, keepdim=True)
    teacher_tail = torch.log(-torch.expm1(mass.clamp(max=0.0)))  # log(1 - sum p_S)
    teacher = torch.cat([lp.to(cdt), teacher_tail], -1)
    return f_divergence(student, teacher, kind, mask=mask, reduction=reduction, **kind_args)

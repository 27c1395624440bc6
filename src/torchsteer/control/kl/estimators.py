"""Estimators of KL(pi || pi_ref) for an RLHF loss, and the double soft-min critic value.

Tokens x_t are sampled from pi. With the log-ratio r_t = log pi_ref(x_t) - log pi(x_t):

    k1 = -r_t                        unbiased, high variance, can be negative
    k2 = r_t^2 / 2                   biased (second-order accurate), low variance
    k3 = (exp(r_t) - 1) - r_t        unbiased, non-negative, low variance

E_pi[k1] = E_pi[k3] = KL(pi || pi_ref) exactly; E_pi[k2] = KL + O(|pi - pi_ref|^3).

Used as a *loss* (the sampled tokens held fixed, the gradient through log pi only), their
expected gradients are not all the gradient of the KL they estimate. With g = grad log pi(x)
and E_pi[g] = 0:

    E_pi[grad k1] = E_pi[g]                          = 0
    E_pi[grad k2] = E_pi[(log pi - log pi_ref) g]    = grad KL(pi || pi_ref)   (reverse KL)
    E_pi[grad k3] = E_pi[(1 - pi_ref / pi) g]
                  = -sum_x pi_ref(x) grad log pi(x)  = grad KL(pi_ref || pi)   (forward KL)

so k3 in the loss (TRL GRPO's default, verl's ``low_var_kl``) is a forward-KL penalty. The
table :data:`ESTIMATORS` declares each estimator's value and gradient;
``tests/control/test_kl_gradient_semantics.py`` checks both by exact enumeration. For a
penalty whose gradient is the reverse KL use ``kind="k2"`` (or the exact KL); k1 and k3 are
the unbiased *values* (for logging and for the controllers' ``update``).
Where the full distributions are at hand (small vocabularies) :func:`kl_exact` gives
sum_v pi(v) (log pi(v) - log pi_ref(v)) per position, with no sampling noise at all.

References:
    J. Schulman, "Approximating KL divergence" (2020), http://joschu.net/blog/kl-approx.html.
    Maity, "SAFE: Stable Alignment Finetuning with Entropy-Aware Predictive Control for RLHF",
    arXiv 2602.04651 (2026) (double soft-min critic).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "ESTIMATORS",
    "Semantics",
    "check_token_shapes",
    "double_softmin",
    "kl_estimate",
    "kl_exact",
    "masked_mean",
]


def check_token_shapes(logp, other, mask, other_name: str = "logp_ref") -> None:
    """``other`` (the reference log-probabilities) and ``mask`` must have ``logp``'s shape."""
    if other.shape != logp.shape:
        raise ValueError(
            f"Invalid {other_name} shape: {tuple(other.shape)} (logp {tuple(logp.shape)})"
        )
    if mask is not None and mask.shape != logp.shape:
        raise ValueError(f"Invalid mask shape: {tuple(mask.shape)} (logp {tuple(logp.shape)})")


class Semantics(NamedTuple):
    """What an estimator's expected value and expected loss gradient equal (samples x ~ pi).

    ``value`` / ``gradient``: ``"reverse_kl"`` (KL(pi || pi_ref) and its gradient),
    ``"forward_kl"`` (KL(pi_ref || pi)), ``"zero"``, or ``"half_squared_log_ratio"``
    (E_pi[(log pi - log pi_ref)^2] / 2, which equals the reverse KL to second order).
    """

    value: str
    gradient: str


ESTIMATORS: dict[str, Semantics] = {
    "k1": Semantics(value="reverse_kl", gradient="zero"),
    "k2": Semantics(value="half_squared_log_ratio", gradient="reverse_kl"),
    "k3": Semantics(value="reverse_kl", gradient="forward_kl"),
}
_KINDS = tuple(ESTIMATORS)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None, dim=None) -> torch.Tensor:
    """Mean of ``values`` over the entries where ``mask`` is true (all entries if ``mask`` is None).

    Args:
        values: any shape.
        mask: bool or 0/1 tensor of the same shape, or None.
        dim: dimension(s) to reduce; None reduces everything.

    Returns:
        The masked mean; positions with an empty mask give 0.
    """
    if mask is None:
        return values.mean() if dim is None else values.mean(dim)
    if mask.shape != values.shape:
        raise ValueError(f"Invalid mask shape: {tuple(mask.shape)} (values {tuple(values.shape)})")
    m = mask.to(values.dtype)
    total = (values * m).sum() if dim is None else (values * m).sum(dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / count.clamp(min=1)


def kl_estimate(
    logp: torch.Tensor,
    logp_ref: torch.Tensor,
    mask: torch.Tensor | None = None,
    kind: str = "k3",
    reduction: str = "mean",
) -> torch.Tensor:
    """Estimate KL(pi || pi_ref) from the log-probabilities of tokens sampled from pi.

    Args:
        logp: log pi(x_t) of the sampled tokens, shape ``(B, T)`` (any shape works).
        logp_ref: log pi_ref(x_t), same shape.
        mask: 1 for response tokens, 0 for padding; None means all tokens count.
        kind: ``"k1"``, ``"k2"`` or ``"k3"`` (see the module docstring). As a loss term only
            ``"k2"`` has the reverse-KL gradient (``"k3"``: forward KL, ``"k1"``: zero); see
            :data:`ESTIMATORS`.
        reduction: ``"none"`` (per-token estimates, padding zeroed), ``"mean"`` (mean over the
            unmasked tokens: per-token KL), ``"sequence"`` (sum over the last dimension, mean
            over sequences: per-sequence KL).

    Returns:
        The estimate, differentiable in ``logp`` (and ``logp_ref``).
    """
    if kind not in _KINDS:
        raise ValueError(f"Invalid kind: {kind!r}; expected one of {_KINDS}")
    if reduction not in ("none", "mean", "sequence"):
        raise ValueError(f"Invalid reduction: {reduction!r}")
    check_token_shapes(logp, logp_ref, mask)
    r = logp_ref - logp
    if kind == "k1":
        k = -r
    elif kind == "k2":
        k = 0.5 * r.square()
    else:
        k = torch.expm1(r) - r
    if reduction == "mean":
        return masked_mean(k, mask)
    if mask is not None:
        k = k * mask.to(k.dtype)
    if reduction == "none":
        return k
    return k.sum(-1).mean()


def kl_exact(logits: torch.Tensor, logits_ref: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Exact KL(softmax(logits) || softmax(logits_ref)) along ``dim`` (e.g. per position).

    Args:
        logits: unnormalized log-probabilities of pi, e.g. ``(B, T, V)``.
        logits_ref: the same for pi_ref.
        dim: the vocabulary dimension.

    Returns:
        sum_v pi(v) (log pi(v) - log pi_ref(v)), the shape of ``logits`` without ``dim``.
    """
    if logits.shape != logits_ref.shape:
        raise ValueError(
            f"Invalid logits_ref: shape {tuple(logits_ref.shape)}, logits {tuple(logits.shape)}"
        )
    if not (logits.is_floating_point() and logits_ref.is_floating_point()):
        raise ValueError(
            f"Invalid logits: dtypes {logits.dtype} and {logits_ref.dtype} (floating point needed)"
        )
    logp = torch.log_softmax(logits, dim)
    logq = torch.log_softmax(logits_ref, dim)
    return (logp.exp() * (logp - logq)).sum(dim)


def double_softmin(v1: torch.Tensor, v2: torch.Tensor, alpha: float = 0.3) -> torch.Tensor:
    """Soft minimum of two critic values.

    .. math:: V = -\\alpha \\log\\big(\\tfrac12 (e^{-V_1/\\alpha} + e^{-V_2/\\alpha})\\big)

    It lies between min(V1, V2) and min(V1, V2) + alpha log 2, tends to the minimum as
    alpha -> 0 and to the mean as alpha -> infinity; computed with logsumexp (no overflow).

    Args:
        v1, v2: critic values (broadcastable).
        alpha: temperature, > 0 (SAFE uses 0.3).

    References:
        Maity, arXiv 2602.04651 (2026), the double soft-min critic.
    """
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"Invalid alpha: {alpha}")
    try:
        v1, v2 = torch.broadcast_tensors(v1, v2)
    except RuntimeError:
        raise ValueError(
            f"Invalid v2: shape {tuple(v2.shape)} does not broadcast with v1 {tuple(v1.shape)}"
        ) from None
    s = torch.stack([-v1 / alpha, -v2 / alpha], dim=-1)
    return -alpha * (torch.logsumexp(s, dim=-1) - math.log(2.0))

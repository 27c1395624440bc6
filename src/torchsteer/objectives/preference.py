"""f-DPO: direct preference optimization under reverse KL, JS, alpha and forward-KL constraints.

With the policy-to-reference ratios u_w = pi(y_w) / pi_ref(y_w) (chosen) and u_l (rejected),
and l = log u, the loss of one pair is

.. math::
    h = f'(u_w) - f'(u_l), \\qquad
    L = -(1 - \\epsilon) \\log\\sigma(\\beta h) - \\epsilon \\log\\sigma(-\\beta h)

(epsilon: label smoothing, conservative DPO as in older TRL's ``sigmoid`` loss; epsilon = 0 is
TRL's ``sigmoid`` loss today), with f' of the divergence that constrains the policy:

=============  ===========================  ================================================
divergence     f'(u)                        h, computed as
=============  ===========================  ================================================
reverse_kl     log u                        l_w - l_l (this is DPO)
js             log(2u / (1 + u))            (l_w - l_l) - (softplus(l_w) - softplus(l_l))
alpha          (u^{alpha-1} - 1)/(alpha-1)  exp(c l_l) expm1(c (l_w - l_l)) / c, c = alpha - 1
forward_kl     1 - 1/u                      the alpha case at alpha = 0
=============  ===========================  ================================================

These are the conventions of TRL's ``f_divergence_type`` (``reverse_kl``, ``forward_kl``,
``js_divergence``, ``alpha_divergence`` with ``f_alpha_divergence_coef``, default 0.5) and of
the f-DPO paper: alpha -> 1 is reverse KL (DPO), alpha = 0 forward KL. Older TRL releases
wrote the alpha case as (1 - u^{-alpha'}) / alpha' with alpha' = 1 - alpha; at the default 0.5
the two agree. The alpha form has no cancellation as alpha -> 1 (expm1; alpha = 1 is the
reverse-KL case exactly) and overflows only where h itself does (TRL clamps the exponent).

References:
    Wang, Jiang, Yang, Liu, Chen, "Beyond Reverse KL: Generalizing Direct Preference
    Optimization with Diverse Divergence Constraints", ICLR 2024 (arXiv 2309.16240).
    Rafailov et al., "Direct Preference Optimization", NeurIPS 2023. TRL ``DPOTrainer``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["DIVERGENCES", "f_dpo_logits", "f_dpo_loss"]

DIVERGENCES = ("reverse_kl", "js", "forward_kl", "alpha")


def _number(name, value, lo, hi, *, lo_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r}")
    if value < lo or (lo_open and value == lo) or value > hi:
        raise ValueError(f"Invalid {name}: {value}")
    return float(value)


def f_dpo_logits(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    divergence: str = "reverse_kl",
    alpha: float = 0.5,
) -> torch.Tensor:
    """h = f'(u_w) - f'(u_l) per pair (before beta), see the module docstring."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"Invalid divergence: {divergence!r}; expected one of {DIVERGENCES}")
    tensors = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"Invalid {name}: {type(t).__name__} (a float tensor)")
        if t.shape != policy_chosen_logps.shape:
            raise ValueError(
                f"Invalid {name} shape: {tuple(t.shape)} "
                f"(policy_chosen_logps {tuple(policy_chosen_logps.shape)})"
            )
    if divergence == "alpha":
        alpha = _number("alpha", alpha, -math.inf, math.inf)
    lw = policy_chosen_logps - ref_chosen_logps
    ll = policy_rejected_logps - ref_rejected_logps
    if divergence == "reverse_kl" or (divergence == "alpha" and alpha == 1.0):
        return lw - ll
    if divergence == "js":
        return (lw - ll) - (F.softplus(lw) - F.softplus(ll))
    c = -1.0 if divergence == "forward_kl" else alpha - 1.0
    return torch.exp(c * ll) * torch.expm1(c * (lw - ll)) / c


def f_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    divergence: str = "reverse_kl",
    alpha: float = 0.5,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """The f-DPO loss of preference pairs from sequence log-probabilities.

    Args:
        policy_chosen_logps, policy_rejected_logps: log pi(y_w | x), log pi(y_l | x) summed
            over each response's tokens, shape ``(B,)`` (any shape, all four the same).
        ref_chosen_logps, ref_rejected_logps: the same under pi_ref (detached by the caller).
        beta: the constraint's strength, finite and > 0 (DPO: 0.1 to 0.5).
        divergence: ``"reverse_kl"`` (DPO), ``"js"``, ``"forward_kl"`` or ``"alpha"``.
        alpha: TRL's ``f_alpha_divergence_coef`` (finite; 1: reverse KL, 0: forward KL;
            used by ``"alpha"`` only).
        label_smoothing: epsilon in [0, 0.5].
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per pair).

    Returns:
        The loss (differentiable in the policy log-probabilities).

    Raises:
        ValueError: an unknown divergence or reduction, beta <= 0, a non-finite alpha, a label
            smoothing outside [0, 0.5], non-float inputs or shapes that differ.

    Example::

        loss = f_dpo_loss(pc, pr, rc, rr, beta=0.1, divergence="js")
        loss.backward()
    """
    beta = _number("beta", beta, 0.0, math.inf, lo_open=True)
    eps = _number("label_smoothing", label_smoothing, 0.0, 0.5)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"Invalid reduction: {reduction!r}")
    h = f_dpo_logits(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        divergence,
        alpha,
    )
    z = beta * h
    losses = -F.logsigmoid(z) * (1.0 - eps)
    if eps > 0:
        losses = losses - F.logsigmoid(-z) * eps
    if reduction == "none":
        return losses
    return losses.mean() if reduction == "mean" else losses.sum()

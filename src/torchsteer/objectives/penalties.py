"""Per-token divergence penalties whose value *and* gradient are the named divergence.

Per token, l = log pi(x) - log pi_ref(x) on a token x drawn either from the policy
(``samples="policy"``: the usual RLHF / GRPO rollout) or from the reference
(``samples="reference"``: DPH-RL's rehearsal of reference completions). With M = (pi + pi_ref)/2:

    reverse_kl  KL(pi || pi_ref)
    forward_kl  KL(pi_ref || pi)                       (mass-covering)
    js          JS = (KL(pi || M) + KL(pi_ref || M)) / 2,  0 <= JS <= log 2

**Policy samples**, t = pi_ref / pi = e^{-l}. The per-token value v is an unbiased estimate
(E_pi[v] = the divergence) and the per-token loss is
``v.detach() + c.detach() * (log pi - log pi.detach())``, whose expected gradient
E_pi[c grad log pi] is exactly the divergence's gradient:

    kind        v (value)                                      c (gradient coefficient)
    reverse_kl  t - 1 + l                     (k3)             l                       (k2's)
    forward_kl  t log t - t + 1 = -t l - expm1(-l)            1 - t                   (k3's)
    js          (log 2 - sp(-l) + t (log 2 - sp(l))) / 2      (log 2 - sp(-l)) / 2

(sp = softplus; each v is >= 0 per token: f(t) with f convex, f(1) = f'(1) = 0). The gradient
of JS needs only pi's own term because d/d pi of the mixture terms cancel.

**Reference samples** (rehearsal), u = pi / pi_ref = e^{l}: the sampling distribution does not
depend on the policy, so v = g(u) with E_ref[g(u)] = the divergence is differentiated as it is:

    reverse_kl  u l - u + 1 = u l - expm1(l)
    forward_kl  u - 1 - l = expm1(l) - l                   (DPH-RL's forward-KL generator)
    js          (u l - (u + 1)(sp(l) - log 2)) / 2          (DPH-RL's JS generator / 2)
                = (u (log 2 - sp(-l)) + log 2 - sp(l)) / 2  (as computed: no cancellation)

DPH-RL's JS generator u log u - (u+1) log((u+1)/2) has expectation 2 JS; here ``"js"`` is JS
in both modes, so a DPH-RL JS coefficient eta corresponds to 2 eta here. Everything is computed
from l in log space (no exp-then-log; the released JS overflows for large u), in forms
without the cancellation of the large terms u l and (u + 1) sp(l).

``mask`` (1 = response token): masked tokens contribute nothing to the value or the gradient,
even when their log-probabilities are NaN or infinite (they are replaced before any arithmetic).

References:
    Li et al., "The Choice of Divergence: A Neglected Key to Mitigating Diversity Collapse in
    Reinforcement Learning with Verifiable Reward" (DPH-RL), arXiv 2509.07430 (2025); code
    ``seamoke/DPH-RL``. Schulman, "Approximating KL divergence" (2020).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from torchsteer.control.kl.estimators import Semantics, check_token_shapes, masked_mean

__all__ = ["PENALTIES", "divergence_penalty", "rehearsal_prompts"]

_LOG2 = math.log(2.0)
_KINDS = ("reverse_kl", "forward_kl", "js")
_SAMPLES = ("policy", "reference")

#: (kind, samples) -> what E[value] and E[grad] equal; the tests check each by enumeration.
PENALTIES: dict[tuple[str, str], Semantics] = {
    (k, s): Semantics(value=k, gradient=k) for k in _KINDS for s in _SAMPLES
}


def _policy_terms(kind: str, lr: torch.Tensor):
    t = torch.exp(-lr)
    if kind == "reverse_kl":
        return torch.expm1(-lr) + lr, lr
    if kind == "forward_kl":
        return -t * lr - torch.expm1(-lr), -torch.expm1(-lr)
    c = _LOG2 - F.softplus(-lr)
    return 0.5 * (c + t * (_LOG2 - F.softplus(lr))), 0.5 * c


def _reference_value(kind: str, lr: torch.Tensor):
    if kind == "reverse_kl":
        return torch.exp(lr) * lr - torch.expm1(lr)
    if kind == "forward_kl":
        return torch.expm1(lr) - lr
    return 0.5 * (torch.exp(lr) * (_LOG2 - F.softplus(-lr)) + (_LOG2 - F.softplus(lr)))


def divergence_penalty(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    kind: str = "reverse_kl",
    mask: torch.Tensor | None = None,
    *,
    samples: str = "policy",
    reduction: str = "mean",
) -> torch.Tensor:
    """A per-token penalty whose expected value and gradient are the divergence ``kind``.

    Args:
        logp: log pi of the sampled tokens, e.g. ``(B, T)``; the gradient flows through it.
        ref_logp: log pi_ref of the same tokens (treated as a constant).
        kind: ``"reverse_kl"``, ``"forward_kl"`` or ``"js"`` (module docstring).
        mask: 1 / True for tokens that count, same shape; None: all count.
        samples: ``"policy"`` (tokens drawn from pi) or ``"reference"`` (from pi_ref:
            DPH-RL rehearsal).
        reduction: ``"mean"`` (over counted tokens), ``"sequence"`` (sum over the last
            dimension, mean over sequences) or ``"none"`` (per token, masked ones 0).

    Returns:
        The penalty; its value estimates the divergence per token (or per sequence), its
        gradient (expected over the declared sampling distribution) is the divergence's.

    Raises:
        ValueError: unknown ``kind``, ``samples`` or ``reduction``, non-float inputs, or
            shapes that differ.

    Example::

        pen = divergence_penalty(logp, ref_logp, "forward_kl", mask)   # rollouts from pi
        loss = pg_loss + ctl.penalty(pen)
    """
    if kind not in _KINDS:
        raise ValueError(f"Invalid kind: {kind!r}; expected one of {_KINDS}")
    if samples not in _SAMPLES:
        raise ValueError(f"Invalid samples: {samples!r}; expected one of {_SAMPLES}")
    if reduction not in ("none", "mean", "sequence"):
        raise ValueError(f"Invalid reduction: {reduction!r}")
    for name, t in (("logp", logp), ("ref_logp", ref_logp)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"Invalid {name}: {type(t).__name__} (a float tensor)")
    check_token_shapes(logp, ref_logp, mask, "ref_logp")
    ref_logp = ref_logp.detach()
    if mask is not None:
        keep = mask.bool()
        logp = torch.where(keep, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
        ref_logp = torch.where(keep, ref_logp, torch.zeros_like(ref_logp))
    lr = logp - ref_logp
    if samples == "reference":
        pen = _reference_value(kind, lr)
    else:
        value, coef = _policy_terms(kind, lr.detach())
        pen = value + coef * (logp - logp.detach())
    if reduction == "mean":
        return masked_mean(pen, mask)
    if mask is not None:
        pen = torch.where(keep, pen, torch.zeros((), dtype=pen.dtype, device=pen.device))
    return pen if reduction == "none" else pen.sum(-1).mean()


def rehearsal_prompts(n_correct: torch.Tensor, n_samples: int | torch.Tensor) -> torch.Tensor:
    """DPH-RL's split: True for the prompts the reference solves on every one of its samples.

    DPH-RL pre-samples k completions per prompt from pi_ref; the prompts with all k correct
    form D_pef, on which the loss is eta * divergence_penalty(..., samples="reference") over
    those reference completions (log pi_ref precomputed once, no online reference model); the
    others (D_exp) get the policy-gradient loss with no KL term.

    Args:
        n_correct: correct reference completions per prompt (integers >= 0).
        n_samples: completions per prompt (k), an int > 0 or a tensor like ``n_correct``.

    Returns:
        A bool tensor, the shape of ``n_correct``.
    """
    n_correct = torch.as_tensor(n_correct)
    n = torch.as_tensor(n_samples, device=n_correct.device)
    if (n < 1).any() or (n_correct < 0).any() or (n_correct > n).any():
        raise ValueError("Invalid n_correct / n_samples: need 0 <= n_correct <= n_samples, n >= 1")
    if n_correct.is_floating_point() and (n_correct != n_correct.round()).any():
        raise ValueError("Invalid n_correct: not whole numbers")
    return n_correct == n

"""The optimum of KL-regularized reward maximization (RL with a KL penalty as inference).

For a reference pi_ref over a finite set of outcomes (a vocabulary, the answers of a bandit, the
sequences of an enumerable toy), rewards r and a coefficient beta > 0,

.. math::
    \\pi^* = \\arg\\max_\\pi E_\\pi[r] - \\beta \\mathrm{KL}(\\pi \\| \\pi_\\mathrm{ref})
           = \\pi_\\mathrm{ref}\\, e^{r/\\beta} / Z, \\qquad
    Z = \\sum_x \\pi_\\mathrm{ref}(x)\\, e^{r(x)/\\beta},

and the optimal value is beta log Z. In log space: log pi* = log_softmax(log pi_ref + r / beta),
which never overflows (outcomes with pi_ref = 0, log pi_ref = -inf, keep probability 0).

References:
    Korbak, Perez, Buckley, "RL with KL penalties is better viewed as Bayesian inference",
    Findings of EMNLP 2022. Go et al., "Aligning Language Models with Preferences through
    f-divergence Minimization" (f-DPG), ICML 2023 (this pi* as the target distribution).
"""

from __future__ import annotations

import math

import torch

__all__ = ["kl_regularized_target", "kl_regularized_value"]


def _check(ref_logprobs, rewards, beta, dim):
    if not isinstance(ref_logprobs, torch.Tensor) or not ref_logprobs.is_floating_point():
        raise ValueError(f"Invalid ref_logprobs: {type(ref_logprobs).__name__} (a float tensor)")
    rewards = torch.as_tensor(rewards, dtype=ref_logprobs.dtype, device=ref_logprobs.device)
    try:
        shape = torch.broadcast_shapes(ref_logprobs.shape, rewards.shape)
    except RuntimeError:
        raise ValueError(
            f"Invalid rewards shape: {tuple(rewards.shape)} (ref_logprobs "
            f"{tuple(ref_logprobs.shape)})"
        ) from None
    if shape != ref_logprobs.shape:
        raise ValueError(
            f"Invalid rewards shape: {tuple(rewards.shape)} does not broadcast to ref_logprobs "
            f"{tuple(ref_logprobs.shape)}"
        )
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise ValueError(f"Invalid beta: {beta!r} (a positive number)")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"Invalid beta: {beta} (must be finite and > 0)")
    if ref_logprobs.dim() == 0:
        raise ValueError("Invalid ref_logprobs: a scalar (needs an outcome dimension)")
    if not torch.isfinite(rewards).all():
        raise ValueError("Invalid rewards: not all finite")
    if torch.isnan(ref_logprobs).any() or (ref_logprobs == math.inf).any():
        raise ValueError("Invalid ref_logprobs: NaN or +inf")
    if (ref_logprobs == -math.inf).all(dim).any():
        raise ValueError("Invalid ref_logprobs: a distribution with no outcome of mass > 0")
    return rewards


def kl_regularized_target(
    ref_logprobs: torch.Tensor, rewards: torch.Tensor, beta: float, dim: int = -1
) -> torch.Tensor:
    """log pi* = log(pi_ref exp(r / beta) / Z) along ``dim``: the KL-regularized optimum.

    Args:
        ref_logprobs: log pi_ref (normalized or not: the result is normalized along ``dim``);
            -inf marks outcomes outside the reference's support.
        rewards: r, broadcastable to ``ref_logprobs``; finite.
        beta: the KL coefficient, finite and > 0.
        dim: the outcome dimension.

    Returns:
        The log-probabilities of pi*, the shape of ``ref_logprobs`` (differentiable in both
        inputs; use it as a distillation target with ``.detach()``).

    Raises:
        ValueError: a non-float ``ref_logprobs``, a shape that does not broadcast, beta <= 0
            or not finite, non-finite rewards, NaN / +inf log-probabilities, or a row with no
            outcome of positive reference mass.

    Example::

        ref = torch.log_softmax(torch.randn(8), 0)
        target = kl_regularized_target(ref, rewards, beta=0.1).exp()   # pi*, sums to 1
    """
    rewards = _check(ref_logprobs, rewards, beta, dim)
    return torch.log_softmax(ref_logprobs + rewards / beta, dim)


def kl_regularized_value(
    ref_logprobs: torch.Tensor, rewards: torch.Tensor, beta: float, dim: int = -1
) -> torch.Tensor:
    """The optimal value max_pi E_pi[r] - beta KL(pi || pi_ref) = beta log Z along ``dim``.

    ``ref_logprobs`` must be normalized along ``dim`` (log pi_ref sums to 1 in probability);
    arguments and errors as :func:`kl_regularized_target`.
    """
    rewards = _check(ref_logprobs, rewards, beta, dim)
    return beta * torch.logsumexp(ref_logprobs + rewards / beta, dim)

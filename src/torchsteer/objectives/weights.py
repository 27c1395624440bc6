"""Difficulty-aware weights and KL coefficients, with the KL controllers' interface.

**PACED** (Beta-kernel weights on the pass rate). For prompt i with pass rate p_i (the share
of the policy's rollouts that are correct), the raw weight is

.. math:: w_i = p_i^{a} (1 - p_i)^{b} \\;\\propto\\; \\mathrm{Beta}(p_i;\\, a + 1, b + 1),

largest at p = a / (a + b), the frontier of competence, and 0 at p = 0 (a > 0) and p = 1
(b > 0), where a group of rollouts carries no learning signal; 0^0 = 1, so a = 0 or b = 0
leaves that end open. With ``normalize="mean"`` the weights are divided by their mean over the
global batch (all ranks: one all-reduce of [sum w, count, sum w^2]), so they average 1 and the
loss keeps the scale of uniform weights; ``"sum"`` makes them sum to 1; ``"none"`` returns the
raw kernel. If no prompt has weight > 0 anywhere, all weights are 0. Signals: ``mean_raw`` (the
global mean raw weight), ``ess`` ((sum w)^2 / (n sum w^2), the effective share of the batch).

**DifficultyAdaptiveKL** (APO's DADS). With difficulty d = 1 - p of a sample's prompt, the
per-sample KL of a sample with advantage > 0 is multiplied by

.. math:: \\omega(d) = 1 - e^{-e (1 - d)} \\quad (0 < d < 1), \\qquad \\omega(0) = \\omega(1) = 1,

and every other sample's by 1 (the released ``calculate_kl_weight``): easy prompts keep their
KL, a correct answer on a hard prompt is held less near the reference. The coefficient itself
comes from a base :class:`~torchsteer.control.kl.KLController` (fixed, adaptive, PID, ...):
``update`` forwards the step's statistics to it, ``coef`` is its coefficient, and
``penalty(kl, weights)`` is ``coef * mean(weights * kl)`` over the per-sample KLs.

**STCR** (APO's length-aware advantage): in a group of rollouts of one prompt, a wrong sample
whose length exceeds the mean length of the group's correct samples by Delta > 0 has its
advantage multiplied by 2 - 1.00001^{-Delta} (a group with no correct sample is unchanged).

References:
    PACED (2026): per-problem weight p^alpha (1 - p)^beta on the student's pass rate.
    APO / View-R1 (2025): ``Indolent-Kawhi/View-R1``, ``openrlhf/trainer/ray/ppo_actor.py``
    (``calculate_kl_weight``) and ``experience_maker.py`` (difficulty, STCR weights).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from torchsteer import distributed
from torchsteer.control.kl import FixedKLController, KLController, finite_hparam

__all__ = ["DifficultyAdaptiveKL", "PACEDWeights", "apo_kl_weight", "pass_rates", "stcr_advantages"]

_NORMALIZE = ("mean", "sum", "none")


def _rates(name: str, p: Any) -> torch.Tensor:
    """Validate per-prompt pass rates (a 1-D float tensor in [0, 1]) without a collective."""
    p = torch.as_tensor(p).to(torch.float64)  # the weights are formed in float64
    if p.dim() != 1:
        raise ValueError(f"Invalid {name}: shape {tuple(p.shape)} (one rate per prompt, 1-D)")
    if torch.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"Invalid {name}: values outside [0, 1] or NaN")
    return p


def pass_rates(n_correct: Any, n_samples: Any) -> torch.Tensor:
    """p = n_correct / n_samples per prompt, checked (0 <= n_correct <= n_samples, n >= 1)."""
    c = torch.as_tensor(n_correct, dtype=torch.float64)
    n = torch.as_tensor(n_samples, dtype=torch.float64)
    if (n < 1).any() or (c < 0).any() or (c > n).any() or torch.isnan(c).any():
        raise ValueError("Invalid n_correct / n_samples: need 0 <= n_correct <= n_samples, n >= 1")
    return torch.broadcast_to(c / n, torch.broadcast_shapes(c.shape, n.shape))


class PACEDWeights:
    """Beta-kernel weights p^a (1 - p)^b on per-prompt pass rates (module docstring).

    Args:
        a, b: the kernel's exponents (finite, >= 0; PACED's alpha, beta).
        normalize: ``"mean"`` (global mean 1), ``"sum"`` (global sum 1) or ``"none"``.

    Example::

        paced = PACEDWeights(a=1.0, b=1.0)
        w = paced.update(n_correct=correct.sum(1), n_samples=correct.shape[1])  # (prompts,)
        loss = (w[:, None] * per_sample_loss).mean()
    """

    _state = ("steps", "mean_raw", "ess")

    def __init__(self, a: float = 1.0, b: float = 1.0, normalize: str = "mean"):
        self.a = finite_hparam("a", a, nonneg=True)
        self.b = finite_hparam("b", b, nonneg=True)
        if normalize not in _NORMALIZE:
            raise ValueError(f"Invalid normalize: {normalize!r}; expected one of {_NORMALIZE}")
        self.normalize = normalize
        self.steps = 0
        self.mean_raw = 0.0
        self.ess = 0.0

    def kernel(self, p: torch.Tensor) -> torch.Tensor:
        """The raw weights p^a (1 - p)^b (0^0 = 1), computed as exp(a log p + b log(1 - p))."""
        p = _rates("pass_rate", p)
        a = torch.tensor(self.a, dtype=p.dtype, device=p.device)
        b = torch.tensor(self.b, dtype=p.dtype, device=p.device)
        return torch.exp(torch.xlogy(a, p) + torch.xlogy(b, 1.0 - p))

    def update(self, pass_rate=None, *, n_correct=None, n_samples=None) -> torch.Tensor:
        """Weights for one step's prompts; a collective under DDP (every rank calls it).

        Args:
            pass_rate: per-prompt pass rates in [0, 1], shape ``(P,)``; or give
            n_correct, n_samples: correct rollouts per prompt and rollouts per prompt.

        Returns:
            The weights, shape ``(P,)``, in float64 (cast them to the loss's dtype).

        Raises:
            ValueError: rates outside [0, 1], NaN, not 1-D, or counts that do not fit; under
                DDP every rank raises together and the state is left as it was.
        """
        ok, err, p = True, None, None
        try:
            if (pass_rate is None) == (n_correct is None):
                raise ValueError("Invalid arguments: give pass_rate or n_correct (not both)")
            if pass_rate is None:
                if n_samples is None:
                    raise ValueError("Invalid n_samples: None (needed with n_correct)")
                pass_rate = pass_rates(n_correct, n_samples)
            w = self.kernel(pass_rate).to(torch.float64)
            p = pass_rate
        except ValueError as e:
            ok, err = False, e
        device = p.device if p is not None else "cpu"
        if not distributed.agree(ok, device=device):
            raise err if err is not None else ValueError("Invalid pass_rate on another rank")
        stats = torch.stack([w.sum(), w.new_tensor(float(w.numel())), w.square().sum()])
        total, count, sq = distributed.all_reduce_sum(stats).tolist()
        self.steps += 1
        self.mean_raw = total / count if count > 0 else 0.0
        self.ess = total * total / (count * sq) if sq > 0 else 0.0
        if self.normalize == "none" or total == 0.0:
            return w
        return w * (count / total) if self.normalize == "mean" else w / total

    def signals(self) -> dict[str, float]:
        return {"mean_raw": self.mean_raw, "ess": self.ess}

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters; unknown keys raise, missing ones keep their values."""
        bad = set(state) - set(self._state)
        if bad:
            raise ValueError(f"Invalid state keys: {sorted(bad)}")
        for k in self._state:
            if k in state:
                setattr(self, k, type(getattr(self, k))(state[k]))

    def __repr__(self) -> str:
        return f"PACEDWeights(a={self.a:g}, b={self.b:g}, normalize={self.normalize!r})"


def apo_kl_weight(difficulty: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """APO's DADS weight per sample: 1 - exp(-e (1 - d)) if advantage > 0 and 0 < d < 1, else 1."""
    d = torch.as_tensor(difficulty)
    adv = torch.as_tensor(advantages, device=d.device)
    if not d.is_floating_point():
        d = d.to(torch.float64)
    if d.shape != adv.shape:
        raise ValueError(
            f"Invalid advantages shape: {tuple(adv.shape)} (difficulty {tuple(d.shape)})"
        )
    if torch.isnan(d).any() or (d < 0).any() or (d > 1).any():
        raise ValueError("Invalid difficulty: values outside [0, 1] or NaN")
    if adv.is_floating_point() and torch.isnan(adv).any():
        raise ValueError("Invalid advantages: NaN")
    w = -torch.expm1(-math.e * (1.0 - d))
    w = torch.where((d > 0) & (d < 1), w, torch.ones_like(w))
    return torch.where(adv > 0, w, torch.ones_like(w))


class DifficultyAdaptiveKL(KLController):
    """APO's difficulty-adaptive KL weights over a base controller's coefficient.

    Args:
        base: the controller that sets the coefficient (a float means a fixed coefficient).

    ``weights(pass_rate, advantages)`` gives the per-sample DADS weights (d = 1 - pass rate
    of each sample's prompt) and records their global mean (signal ``mean_weight``, one
    all-reduce); ``update`` forwards the statistics to ``base``; ``state_dict`` holds both.

    Example::

        ctl = DifficultyAdaptiveKL(PIDKLController(target=0.05))
        w = ctl.weights(pass_rate=p.repeat_interleave(n), advantages=adv)
        kl_i = divergence_penalty(logp, ref_logp, "reverse_kl", mask, reduction="none")
        kl_i = kl_i.sum(1) / mask.sum(1).clamp(min=1)                  # per-sample token mean
        loss = pg_loss + ctl.penalty(kl_i, w)
        ctl.update(kl=kl_i.mean().detach())
    """

    def __init__(self, base: KLController | float = 0.1):
        if not isinstance(base, KLController):
            base = FixedKLController(finite_hparam("base", base, nonneg=True))
        self.base = base
        self.needs = base.needs
        self.steps = 0
        self.mean_weight = 1.0

    def _update(self, kl, entropy, reward, n_steps):
        self.base.update(kl=kl, entropy=entropy, reward=reward, n_steps=n_steps)

    @property
    def coef(self) -> float:
        return self.base.coef

    def weights(self, pass_rate: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
        """The DADS weight of each sample (a collective under DDP; bad input: all ranks raise)."""
        ok, err, w = True, None, None
        try:
            p = torch.as_tensor(pass_rate)
            if p.dim() != 1:
                raise ValueError(f"Invalid pass_rate: shape {tuple(p.shape)} (one per sample)")
            w = apo_kl_weight(1.0 - _rates("pass_rate", p), advantages).to(torch.float64)
        except ValueError as e:
            ok, err = False, e
        if not distributed.agree(ok, device=w.device if w is not None else "cpu"):
            raise err if err is not None else ValueError("Invalid weights input on another rank")
        s = distributed.all_reduce_sum(torch.stack([w.sum(), w.new_tensor(float(w.numel()))]))
        total, count = s.tolist()
        self.steps += 1
        self.mean_weight = total / count if count > 0 else 1.0
        return w

    def penalty(self, kl: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``coef * mean(weights * kl)`` over per-sample KLs (``coef * kl`` without weights)."""
        if weights is None:
            return self.coef * kl
        if weights.shape != kl.shape:
            raise ValueError(
                f"Invalid weights shape: {tuple(weights.shape)} (kl {tuple(kl.shape)})"
            )
        return self.coef * (weights.to(kl.dtype) * kl).mean()

    def signals(self) -> dict[str, float]:
        return {**self.base.signals(), "mean_weight": self.mean_weight}

    def state_dict(self) -> dict[str, Any]:
        return {
            "base": self.base.state_dict(),
            "steps": self.steps,
            "mean_weight": self.mean_weight,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        bad = set(state) - {"base", "steps", "mean_weight"}
        if bad:
            raise ValueError(f"Invalid state keys: {sorted(bad)}")
        if "base" in state:
            self.base.load_state_dict(state["base"])
        self.steps = int(state.get("steps", self.steps))
        self.mean_weight = float(state.get("mean_weight", self.mean_weight))


def stcr_advantages(advantages: torch.Tensor, lengths: torch.Tensor, correct: torch.Tensor):
    """APO's STCR: ``(G, n)`` advantages of G groups of n rollouts, scaled for long wrong answers.

    Args:
        advantages: per-rollout advantages, ``(G, n)``.
        lengths: response lengths, ``(G, n)``.
        correct: bool (or 0/1), ``(G, n)``: which rollouts are correct.

    Returns:
        advantages x (2 - 1.00001^{-Delta}) for wrong rollouts with Delta = length - mean
        correct length > 0 in a group with a correct rollout; unchanged elsewhere.
    """
    for name, t in (("lengths", lengths), ("correct", correct)):
        if t.shape != advantages.shape or advantages.dim() != 2:
            raise ValueError(
                f"Invalid {name} shape: {tuple(t.shape)} (advantages {tuple(advantages.shape)}, "
                "both (G, n))"
            )
    ok = correct.bool()
    n_ok = ok.sum(1, keepdim=True)
    lengths = lengths.to(torch.float64)
    mean_ok = torch.where(ok, lengths, 0.0).sum(1, keepdim=True) / n_ok.clamp(min=1)
    delta = torch.where(~ok & (n_ok > 0), lengths - mean_ok, 0.0)
    extra = torch.where(delta > 0, -torch.expm1(-delta * math.log(1.00001)), 0.0)
    return advantages * (1.0 + extra).to(advantages.dtype)

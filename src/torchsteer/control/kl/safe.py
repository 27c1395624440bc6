"""SAFE: entropy-gated, phase-aware KL penalty (Maity, 2026), with a differentiable penalty.

Also exported from :mod:`torchsteer.control.kl`; see that module for the shared interface.
"""

from __future__ import annotations

import math
from collections import deque
from functools import partial

import torch

from torchsteer.control.kl.base import (
    KLController,
    as_statistic,
    finite_hparam,
    state_number,
    state_sequence,
)

__all__ = ["SAFEController"]

_PHASES = {"warmup": 1.5, "climbing": 1.2, "converged": 1.0, "plateau": 0.8}


class SAFEController(KLController):
    """SAFE's entropy-gated, phase-aware KL penalty (Maity, 2026), with its gradient fixed.

    Per update with batch KL k, entropy H and mean raw reward r:

    1. KL_s <- 0.9 KL_s + 0.1 k,  KL_l <- 0.99 KL_l + 0.01 k  (both start at 0).
    2. PID on the reward velocity: the first call stores E = r and gives u = 0; then
       E' = 0.95 E + 0.05 r, e = (E' - E) - 0.001, I = clip(I + e, -1, 1),
       u = 0.3 e + 0.01 I + 0.05 (e - e_prev), E <- E'.
    3. Phase multiplier phi over the reward history: < 50 rewards: 1.5 (warm-up); mean of
       the last 50 above the previous 50 by > 0.01: 1.2 (climbing); std of the last 50 <
       0.02 and mean > 0.7: 1.0 (converged); else 0.8 (plateau).
    4. Threshold tau = clip((tau_0 + u) phi, 0.1, 0.6);  gate g = max(0.5, 2 / (H + 0.1)).
    5. Penalty P = 0.1 g (KL_s - tau)^2 if KL_s > tau, else 0.

    ``penalty(kl)`` gives P for the current step: it forms KL_s = 0.9 KL_s + 0.1 kl from the
    stored average and this step's (differentiable) ``kl``, with tau and g of the latest
    ``update``; ``update`` then commits the same KL_s. With ``differentiable=True`` the
    penalty's gradient is 0.02 g (KL_s - tau) d kl above the threshold. The released code
    built P from ``kl.item()``: ``differentiable=False`` reproduces that, the value is the
    same but carries no gradient, so the "penalty" does not act on the policy at all.

    ``coef`` is the penalty's current slope dP/dkl at the last KL_s (for logging).

    Args:
        base_threshold: tau_0 (0.3, a per-token KL in the release).
        penalty_scale: the 0.1 in P.
        entropy_floor: the 2 in the gate.
        threshold_bounds: the clip of tau, (0.1, 0.6).
        kp, ki, kd: gains of the reward-velocity PID (0.3, 0.01, 0.05).
        target_velocity: 0.001.
        window: the phase window (50).
        differentiable: keep the gradient of the penalty (True), or reproduce the release.

    References:
        Maity, "SAFE: Stable Alignment Finetuning with Entropy-Aware Predictive Control for
        RLHF", arXiv 2602.04651 (2026); code ``ryyzn9/SAFE``.
    """

    needs = ("kl", "entropy", "reward")
    _state = (
        "kl_short",
        "kl_long",
        "reward_ema",
        "integral",
        "prev_error",
        "u",
        "rewards",
        "phase",
        "threshold",
        "gate",
        "kl",
    )

    def __init__(
        self,
        base_threshold: float = 0.3,
        penalty_scale: float = 0.1,
        entropy_floor: float = 2.0,
        threshold_bounds: tuple[float, float] = (0.1, 0.6),
        kp: float = 0.3,
        ki: float = 0.01,
        kd: float = 0.05,
        target_velocity: float = 0.001,
        window: int = 50,
        differentiable: bool = True,
    ):
        self.base_threshold = finite_hparam("base_threshold", base_threshold, nonneg=True)
        self.penalty_scale = finite_hparam("penalty_scale", penalty_scale, nonneg=True)
        self.entropy_floor = finite_hparam("entropy_floor", entropy_floor, nonneg=True)
        lo, hi = threshold_bounds
        lo, hi = finite_hparam("threshold_bounds", lo), finite_hparam("threshold_bounds", hi)
        if not 0 <= lo <= hi:
            raise ValueError(f"Invalid threshold_bounds: {threshold_bounds}")
        self.threshold_bounds = (float(lo), float(hi))
        self.kp = finite_hparam("kp", kp)
        self.ki = finite_hparam("ki", ki)
        self.kd = finite_hparam("kd", kd)
        self.target_velocity = finite_hparam("target_velocity", target_velocity)
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"Invalid window: {window}")
        self.window = window
        self.differentiable = bool(differentiable)
        self.kl_short = 0.0
        self.kl_long = 0.0
        self.reward_ema: float | None = None
        self.integral = 0.0
        self.prev_error = 0.0
        self.u = 0.0
        self.rewards: deque[float] = deque(maxlen=2 * window)
        self.phase = "warmup"
        self.threshold = self._clip_tau((self.base_threshold + self.u) * _PHASES[self.phase])
        self.gate = 1.0
        self.kl = 0.0

    def _clip_tau(self, tau):
        lo, hi = self.threshold_bounds
        return min(max(tau, lo), hi)

    def _velocity_pid(self, r):
        if self.reward_ema is None:
            self.reward_ema = r
            return 0.0
        new = 0.95 * self.reward_ema + 0.05 * r
        e = (new - self.reward_ema) - self.target_velocity
        self.integral = min(max(self.integral + e, -1.0), 1.0)
        u = self.kp * e + self.ki * self.integral + self.kd * (e - self.prev_error)
        self.prev_error, self.reward_ema = e, new
        return u

    def _phase(self):
        h, w = list(self.rewards), self.window
        if len(h) < w:
            return "warmup"
        recent = h[-w:]
        old = h[-2 * w : -w] if len(h) >= 2 * w else recent
        mean = sum(recent) / w
        if mean > sum(old) / len(old) + 0.01:
            return "climbing"
        std = math.sqrt(sum((x - mean) ** 2 for x in recent) / w)
        return "converged" if std < 0.02 and mean > 0.7 else "plateau"

    def _update(self, kl, entropy, reward, n_steps):
        self.kl_short = 0.9 * self.kl_short + 0.1 * kl
        self.kl_long = 0.99 * self.kl_long + 0.01 * kl
        self.rewards.append(reward)
        self.phase = self._phase()
        self.u = self._velocity_pid(reward)
        self.threshold = self._clip_tau((self.base_threshold + self.u) * _PHASES[self.phase])
        self.gate = max(0.5, self.entropy_floor / (entropy + 0.1))
        self.kl = kl

    def _state_rules(self):
        lo, hi = self.threshold_bounds

        def reward_ema(key, value):
            return None if value is None else state_number(key, value)

        def phase(key, value):
            if not isinstance(value, str) or value not in _PHASES:
                raise ValueError(f"Invalid state_dict {key}: {value!r} (one of {list(_PHASES)})")
            return value

        return {
            "kl_short": state_number,
            "kl_long": state_number,
            "reward_ema": reward_ema,
            "integral": partial(state_number, low=-1.0, high=1.0),
            "prev_error": state_number,
            "u": state_number,
            "rewards": partial(state_sequence, maxlen=self.rewards.maxlen),
            "phase": phase,
            "threshold": partial(state_number, low=lo, high=hi),
            "gate": partial(state_number, low=0.5),
            "kl": state_number,
        }

    def penalty(self, kl) -> torch.Tensor:
        """P for this step's KL (a tensor; with ``differentiable=False`` it has no gradient)."""
        kl = kl if isinstance(kl, torch.Tensor) else torch.tensor(float(kl))
        as_statistic("kl", kl, required=True)
        if not self.differentiable:
            kl = kl.detach()  # the released code: P built from kl.item()
        kl_s = 0.9 * self.kl_short + 0.1 * kl
        if float(kl_s.detach()) <= self.threshold:
            return kl_s * 0.0
        return self.penalty_scale * self.gate * (kl_s - self.threshold).square()

    @property
    def coef(self) -> float:
        return 2.0 * 0.1 * self.penalty_scale * self.gate * max(0.0, self.kl_short - self.threshold)

    def signals(self):
        excess = max(0.0, self.kl_short - self.threshold)
        return {
            "coef": self.coef,
            "penalty": self.penalty_scale * self.gate * excess**2,
            "kl_short": self.kl_short,
            "kl_long": self.kl_long,
            "threshold": self.threshold,
            "phase": _PHASES[self.phase],
            "gate": self.gate,
            "velocity_pid": self.u,
            "integral": self.integral,
            "kl": self.kl,
        }

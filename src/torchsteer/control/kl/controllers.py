"""KL controllers for RLHF-style fine-tuning: fixed, adaptive (Ziegler), PID Lagrangian.

A policy pi is trained on a reward with a KL term that keeps it near a reference pi_ref. Each
controller reads the statistics of one optimizer step (a KL estimate, the policy entropy, the
mean reward) through ``update`` and returns the coefficient beta for the next step; the loss
adds ``controller.penalty(kl) = beta * kl``. All controllers are plain, deterministic objects
with one interface (:class:`~torchsteer.control.kl.base.KLController`); SAFE lives in
:mod:`torchsteer.control.kl.safe`. All are exported from :mod:`torchsteer.control.kl`.

Example::

    ctl = PIDKLController(target=0.3, kp=1.0, ki=0.05)
    for batch in data:
        pen = kl_estimate(logp, logp_ref, mask, kind="k2")  # gradient: grad KL(pi || pi_ref)
        loss = pg_loss + ctl.penalty(pen)
        loss.backward(); opt.step(); opt.zero_grad()
        kl = kl_estimate(logp.detach(), logp_ref, mask, kind="k3")  # unbiased value
        ctl.update(kl=kl, entropy=entropy, reward=reward.mean())

(k3 in the loss would have the gradient of the *forward* KL(pi_ref || pi); see
:data:`~torchsteer.control.kl.estimators.ESTIMATORS`.)

References:
    Ziegler et al., "Fine-Tuning Language Models from Human Preferences", arXiv 1909.08593
    (2019). Stooke, Achiam, Abbeel, "Responsive Safety in Reinforcement Learning by PID
    Lagrangian Methods", ICML 2020.
"""

from __future__ import annotations

from collections import deque
from functools import partial

from torchsteer.control.kl._device import clamp, divide, maximum
from torchsteer.control.kl.base import KLController, finite_hparam, state_number, state_sequence

__all__ = ["AdaptiveKLController", "FixedKLController", "PIDKLController"]


class FixedKLController(KLController):
    """A constant coefficient: beta_t = beta.

    Args:
        beta: the coefficient, >= 0.
    """

    needs = ()
    _state = ("kl",)

    def __init__(self, beta: float = 0.1):
        self.beta = finite_hparam("beta", beta, nonneg=True)
        self.kl = 0.0

    def _update(self, kl, entropy, reward, n_steps):
        if kl is not None:
            self.kl = kl

    def signals(self):
        return {"coef": self.beta, "kl": self.kl}

    def _state_rules(self):
        return {"kl": state_number}


class AdaptiveKLController(KLController):
    """The adaptive controller of Ziegler et al. (2019), as in HuggingFace TRL, kept positive.

    .. math::
        e = \\mathrm{clip}(\\mathrm{KL} / \\mathrm{target} - 1, -c, c), \\qquad
        f = \\mathrm{clip}(1 + e \\cdot n_{steps} / \\mathrm{horizon}, 1/2, 2), \\qquad
        \\beta \\leftarrow \\mathrm{clip}(\\beta f, \\beta_{min}, \\beta_{max})

    TRL multiplies by ``1 + e n_steps / horizon`` unclamped: once ``n_steps > horizon / c``
    that factor can be negative (beta flips sign, the KL penalty becomes a reward; 0 at
    equality, after which beta stays 0), and under a KL held above target beta grows
    geometrically until it overflows to inf. Here the factor is clamped to [1/2, 2] (beta at
    most halves or doubles in one update) and beta to ``beta_bounds``, so beta stays positive
    and finite. Inside TRL's valid range this is TRL's update bit for bit: the factor never
    exceeds 2 while ``n_steps <= horizon / c``, is at least 1/2 while ``n_steps <= horizon /
    (2 c)`` (25,000 samples at TRL's defaults), and beta is only clamped once it leaves
    ``beta_bounds``.

    Args:
        beta0: initial coefficient (TRL: 0.2), inside ``beta_bounds``.
        target: KL target (TRL: 6, a per-sequence KL).
        horizon: samples over which beta may change by a factor ~e^0.2 (TRL: 10000).
        clip: the error clip c (0.2).
        beta_bounds: ``(beta_min, beta_max)``, ``0 < beta_min <= beta_max < inf``
            (default ``(1e-8, 1e8)``).

    References:
        Ziegler et al., arXiv 1909.08593 (2019), Sec. 2.2.
    """

    _state = ("beta", "error", "kl")
    min_factor, max_factor = 0.5, 2.0  # the clamp of one update's factor f

    def __init__(self, beta0=0.2, target=6.0, horizon=10_000, clip=0.2, beta_bounds=(1e-8, 1e8)):
        self.beta = finite_hparam("beta0", beta0, positive=True)
        self.target = finite_hparam("target", target, positive=True)
        self.horizon = finite_hparam("horizon", horizon, positive=True)
        self.clip = finite_hparam("clip", clip, positive=True)
        try:
            lo, hi = beta_bounds
        except (TypeError, ValueError):
            raise ValueError(f"Invalid beta_bounds: {beta_bounds!r}") from None
        lo = finite_hparam("beta_bounds", lo, positive=True)
        hi = finite_hparam("beta_bounds", hi, positive=True)
        if lo > hi:
            raise ValueError(f"Invalid beta_bounds: {beta_bounds!r} (expected min <= max)")
        if not lo <= self.beta <= hi:
            raise ValueError(f"Invalid beta0: {beta0} (outside beta_bounds {beta_bounds!r})")
        self.beta_bounds = (lo, hi)
        self.error = 0.0
        self.kl = 0.0

    def _update(self, kl, entropy, reward, n_steps):
        e = clamp(kl / self.target - 1.0, -self.clip, self.clip)
        factor = clamp(1.0 + e * n_steps / self.horizon, self.min_factor, self.max_factor)
        lo, hi = self.beta_bounds
        self.beta = clamp(self.beta * factor, lo, hi)
        self.error, self.kl = e, kl

    def signals(self):
        return {"coef": self.beta, "error": self.error, "kl": self.kl}

    def _state_rules(self):
        lo, hi = self.beta_bounds
        return {"beta": partial(state_number, low=lo, high=hi), "error": state_number,
                "kl": state_number}  # fmt: skip


class PIDKLController(KLController):
    """PID Lagrangian on the constraint KL <= target (Stooke et al., 2020).

    With cost J = KL and limit d = target, per update:

    .. math::
        I &\\leftarrow \\max(0, I + K_i (J - d)) \\\\
        P &\\leftarrow a P + (1 - a)(J - d) \\\\
        C &\\leftarrow a_d C + (1 - a_d) J, \\quad D = \\max(0, C - C_{-\\mathrm{delay}}) \\\\
        \\beta &= g(H) \\max(0, K_p P + I + K_d D)

    C_{-delay} is the EMA ``delay`` updates earlier (0 before that). The optional entropy
    gate g(H) = max(1, (h_floor + 0.1) / (H + 0.1)) is 1 while the entropy H stays at or
    above ``entropy_floor`` and grows as the policy collapses below it (g = 1 when
    ``entropy_floor`` is None).

    Args:
        target: the KL limit d (same units as the KL you pass: per token or per sequence).
        kp, ki, kd: gains K_p, K_i, K_d (>= 0).
        beta0: initial integral (the coefficient before any update).
        ema: a for P (0.95); ``d_ema``: a_d for the cost EMA (0.95); ``delay``: 10.
        entropy_floor: entropy below which the gate strengthens beta; None disables it.

    References:
        Stooke, Achiam, Abbeel, ICML 2020, Algorithm 2 (PID Lagrangian).
    """

    _state = ("integral", "p_ema", "cost_ema", "cost_hist", "gate", "error", "deriv", "kl")

    def __init__(
        self,
        target: float,
        kp: float = 1.0,
        ki: float = 0.05,
        kd: float = 0.0,
        beta0: float = 0.0,
        ema: float = 0.95,
        d_ema: float = 0.95,
        delay: int = 10,
        entropy_floor: float | None = None,
    ):
        self.target = finite_hparam("target", target, positive=True)
        self.kp = finite_hparam("kp", kp, nonneg=True)
        self.ki = finite_hparam("ki", ki, nonneg=True)
        self.kd = finite_hparam("kd", kd, nonneg=True)
        self.ema = finite_hparam("ema", ema, nonneg=True)
        self.d_ema = finite_hparam("d_ema", d_ema, nonneg=True)
        for name, value in (("ema", self.ema), ("d_ema", self.d_ema)):
            if value >= 1:
                raise ValueError(f"Invalid {name}: {value} (must be < 1)")
        if isinstance(delay, bool) or not isinstance(delay, int) or delay < 1:
            raise ValueError(f"Invalid delay: {delay}")
        if entropy_floor is not None:
            entropy_floor = finite_hparam("entropy_floor", entropy_floor, positive=True)
        self.entropy_floor = entropy_floor
        self.needs = ("kl", "entropy") if entropy_floor is not None else ("kl",)
        self.integral = finite_hparam("beta0", beta0, nonneg=True)
        self.p_ema = 0.0
        self.cost_ema = 0.0
        self.cost_hist = deque([0.0], maxlen=delay)
        self.gate = 1.0
        self.error = 0.0
        self.deriv = 0.0
        self.kl = 0.0

    def _update(self, kl, entropy, reward, n_steps):
        e = kl - self.target
        self.integral = maximum(0.0, self.integral + self.ki * e)
        self.p_ema = self.ema * self.p_ema + (1.0 - self.ema) * e
        self.cost_ema = self.d_ema * self.cost_ema + (1.0 - self.d_ema) * kl
        self.deriv = maximum(0.0, self.cost_ema - self.cost_hist[0])
        self.cost_hist.append(self.cost_ema)
        if self.entropy_floor is not None:
            self.gate = maximum(1.0, divide(self.entropy_floor + 0.1, entropy + 0.1))
        self.error, self.kl = e, kl

    def _state_rules(self):
        nonneg = partial(state_number, low=0.0)
        return {
            "integral": nonneg,
            "p_ema": state_number,
            "cost_ema": state_number,
            "cost_hist": partial(state_sequence, maxlen=self.cost_hist.maxlen, min_len=1),
            "gate": partial(state_number, low=1.0),
            "error": state_number,
            "deriv": nonneg,
            "kl": state_number,
        }

    @property
    def coef(self) -> float:
        raw = self.kp * self.p_ema + self.integral + self.kd * self.deriv
        return self.gate * maximum(0.0, raw)

    def signals(self):
        return {
            "coef": self.coef,
            "error": self.error,
            "proportional": self.p_ema,
            "integral": self.integral,
            "derivative": self.deriv,
            "gate": self.gate,
            "kl": self.kl,
        }

"""The interface shared by the KL controllers, and the validation of their inputs.

See :mod:`torchsteer.control.kl` for the controllers and the usage.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch

__all__ = ["KLController", "as_statistic", "finite_hparam"]


def finite_hparam(name: str, value: float, *, positive: bool = False, nonneg: bool = False):
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > 0 if positive else True) and (value >= 0 if nonneg else True)
    if not ok:
        raise ValueError(f"Invalid {name}: {value}")
    return float(value)


def as_statistic(name: str, value: Any, *, required: bool, nonneg: bool = False):
    """Validate one statistic given to ``update``: a finite number (or 0-d tensor), else raise.

    Returns a Python float, or None when the statistic is absent and not required.
    """
    if value is None:
        if required:
            raise ValueError(f"Invalid {name}: None (this controller needs it)")
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            shape = tuple(value.shape)
            raise ValueError(f"Invalid {name}: a tensor of shape {shape}, not a scalar")
        value = value.detach().item()
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid {name}: {value!r}") from None
    if not math.isfinite(x) or (nonneg and x < 0):
        raise ValueError(f"Invalid {name}: {x}")
    return x


class KLController:
    """The shared interface of the KL controllers.

    Subclasses implement ``_update(kl, entropy, reward, n_steps)`` (statistics already
    validated, floats or None) and keep their state in the attributes named by ``_state``.
    """

    _state: tuple[str, ...] = ()
    needs: tuple[str, ...] = ("kl",)  # statistics that ``update`` requires

    def update(self, *, kl=None, entropy=None, reward=None, n_steps: int = 1) -> float:
        """Read one optimizer step's statistics and return the coefficient for the next step.

        Args:
            kl: KL(pi || pi_ref) estimate of the step (float or 0-d tensor; finite).
            entropy: mean policy entropy (>= 0).
            reward: mean reward.
            n_steps: samples the step consumed (batch size x processes); only the adaptive
                controller uses it.

        Raises:
            ValueError: a non-finite or missing statistic, a negative entropy; the state is
                left as it was.
        """
        kl = as_statistic("kl", kl, required="kl" in self.needs)
        entropy = as_statistic("entropy", entropy, required="entropy" in self.needs, nonneg=True)
        reward = as_statistic("reward", reward, required="reward" in self.needs)
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"Invalid n_steps: {n_steps}")
        self._update(kl, entropy, reward, n_steps)
        return self.coef

    def _update(self, kl, entropy, reward, n_steps) -> None:
        raise NotImplementedError

    @property
    def coef(self) -> float:
        """The KL coefficient beta for the next step."""
        return self.beta

    def penalty(self, kl: torch.Tensor) -> torch.Tensor:
        """The KL term to add to the loss: ``coef * kl`` (differentiable in ``kl``)."""
        return self.coef * kl

    def signals(self) -> dict[str, float]:
        """Internal signals for logging (floats)."""
        return {"coef": self.coef}

    def state_dict(self) -> dict[str, Any]:
        out = {}
        for k in self._state:
            v = getattr(self, k)
            out[k] = list(v) if isinstance(v, deque) else v
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state; keys that are missing keep their current values."""
        for k in self._state:
            if k in state:
                cur = getattr(self, k)
                v = state[k]
                if isinstance(cur, deque):
                    v = deque((float(x) for x in v), maxlen=cur.maxlen)
                elif isinstance(v, torch.Tensor):
                    v = v.item()
                setattr(self, k, v)

    def __repr__(self) -> str:
        sig = ", ".join(f"{k}={v:.4g}" for k, v in self.signals().items())
        return f"{type(self).__name__}({sig})"

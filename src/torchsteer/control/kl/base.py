"""The interface shared by the KL controllers, and the validation of their inputs.

See :mod:`torchsteer.control.kl` for the controllers and the usage.
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import torch

from torchsteer.control.kl._device import device_statistic, masked_state

__all__ = ["KLController", "as_statistic", "finite_hparam", "state_number", "state_sequence"]


def finite_hparam(name: str, value: float, *, positive: bool = False, nonneg: bool = False):
    """``value`` as a float if it is a finite real number (``bool`` refused), else ValueError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
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


def state_number(name: str, value: Any, low: float | None = None, high: float | None = None):
    """One saved state value: a finite real number (or a one-element real tensor) in
    ``[low, high]``, returned as a float; anything else raises ``ValueError`` naming it."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid state_dict {name}: {value!r} (expected a finite number)")
    x = float(value)
    if not math.isfinite(x) or (low is not None and x < low) or (high is not None and x > high):
        where = f" in [{low}, {high}]" if low is not None or high is not None else ""
        raise ValueError(f"Invalid state_dict {name}: {x} (expected a finite number{where})")
    return x


def state_sequence(name: str, value: Any, maxlen: int, min_len: int = 0) -> deque:
    """A saved history: a list (or 1-d tensor) of ``min_len..maxlen`` finite numbers, as the
    ``deque(maxlen=maxlen)`` the controller keeps."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        value = value.tolist()
    if not isinstance(value, (list, tuple, deque)) or not min_len <= len(value) <= maxlen:
        got = f"{len(value)} entries" if isinstance(value, (list, tuple, deque)) else repr(value)
        raise ValueError(
            f"Invalid state_dict {name}: {got} (expected a list of {min_len} to {maxlen} "
            "finite numbers; a checkpoint of another window or delay?)"
        )
    return deque((state_number(name, x) for x in value), maxlen=maxlen)


class KLController:
    """The shared interface of the KL controllers.

    Subclasses implement ``_update(kl, entropy, reward, n_steps)`` (statistics already
    validated, floats or None), keep their state in the attributes named by ``_state`` and
    give in ``_state_rules()`` the check of every saved value (``load_state_dict`` runs them
    all before it assigns anything).

    TRL's call convention works too: ``update(current, n_steps)`` (``current`` is the KL) and
    ``value`` (the coefficient), so code written for TRL's ``AdaptiveKLController`` /
    ``FixedKLController`` runs unchanged with any controller here.
    """

    _state: tuple[str, ...] = ()
    needs: tuple[str, ...] = ("kl",)  # statistics that ``update`` requires

    @property
    def nonfinite(self) -> str:
        """The tensor path's policy for a bad statistic: ``"raise"`` (default; one host read
        per update) or ``"skip"`` (masked on the device; :mod:`torchsteer.control.kl._device`)."""
        return getattr(self, "_nonfinite", "raise")

    @nonfinite.setter
    def nonfinite(self, value: str) -> None:
        if value not in ("raise", "skip"):
            raise ValueError(f"Invalid nonfinite: {value!r}; expected 'raise' or 'skip'")
        self._nonfinite = value

    def update(
        self, current=None, n_steps: int = 1, *, kl=None, entropy=None, reward=None
    ) -> float:
        """Read one optimizer step's statistics and return the coefficient for the next step.

        Args:
            current: the KL, under TRL's name (``update(current, n_steps)``); give ``kl`` or
                ``current``, not both.
            n_steps: samples the step consumed (batch size x processes), a positive integer;
                only the adaptive controller uses it.
            kl: KL(pi || pi_ref) estimate of the step (float or 0-d tensor; finite).
            entropy: mean policy entropy (>= 0).
            reward: mean reward.

        Raises:
            ValueError: a non-finite or missing statistic, a negative entropy, an invalid
                ``n_steps``; the state is left as it was.

        Tensor path: when a statistic is a tensor, the update runs on its device and the
        coefficient returned (and ``coef``) is a 0-d float64 tensor; with
        ``nonfinite="skip"`` a bad statistic leaves the state as it was, decided on the
        device (no host sync); ``"raise"`` reads the check once.
        """
        if current is not None:
            if kl is not None:
                raise ValueError("Invalid kl: given twice (as kl= and as current, TRL's name)")
            kl = current
        if any(isinstance(v, torch.Tensor) for v in (kl, entropy, reward)):
            return self._update_on_device(kl, entropy, reward, n_steps)
        kl = as_statistic("kl", kl, required="kl" in self.needs)
        entropy = as_statistic("entropy", entropy, required="entropy" in self.needs, nonneg=True)
        reward = as_statistic("reward", reward, required="reward" in self.needs)
        self._update(kl, entropy, reward, _check_n_steps(n_steps))
        return self.coef

    def _update(self, kl, entropy, reward, n_steps) -> None:
        raise NotImplementedError

    def _update_on_device(self, kl, entropy, reward, n_steps):
        names, stats, oks = ("kl", "entropy", "reward"), [], []
        for name, v in zip(names, (kl, entropy, reward)):
            x, ok = device_statistic(name, v, required=name in self.needs, nonneg=name == "entropy")
            stats.append(x)
            if ok is not None:
                oks.append((name, x, ok))
        n = _check_n_steps(n_steps)
        ok = oks[0][2] if oks else None
        for _, _, o in oks[1:]:
            ok = ok & o.to(ok.device)
        if self.nonfinite == "raise" and oks:  # one transfer: the checks and the values
            read = torch.stack([t for _, x, o in oks for t in (o.double(), x)]).tolist()
            for (name, _, _), good, x in zip(oks, read[::2], read[1::2]):
                if not good:
                    raise ValueError(f"Invalid {name}: {x}")
        old = {k: (list(v) if isinstance(v, deque) else v) for k in self._state
               for v in (getattr(self, k),)}  # fmt: skip
        self._update(*stats, n)
        if self.nonfinite == "skip" and oks and not masked_state(self, ok, old):
            if not bool(ok):  # a history filling up: decided on the host (one read)
                for k, v in old.items():
                    cur = getattr(self, k)
                    setattr(self, k, deque(v, maxlen=cur.maxlen) if isinstance(cur, deque) else v)
        return self.coef

    @property
    def coef(self) -> float:
        """The KL coefficient beta for the next step."""
        return self.beta

    @property
    def value(self) -> float:
        """``coef`` under TRL's name (``kl_ctl.value``)."""
        return self.coef

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

    def _state_rules(self) -> dict[str, Callable[[str, Any], Any]]:
        """For each key of ``_state``: a function ``(key, saved value) -> value to assign``
        that raises ``ValueError`` for a value this controller cannot hold."""
        raise NotImplementedError

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state; keys that are missing keep their current values.

        Atomic: every value is checked first (a finite number in its range, a history of
        the right length, a known phase), then all are assigned. A key this controller does
        not have, or a value it cannot hold, raises ``ValueError`` naming it and leaves the
        controller exactly as it was.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"Invalid state_dict: {type(state).__name__}, expected a dict")
        unknown = sorted(str(k) for k in state if k not in self._state)
        if unknown:
            raise ValueError(
                f"Invalid state_dict: unknown keys {unknown} for {type(self).__name__} "
                f"(expected some of {list(self._state)}; another controller's checkpoint?)"
            )
        rules = self._state_rules()
        checked = {k: rules[k](k, state[k]) for k in self._state if k in state}
        for k, v in checked.items():
            setattr(self, k, v)

    def __repr__(self) -> str:
        sig = ", ".join(f"{k}={v:.4g}" for k, v in self.signals().items())
        return f"{type(self).__name__}({sig})"


def _check_n_steps(n_steps: Any) -> int:
    """``n_steps`` as an int: a positive integer (``numbers.Integral``: Python or NumPy) or an
    integer tensor of one element."""
    value = n_steps
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Invalid n_steps: {n_steps!r} (expected a positive integer)")
    return int(value)

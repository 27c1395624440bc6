"""The radius limiter's per-step record, kept as device tensors until someone reads it.

A step's signals (``r``, ``rho_a``, ``tau``, ``scale``, ``limited``, ``skipped``) and the
running counts of limited and skipped steps are one float64 vector on the device; reading
any of them (``limiter.last``, ``limiter.limited``, a key of what ``after_step`` returned)
moves that vector to the host in one transfer, once. The counts are exact integers in
float64 (up to 2^53 steps).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

__all__ = ["KEYS", "LazySignals", "Tally"]

KEYS = ("r", "rho_a", "tau", "scale", "limited", "skipped")
_ORDER = ("r", "rho_a", "tau", "scale", "limited", "fraction_limited", "skipped", "step")


class Tally:
    """``steps`` (host: every step counts) and the limited / skipped counts (a device tensor
    added to each step, or host ints after a read or a load)."""

    def __init__(self) -> None:
        self.steps = 0
        self._counts: torch.Tensor | tuple[int, int] = (0, 0)
        self._last: LazySignals | dict = {}
        self._previous = (0, (0, 0), {})

    def add(self, values: torch.Tensor) -> LazySignals:
        """Record one step: ``values`` = the float64 vector of :data:`KEYS` and a flag (a
        NaN/Inf gradient), on any device."""
        self._previous = (self.steps, self._counts, self._last)
        self.steps += 1
        counts = self._counts
        if not isinstance(counts, torch.Tensor):
            counts = values.new_tensor(counts)
        elif counts.device != values.device:
            values = values.to(counts.device)
        counts = counts + values[4:6]
        self._counts = counts
        self._last = LazySignals(torch.cat([values, counts]), self.steps)
        return self._last

    def undo(self) -> None:
        """Forget the step just added (a step that raised is not counted)."""
        self.steps, self._counts, self._last = self._previous

    def counts(self) -> tuple[int, int]:
        """(limited, skipped): a host read of the device counts (once per step at most)."""
        if isinstance(self._counts, torch.Tensor):
            limited, skipped = self._last._host()[-2:]
            self._counts = (round(limited), round(skipped))
        return self._counts

    def set_counts(self, limited: int, skipped: int) -> None:
        self._counts = (int(limited), int(skipped))

    @property
    def last(self) -> dict[str, float]:
        return dict(self._last)

    @last.setter
    def last(self, value: Mapping) -> None:
        self._last = dict(value)


class LazySignals(Mapping):
    """The signals of one step as a read-only mapping of floats, moved to the host on the
    first access (one transfer)."""

    def __init__(self, values: torch.Tensor, step: int) -> None:
        self._values, self._step, self._floats, self._out = values, step, None, None

    def _host(self) -> list[float]:
        if self._floats is None:
            self._floats = self._values.tolist()
            self._values = None
        return self._floats

    def _dict(self) -> dict[str, float]:
        if self._out is None:
            r, rho, tau, scale, limited, skipped, _, n_limited, _ = self._host()
            self._out = {"r": r, "rho_a": rho, "tau": tau, "scale": scale, "limited": limited,
                         "fraction_limited": n_limited / self._step, "skipped": skipped,
                         "step": self._step}  # fmt: skip
        return self._out

    @property
    def bad_gradient(self) -> bool:
        """The step was skipped for a NaN/Inf gradient found before the base step."""
        return self._host()[6] != 0.0

    def __getitem__(self, key: str) -> float:
        return self._dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(_ORDER)

    def __len__(self) -> int:
        return len(_ORDER)

    def __repr__(self) -> str:
        return repr(self._dict())

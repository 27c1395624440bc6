"""Count host synchronizations: the Python-level calls that make the host wait for a device.

``SyncCounter`` patches ``torch.Tensor.item``, ``__bool__``, ``__float__``, ``__int__``,
``tolist``, ``cpu`` and ``nonzero`` for the duration of a ``with`` block and counts each call
(by name) made on any tensor, on CPU too: a call that would synchronize on a GPU is counted
wherever it runs, so the count is the same on this machine and on a device. Calls made inside
torch's C++ code are not seen; a ``.cpu()`` of a tensor already on the CPU is counted (it
would be a copy from a device). The GPU issue (17) asks for 0 of them in a steady-state step
of M-FAC, Sven (dense), the radius limiter, DROWeighting and the KL controllers' tensor path,
and 1 per accept test in RegularizedNewton; ``benchmarks/sync_counts.py`` records today's.
"""

from __future__ import annotations

from collections import Counter

import torch

NAMES = ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "nonzero")


class SyncCounter:
    """``with SyncCounter() as c: ...`` then ``c.counts`` (a Counter by name), ``c.total``."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self._saved: dict[str, object] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> SyncCounter:
        for name in NAMES:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(t, *args, _name=name, _original=original, **kwargs):
                self.counts[_name] += 1
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()

"""What a :class:`~torchsteer.control.radius.RadiusLimiter` keeps between steps, and how it is
copied.

Per optimizer a :class:`Slot`: its (parameters, names) list, the theta_old buffers (flat, or one
per tensor) and the snapshot of its state. These are caches, rebuilt on the next step from the
optimizer and the model, and the slots are keyed by weak references to the optimizers; the
forward hooks of ``reuse_forward`` are handles on the model. None of them can be pickled, and
none is needed to go on: :class:`CopyableLimiter` pickles (and deep-copies) a limiter as its
settings, its counters and records and its model, with the caches dropped and the hooks
registered anew on the copy's model. The next step rebuilds the caches from the same values, so
it equals the original's step bit for bit. A limiter in the middle of a step (between
``before_step`` and ``after_step``) holds theta_old that only it can restore: copying it then
raises ``TypeError``.
"""

from __future__ import annotations

import weakref
from typing import Any

from torchsteer.control.radius._masked import StateSnapshot
from torchsteer.jacobian import unwrap_model

__all__ = ["CopyableLimiter", "Slot"]

_CACHES = ("_slots", "_slot", "_recorder", "_reuse_ok")


class Slot:
    """One optimizer's (parameters, names) cache, theta_old buffers and state snapshot."""

    def __init__(self):
        self.named_cache: tuple | None = None
        self.flat = None
        self.buffers: list = []
        self.snapshot = StateSnapshot()


class CopyableLimiter:
    """``__getstate__`` / ``__setstate__`` for the limiter (see the module docstring)."""

    def __getstate__(self) -> dict[str, Any]:
        if self._pending is not None:
            raise TypeError(
                "Cannot pickle or copy a RadiusLimiter while a step is pending (between "
                "before_step and after_step): its theta_old is not part of its state"
            )
        state = {k: v for k, v in self.__dict__.items() if k not in _CACHES}
        rec = self._recorder
        state["_recorder_kind"] = None if rec is None else type(rec)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        kind = state.pop("_recorder_kind", None)
        self.__dict__.update(state)
        self._slots, self._slot, self._reuse_ok = weakref.WeakKeyDictionary(), Slot(), False
        self._recorder = None if kind is None else kind(unwrap_model(self.model))
        if self._recorder is not None:  # (its hooks go with the copy, as the original's)
            weakref.finalize(self, self._recorder.remove)

"""The optimizer contract: hyperparameter validation and a mixin for global state.

Every torchsteer optimizer promises (see ``docs/optimizer_contract.md``):

1. **defaults**: every hyperparameter (policies such as ``nonfinite`` included) is a key of
   ``defaults`` and of every param group, so ``state_dict()``, ``copy.deepcopy`` and ``pickle``
   carry it. Hyperparameters that are *global* (one value for the whole optimizer, e.g. a
   window size) are the same in every group: a group that gives another value raises.
2. **validation**: a bad value -- NaN/Inf, out of range, wrong type, a tensor that is not
   0-d -- raises ``ValueError("Invalid <name>: ...")`` at construction, in
   ``add_param_group`` and in ``load_state_dict``, before anything is changed.
3. **resume**: ``load_state_dict(opt.state_dict())`` (also through
   ``torch.load(weights_only=True)``) continues bit for bit. It keeps the dtype of the global
   state (a float64 Gram stays float64 under float32 parameters) and is atomic: everything
   is validated first, and a rejected state dict leaves the optimizer as it was.
4. **non-finite input**: ``nonfinite="raise"`` raises ``ValueError`` with parameters and
   state untouched; ``nonfinite="skip"`` leaves them untouched too and counts the step in
   ``skipped_steps``.

:func:`check_hyperparameter` and :func:`check_choice` are the one validation helper;
:class:`GlobalStateMixin` gives an optimizer whose state is global (kept on the first
parameter) the dtype-keeping, atomic ``load_state_dict``, the global-hyperparameter rule,
``deepcopy``/``pickle`` support and the ``nonfinite`` policy with its ``skipped_steps``.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Iterable
from typing import Any

import torch

__all__ = [
    "NONFINITE_POLICIES",
    "GlobalStateMixin",
    "check_choice",
    "check_hyperparameter",
    "user_stacklevel",
]

NONFINITE_POLICIES = ("raise", "skip")


def check_hyperparameter(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    tensor: bool = False,
) -> Any:
    """Return ``value`` if it is a finite real number in the range, else raise ``ValueError``.

    The range is ``[low, high]``; ``low_open``/``high_open`` exclude an end; ``None`` leaves
    that side unbounded. ``integer``: a Python ``int`` (``bool`` is refused). ``tensor``: a
    0-d real tensor is accepted too (as ``torch.optim`` accepts a tensor ``lr``) and checked by
    its value; a tensor of any other shape is refused. The message names the hyperparameter:
    ``"Invalid lr: nan (expected a finite number >= 0)"``.
    """
    if isinstance(value, torch.Tensor):
        if not tensor:
            raise ValueError(f"Invalid {name}: a tensor is not accepted here, give a number")
        if value.dim() != 0 or value.is_complex() or not value.dtype.is_floating_point:
            raise ValueError(
                f"Invalid {name}: a tensor {name} must be a 0-d real floating-point tensor, "
                f"got shape {tuple(value.shape)} and dtype {value.dtype}"
            )
        number = float(value.detach())
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid {name}: {value!r} (expected a real number)")
    elif integer and not isinstance(value, numbers.Integral):
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer)")
    else:
        number = float(value)
    ok = math.isfinite(number)
    ok = ok and (low is None or (number > low if low_open else number >= low))
    ok = ok and (high is None or (number < high if high_open else number <= high))
    if not ok:
        expected = _describe(low, high, low_open, high_open, integer)
        raise ValueError(f"Invalid {name}: {value!r} (expected {expected})")
    return value


def _describe(low, high, low_open, high_open, integer) -> str:
    kind = "a finite integer" if integer else "a finite number"
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high}"
    return kind


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices`` (compared with ``is`` for ``None`` and the
    booleans, ``==`` otherwise), else raise ``ValueError`` naming the hyperparameter."""
    choices = tuple(choices)
    for c in choices:
        same_kind = isinstance(c, bool) == isinstance(value, bool)
        if (c is None and value is None) or (c is not None and same_kind and value == c):
            return value
    raise ValueError(f"Invalid {name}: {value!r} (expected one of {', '.join(map(repr, choices))})")


class GlobalStateMixin:
    """Mixin for a ``torch.optim.Optimizer`` whose state is global (one window, one counter).

    Put it first: ``class MyOpt(GlobalStateMixin, torch.optim.Optimizer)``. The subclass sets

    - ``global_hyperparameters``: the keys of ``defaults`` that are one value for the whole
      optimizer. The first param group may set them (they become the defaults of the later
      groups); any other group that gives a different value raises ``ValueError``.
    - ``structural_hyperparameters``: global ones that fix the shapes of the global state
      (a window size): ``load_state_dict`` refuses a state dict with other values.
    - ``policy_hyperparameters``: global ones that choose how the optimizer behaves, not
      where it goes (``nonfinite``): carried by ``state_dict`` like all others, but
      ``load_state_dict`` keeps the live optimizer's value (the one it was built with).
    - ``global_state_keys``: keys of the first parameter's state that ``load_state_dict``
      keeps as saved (dtype kept; 0-d tensors on the CPU, others on the first parameter's
      device) instead of casting them to the parameter's dtype.

    and may override

    - ``_validate_group(group)``: check one group's hyperparameters (``check_hyperparameter``);
      called by ``add_param_group``, by ``load_state_dict`` on every saved group and by
      :meth:`_validate_groups` (which a ``step`` may call to catch values set directly);
    - ``_validate_global_state(state, saved_groups)``: check the saved global state (shapes,
      ranges) before anything is assigned;
    - ``_reset_runtime()``: drop caches that are not state (called after ``__init__``-time
      setup by the subclass itself, after unpickling/deepcopy and after ``load_state_dict``);
    - ``_after_load_state_dict()``: rebuild runtime objects from the loaded state.

    The global state lives in ``self.state[first parameter]`` (:attr:`global_state`);
    ``nonfinite`` must be a hyperparameter with values :data:`NONFINITE_POLICIES`, and
    :meth:`_nonfinite` applies it (raise, or count the step in ``skipped_steps``).
    """

    global_hyperparameters: tuple[str, ...] = ()
    structural_hyperparameters: tuple[str, ...] = ()
    policy_hyperparameters: tuple[str, ...] = ("nonfinite",)
    global_state_keys: tuple[str, ...] = ("step", "skipped_steps")

    # ------------------------------------------------------------------ groups
    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check one group's hyperparameters (raise ``ValueError``); default: nothing."""

    def _validate_groups(self) -> None:
        """Check every live group (e.g. at the start of ``step``: values set directly)."""
        for group in self.param_groups:
            self._validate_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer``, after validating the group (nothing is added if it
        is invalid). Global hyperparameters: see the class docstring."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        first = not self.param_groups
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        # each value is checked before the comparison with the first group's: a tensor of
        # the wrong shape compared with != would raise torch's "Boolean value of Tensor"
        self._validate_group(merged)
        if not first:
            reference = self.param_groups[0]
            differ = [k for k in self.global_hyperparameters if merged[k] != reference[k]]
            if differ:
                raise ValueError(
                    f"Invalid param group: {', '.join(differ)} "
                    f"{'is' if len(differ) == 1 else 'are'} global for "
                    f"{type(self).__name__}; every group must have the first group's value "
                    f"({', '.join(f'{k}={reference[k]!r}' for k in differ)})"
                )
        super().add_param_group(param_group)
        if first:  # the first group's global values are the optimizer's
            for k in self.global_hyperparameters:
                self.defaults[k] = self.param_groups[0][k]

    # ------------------------------------------------------------------ global state
    @property
    def global_state(self) -> dict[str, Any]:
        """The state dict entry of the first parameter, which holds the global state."""
        return self.state[self.param_groups[0]["params"][0]]

    @property
    def skipped_steps(self) -> int:
        """Steps skipped by ``nonfinite="skip"`` (0 before the first step)."""
        value = self._first_state().get("skipped_steps")
        return 0 if value is None else int(value)

    def _first_state(self) -> dict[str, Any]:
        """The first parameter's state without creating an entry for it (``{}`` if none)."""
        if not self.param_groups or not self.param_groups[0]["params"]:
            return {}
        return self.state.get(self.param_groups[0]["params"][0], {})

    def _nonfinite(self, error: Exception) -> None:
        """Apply the ``nonfinite`` policy to a rejected step: re-raise ``error``
        (``"raise"``) or count it in ``skipped_steps`` (``"skip"``). Call it before anything
        of the step has been changed."""
        if self.param_groups[0]["nonfinite"] == "raise":
            raise error
        state = self.global_state
        state["skipped_steps"] = state.get("skipped_steps", torch.tensor(0.0)) + 1

    def _reset_runtime(self) -> None:
        """Drop runtime caches (not state); default: nothing."""

    def _after_load_state_dict(self) -> None:
        """Rebuild runtime objects from freshly loaded state; default: nothing."""

    def _validate_global_state(self, state: dict[str, Any], saved_groups: list[dict]) -> None:
        """Check the saved global state before anything is assigned; default: nothing."""

    # ------------------------------------------------------------------ pickling
    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle / deepcopy / ``load_state_dict``: groups of older checkpoints get the
        defaults of hyperparameters they lack; runtime caches are dropped."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key != "differentiable":  # torch's own default, not one of ours
                    group.setdefault(key, value)
        self._reset_runtime()

    # ------------------------------------------------------------------ loading
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as ``torch.optim.Optimizer`` does, but validate everything first (a rejected
        state dict raises ``ValueError`` and changes nothing) and keep the dtypes of the
        ``global_state_keys`` instead of casting them to the parameter dtype."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError("Invalid state_dict: expected a dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"Invalid state_dict: {len(saved_groups)} param groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"Invalid state_dict: param group {i} has {len(saved['params'])} "
                    f"parameters, this optimizer's has {len(group['params'])}"
                )
        merged = [{**self.defaults, **saved} for saved in saved_groups]
        for key in self.structural_hyperparameters:
            live = self.param_groups[0][key]
            for group in merged:
                if group[key] != live:
                    raise ValueError(
                        f"Invalid state_dict: {key}={group[key]!r}, this optimizer has "
                        f"{key}={live!r} (it fixes the shape of the saved state)"
                    )
        for key in self.global_hyperparameters:
            if any(group[key] != merged[0][key] for group in merged):
                raise ValueError(f"Invalid state_dict: the param groups differ in {key}")
        for group in merged:
            self._validate_group(group)
        saved_state = dict(state_dict["state"])
        first_id = saved_groups[0]["params"][0] if saved_groups[0]["params"] else None
        kept: dict[str, Any] = {}
        if first_id in saved_state:
            first_state = dict(saved_state[first_id])
            kept = {k: first_state.pop(k) for k in self.global_state_keys if k in first_state}
            saved_state[first_id] = first_state
        self._validate_global_state(kept, merged)
        ids = {i for g in saved_groups for i in g["params"]}
        params = {
            i: p
            for g, sg in zip(self.param_groups, saved_groups)
            for i, p in zip(sg["params"], g["params"], strict=True)
        }
        for pid, pstate in saved_state.items():
            if pid in ids:
                self._validate_param_state(params[pid], pstate)

        old = {"state": self.state, "param_groups": self.param_groups}
        policies = {k: self.param_groups[0][k] for k in self.policy_hyperparameters}
        try:
            super().load_state_dict({**state_dict, "state": saved_state, "param_groups": merged})
            for group in self.param_groups:
                group.update(policies)
            first = self.param_groups[0]["params"][0]
            for key, value in kept.items():
                if isinstance(value, torch.Tensor):
                    device = "cpu" if value.dim() == 0 else first.device
                    value = value.to(device=device, copy=True)
                self.state[first][key] = value
            self._after_load_state_dict()
        except BaseException:
            self.__setstate__(old)  # the live objects were never modified: back to them
            self._after_load_state_dict()
            raise

    def _validate_param_state(self, param: torch.Tensor, pstate: dict[str, Any]) -> None:
        """A saved per-parameter state: tensors that are not 0-d must have the parameter's
        shape (override for other layouts)."""
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise ValueError(
                    f"Invalid state_dict: state {key!r} has shape {tuple(value.shape)}, "
                    f"its parameter {tuple(param.shape)}"
                )


def user_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` in the caller that names the first frame
    outside torch and torchsteer (the user's line, past torch's step wrappers)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in (
        "torch",
        "torchsteer",
    ):
        frame, level = frame.f_back, level + 1
    return level

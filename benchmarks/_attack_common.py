"""The attack harness's case registry, verdicts and the checks every case shares.

A case is a function of no arguments returning a :class:`Verdict`: ``held`` (a clear error
with the state bit for bit unchanged, or a correct result), ``held (documented)`` (a
documented limitation, with the doc reference) or ``defect`` (with a one-line reason).
``benchmarks/attack.py`` runs them; the case modules register them with :func:`add`.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "CASES",
    "Verdict",
    "add",
    "bitwise_equal",
    "clear_error",
    "defect",
    "documented",
    "expect_reject",
    "held",
    "roundtrip",
    "snapshot",
]


@dataclass
class Verdict:
    status: str  # "held", "held (documented)", "defect"
    reason: str


def held(reason: str) -> Verdict:
    return Verdict("held", reason)


def documented(reason: str) -> Verdict:
    return Verdict("held (documented)", reason)


def defect(reason: str) -> Verdict:
    return Verdict("defect", reason)


@dataclass
class Case:
    kind: str
    group: str
    name: str
    fn: Callable[[], Verdict]
    repro: str


CASES: list[Case] = []


def add(kind: str, group: str, name: str, fn: Callable[[], Verdict], repro: str = "") -> None:
    CASES.append(Case(kind, group, name, fn, repro or f"{group}: {name}"))


# raw messages of torch / Python that do not say what the user did wrong
RAW = (
    "mat1 and mat2",
    "size of tensor",
    "out of range",
    "expected scalar type",
    "must match the size",
    "Expected all tensors",
    "shape '[",
    "not implemented for",
    "result type",
    "can't convert",
    "only one element tensors",
    "Boolean value of Tensor",
    "must be real number",
    "not supported between instances",
    "object is not subscriptable",
    "has no attribute",
    "unsupported operand",
    "cannot be multiplied",
    "Dimension out of range",
    "element 0 of tensors",
    "range() arg",
    "division by zero",
    "invalid for input of size",
    "Trying to backward through the graph",
)


def clear_error(exc: BaseException, names: tuple[str, ...] = ()) -> tuple[bool, str]:
    """Whether ``exc`` is a ValueError/TypeError that names one of ``names`` (no raw text)."""
    msg = str(exc).replace("\n", " ")
    head = f"{type(exc).__name__}: {msg[:110]}"
    if not isinstance(exc, ValueError | TypeError):
        return False, f"raw {head}"
    raw = [r for r in RAW if r in msg]
    if raw:
        return False, f"raw message {head}"
    if names and not any(n.lower() in msg.lower() for n in names):
        return False, f"does not name {names[0]!r}: {head}"
    return True, head


def _freeze(obj: Any) -> Any:
    """A deep, detached copy of tensors / containers / numbers for bitwise comparison."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, torch.Generator):
        return obj.get_state().clone()
    if isinstance(obj, dict):
        return {k: _freeze(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_freeze(v) for v in obj) if not hasattr(obj, "_fields") else obj
    try:
        return copy.deepcopy(obj)
    except Exception:
        return repr(obj)


def snapshot(*objs: Any) -> Any:
    """Parameters (tensors / modules), optimizers and controllers as comparable data."""
    out = []
    for o in objs:
        if isinstance(o, torch.nn.Module):
            out.append(_freeze(dict(o.state_dict())))
        elif isinstance(o, torch.optim.Optimizer):
            out.append(_freeze(o.state_dict()))
        elif hasattr(o, "state_dict") and callable(o.state_dict):
            out.append(_freeze(o.state_dict()))
        else:
            out.append(_freeze(o))
    return out


def bitwise_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.numel() == 0:
            return True
        if a.dtype == torch.bool:
            return torch.equal(a, b)
        return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(bitwise_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(bitwise_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:
        return repr(a) == repr(b)


def expect_reject(
    call: Callable[[], Any],
    state: Callable[[], tuple] = lambda: (),
    names: tuple[str, ...] = (),
    accepted: Callable[[Any], Verdict | None] | None = None,
) -> Verdict:
    """``call()`` must raise a clear error naming ``names`` and leave ``state()`` unchanged.

    If it returns instead, ``accepted(result)`` may judge the result (a correct documented
    result is held); without it, a silent acceptance is a defect.
    """
    before = snapshot(*state())
    try:
        out = call()
    except Exception as exc:
        ok, why = clear_error(exc, names)
        if not bitwise_equal(before, snapshot(*state())):
            return defect(f"state changed after {why}")
        return held(why) if ok else defect(why)
    if accepted is not None:
        v = accepted(out)
        if v is not None:
            return v
    return defect("accepted silently")


def roundtrip(state: Any) -> Any:
    """``state`` through ``torch.save`` / ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)

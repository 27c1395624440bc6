"""Validation of a saved M-FAC window (dense or blocked) before ``load_state_dict`` assigns.

A dense window is ``window_grads (m, d)``, ``window_gram`` and ``window_inverse`` ``(m, m)``
and a scalar ``window_since_refresh``; a blocked one (``B = ceil(d / block_size) > 1``) has
``window_gram`` and ``window_inverse`` of shape ``(B, m, m)`` and ``window_since_refresh`` of
shape ``(B,)`` (one refresh counter a block), as have the optional ``window_float64_gram``
(0/1: Gram rows in float64) and ``window_calm_steps``. Both share the ring position
(``window_index`` in ``[0, m)``, ``window_count`` in ``[0, m]``) and ``window_damp``.
"""

from __future__ import annotations

from typing import Any

import torch

from torchsteer.optim._contract import check_hyperparameter
from torchsteer.optim.mfac_memory import mfac_n_blocks

__all__ = ["WINDOW_KEYS", "validate_window_state"]

WINDOW_KEYS = {
    "window_grads": "grads",
    "window_gram": "gram",
    "window_inverse": "inverse",
    "window_index": "index",
    "window_count": "count",
    "window_since_refresh": "since_refresh",
    "window_damp": "damp",
    "window_float64_gram": "float64_gram",
    "window_calm_steps": "calm_steps",
}
OPTIONAL_KEYS = ("window_float64_gram", "window_calm_steps")  # absent in older saves: 0


def number(value: Any) -> Any:
    """A 0-d tensor as a Python number (int for integer dtypes), anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    return value


def validate_window_state(state: dict[str, Any], group: dict[str, Any], dim: int) -> None:
    """Raise ``ValueError`` unless ``state`` (the first parameter's saved global state) holds
    a window that fits ``group``'s ``ngrads``, ``damp`` and ``block_size`` over ``dim``
    parameters: all keys, the shapes above, finite floating-point buffers, the ring position
    inside the window, non-negative counters."""
    for key in ("step", "skipped_steps"):
        if key in state:
            check_hyperparameter(f"state_dict {key}", number(state[key]), low=0.0)
    if not any(k in state for k in WINDOW_KEYS):
        return
    missing = [k for k in WINDOW_KEYS if k not in state and k not in OPTIONAL_KEYS]
    if missing:
        raise ValueError(f"Invalid state_dict: the window state lacks {missing}")
    m, nb = group["ngrads"], mfac_n_blocks(dim, group.get("block_size"))
    small = (m, m) if nb == 1 else (nb, m, m)
    what = f"ngrads={m}, {dim} parameters" + (f", {nb} blocks" if nb > 1 else "")
    for key, shape in (("window_grads", (m, dim)), ("window_gram", small),
                       ("window_inverse", small)):  # fmt: skip
        value = state[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
            raise ValueError(f"Invalid state_dict: {key} is {got}, expected {shape} ({what})")
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise ValueError(f"Invalid state_dict: {key} is not finite floating point")
    check_hyperparameter("state_dict window_index", number(state["window_index"]),
                         low=0, high=m, high_open=True, integer=True)  # fmt: skip
    check_hyperparameter("state_dict window_count", number(state["window_count"]),
                         low=0, high=m, integer=True)  # fmt: skip
    since = state["window_since_refresh"]
    if nb > 1:
        if not isinstance(since, torch.Tensor) or tuple(since.shape) != (nb,):
            raise ValueError(f"Invalid state_dict: window_since_refresh must have shape ({nb},)")
        since = [number(s) for s in since]
    for value in since if isinstance(since, list) else [number(since)]:
        check_hyperparameter("state_dict window_since_refresh", value, low=0, integer=True)
    for key in OPTIONAL_KEYS:  # the Gram's precision mode (0/1) and its calm-step counter
        if key not in state:
            continue
        values = state[key]
        values = values.reshape(-1).tolist() if isinstance(values, torch.Tensor) else [values]
        if len(values) != nb:
            raise ValueError(f"Invalid state_dict: {key} must have {nb} entries")
        high = 1 if key == OPTIONAL_KEYS[0] else None
        for value in values:
            check_hyperparameter(f"state_dict {key}", value, low=0, high=high, integer=True)
    if float(state["window_damp"]) != float(group["damp"]):
        raise ValueError(
            f"Invalid state_dict: window_damp {float(state['window_damp'])} != damp {group['damp']}"
        )

"""Checks of the radius limiter's settings and of what a measurement is handed.

Settings (:func:`check_settings`): ``r_max``, ``temperature`` and ``fd_eps`` are real numbers
(``bool`` is not one), finite and ``> 0``; the choices are among their values; the switches
(``eval_mode``, ``reuse_forward``, ``channels_last``, ``fold``) are ``bool``. Each failure is a
``ValueError`` that names the setting.

A measurement ``a = J_z v`` (:func:`check_direction`) needs ``v`` over known trainable
parameters, each of its parameter's shape, and all of them unless the point ``params`` names
the subset that moves. These are checks of metadata (names and shapes): no tensor is read, so
no host synchronization is added.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["check_direction", "check_positive", "check_settings", "forward_error"]


def check_positive(name: str, value: Any) -> float:
    """``value`` as a float when it is a finite real number ``> 0``, else ``ValueError``."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value > 0):
        raise ValueError(f"Invalid {name}: {value!r} (a finite real number > 0)")
    return float(value)


def check_settings(r_max, temperature, fd_eps, choices: dict, switches: dict) -> None:
    """The limiter's constructor arguments (see :class:`RadiusLimiter`)."""
    check_positive("r_max", r_max)
    check_positive("temperature", temperature)
    if fd_eps is not None:
        check_positive("fd_eps", fd_eps)
    for name, (value, allowed) in choices.items():
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"Invalid {name}: {value!r} (one of {', '.join(allowed)})")
    for name, value in switches.items():
        if not isinstance(value, bool):
            raise ValueError(f"Invalid {name}: {value!r} (True or False)")


def check_direction(
    direction: Mapping[str, torch.Tensor],
    live: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor] | None,
) -> None:
    """``direction`` against the model's trainable parameters ``live`` and the point."""
    unknown = [k for k in direction if k not in live]
    if unknown:
        raise ValueError(f"Invalid direction: {unknown} are not trainable parameters of the model")
    if params is None:
        missing = [k for k in live if k not in direction]
        if missing:
            raise ValueError(
                f"Invalid direction: it misses the parameters {missing}; give every trainable "
                "parameter (zeros where it does not move), or params= naming the subset"
            )
    for k, t in direction.items():
        if not isinstance(t, torch.Tensor) or t.shape != live[k].shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"Invalid direction shape: {k!r} is {got}, the parameter {tuple(live[k].shape)}"
            )


def forward_error(err: Exception) -> ValueError:
    """A clear error for a forward that failed on the measured inputs."""
    return ValueError(
        "Invalid inputs: the model's forward failed on them (a wrong shape or dtype for this "
        f"model?); the model's {type(err).__name__} is chained to this error"
    )

"""A KL reference made of a weight soup of several fine-tuned models (SALSA).

SALSA replaces the single SFT reference of RLHF by the weight average of N models fine-tuned
from the same initialization:

.. math:: \\theta_\\mathrm{soup}[k] = \\sum_{i=1}^N w_i\\, \\theta_i[k], \\qquad
          w_i \\ge 0, \\; \\sum_i w_i = 1 \\; (\\text{uniform by default})

for every floating-point entry k of the state dicts, accumulated in float64 and cast back to
the entry's dtype. Integer / bool entries (e.g. BatchNorm's ``num_batches_tracked``) are not
averaged: they must be equal in every model and are copied. Load the result into a copy of the
architecture and use it as pi_ref; the KL controllers and penalties are unchanged.

References:
    Chegini, Kazemi, Mirzadeh, Yin, Horton, Nabi, Farajtabar, Alizadeh, "SALSA: Soup-based
    Alignment Learning for Stronger Adaptation in RLHF", arXiv 2411.01798 (2024).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

__all__ = ["soup_reference"]


def soup_reference(
    models: Sequence[torch.nn.Module | Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """The weighted average of the models' state dicts (module docstring).

    Args:
        models: two or more modules or state dicts with the same keys, shapes and dtypes.
        weights: one non-negative weight per model summing to 1 (within 1e-9); None: uniform.

    Returns:
        A new state dict (detached tensors on each entry's device).

    Raises:
        ValueError: fewer than two models, keys / shapes / dtypes that differ, integer entries
            that differ, or weights of the wrong length, negative, non-finite, or not summing
            to 1.

    Example::

        ref = copy.deepcopy(sft_a)
        ref.load_state_dict(soup_reference([sft_a, sft_b]))
        ref.requires_grad_(False)
    """
    if isinstance(models, (torch.nn.Module, Mapping)) or len(models) < 2:
        raise ValueError("Invalid models: give a sequence of at least two models / state dicts")
    sds = [m.state_dict() if isinstance(m, torch.nn.Module) else dict(m) for m in models]
    n = len(sds)
    if weights is None:
        weights = [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"Invalid weights: {len(weights)} for {n} models")
    if any(not math.isfinite(w) or w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-9:
        raise ValueError(f"Invalid weights: {weights} (non-negative, summing to 1)")
    keys = list(sds[0])
    for i, sd in enumerate(sds[1:], 1):
        if list(sd) != keys:
            diff = sorted(set(sd) ^ set(keys))
            raise ValueError(f"Invalid models: model {i} has other keys than model 0 ({diff[:5]})")
    out = {}
    for k in keys:
        first = sds[0][k]
        for i, sd in enumerate(sds[1:], 1):
            t = sd[k]
            if t.shape != first.shape or t.dtype != first.dtype:
                raise ValueError(
                    f"Invalid models: entry {k!r} of model {i} is {tuple(t.shape)} {t.dtype}, "
                    f"model 0 {tuple(first.shape)} {first.dtype}"
                )
        if first.is_floating_point():
            acc = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
            for w, sd in zip(weights, sds):
                acc += w * sd[k].detach().to(device=first.device, dtype=torch.float64)
            out[k] = acc.to(first.dtype)
        else:
            if any(not torch.equal(sd[k].cpu(), first.cpu()) for sd in sds[1:]):
                raise ValueError(f"Invalid models: integer entry {k!r} differs between models")
            out[k] = first.detach().clone()
    return out

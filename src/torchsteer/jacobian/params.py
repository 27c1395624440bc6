"""Parameters as a dict (for ``functional_call``) and as one flat vector (for linear algebra).

The dict maps ``named_parameters()`` names to tensors; the flat vector is their
concatenation in that order. :func:`flatten` copies (a concatenation must);
:func:`unflatten` returns views into the flat vector, never a copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "check_finite",
    "flatten",
    "numel",
    "param_dict",
    "unflatten",
    "unwrap_model",
]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers.

    ``torch.func`` transforms cannot see through those wrappers, so every functional product
    runs on the unwrapped module. The parameters are shared, not copied.
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
    return model


def param_dict(model: nn.Module, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """``{name: parameter}`` of the unwrapped model (only ``requires_grad`` ones by default)."""
    model = unwrap_model(model)
    return {
        name: p for name, p in model.named_parameters() if p.requires_grad or not trainable_only
    }


def _values(tensors: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(tensors, Mapping):
        return list(tensors.values())
    return list(tensors)


def numel(tensors: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> int:
    """Total number of entries."""
    return sum(t.numel() for t in _values(tensors))


def flatten(tensors: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> torch.Tensor:
    """One flat vector, the tensors concatenated in order (a dict in its key order)."""
    vals = _values(tensors)
    if not vals:
        raise ValueError("Invalid tensors: nothing to flatten")
    return torch.cat([t.reshape(-1) for t in vals])


def flatten_like(
    tensors: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """One detached (P,) vector in ``dtype`` from per-parameter tensors, ``None`` counting as
    zeros shaped like its parameter (what ``torch.autograd.grad(..., allow_unused=True)``
    returns for a parameter the output does not use). A count or size that does not match
    ``like`` raises ``ValueError`` (``zip`` would drop the rest silently)."""
    if len(tensors) != len(like):
        raise ValueError(f"Invalid tensors: {len(tensors)} for {len(like)} parameters in like")
    for i, (t, p) in enumerate(zip(tensors, like)):
        if t is not None and t.numel() != p.numel():
            raise ValueError(
                f"Invalid tensors[{i}]: {t.numel()} entries, its parameter {p.numel()}"
            )
    parts = [(torch.zeros_like(p) if t is None else t).reshape(-1) for t, p in zip(tensors, like)]
    return torch.cat(parts).detach().to(dtype)


def unflatten(
    vec: torch.Tensor, like: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
) -> dict[str, torch.Tensor] | list[torch.Tensor]:
    """Views into ``vec`` shaped like ``like`` (a dict gives a dict, a sequence a list).

    Raises:
        ValueError: if ``vec`` is not a vector of the total size of ``like``.
    """
    vals = _values(like)
    total = sum(t.numel() for t in vals)
    if vec.dim() != 1 or vec.numel() != total:
        raise ValueError(
            f"Invalid vector: shape {tuple(vec.shape)}, expected ({total},) to match the parameters"
        )
    parts = vec.split([t.numel() for t in vals])
    views = [p.view(t.shape) for p, t in zip(parts, vals)]
    if isinstance(like, Mapping):
        return dict(zip(like.keys(), views))
    return views


def check_finite(name: str, *tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` when any tensor holds NaN or Inf.

    This synchronizes with the device once (one reduction over all tensors).
    """
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    if flags and not bool(torch.stack(flags).all()):
        raise ValueError(f"Invalid {name}: contains NaN or Inf")

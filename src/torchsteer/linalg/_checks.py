"""Argument checks of the public truncated solves.

Every check but :func:`check_singular_values` reads shapes and Python numbers, never tensor
values, so it costs no host synchronization; :func:`check_singular_values` reads S's verdict
in one transfer (a public utility may; Sven calls the unchecked kernel). The solves' numbers
are unchanged. A failure raises ``ValueError`` naming the argument (before: torch's "size
mismatch, got input (6), mat (6x8), vec (5)", or a negative S accepted silently).
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = [
    "check_matrix",
    "check_rank",
    "check_rows",
    "check_rtol_damping",
    "check_singular_values",
    "check_triplets",
]


def check_matrix(name: str, A) -> None:
    """``A`` has a 2-D ``shape``."""
    shape = tuple(getattr(A, "shape", ()))
    if len(shape) != 2:
        raise ValueError(f"Invalid {name}: shape {shape}, expected a 2-D matrix")


def check_rows(name: str, r: torch.Tensor, n: int, of: str, matrix: bool = False) -> None:
    """``r`` is (n,) (or (n, m) with ``matrix``), n the rows of ``of``."""
    ok = r.dim() == 1 or (matrix and r.dim() == 2)
    if not ok or r.shape[0] != n:
        want = f"({n},) or ({n}, m)" if matrix else f"({n},)"
        raise ValueError(f"Invalid {name}: shape {tuple(r.shape)}, expected {want} ({of})")


def check_rank(rank) -> None:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"Invalid rank: {rank!r} (expected an integer >= 1)")


def check_rtol_damping(rtol, damping) -> None:
    if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not 0.0 <= rtol < 1.0:
        raise ValueError(f"Invalid rtol: {rtol!r} (expected 0 <= rtol < 1)")
    if (
        isinstance(damping, bool)
        or not isinstance(damping, numbers.Real)
        or not (math.isfinite(damping) and damping >= 0.0)
    ):
        raise ValueError(f"Invalid damping: {damping!r} (expected a finite number >= 0)")


def check_triplets(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> None:
    """U (N, k), S (k,), V (P, k)."""
    check_matrix("U", U)
    check_matrix("V", V)
    k = U.shape[1]
    if S.dim() != 1 or S.shape[0] != k:
        raise ValueError(
            f"Invalid S: shape {tuple(S.shape)}, expected ({k},) as U {tuple(U.shape)}"
        )
    if V.shape[1] != k:
        raise ValueError(f"Invalid V: shape {tuple(V.shape)}, expected (P, {k}) as U")


def check_singular_values(S: torch.Tensor) -> None:
    """``S`` finite and ``>= 0`` (singular values): one host read of both verdicts."""
    if S.numel() == 0:
        return
    finite, low = torch.stack([torch.isfinite(S).all().to(S.dtype), S.min()]).tolist()
    if finite != 1.0:
        raise ValueError("Invalid S: contains NaN or Inf (singular values are finite, >= 0)")
    if low < 0.0:
        raise ValueError(
            f"Invalid S: negative entries (min {low:.3g}); singular values are >= 0 (a sign "
            "belongs in U or V)"
        )

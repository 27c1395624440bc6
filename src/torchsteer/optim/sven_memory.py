"""Sven's memory formulas and the path its ``memory_budget`` picks: dense, matrix-free, a fraction.

With B rows (after ``microbatch_size``), P optimized coordinates, ``n`` bytes a number of the
algebra dtype, ``P_k = ceil(f P)`` kept coordinates (``param_fraction = f``) and a sketch
width ``l`` (``min(rank + oversample, B, P_k)``; ``min(B, P_k)`` with ``svd="exact"``):

    dense Jacobian         J = dl/dtheta:            n B P
    matrix-free sketch     n l (2 P + 2 P_k)  [+ 8 P + 16 P_k when f < 1]

The dense figure is the Jacobian itself (the budget's historical meaning; the B x B Gram and,
off the reused-buffer path, one transient copy come on top). The matrix-free figure counts
the (P, l) blocks alive at the peak of the randomized SVD on products: a full-length (P, l)
block of tangents and its per-parameter copy (``M V`` needs every coordinate's tangent, the
dropped ones zero) or of cotangent gradients and their concatenation (``M^T U``), beside the
sketch ``Omega`` and ``B^T = M^T Q`` (or the SVD of ``B``) on the kept coordinates (two
``(P_k, l)`` blocks; measured with ``bench.memory.peak_memory`` on a 2M-parameter MLP,
B = 32, l = 4 and 8: 4.0 ``n l P`` at f = 1, 2.5 at f = 0.25, 2.2 at f = 0.1); with
``f < 1`` the coordinates are drawn by an int64 permutation of all P (8 P bytes) and sorted
(16 P_k). Neither counts the model, its gradients or the activations of the forward / JVP /
VJP passes (the graph of one evaluation).

The choice (:func:`plan`) for ``jacobian``:

    "dense"        dense; over budget (n B P > memory_budget) -> MemoryBudgetError
    "matrix_free"  matrix-free at the given fraction (the budget is not consulted)
    "auto"         dense if n B P <= memory_budget, else matrix-free at the given fraction
                   if its sketch fits, else matrix-free at the largest fraction
                   f = P_k / P <= param_fraction whose sketch fits (P_k >= l), else
                   MemoryBudgetError (even P_k = l leaves the 2 n l P of full-length blocks)

:class:`MemoryBudgetError` is a ``ValueError`` raised before any Jacobian or sketch is
allocated and before anything changes; its message names the part, the bytes it would need
and the options that reduce them.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["MemoryBudgetError", "Plan", "dense_bytes", "matrix_free_bytes", "plan", "sven_memory"]


class MemoryBudgetError(ValueError):
    """A part would need more memory than its budget (raised before allocating it)."""


def dense_bytes(rows: int, cols: int, itemsize: int) -> int:
    """The dense Jacobian: ``n B P`` bytes."""
    return rows * cols * itemsize


def sketch_width(rows: int, kept: int, rank: int, oversample: int, exact: bool) -> int:
    """``l``: ``min(B, P_k)`` for ``svd="exact"``, else ``min(rank + oversample, B, P_k)``."""
    return min(rows, kept) if exact else min(rank + oversample, rows, kept)


def kept_columns(cols: int, fraction: float) -> int:
    """``P_k = max(1, ceil(f P))`` (the coordinates one step updates)."""
    return cols if fraction == 1.0 else max(1, math.ceil(fraction * cols))


def matrix_free_bytes(cols: int, kept: int, width: int, itemsize: int) -> int:
    """The matrix-free sketch: ``n l (2 P + 2 P_k)`` bytes, ``+ 8 P + 16 P_k`` (the drawn
    coordinates' int64 permutation and sort) when ``P_k < P``."""
    draw = 8 * cols + 16 * kept if kept < cols else 0
    return itemsize * width * (2 * cols + 2 * kept) + draw


def sven_memory(
    rows: int,
    cols: int,
    itemsize: int = 4,
    rank: int = 64,
    oversample: int = 10,
    power_iters: int = 2,
    fraction: float = 1.0,
    exact: bool = False,
) -> dict[str, int]:
    """Both formulas at these sizes (bytes): ``{"dense Jacobian", "matrix-free sketch"}``."""
    del power_iters  # the subspace iterations reuse the same blocks
    kept = kept_columns(cols, fraction)
    width = sketch_width(rows, kept, rank, oversample, exact)
    return {
        "dense Jacobian (n B P)": dense_bytes(rows, cols, itemsize),
        f"matrix-free sketch (n l (2P + 2P_k), l = {width}, f = {fraction:g})": (
            matrix_free_bytes(cols, kept, width, itemsize)
        ),
    }


@dataclasses.dataclass(frozen=True)
class Plan:
    """The path of one step: ``"dense"`` or ``"matrix_free"``, the fraction of coordinates it
    updates and the bytes its formula gives."""

    path: str
    fraction: float
    bytes: int


def _gib(x: float) -> str:
    return f"{x:,.0f} bytes ({x / 2**30:.2f} GiB)"


def plan(
    jacobian: str,
    rows: int,
    cols: int,
    itemsize: int,
    budget: int,
    fraction: float,
    rank: int,
    oversample: int,
    exact: bool,
) -> Plan:
    """The path ``jacobian`` takes for B = ``rows``, P = ``cols`` (module docstring)."""
    dense = dense_bytes(rows, cols, itemsize)
    if jacobian == "dense":
        if dense > budget:
            raise MemoryBudgetError(
                f"Sven dense Jacobian: B x P = {rows} x {cols:,} needs {_gib(dense)}, over "
                f"memory_budget = {_gib(budget)}; use jacobian='auto' or 'matrix_free' (a "
                "sketch instead of the matrix), a smaller batch or microbatch_size (fewer "
                "rows), or raise memory_budget"
            )
        return Plan("dense", fraction, dense)

    def sketch(f: float) -> int:
        kept = kept_columns(cols, f)
        width = sketch_width(rows, kept, rank, oversample, exact)
        return matrix_free_bytes(cols, kept, width, itemsize)

    if jacobian == "matrix_free":
        return Plan("matrix_free", fraction, sketch(fraction))
    if dense <= budget:
        return Plan("dense", fraction, dense)
    if sketch(fraction) <= budget:
        return Plan("matrix_free", fraction, sketch(fraction))
    width = sketch_width(rows, cols, rank, oversample, exact)  # l for any P_k >= l
    nl = itemsize * width  # solve budget = nl (2 P + 2 P_k) + 8 P + 16 P_k for P_k
    kept = min(kept_columns(cols, fraction), (budget - (2 * nl + 8) * cols) // (2 * nl + 16))
    if kept >= width:
        f = kept / cols
        while kept_columns(cols, f) > kept:  # ceil(f P) is exactly P_k
            f = math.nextafter(f, 0.0)
        return Plan("matrix_free", f, sketch(f))
    raise MemoryBudgetError(
        f"Sven Jacobian: B x P = {rows} x {cols:,} needs {_gib(dense)} dense, and the "
        f"matrix-free sketch (width l = {width}) at least {_gib(sketch(width / cols))} at any "
        f"param_fraction, over memory_budget = {_gib(budget)}; raise memory_budget, or "
        "lower rank / oversample (a narrower sketch) or the batch (fewer rows)"
    )

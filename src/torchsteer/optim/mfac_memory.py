"""M-FAC's memory: the bytes of its window for given settings, and the budget check.

With ``d`` parameters, ``m = ngrads``, ``s`` bytes a number of ``window_dtype`` and
``B = ceil(d / block_size)`` blocks (``B = 1`` without blocks or when
``block_size >= d``), MFAC holds

.. math::

    \\text{bytes} = \\underbrace{m\\, d_r\\, s}_{\\text{window } G}
    + \\underbrace{2 B m^2 \\cdot 8}_{\\text{Gram and inverse, float64}}
    + \\underbrace{d_r\\, s}_{\\text{gradient buffer}}

where ``d_r = ceil(d / R)`` is the largest shard of a dense window sharded over ``R`` ranks
(``d_r = d`` in one process and for a blocked window, which is not sharded). Not counted:
the momentum buffers (``d`` numbers of the parameter dtype when ``momentum > 0``) and a
step's temporaries (on the blocked and the reduced-precision paths ``d`` float32 numbers for
``F^{-1} g`` plus float32 column chunks of about 4 M numbers; a float64 pass on duplicate
gradients uses 4 M float64 numbers).

Example: ``mfac_window_bytes(124_000_000, 1024)`` is 508 GB (float32), while
``mfac_max_ngrads(124_000_000, 8e9, window_dtype=torch.bfloat16)`` is the largest window
that fits 8 GB in bfloat16 (31).
"""

from __future__ import annotations

import math

import torch

__all__ = ["check_memory_budget", "mfac_max_ngrads", "mfac_n_blocks", "mfac_window_bytes"]


def _check_int(name: str, value, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= {low})")
    return value


def mfac_n_blocks(n_params: int, block_size: int | None) -> int:
    """The number of window blocks: ``ceil(d / block_size)``, or 1 (``block_size`` None or
    at least ``d``: the dense window)."""
    _check_int("n_params", n_params, 1)
    if block_size is None:
        return 1
    _check_int("block_size", block_size, 1)
    return 1 if block_size >= n_params else -(-n_params // block_size)


def mfac_window_bytes(
    n_params: int,
    ngrads: int,
    block_size: int | None = None,
    window_dtype: torch.dtype = torch.float32,
    *,
    world_size: int = 1,
) -> int:
    """Bytes of MFAC's state besides momentum (see the module docstring for the formula).

    Args:
        n_params: ``d``, the number of parameters of all groups.
        ngrads: the window size ``m``.
        block_size: MFAC's ``block_size`` (``None``: one dense window).
        window_dtype: the window's dtype (its ``itemsize`` bytes a number).
        world_size: ranks a dense window is sharded over (``shard``); ignored for blocks.
    """
    _check_int("ngrads", ngrads, 1)
    _check_int("world_size", world_size, 1)
    if not (isinstance(window_dtype, torch.dtype) and window_dtype.is_floating_point):
        raise ValueError(f"Invalid window_dtype: {window_dtype!r}")
    nb = mfac_n_blocks(n_params, block_size)
    local = n_params if nb > 1 else -(-n_params // world_size)
    itemsize = window_dtype.itemsize
    return ngrads * local * itemsize + 2 * nb * ngrads * ngrads * 8 + local * itemsize


def mfac_max_ngrads(
    n_params: int,
    memory_budget: float,
    block_size: int | None = None,
    window_dtype: torch.dtype = torch.float32,
    *,
    world_size: int = 1,
) -> int:
    """The largest ``ngrads`` whose :func:`mfac_window_bytes` is at most ``memory_budget``
    (0 if not even ``ngrads=1`` fits)."""
    if not (isinstance(memory_budget, (int, float)) and math.isfinite(memory_budget)):
        raise ValueError(f"Invalid memory_budget: {memory_budget!r}")

    def fits(m: int) -> bool:
        return mfac_window_bytes(n_params, m, block_size, window_dtype, world_size=world_size) <= (
            memory_budget
        )

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):  # the bytes grow with m: double, then bisect
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def check_memory_budget(
    n_params: int,
    ngrads: int,
    block_size: int | None,
    window_dtype: torch.dtype,
    memory_budget: float | None,
    *,
    world_size: int = 1,
) -> None:
    """Raise ``ValueError`` when the window would exceed ``memory_budget`` bytes (``None``:
    no budget). The message names MFAC, the bytes and their terms, and the options that
    reduce them. Call it before allocating the window."""
    if memory_budget is None:
        return
    need = mfac_window_bytes(n_params, ngrads, block_size, window_dtype, world_size=world_size)
    if need <= memory_budget:
        return
    nb = mfac_n_blocks(n_params, block_size)
    local = n_params if nb > 1 else -(-n_params // world_size)
    s = window_dtype.itemsize
    fit = mfac_max_ngrads(n_params, memory_budget, block_size, window_dtype, world_size=world_size)
    half = ""
    if s > 2:
        fit2 = mfac_max_ngrads(n_params, memory_budget, block_size, torch.bfloat16,
                               world_size=world_size)  # fmt: skip
        half = f"; window_dtype=torch.bfloat16 (2 bytes a number; ngrads <= {fit2} then fits)"
    raise ValueError(
        f"MFAC: the window needs {need:,} bytes ({need / 1e9:.3g} GB) > memory_budget="
        f"{memory_budget:,.0f}: ngrads={ngrads} x {local:,} parameters x {s} bytes "
        f"({window_dtype}) = {ngrads * local * s:,} for the window, + Gram and inverse "
        f"2 x {nb} block(s) x {ngrads}^2 x 8 = {2 * nb * ngrads**2 * 8:,}, + the gradient "
        f"buffer {local * s:,}. Reduce it with ngrads (ngrads <= {fit} fits){half}; a "
        "larger block_size (or none) shrinks only the Gram term, not the m x d window. "
        "Nothing was allocated."
    )

"""Peak memory of a few steps on CPU, for every arm of every suite.

:func:`peak_memory` runs ``fn()`` and returns the peak of the bytes allocated while it ran,
above what was allocated when it started:

* torch's CPU allocations, from ``torch.profiler`` with ``profile_memory=True``: the
  profiler records every allocation and free of a tensor's storage as a ``[memory]`` event
  with a signed size; the peak of their running sum, in time order, is the peak of torch
  bytes alive above the start (gradients, optimizer state, activations, temporaries);
* with ``python=True``, also what ``tracemalloc`` traces: Python objects and NumPy arrays
  (NumPy registers its data buffers with tracemalloc). Its peak (``get_traced_memory()``
  after ``reset_peak()``) is added to torch's, so the sum bounds the joint peak from above
  (the two peaks may fall at different moments). Memory that neither sees (a BLAS or
  LAPACK workspace, SciPy's Fortran arrays) is not counted.

Suites call it on a copy of the fresh state over two steps, outside the timed training, so
the curves and CPU times are unchanged; ``None`` means the profiler did not expose its
memory events.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tracemalloc
from collections.abc import Callable

import torch

__all__ = ["peak_memory"]


@contextlib.contextmanager
def _silence_stderr():
    """Mute file descriptor 2 (the profiler's C++ start/stop lines)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def peak_memory(fn: Callable[[], object], *, python: bool = False) -> int | None:
    """Peak bytes allocated while ``fn()`` runs, above the start (see the module docstring).

    The global torch RNG state is restored after ``fn``.
    """
    from torch.profiler import ProfilerActivity, profile

    started = python and not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        if python:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
        with torch.random.fork_rng(devices=[]), _silence_stderr():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
        py_peak = tracemalloc.get_traced_memory()[1] - base if python else 0
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except (AttributeError, RuntimeError):
        return None
    finally:
        if started:
            tracemalloc.stop()
    events.sort(key=lambda e: e.start_ns())
    total = peak = 0
    for e in events:
        total += e.nbytes()
        peak = max(peak, total)
    return peak + max(py_peak, 0)

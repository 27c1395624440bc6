"""Timing helpers shared by the benchmark scripts: a clock per device, interleaved arms."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["clock", "interleaved"]


def clock(device: str) -> Callable[[], float]:
    """CUDA-synchronized wall time on a GPU, ``time.process_time`` (CPU time) otherwise."""
    if device.startswith("cuda"):

        def now() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()

        return now
    return time.process_time


def interleaved(
    arms: dict[str, Callable[[], object]], repeats: int, now: Callable[[], float], warmup: int = 1
) -> dict[str, float]:
    """Median time of each arm, the arms run in turn (ABAB...) after ``warmup`` calls each."""
    times: dict[str, list[float]] = {k: [] for k in arms}
    for fn in arms.values():
        for _ in range(warmup):
            fn()
    for _ in range(repeats):
        for name, fn in arms.items():
            t0 = now()
            fn()
            times[name].append(now() - t0)
    return {k: statistics.median(v) for k, v in times.items()}

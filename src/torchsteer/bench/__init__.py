"""Convergence benchmarks: ``torchsteer bench``. Suites register in :mod:`.registry`."""

from torchsteer.bench.registry import Context, Run, Suite, get_suite, register, suites

__all__ = ["Context", "Run", "Suite", "get_suite", "register", "suites"]

"""Convergence benchmarks: ``torchsteer bench``. Suites register in :mod:`.registry`.

The suites themselves live one per module in :mod:`torchsteer.bench.suites`; list them with
:func:`torchsteer.bench.registry.suites`.
"""

from torchsteer.bench.registry import Context, Run, Suite, get_suite, register

__all__ = ["Context", "Run", "Suite", "get_suite", "register"]

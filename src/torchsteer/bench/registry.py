"""Benchmark suites and the records they return.

A suite is a named experiment that runs several *methods* (optimizer or controller arms)
over several seeds and returns one :class:`Run` per (method, seed). Suites live one per
module in :mod:`torchsteer.bench.suites` and register themselves with :func:`register`;
the runner (:mod:`torchsteer.bench.runner`) discovers them, shows progress, and writes the
table, CSV/JSON and plots.

Example::

    from torchsteer.bench.registry import Run, Suite, register

    def run_my_suite(ctx):
        runs = []
        for seed in ctx.seeds:
            for method in ("SGD", "Adam"):
                run = Run(suite="my-suite", method=method, seed=seed)
                ...  # train, calling run.record(step, cpu_time, loss, metric) as you go
                ctx.advance()  # one unit of progress
                runs.append(run)
        return runs

    register(Suite(name="my-suite", description="...", run=run_my_suite,
                   units=lambda quick, seeds: 2 * len(seeds)))
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import Any

__all__ = [
    "Context",
    "Run",
    "Suite",
    "discover",
    "get_suite",
    "register",
    "registered",
    "suites",
]


@dataclasses.dataclass(kw_only=True)
class Run:
    """The record of one method on one seed.

    Attributes:
        suite: name of the suite.
        method: display name of the arm (``"Sven (rank 64)"``, ``"Adam lr=1e-3"``).
        seed: the seed.
        steps, cpu_time, loss, metric: the curve, one entry per recorded point; ``cpu_time``
            is cumulative ``time.process_time()`` seconds spent in training (evaluation
            excluded), ``metric`` is the suite's metric (accuracy, validation MSE, ...) or NaN.
        step_time: mean CPU seconds per optimizer step (for the step-cost ratio).
        time_to_target: CPU seconds until the suite's target was first reached, else None.
        peak_memory: peak extra bytes measured by the suite (None when not measured).
        extra: anything else worth keeping (kept ranks, KL error, ...); must be JSON-able.
    """

    suite: str
    method: str
    seed: int
    steps: list[int] = dataclasses.field(default_factory=list)
    cpu_time: list[float] = dataclasses.field(default_factory=list)
    loss: list[float] = dataclasses.field(default_factory=list)
    metric: list[float] = dataclasses.field(default_factory=list)
    step_time: float | None = None
    time_to_target: float | None = None
    peak_memory: int | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def record(self, step: int, cpu_time: float, loss: float, metric: float = float("nan")):
        """Append one point of the curve."""
        self.steps.append(int(step))
        self.cpu_time.append(float(cpu_time))
        self.loss.append(float(loss))
        self.metric.append(float(metric))

    @property
    def final_loss(self) -> float:
        return self.loss[-1] if self.loss else float("nan")

    @property
    def final_metric(self) -> float:
        return self.metric[-1] if self.metric else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(kw_only=True)
class Context:
    """What the runner hands a suite (see :meth:`grid` for the usual loop).

    Attributes:
        quick: run the small, fast configuration (what ``make bench`` uses).
        seeds: the seeds to run.
        advance: call once per finished unit of work (moves the progress bar).
        log: print a line above the progress bar.
    """

    quick: bool
    seeds: list[int]
    advance: Callable[[], None] = lambda: None
    log: Callable[[str], None] = print

    def grid(self, arms: Iterable[Any], train: Callable[[Any, int], Run]) -> list[Run]:
        """``train(arm, seed)`` for every seed and every arm (seed-major), one progress
        step a run: the loop of a suite whose unit of work is one (arm, seed) run."""
        arms = list(arms)
        runs = []
        for seed in self.seeds:
            for arm in arms:
                runs.append(train(arm, seed))
                self.advance()
        return runs


@dataclasses.dataclass(kw_only=True)
class Suite:
    """A registered benchmark suite.

    Attributes:
        name: the name used on the command line (``torchsteer bench NAME``).
        description: one line for ``torchsteer bench --list``.
        run: ``run(ctx) -> list[Run]``.
        units: ``units(quick, seeds) -> int``, the number of ``ctx.advance()`` calls.
        metric_name: what ``Run.metric`` holds (column title).
        loss_name: what ``Run.loss`` holds.
        baseline: the method whose step time is the denominator of the step-cost ratio:
            a method name, or its first word (``"SGD"`` matches ``"SGD lr=0.1"`` but not
            ``"SGD+momentum"``); several matches are pooled (median).
        higher_is_better: direction of the metric.
        target: the metric value that ``Run.time_to_target`` refers to (shown in the table;
            the runner fills ``time_to_target`` from the curve when a suite leaves it None).
        quick_default: whether ``torchsteer bench`` with no suite named runs it.
        log_loss: plot the loss on a log axis.
        step_name: what ``Run.steps`` counts (the x label of the plots' left panels), e.g.
            ``"tokens"`` for a suite that records the tokens trained on.
    """

    name: str
    description: str
    run: Callable[[Context], list[Run]]
    units: Callable[[bool, list[int]], int]
    metric_name: str = "metric"
    loss_name: str = "loss"
    baseline: str | None = "SGD"
    higher_is_better: bool = True
    target: float | None = None
    quick_default: bool = True
    log_loss: bool = True
    step_name: str = "step"


_SUITES: dict[str, Suite] = {}


def register(suite: Suite) -> Suite:
    """Add a suite to the registry (a second suite of the same name is an error)."""
    if suite.name in _SUITES and _SUITES[suite.name] is not suite:
        raise ValueError(f"Invalid suite name: {suite.name!r} is already registered")
    _SUITES[suite.name] = suite
    return suite


def discover() -> None:
    """Import every module of :mod:`torchsteer.bench.suites` so that they register."""
    # not ``from torchsteer.bench import suites``: the package re-exports the function
    # :func:`suites`, which shadows the subpackage attribute of the same name
    pkg = importlib.import_module("torchsteer.bench.suites")

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            module = f"{pkg.__name__}.{info.name}"
            try:
                importlib.import_module(module)
            except Exception as e:
                raise ImportError(f"Invalid suite module {module}: {type(e).__name__}: {e}") from e


def registered() -> dict[str, Suite]:
    """The suites registered so far, by name, without importing the suite modules."""
    return dict(_SUITES)


def suites() -> dict[str, Suite]:
    """All registered suites, by name (after :func:`discover`)."""
    discover()
    return dict(_SUITES)


def get_suite(name: str) -> Suite:
    all_suites = suites()
    if name not in all_suites:
        raise ValueError(f"Invalid suite: {name!r}; known suites: {', '.join(sorted(all_suites))}")
    return all_suites[name]

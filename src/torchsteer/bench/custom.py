"""Your own workload through ``torchsteer bench``: a suite from a Python file, or from a call.

``torchsteer bench --suite path/to/file.py:make_suite`` imports the file, calls
``make_suite()`` and runs the :class:`~torchsteer.bench.registry.Suite` it returns through the
same runner, table, CSV/JSON and plots as the built-in suites (``:make_suite`` may be left out:
that is the default name). From Python, pass the spec or the Suite itself:
``run_suites(["path/to/file.py:make_suite"])`` or ``run_suites([make_suite()])``.

:func:`workload` builds such a suite from its parts: a model factory, the data, a per-sample
loss, the arms (:class:`~torchsteer.bench.training.Method`) and, optionally, a held-out metric
and its target. Each (arm, seed) starts from ``model(seed)`` and trains with
:func:`torchsteer.bench.training.train` (CPU time of the optimizer steps only, the curve every
``eval_every`` steps, the peak step memory); ``quick`` runs ``quick_steps`` steps instead of
``steps``.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torchsteer.bench.registry import Context, Run, Suite

__all__ = ["is_spec", "load", "workload"]


def is_spec(name: str) -> bool:
    """Whether a suite name is a ``file.py[:function]`` spec rather than a registered name."""
    return name.split(":", 1)[0].endswith(".py") if ":" in name else name.endswith(".py")


def load(spec: str) -> Suite:
    """The suite of ``"path/to/file.py:make_suite"``: import the file, call the function.

    Raises:
        ValueError: the file is missing, fails to import, has no such function, or the
            function does not return a :class:`Suite` (one line naming the problem).
    """
    path_text, _, func = spec.rpartition(":") if ":" in spec else (spec, "", "make_suite")
    func = func or "make_suite"
    path = Path(path_text)
    if not path.is_file():
        raise ValueError(f"Invalid --suite {spec!r}: no file {path}")
    name = f"torchsteer_user_suite_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickle look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ValueError(
            f"Invalid --suite {spec!r}: importing it raised {type(e).__name__}: {e}"
        ) from e
    factory = getattr(module, func, None)
    if not callable(factory):
        raise ValueError(f"Invalid --suite {spec!r}: {path} has no function {func}()")
    try:
        suite = factory()
    except Exception as e:
        raise ValueError(
            f"Invalid --suite {spec!r}: {func}() raised {type(e).__name__}: {e}"
        ) from e
    if not isinstance(suite, Suite):
        raise ValueError(
            f"Invalid --suite {spec!r}: {func}() returned {type(suite).__name__}, "
            "not a torchsteer.bench.Suite"
        )
    return suite


def workload(
    name: str,
    *,
    model: Callable[[int], Any],
    data: tuple | Callable[[], tuple],
    loss_fn: Callable,
    arms: Sequence | Callable[[], Sequence],
    steps: int,
    batch_size: int,
    eval_every: int,
    quick_steps: int | None = None,
    metric_fn: Callable | None = None,
    target: float | None = None,
    higher_is_better: bool = True,
    description: str = "",
    metric_name: str = "metric",
    loss_name: str = "loss",
    baseline: str | None = None,
    log_loss: bool = True,
) -> Suite:
    """A :class:`Suite` that trains ``model(seed)`` with every arm on every seed.

    Args:
        name: the suite's name (its table, plots and rows in the CSV files).
        model: ``model(seed) -> nn.Module``, a fresh model of the seed.
        data: the training set ``(x, y)``, or a function returning it (called once per run
            of the suite, so that importing the file stays cheap).
        loss_fn: per-sample loss, ``loss_fn(model(x), y)`` of shape ``(B,)``.
        arms: the :class:`~torchsteer.bench.training.Method` list, or a function returning it.
        steps, batch_size, eval_every: as :func:`torchsteer.bench.training.train`.
        quick_steps: steps under ``--quick`` (default ``steps``).
        metric_fn: ``metric_fn(model) -> float`` on held-out data; ``target`` and
            ``higher_is_better`` define time to target.
        description, metric_name, loss_name, baseline, log_loss: as :class:`Suite`.
    """
    from torchsteer.bench.training import sweep

    arm_list = arms if callable(arms) else (lambda: list(arms))

    def run(ctx: Context) -> list[Run]:
        x, y = data() if callable(data) else data
        return sweep(
            ctx,
            arm_list,
            model,
            loss_fn,
            x,
            y,
            suite=name,
            steps=quick_steps if ctx.quick and quick_steps is not None else steps,
            batch_size=batch_size,
            eval_every=eval_every,
            metric_fn=metric_fn,
            target=target,
            higher_is_better=higher_is_better,
        )

    return Suite(
        name=name,
        description=description or f"user suite {name}",
        run=run,
        units=lambda quick, seeds: len(arm_list()) * len(seeds),
        metric_name=metric_name,
        loss_name=loss_name,
        baseline=baseline,
        higher_is_better=higher_is_better,
        target=target,
        quick_default=False,
        log_loss=log_loss,
    )

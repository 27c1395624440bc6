"""Run benchmark suites under a rich progress bar and write their reports.

:func:`run_suites` resolves the suite names (none given: every suite with ``quick_default``),
runs each suite with a :class:`~torchsteer.bench.registry.Context` whose ``advance`` moves
the suite's progress bar, checks what the suite returned, fills ``time_to_target`` from the
curves where the suite has a target and left it unset, prints the suite's table as soon as it
ends, then writes ``results.json``, ``results.csv``, ``runs.csv``, ``summary.csv`` and the plots
into the output folder.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from torchsteer.bench import output, report
from torchsteer.bench.custom import is_spec, load
from torchsteer.bench.registry import Context, Run, Suite, suites
from torchsteer.bench.training import time_to_target
from torchsteer.extras import require

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["resolve", "run_suites"]


def resolve(names: Sequence[str | Suite] | None) -> list[Suite]:
    """The suites to run: those named (in order), else all with ``quick_default``.

    An entry may also be a :class:`Suite` (run as it is, without registering it) or a
    ``"path/to/file.py:make_suite"`` spec of a user's suite (:func:`torchsteer.bench.custom.load`).
    """
    known = suites()
    if not names:
        return [s for _, s in sorted(known.items()) if s.quick_default]
    unknown = [n for n in names if isinstance(n, str) and n not in known and not is_spec(n)]
    if unknown:
        raise ValueError(
            f"Invalid suite: {', '.join(map(repr, unknown))}; known suites: "
            f"{', '.join(sorted(known))}"
        )
    out: dict[str, Suite] = {}
    for n in names:
        suite = n if isinstance(n, Suite) else known[n] if n in known else load(n)
        if out.get(suite.name, suite) is not suite:
            raise ValueError(f"Invalid suite: two different suites are named {suite.name!r}")
        out[suite.name] = suite
    return list(out.values())


def _check(suite: Suite, runs) -> list[Run]:
    if not isinstance(runs, list) or not all(isinstance(r, Run) for r in runs):
        raise TypeError(f"Suite {suite.name!r} must return a list of Run, got {type(runs)}")
    for r in runs:
        if r.suite != suite.name:
            raise ValueError(f"Invalid Run.suite: {r.suite!r} returned by suite {suite.name!r}")
        if suite.target is not None and r.time_to_target is None:
            r.time_to_target = time_to_target(
                r.cpu_time, r.metric, suite.target, suite.higher_is_better
            )
    return runs


def run_suites(
    names: Sequence[str | Suite] | None = None,
    *,
    quick: bool = False,
    seeds: Sequence[int] = (0,),
    out: str | Path = "bench-results",
    console: Console | None = None,
    threads: int | None = 1,
    plots: bool = True,
    keep_going: bool = True,
    overwrite: bool = False,
) -> dict[str, tuple[Suite, list[Run]]]:
    """Run suites, print their tables and write the results into ``out``.

    Args:
        names: suite names, :class:`Suite` objects or ``"file.py:make_suite"`` specs
            (:func:`resolve`); ``None`` or empty runs every suite with ``quick_default``.
        quick: the small configuration of each suite.
        seeds: the seeds handed to every suite.
        out: output folder (created). It must not hold an earlier run's files unless
            ``overwrite``, and no file is written through a symbolic link
            (:mod:`torchsteer.bench.output`).
        console: a ``rich.console.Console`` (default: a new one on stdout). The progress
            bar shows only when it is a terminal; each suite's table is printed as soon as
            that suite ends.
        threads: ``torch.set_num_threads`` during the run (restored after); ``None`` leaves it.
        plots: write the PNG plots.
        keep_going: when a suite raises, print its traceback, list it under
            ``meta["failed"]`` in results.json and go on with the others (else re-raise).
        overwrite: replace an earlier run's files in ``out``.

    Returns:
        ``{suite name: (suite, runs)}`` of the suites that finished.
    """
    require("rich", "torchsteer bench")
    if plots:
        require("matplotlib", "torchsteer bench's plots")
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file: no need to squeeze the table into 80 columns
            console = Console(width=150)
    selected = resolve(names)
    seeds = [int(s) for s in seeds]
    out = output.prepare(out, overwrite)  # before any suite runs: refuse early
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    results: dict[str, tuple[Suite, list[Run]]] = {}
    timing: dict[str, dict[str, float]] = {}
    failed: dict[str, str] = {}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
            for suite in selected:
                units = suite.units(quick, seeds)
                task = progress.add_task(suite.name, total=units)
                ctx = Context(
                    quick=quick,
                    seeds=list(seeds),
                    advance=lambda task=task: progress.advance(task),
                    log=progress.console.log,
                )
                c, w = time.process_time(), time.perf_counter()
                try:
                    results[suite.name] = (suite, _check(suite, suite.run(ctx)))
                except Exception as e:
                    if not keep_going:
                        raise
                    progress.console.print_exception()
                    failed[suite.name] = f"{type(e).__name__}: {e}"
                    progress.update(task, description=f"{suite.name} [red](failed)")
                    continue
                timing[suite.name] = {
                    "cpu_s": time.process_time() - c,
                    "wall_s": time.perf_counter() - w,
                }
                progress.console.log(
                    f"{suite.name}: {len(results[suite.name][1])} runs, "
                    f"{timing[suite.name]['cpu_s']:.1f} CPU s, "
                    f"{timing[suite.name]['wall_s']:.1f} wall s"
                )
                progress.update(task, completed=units)
                rows = report.summarize(suite, results[suite.name][1])
                report.print_table(progress.console, suite, rows)
    finally:
        if threads is not None:
            torch.set_num_threads(old_threads)
    meta = {
        "quick": quick,
        "seeds": seeds,
        "suites": timing,
        "failed": failed,
        "total_cpu_s": time.process_time() - cpu0,
        "total_wall_s": time.perf_counter() - wall0,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": threads,
    }
    rows = [row for suite, runs in results.values() for row in report.summarize(suite, runs)]
    report.write_json(out / "results.json", results, meta)
    report.write_csv(out / "results.csv", [r for _, runs in results.values() for r in runs])
    report.write_summary_csv(out / "summary.csv", rows)
    for suite, runs in results.values() if plots else ():
        try:
            report.plot_suite(out, suite, runs)
        except Exception as e:  # a plot is not worth the numbers: they are written already
            console.print(f"[red]plots of {suite.name} failed: {type(e).__name__}: {e}")
    times = ", ".join(f"{k} {v['cpu_s']:.1f}" for k, v in timing.items())
    console.print(f"CPU s per suite: {times}")
    console.print(
        f"total: {meta['total_cpu_s']:.1f} CPU s, {meta['total_wall_s']:.1f} wall s; "
        f"results in {out}/"
    )
    for name, error in failed.items():
        console.print(f"[red]suite {name} failed: {error}")
    return results

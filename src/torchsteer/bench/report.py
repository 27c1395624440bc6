"""What ``torchsteer bench`` writes: summary rows, results.json, results.csv, runs.csv.

* :func:`summarize` turns a suite's runs into one :class:`Row` per method: medians over seeds
  of the final loss and metric and of the time to target (over the seeds that reached it),
  the step-time ratio ``median step_time(method) / median step_time(baseline runs)``, and the
  largest measured memory.
* ``results.json`` holds every :class:`~torchsteer.bench.registry.Run` (the full curves and
  its ``extra``, once) and the summary rows; ``results.csv`` the curves in long form, one line
  per recorded point keyed by ``suite, method, seed`` (no per-run field repeated);
  ``runs.csv`` one line per run with its scalars; ``summary.csv`` the table.
  :func:`read_json` and :func:`read_csv` give the runs back.
* The table is :mod:`torchsteer.bench.table`'s, the plots :mod:`torchsteer.bench.plots`'
  (both re-exported here).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from torchsteer.bench.output import open_output
from torchsteer.bench.plots import plot_suite
from torchsteer.bench.registry import Run, Suite
from torchsteer.bench.table import print_table

__all__ = [
    "Row",
    "baseline_runs",
    "plot_suite",
    "print_table",
    "read_csv",
    "read_json",
    "summarize",
    "write_csv",
    "write_json",
    "write_summary_csv",
]

_KEY_FIELDS = ("suite", "method", "seed")
_POINT_FIELDS = ("step", "cpu_time", "loss", "metric")
_RUN_FIELDS = ("points", "step_time", "time_to_target", "peak_memory")


@dataclasses.dataclass(kw_only=True)
class Row:
    """One line of the table: a method aggregated over its seeds."""

    suite: str
    method: str
    seeds: int
    final_loss: float
    final_metric: float
    time_to_target: float | None
    reached: int
    step_time: float | None
    step_time_ratio: float | None
    peak_memory: int | None
    diverged: int
    best: bool = False


def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else None


def baseline_runs(runs: Sequence[Run], baseline: str | None) -> list[Run]:
    """The runs of the baseline: exact method name, else methods whose first word it is."""
    if baseline is None:
        return []
    exact = [r for r in runs if r.method == baseline]
    return exact or [r for r in runs if r.method.split(" ", 1)[0] == baseline]


def summarize(suite: Suite, runs: Sequence[Run]) -> list[Row]:
    """One :class:`Row` per method, in the order the methods first appear."""
    base = _median([r.step_time for r in baseline_runs(runs, suite.baseline)])
    by_method: dict[str, list[Run]] = {}
    for r in runs:
        by_method.setdefault(r.method, []).append(r)
    rows = []
    for method, rs in by_method.items():
        step_time = _median([r.step_time for r in rs])
        memory = [r.peak_memory for r in rs if r.peak_memory is not None]
        final_loss = _median([r.final_loss for r in rs])
        final_metric = _median([r.final_metric for r in rs])
        rows.append(
            Row(
                suite=suite.name,
                method=method,
                seeds=len(rs),
                final_loss=float("nan") if final_loss is None else final_loss,
                final_metric=float("nan") if final_metric is None else final_metric,
                time_to_target=_median([r.time_to_target for r in rs]),
                reached=sum(r.time_to_target is not None for r in rs),
                step_time=step_time,
                step_time_ratio=step_time / base if step_time is not None and base else None,
                peak_memory=max(memory) if memory else None,
                diverged=sum(bool(r.extra.get("diverged")) for r in rs),
            )
        )
    finite = [r for r in rows if not math.isnan(r.final_metric)]
    if finite:
        pick = max if suite.higher_is_better else min
        pick(finite, key=lambda r: r.final_metric).best = True
    return rows


def _jsonable(obj):
    """JSON for what suites put into ``Run.extra``: numpy and torch scalars and arrays."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "tolist"):  # torch.Tensor, without importing torch here
        return obj.tolist()
    raise TypeError(f"Invalid Run.extra value: {type(obj).__name__} is not JSON-able")


def write_json(
    path: Path, results: dict[str, tuple[Suite, list[Run]]], meta: dict[str, Any] | None = None
) -> None:
    """Write every run and the summary rows, by suite, with ``meta`` (mode, seeds, times)."""
    out: dict[str, Any] = {"meta": meta or {}, "suites": {}}
    for name, (suite, runs) in results.items():
        out["suites"][name] = {
            "description": suite.description,
            "metric_name": suite.metric_name,
            "loss_name": suite.loss_name,
            "higher_is_better": suite.higher_is_better,
            "baseline": suite.baseline,
            "target": suite.target,
            "summary": [dataclasses.asdict(r) for r in summarize(suite, runs)],
            "runs": [r.to_dict() for r in runs],
        }
    with open_output(path) as f:
        f.write(json.dumps(out, indent=1, default=_jsonable))


def read_json(path: Path) -> dict[str, list[Run]]:
    """The runs of a ``results.json``, by suite."""
    data = json.loads(Path(path).read_text())
    return {name: [Run(**r) for r in s["runs"]] for name, s in data["suites"].items()}


def write_csv(path: Path, runs: Sequence[Run], runs_path: Path | None = None) -> None:
    """The curves in long form, one line per recorded point, into ``path``; the runs' scalars,
    one line per run, into ``runs_path`` (default: ``runs.csv`` beside ``path``).

    ``results.csv``: ``suite, method, seed, step, cpu_time, loss, metric``; ``runs.csv``:
    ``suite, method, seed, points, step_time, time_to_target, peak_memory``. ``Run.extra``
    (per-step signals, per-class accuracies, ...) is written once per run into results.json
    only, not repeated on every line. Floats are written with ``repr`` (exact round trip).
    """
    path = Path(path)
    runs_path = path.with_name("runs.csv") if runs_path is None else Path(runs_path)
    with open_output(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(_KEY_FIELDS + _POINT_FIELDS)
        for r in runs:
            for point in zip(r.steps, r.cpu_time, r.loss, r.metric):
                w.writerow([r.suite, r.method, r.seed, *(_cell(v) for v in point)])
    with open_output(runs_path, newline="") as f:
        w = csv.writer(f)
        w.writerow(_KEY_FIELDS + _RUN_FIELDS)
        for r in runs:
            scalars = (r.step_time, r.time_to_target, r.peak_memory)
            w.writerow([r.suite, r.method, r.seed, len(r.steps), *(_cell(v) for v in scalars)])


def _cell(v) -> str:
    """A CSV cell: empty for None, ``repr`` for floats (exact round trip), else ``str``."""
    if v is None:
        return ""
    return repr(v) if isinstance(v, float) else str(v)


def _opt(s: str, cast):
    return None if s == "" else cast(s)


def read_csv(path: Path, runs_path: Path | None = None) -> list[Run]:
    """The runs of a ``results.csv`` and its ``runs.csv``, in file order (``extra`` is empty:
    it lives in results.json)."""
    path = Path(path)
    runs_path = path.with_name("runs.csv") if runs_path is None else Path(runs_path)
    runs: dict[tuple[str, str, int], Run] = {}
    with open(runs_path, newline="") as f:
        for row in csv.DictReader(f):
            key = (row["suite"], row["method"], int(row["seed"]))
            runs[key] = Run(
                suite=key[0],
                method=key[1],
                seed=key[2],
                step_time=_opt(row["step_time"], float),
                time_to_target=_opt(row["time_to_target"], float),
                peak_memory=_opt(row["peak_memory"], int),
            )
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            key = (row["suite"], row["method"], int(row["seed"]))
            if key not in runs:
                raise ValueError(f"Invalid {path}: run {key} is not in {runs_path}")
            runs[key].record(
                int(row["step"]), float(row["cpu_time"]), float(row["loss"]), float(row["metric"])
            )
    return list(runs.values())


def write_summary_csv(path: Path, rows: Sequence[Row]) -> None:
    """The table rows, one line per (suite, method)."""
    fields = [f.name for f in dataclasses.fields(Row)]
    with open_output(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for r in rows:
            w.writerow([_cell(getattr(r, k)) for k in fields])

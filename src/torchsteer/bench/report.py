"""What ``torchsteer bench`` prints and writes: table, results.json, results.csv, plots.

* :func:`summarize` turns a suite's runs into one :class:`Row` per method: medians over seeds
  of the final loss and metric and of the time to target (over the seeds that reached it),
  the step-time ratio ``median step_time(method) / median step_time(baseline runs)``, and the
  largest measured memory.
* ``results.json`` holds every :class:`~torchsteer.bench.registry.Run` (the full curves) and
  the summary rows; ``results.csv`` the curves in long form, one line per recorded point with
  the run's scalar fields repeated; ``summary.csv`` the table. :func:`read_json` and
  :func:`read_csv` give the runs back.
* Plots (matplotlib, Agg backend): per suite ``<suite>_loss.png`` (loss against steps and
  against CPU time) and, when the metric was recorded, ``<suite>_metric.png``; one colour per
  method, the median over seeds as a line and the min/max over seeds as a band.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from torchsteer.bench.output import open_output
from torchsteer.bench.registry import Run, Suite

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

_RUN_FIELDS = ("suite", "method", "seed", "step_time", "time_to_target", "peak_memory", "extra")
_POINT_FIELDS = ("step", "cpu_time", "loss", "metric")


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


def _fmt(value: float | None, spec: str = ".4g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _fmt_loss(r: Row) -> str:
    return _fmt(r.final_loss, ".3g")


def _fmt_metric(r: Row) -> str:
    return _fmt(r.final_metric, ".4g") + (" *" if r.best else "")


def _fmt_ttt(r: Row) -> str:
    text = "-" if r.time_to_target is None else f"{r.time_to_target:.3g}"
    return text + (f" ({r.reached}/{r.seeds})" if r.seeds > 1 else "")


def _fmt_ratio(r: Row) -> str:
    return _fmt(r.step_time_ratio, ".3g")


def _fmt_memory(r: Row) -> str:
    return _fmt_bytes(r.peak_memory)


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def print_table(console, suite: Suite, rows: Sequence[Row]) -> None:
    """Print the suite's table with rich (``*`` marks the best final metric).

    The metric column is left out when no method recorded a metric, the time-to-target
    column when the suite has no target, the step-time ratio when it has no baseline.
    """
    from rich.table import Table

    has_metric = any(not math.isnan(r.final_metric) for r in rows)
    has_target = suite.target is not None
    columns = [("method", None), (f"final {suite.loss_name}", _fmt_loss)]
    if has_metric:
        columns.append((f"final {suite.metric_name}", _fmt_metric))
    if has_target:
        sign = ">=" if suite.higher_is_better else "<="
        columns.append((f"CPU s to {suite.metric_name} {sign} {suite.target:g}", _fmt_ttt))
    if suite.baseline is not None:
        columns.append((f"step time / {suite.baseline}", _fmt_ratio))
    columns.append(("peak memory", _fmt_memory))
    table = Table(title=f"{suite.name}: {suite.description}")
    for i, (title, _) in enumerate(columns):
        table.add_column(title, no_wrap=True, justify="left" if i == 0 else "right")
    for r in rows:
        name = r.method + (" (diverged)" if r.diverged else "")
        table.add_row(name, *(cell(r) for _, cell in columns[1:]))
    console.print(table)


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


def write_csv(path: Path, runs: Sequence[Run]) -> None:
    """The curves in long form; floats written with ``repr`` (exact round trip)."""
    with open_output(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(_RUN_FIELDS + _POINT_FIELDS)
        for r in runs:
            head = [
                r.suite,
                r.method,
                r.seed,
                _cell(r.step_time),
                _cell(r.time_to_target),
                _cell(r.peak_memory),
                json.dumps(r.extra, sort_keys=True, default=_jsonable),
            ]
            for point in zip(r.steps, r.cpu_time, r.loss, r.metric):
                w.writerow(head + [_cell(v) for v in point])
            if not r.steps:
                w.writerow(head + [""] * len(_POINT_FIELDS))


def _cell(v) -> str:
    """A CSV cell: empty for None, ``repr`` for floats (exact round trip), else ``str``."""
    if v is None:
        return ""
    return repr(v) if isinstance(v, float) else str(v)


def _opt(s: str, cast):
    return None if s == "" else cast(s)


def read_csv(path: Path) -> list[Run]:
    """The runs of a ``results.csv``, in file order."""
    runs: dict[tuple[str, str, int], Run] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            key = (row["suite"], row["method"], int(row["seed"]))
            if key not in runs:
                runs[key] = Run(
                    suite=key[0],
                    method=key[1],
                    seed=key[2],
                    step_time=_opt(row["step_time"], float),
                    time_to_target=_opt(row["time_to_target"], float),
                    peak_memory=_opt(row["peak_memory"], int),
                    extra=json.loads(row["extra"]),
                )
            if row["step"] != "":
                runs[key].record(
                    int(row["step"]),
                    float(row["cpu_time"]),
                    float(row["loss"]),
                    float(row["metric"]),
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


def _band(runs: Sequence[Run], x_of, y_of, points: int = 200):
    """Median and min/max over seeds on a common x grid (linear interpolation, NaN outside)."""
    curves = [(np.asarray(x_of(r), float), np.asarray(y_of(r), float)) for r in runs]
    curves = [(x, y) for x, y in curves if len(x)]
    if not curves:
        return None
    if all(len(x) == len(curves[0][0]) and np.array_equal(x, curves[0][0]) for x, _ in curves):
        grid, ys = curves[0][0], np.stack([y for _, y in curves])
    else:
        grid = np.linspace(0.0, max(x[-1] for x, _ in curves), points)
        ys = np.stack([np.where(grid <= x[-1], np.interp(grid, x, y), np.nan) for x, y in curves])
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns after a divergence
        return grid, np.nanmedian(ys, 0), np.nanmin(ys, 0), np.nanmax(ys, 0)


def _all_positive(runs: Sequence[Run], y_of) -> bool:
    values = np.concatenate([np.asarray(y_of(r), float) for r in runs] or [np.zeros(0)])
    values = values[np.isfinite(values)]
    return bool(values.size) and bool((values > 0).all())


def plot_suite(out: Path, suite: Suite, runs: Sequence[Run]) -> list[Path]:
    """Write the suite's plots into ``out``; returns the paths written.

    The loss (and a lower-is-better metric) use a log axis when ``suite.log_loss`` is set and
    every finite value is positive.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r.method for r in runs))
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    colors = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
    written = []
    has_metric = any(not math.isnan(v) for r in runs for v in r.metric)
    panels = [("loss", suite.loss_name, lambda r: r.loss, suite.log_loss)]
    if has_metric:
        panels.append(("metric", suite.metric_name, lambda r: r.metric, not suite.higher_is_better))
    for kind, label, y_of, log in panels:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, (xlabel, x_of) in zip(
            axes, (("step", lambda r: r.steps), ("CPU time [s]", lambda r: r.cpu_time))
        ):
            for m in methods:
                band = _band([r for r in runs if r.method == m], x_of, y_of)
                if band is None:
                    continue
                grid, med, lo, hi = band
                ax.plot(grid, med, color=colors[m], label=m, lw=1.4)
                ax.fill_between(grid, lo, hi, color=colors[m], alpha=0.2, lw=0)
            if log and _all_positive(runs, y_of):
                ax.set_yscale("log")
            if kind == "metric" and suite.target is not None:
                ax.axhline(suite.target, color="gray", ls="--", lw=0.8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7, loc="best")
        fig.suptitle(f"{suite.name}: {label} (median over seeds, band = min/max)")
        fig.tight_layout()
        path = Path(out) / f"{suite.name}_{kind}.png"
        with open_output(path, "wb") as f:
            fig.savefig(f, dpi=110, format="png")
        plt.close(fig)
        written.append(path)
    return written

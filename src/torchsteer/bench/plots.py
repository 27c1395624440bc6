"""The plots of ``torchsteer bench``: one panel per problem, one legend that fits the figure.

Per suite ``<suite>_loss.png`` and, when a metric was recorded, ``<suite>_metric.png``
(matplotlib, Agg backend). Each row of panels shows one *problem*: when every method of the
suite is named ``"<problem> | <arm>"`` (the convex suite's ``"logistic-d100 | RN
hessian/cg"``, lr-spike's ``"MLP+LN | clip | 10000x"``), the rows are the problems and the
curves the arms; otherwise one row holds every method. The left panel plots against steps,
the right one against CPU seconds; each arm keeps one colour in every row, its median over
seeds as a line and the min/max over seeds as a band. One legend for the whole figure sits
below the panels, in as many columns as its longest label allows, and the figure grows by
the legend's height, so the legend never covers a curve nor runs off the figure.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from torchsteer.bench.output import open_output
from torchsteer.bench.registry import Run, Suite

__all__ = ["band", "figure", "panels", "plot_suite"]

WIDTH_IN, ROW_IN, FONT = 12.0, 3.0, 8


def band(runs: Sequence[Run], x_of, y_of, points: int = 200):
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


def all_positive(runs: Sequence[Run], y_of) -> bool:
    values = np.concatenate([np.asarray(y_of(r), float) for r in runs] or [np.zeros(0)])
    values = values[np.isfinite(values)]
    return bool(values.size) and bool((values > 0).all())


def panels(runs: Sequence[Run]) -> dict[str | None, dict[str, list[Run]]]:
    """``{problem: {arm label: runs}}``; ``{None: {method: runs}}`` unless every method has
    the form ``"<problem> | <arm>"``."""
    split = all(" | " in r.method for r in runs)
    out: dict[str | None, dict[str, list[Run]]] = {}
    for r in runs:
        problem, label = r.method.split(" | ", 1) if split else (None, r.method)
        out.setdefault(problem, {}).setdefault(label, []).append(r)
    return out


def _legend_columns(labels: Sequence[str]) -> int:
    """Columns of the legend: a label's width at FONT points (~0.6 em a character) plus the
    handle and spacing (~4 em), as many as fit into the figure's width."""
    longest = max(map(len, labels))
    per_column_pt = FONT * (0.6 * longest + 4.0)
    return max(1, min(len(labels), int(WIDTH_IN * 72 / per_column_pt)))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure(suite: Suite, runs: Sequence[Run], kind: str):
    """The figure of ``kind`` (``"loss"`` or ``"metric"``) for a suite's runs."""
    plt = _pyplot()
    if kind == "loss":
        label, y_of, log = suite.loss_name, (lambda r: r.loss), suite.log_loss
    else:
        label, y_of, log = suite.metric_name, (lambda r: r.metric), not suite.higher_is_better
    groups = panels(runs)
    labels = list(dict.fromkeys(lab for group in groups.values() for lab in group))
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    colors = {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}
    ncol = _legend_columns(labels)
    legend_in = (math.ceil(len(labels) / ncol) + 1) * FONT * 1.6 / 72
    rows = len(groups)
    fig, axes = plt.subplots(
        rows, 2, figsize=(WIDTH_IN, ROW_IN * rows + legend_in + 0.4), squeeze=False
    )
    handles = {}
    for row, (problem, group) in zip(axes, groups.items()):
        flat = [r for rs in group.values() for r in rs]
        for ax, (xlabel, x_of) in zip(
            row, ((suite.step_name, lambda r: r.steps), ("CPU time [s]", lambda r: r.cpu_time))
        ):
            for lab, rs in group.items():
                b = band(rs, x_of, y_of)
                if b is None:
                    continue
                grid, med, lo, hi = b
                (handles[lab],) = ax.plot(grid, med, color=colors[lab], label=lab, lw=1.4)
                ax.fill_between(grid, lo, hi, color=colors[lab], alpha=0.2, lw=0)
            if log and all_positive(flat, y_of):
                ax.set_yscale("log")
            if kind == "metric" and suite.target is not None:
                ax.axhline(suite.target, color="gray", ls="--", lw=0.8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if problem is not None:
                ax.set_title(problem, fontsize=9)
    shown = [lab for lab in labels if lab in handles]
    if shown:
        fig.legend(
            [handles[lab] for lab in shown],
            shown,
            loc="lower center",
            ncol=ncol,
            fontsize=FONT,
            frameon=False,
        )
    fig.suptitle(f"{suite.name}: {label} (median over seeds, band = min/max)")
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, (legend_in + 0.1) / height, 1, 1))
    return fig


def plot_suite(out: Path, suite: Suite, runs: Sequence[Run]) -> list[Path]:
    """Write the suite's plots into ``out``; returns the paths written.

    The loss (and a lower-is-better metric) use a log axis when ``suite.log_loss`` is set and
    every finite value of the row is positive.
    """
    plt = _pyplot()
    written = []
    kinds = ["loss"]
    if any(not math.isnan(v) for r in runs for v in r.metric):
        kinds.append("metric")
    for kind in kinds:
        fig = figure(suite, runs, kind)
        path = Path(out) / f"{suite.name}_{kind}.png"
        with open_output(path, "wb") as f:
            fig.savefig(f, dpi=110, format="png")
        plt.close(fig)
        written.append(path)
    return written

"""The table ``torchsteer bench`` prints per suite: numbers that fit, columns that fold, no cut.

Every number is written with :func:`fmt_number`: ``digits`` significant digits, fixed point
for ``1e-3 <= |v| < 10^(digits + 1)`` and scientific otherwise (``1.23e-05``), trailing zeros
dropped, so no number takes more than 9 characters. A cell is never cut: each number column
is exactly as wide as its widest cell (its title wrapped onto several lines to fit), and the
method column, the only one that may wrap, folds its names. When the columns do not fit the
console's width (an 80-column terminal), they are *folded*: the table is printed as several
tables, each with the method column and as many of the number columns as fit, in order.

Widths: rich's default box draws one border character per column plus one, and pads each
cell with a space on both sides, so a table of columns ``w_1 .. w_k`` takes
``1 + sum(w_i + 3)`` characters.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence

from torchsteer.bench.registry import Suite

__all__ = ["columns", "fmt_bytes", "fmt_number", "layout", "print_table"]

METHOD_MIN = 12  # the method column folds its names down to this width before columns fold


def fmt_number(value: float | None, digits: int = 3) -> str:
    """``value`` in at most 9 characters: fixed ``1e-3 <= |v| < 10^(digits+1)``, else ``1.2e-05``.

    ``None`` and NaN give ``-``; trailing zeros (and a bare ``.``) are dropped.
    """
    if value is None or math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    exponent = math.floor(math.log10(abs(value)))
    if -3 <= exponent <= digits:
        text = f"{value:.{max(digits - 1 - exponent, 0)}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    mantissa, exp = f"{value:.{digits - 1}e}".split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{exp}"


def fmt_bytes(n: int | None) -> str:
    """Bytes in B, KiB, MiB or GiB (``-`` for ``None``)."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "-"


def _ttt(r) -> str:
    text = fmt_number(r.time_to_target)
    return text + (f" ({r.reached}/{r.seeds})" if r.seeds > 1 else "")


def columns(suite: Suite, rows: Sequence) -> list[tuple[str, Callable]]:
    """The number columns ``(title, cell)`` of a suite's table, in order.

    The metric column is left out when no method recorded a metric, the time-to-target
    column when the suite has no target, the step-time ratio when it has no baseline.
    """
    out: list[tuple[str, Callable]] = [
        (f"final {suite.loss_name}", lambda r: fmt_number(r.final_loss))
    ]
    if any(not math.isnan(r.final_metric) for r in rows):
        out.append(
            (
                f"final {suite.metric_name}",
                lambda r: fmt_number(r.final_metric, 4) + (" *" if r.best else ""),
            )
        )
    if suite.target is not None:
        sign = ">=" if suite.higher_is_better else "<="
        out.append((f"CPU s to {suite.metric_name} {sign} {fmt_number(suite.target)}", _ttt))
    if suite.baseline is not None:
        out.append((f"step time / {suite.baseline}", lambda r: fmt_number(r.step_time_ratio)))
    out.append(("peak memory", lambda r: fmt_bytes(r.peak_memory)))
    return out


def _wrap(title: str, width: int) -> list[str]:
    return textwrap.wrap(title, width=width, break_long_words=False) or [""]


def layout(suite: Suite, rows: Sequence, width: int) -> list[dict]:
    """The tables to print: ``[{"method_width", "columns": [(header lines, width, cells)]}]``.

    When every column fits at the width of its title (and the method column at its longest
    name), that is the one table. Otherwise a number column is ``max(widest cell, 9)`` wide,
    or its title's longest word if that is wider, its title wrapping onto lines of that width.
    Columns go into the current table while
    ``1 + (method width + 3) + sum(w_i + 3) <= width`` with the method column at
    ``min(longest name, METHOD_MIN)``; the method column then takes what is left (up to its
    longest name).
    """
    names = [r.method + (" (diverged)" if r.diverged else "") for r in rows]
    longest = max([len("method"), *map(len, names)])
    method_min = min(longest, METHOD_MIN)
    cols, wide = [], []
    for title, cell in columns(suite, rows):
        cells = [cell(r) for r in rows]
        w = max([9, *map(len, cells)])
        w = max([w, *(len(word) for word in title.split())])
        cols.append((_wrap(title, w), w, cells))
        wide.append(([title], max(w, len(title)), cells))
    if 1 + longest + 3 + sum(c[1] + 3 for c in wide) <= width:  # fits with unwrapped titles
        return [{"method_width": longest, "columns": wide}]
    groups: list[list] = [[]]
    for col in cols:
        used = 1 + method_min + 3 + sum(c[1] + 3 for c in groups[-1])
        if groups[-1] and used + col[1] + 3 > width:
            groups.append([])
        groups[-1].append(col)
    tables = []
    for group in groups:
        room = width - 1 - 3 - sum(c[1] + 3 for c in group)
        tables.append({"method_width": max(method_min, min(longest, room)), "columns": group})
    return tables


def print_table(console, suite: Suite, rows: Sequence) -> None:
    """Print the suite's table with rich, folded to ``console.width`` (``*``: best metric)."""
    from rich.table import Table

    names = [r.method + (" (diverged)" if r.diverged else "") for r in rows]
    tables = layout(suite, rows, console.width)
    for i, spec in enumerate(tables):
        title = f"{suite.name}: {suite.description}"
        if len(tables) > 1:
            title += f" ({i + 1}/{len(tables)})"
        table = Table(title=title)
        table.add_column("method", width=spec["method_width"], overflow="fold")
        for lines, w, _ in spec["columns"]:
            table.add_column("\n".join(lines), width=w, no_wrap=True, justify="right")
        for k, name in enumerate(names):
            table.add_row(name, *(cells[k] for _, _, cells in spec["columns"]))
        console.print(table)

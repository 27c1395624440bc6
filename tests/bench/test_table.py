"""The bench table: numbers formatted to fit, never cut, folded to the console's width."""

import io
import math

import pytest
from rich.console import Console

from torchsteer.bench import report
from torchsteer.bench.registry import Run, Suite
from torchsteer.bench.table import fmt_number, layout

NAN = float("nan")


@pytest.mark.parametrize(
    ("value", "digits", "text"),
    [
        (None, 3, "-"),
        (NAN, 3, "-"),
        (math.inf, 3, "inf"),
        (0.0, 3, "0"),
        (2.0, 3, "2"),
        (0.25, 3, "0.25"),
        (0.0123, 3, "0.0123"),
        (0.00123456, 3, "0.00123"),
        (0.000123456, 3, "1.23e-04"),
        (-3.21e-9, 3, "-3.21e-09"),
        (1e-8, 3, "1e-08"),
        (9999.4, 3, "9999"),
        (12345.6, 3, "1.23e+04"),
        (0.9583333, 4, "0.9583"),
        (6.54321e-10, 4, "6.543e-10"),
        (123.456 / 0.002, 3, "6.17e+04"),
    ],
)
def test_fmt_number(value, digits, text):
    assert fmt_number(value, digits) == text
    assert len(fmt_number(value, digits)) <= 9


def make(method, step_time, losses, metrics, ttt=None, mem=None):
    run = Run(suite="s", method=method, seed=0, step_time=step_time, time_to_target=ttt)
    run.peak_memory = mem
    for i, (loss, metric) in enumerate(zip(losses, metrics)):
        run.record(10 * i, 0.5 * i, loss, metric)
    return run


SUITE = Suite(
    name="s",
    description="a suite with long column titles",
    run=lambda ctx: [],
    units=lambda quick, seeds: 0,
    metric_name="val MSE",
    loss_name="train MSE",
    baseline="SGD",
    higher_is_better=False,
    target=1e-4,
)
RUNS = [
    make("SGD lr=0.1", 0.002, (1.0, 0.25), (1.0, 0.0123)),
    make(
        "Sven lr=0.1 rank=64 kappa=1 cap=1 rtol=1e-5 momentum=0.5",
        0.0123456,
        (1.0, 3.21e-9),
        (1.0, 6.54321e-10),
        ttt=0.375,
        mem=5 * 2**20,
    ),
    make("L-BFGS", 123.456, (1.0, 12345.6), (1.0, NAN), mem=1536),
]
CELLS = ["0.25", "0.0123", "3.21e-09", "6.543e-10 *", "0.375", "6.17", "5.0 MiB", "1.23e+04"]
CELLS += ["6.17e+04", "1.5 KiB"]

EXPECTED_80 = """
                       s: a suite with long column titles
┏━━━━━━━━━━━━━━━━┳━━━━━━━━━━━┳━━━━━━━━━━━━━┳━━━━━━━━━━━┳━━━━━━━━━━━┳━━━━━━━━━━━┓
┃                ┃           ┃             ┃  CPU s to ┃           ┃           ┃
┃                ┃     final ┃   final val ┃   val MSE ┃ step time ┃      peak ┃
┃ method         ┃ train MSE ┃         MSE ┃  <= 1e-04 ┃     / SGD ┃    memory ┃
┡━━━━━━━━━━━━━━━━╇━━━━━━━━━━━╇━━━━━━━━━━━━━╇━━━━━━━━━━━╇━━━━━━━━━━━╇━━━━━━━━━━━┩
│ SGD lr=0.1     │      0.25 │      0.0123 │         - │         1 │         - │
│ Sven lr=0.1    │  3.21e-09 │ 6.543e-10 * │     0.375 │      6.17 │   5.0 MiB │
│ rank=64        │           │             │           │           │           │
│ kappa=1 cap=1  │           │             │           │           │           │
│ rtol=1e-5      │           │             │           │           │           │
│ momentum=0.5   │           │             │           │           │           │
│ L-BFGS         │  1.23e+04 │           - │         - │  6.17e+04 │   1.5 KiB │
└────────────────┴───────────┴─────────────┴───────────┴───────────┴───────────┘
"""

# 56 columns: the number columns do not fit beside the method column: two tables
EXPECTED_56 = """
        s: a suite with long column titles (1/2)
┏━━━━━━━━━━━━━━━━┳━━━━━━━━━━━┳━━━━━━━━━━━━━┳━━━━━━━━━━━┓
┃                ┃           ┃             ┃  CPU s to ┃
┃                ┃     final ┃   final val ┃   val MSE ┃
┃ method         ┃ train MSE ┃         MSE ┃  <= 1e-04 ┃
┡━━━━━━━━━━━━━━━━╇━━━━━━━━━━━╇━━━━━━━━━━━━━╇━━━━━━━━━━━┩
│ SGD lr=0.1     │      0.25 │      0.0123 │         - │
│ Sven lr=0.1    │  3.21e-09 │ 6.543e-10 * │     0.375 │
│ rank=64        │           │             │           │
│ kappa=1 cap=1  │           │             │           │
│ rtol=1e-5      │           │             │           │
│ momentum=0.5   │           │             │           │
│ L-BFGS         │  1.23e+04 │           - │         - │
└────────────────┴───────────┴─────────────┴───────────┘
        s: a suite with long column titles (2/2)
┏━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━┳━━━━━━━━━━━┓
┃                              ┃ step time ┃      peak ┃
┃ method                       ┃     / SGD ┃    memory ┃
┡━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━╇━━━━━━━━━━━┩
│ SGD lr=0.1                   │         1 │         - │
│ Sven lr=0.1 rank=64 kappa=1  │      6.17 │   5.0 MiB │
│ cap=1 rtol=1e-5 momentum=0.5 │           │           │
│ L-BFGS                       │  6.17e+04 │   1.5 KiB │
└──────────────────────────────┴───────────┴───────────┘
"""


def render(width: int) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    report.print_table(console, SUITE, report.summarize(SUITE, RUNS))
    return "\n".join(line.rstrip() for line in console.export_text().splitlines())


@pytest.mark.parametrize(("width", "expected"), [(80, EXPECTED_80), (56, EXPECTED_56)])
def test_table_in_a_narrow_console_matches_the_expected_text(width, expected):
    text = render(width)
    assert text == expected.strip("\n")
    assert max(map(len, text.splitlines())) <= width
    assert "…" not in text  # rich's ellipsis: a cut cell
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert all(any(f" {cell} │" in row for row in rows) for cell in CELLS)  # whole cells


def test_a_wide_console_keeps_one_table_with_unwrapped_titles():
    text = render(200)
    assert text.count("┏") == 1
    assert (
        "CPU s to val MSE <= 1e-04" in text
        and "Sven lr=0.1 rank=64 kappa=1 cap=1 rtol=1e-5 momentum=0.5" in text
    )


def test_layout_folds_columns_in_order_and_each_table_fits():
    for width in (40, 56, 64, 80, 100):
        tables = layout(SUITE, report.summarize(SUITE, RUNS), width)
        titles = [" ".join(lines) for t in tables for lines, _, _ in t["columns"]]
        assert titles == [
            "final train MSE",
            "final val MSE",
            "CPU s to val MSE <= 1e-04",
            "step time / SGD",
            "peak memory",
        ]
        for t in tables:
            used = 1 + t["method_width"] + 3 + sum(w + 3 for _, w, _ in t["columns"])
            assert used <= width or len(t["columns"]) == 1

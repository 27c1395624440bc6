"""The plots: one row of panels per problem, one legend that lies inside the figure."""

import math

import pytest

from torchsteer.bench import plots
from torchsteer.bench.registry import Run, Suite

PROBLEMS = ("logreg d=100", "logreg d=1000", "breast-cancer", "digits softmax")
ARMS = [f"arm {i} with a fairly long name/cg" for i in range(9)]


def convex_like() -> list[Run]:
    """36 curves like the convex suite's: 4 problems x 9 arms, named ``problem | arm``."""
    runs = []
    for p, problem in enumerate(PROBLEMS):
        for a, arm in enumerate(ARMS):
            run = Run(suite="c", method=f"{problem} | {arm}", seed=0)
            for i in range(20):
                run.record(i, 0.01 * i * (a + 1), math.exp(-0.1 * i * (a + 1)), 10.0 ** (-i - p))
            runs.append(run)
    return runs


SUITE = Suite(
    name="c",
    description="",
    run=lambda ctx: [],
    units=lambda q, s: 0,
    baseline=None,
    higher_is_better=False,
    target=1e-8,
)


@pytest.mark.parametrize("kind", ["loss", "metric"])
def test_one_row_per_problem_and_a_legend_inside_the_figure(kind):
    plt = plots._pyplot()
    fig = plots.figure(SUITE, convex_like(), kind)
    try:
        fig.canvas.draw()
        axes = fig.get_axes()
        assert [ax.get_title() for ax in axes] == [p for p in PROBLEMS for _ in range(2)]
        assert all(len(ax.get_lines()) == len(ARMS) + (kind == "metric") for ax in axes)
        (legend,) = fig.legends
        assert [t.get_text() for t in legend.get_texts()] == ARMS  # each arm once
        renderer = fig.canvas.get_renderer()
        box, page = legend.get_window_extent(renderer), fig.bbox
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0
        assert box.y1 <= min(ax.get_tightbbox(renderer).y0 for ax in axes)  # below the panels
        # one colour per arm, the same in every panel
        colors = [[line.get_color() for line in ax.get_lines()[: len(ARMS)]] for ax in axes]
        assert all(c == colors[0] for c in colors) and len(set(map(str, colors[0]))) == 9
    finally:
        plt.close(fig)


def test_methods_without_a_problem_share_one_row():
    runs = [Run(suite="c", method=m, seed=0) for m in ("SGD", "Adam | x")]
    for r in runs:
        r.record(0, 0.0, 1.0)
        r.record(1, 0.1, 0.5)
    assert list(plots.panels(runs)) == [None]
    assert list(plots.panels(convex_like())) == list(PROBLEMS)

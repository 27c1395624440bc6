"""Report: aggregation, step-time ratio, CSV/JSON round trips and the seed bands."""

import dataclasses
import json
import math

import numpy as np
import pytest

from torchsteer.bench import plots, report, table
from torchsteer.bench.registry import Run, Suite

NAN = float("nan")


def make_run(method, seed, step_time, metric=(0.2, 0.6, 0.9), ttt=None, **kw):
    run = Run(suite="s", method=method, seed=seed, step_time=step_time, time_to_target=ttt, **kw)
    for i, m in enumerate(metric):
        run.record(10 * i, 0.5 * i + 0.1 * seed, 1.0 / (i + 1 + seed), m)
    return run


def suite(**kw):
    return Suite(name="s", description="d", run=lambda ctx: [], units=lambda q, s: 0, **kw)


def same_runs(a, b):
    """Equality of Runs with NaN == NaN (JSON text of the dicts)."""
    dump = lambda runs: [json.dumps(r.to_dict(), sort_keys=True) for r in runs]  # noqa: E731
    return dump(a) == dump(b)


def test_step_time_ratio_uses_the_pooled_baseline_only():
    runs = [
        make_run("SGD lr=0.1", 0, 1.0),
        make_run("SGD lr=0.1", 1, 3.0),
        make_run("SGD lr=0.3", 0, 2.0),
        make_run("SGD+momentum", 0, 4.0),
        make_run("Adam", 0, 5.0),
        make_run("Adam", 1, 7.0),
    ]
    rows = {r.method: r for r in report.summarize(suite(baseline="SGD"), runs)}
    # baseline = median(1, 3, 2) = 2 ("SGD+momentum" is not "SGD"); Adam = median(5, 7) = 6
    assert rows["Adam"].step_time == 6.0
    assert rows["Adam"].step_time_ratio == 3.0
    assert rows["SGD+momentum"].step_time_ratio == 2.0
    assert rows["SGD lr=0.1"].step_time_ratio == 1.0
    exact = {r.method: r for r in report.summarize(suite(baseline="SGD+momentum"), runs)}
    assert exact["Adam"].step_time_ratio == 1.5
    assert all(r.step_time_ratio is None for r in report.summarize(suite(baseline=None), runs))


def test_summary_medians_reached_counts_and_best():
    runs = [
        make_run("A", 0, 1.0, metric=(0.1, 0.5), ttt=2.0),
        make_run("A", 1, 1.0, metric=(0.1, 0.7), ttt=None),
        make_run("A", 2, 1.0, metric=(0.1, 0.9), ttt=4.0),
        make_run("B", 0, 1.0, metric=(0.1, 0.8), extra={"diverged": True}),
    ]
    rows = report.summarize(suite(higher_is_better=True), runs)
    a, b = rows
    assert (a.method, a.seeds, a.final_metric) == ("A", 3, 0.7)
    assert a.time_to_target == 3.0 and a.reached == 2  # median over the seeds that reached
    assert a.final_loss == 1.0 / 3.0  # losses 1/2, 1/3, 1/4 at the last point
    assert b.time_to_target is None and b.reached == 0 and b.diverged == 1
    assert (a.best, b.best) == (False, True)
    low = report.summarize(suite(higher_is_better=False), runs)
    assert (low[0].best, low[1].best) == (True, False)


def test_json_and_csv_round_trip_the_runs(tmp_path):
    runs = [
        make_run(
            "SGD lr=0.1",
            0,
            0.001,
            metric=(NAN, 0.25, 0.125),
            ttt=0.5,
            peak_memory=123,
            extra={"diverged": True, "ranks": [1, 2]},
        ),
        make_run("L-BFGS", 1, 1 / 3, ttt=None),
        Run(suite="s", method='empty, "quoted"', seed=2),
    ]
    s = suite()
    report.write_json(tmp_path / "r.json", {"s": (s, runs)}, {"quick": True})
    report.write_csv(tmp_path / "r.csv", runs)
    assert same_runs(report.read_json(tmp_path / "r.json")["s"], runs)
    no_extra = [dataclasses.replace(r, extra={}) for r in runs]  # extra: results.json only
    assert same_runs(report.read_csv(tmp_path / "r.csv"), no_extra)
    back = report.read_csv(tmp_path / "r.csv")[0]
    assert back.cpu_time == runs[0].cpu_time and back.step_time == 0.001  # exact floats
    assert math.isnan(back.metric[0])
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["meta"] == {"quick": True}
    want = [dataclasses.asdict(r) for r in report.summarize(s, runs)]
    assert json.dumps(data["suites"]["s"]["summary"]) == json.dumps(want)


def test_csv_is_long_form_points_and_one_line_per_run_without_extra(tmp_path):
    blob = {"curves": {"proxy": [0.123456] * 400}, "per_class": list(range(10))}
    runs = [
        make_run("SGD", 0, 0.5, ttt=1.5, peak_memory=2048, extra=blob),
        make_run("Adam", 1, 0.25, metric=(0.5, 0.75)),
    ]
    report.write_csv(tmp_path / "results.csv", runs)
    points = (tmp_path / "results.csv").read_text().splitlines()
    per_run = (tmp_path / "runs.csv").read_text().splitlines()
    # make_run: points (10 i, 0.5 i + 0.1 seed, 1 / (i + 1 + seed), metric_i)
    assert points == [
        "suite,method,seed,step,cpu_time,loss,metric",
        "s,SGD,0,0,0.0,1.0,0.2",
        "s,SGD,0,10,0.5,0.5,0.6",
        "s,SGD,0,20,1.0,0.3333333333333333,0.9",
        "s,Adam,1,0,0.1,0.5,0.5",
        "s,Adam,1,10,0.6,0.3333333333333333,0.75",
    ]
    assert per_run == [
        "suite,method,seed,points,step_time,time_to_target,peak_memory",
        "s,SGD,0,3,0.5,1.5,2048",
        "s,Adam,1,2,0.25,,",
    ]


def test_band_on_shared_steps_is_median_min_max():
    runs = [
        make_run("A", 0, 1.0, metric=(1.0, 2.0, 3.0)),
        make_run("A", 1, 1.0, metric=(3.0, 4.0, 5.0)),
        make_run("A", 2, 1.0, metric=(2.0, 9.0, 4.0)),
    ]
    grid, med, lo, hi = plots.band(runs, lambda r: r.steps, lambda r: r.metric)
    np.testing.assert_array_equal(grid, [0, 10, 20])
    np.testing.assert_array_equal(med, [2.0, 4.0, 4.0])
    np.testing.assert_array_equal(lo, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(hi, [3.0, 9.0, 5.0])


def test_band_on_different_times_interpolates_and_stops_at_each_end():
    a, b = Run(suite="s", method="A", seed=0), Run(suite="s", method="A", seed=1)
    for t, v in [(0.0, 0.0), (1.0, 1.0), (2.0, 4.0)]:
        a.record(0, t, v)
    for t, v in [(0.0, 2.0), (4.0, 6.0)]:
        b.record(0, t, v)
    grid, med, lo, hi = plots.band([a, b], lambda r: r.cpu_time, lambda r: r.loss, points=9)
    np.testing.assert_allclose(grid, np.linspace(0, 4, 9))
    ya = np.where(grid <= 2.0, np.interp(grid, [0, 1, 2], [0, 1, 4]), NAN)
    yb = 2.0 + grid
    np.testing.assert_allclose(lo, np.where(np.isnan(ya), yb, np.minimum(ya, yb)))
    np.testing.assert_allclose(hi, np.where(np.isnan(ya), yb, np.maximum(ya, yb)))
    np.testing.assert_allclose(med, np.where(np.isnan(ya), yb, (ya + yb) / 2))


def test_plots_are_written_per_suite(tmp_path):
    runs = [make_run("A", 0, 1.0), make_run("B", 0, 1.0, metric=(NAN, NAN, NAN))]
    paths = report.plot_suite(tmp_path, suite(target=0.5), runs)
    assert [p.name for p in paths] == ["s_loss.png", "s_metric.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    no_metric = [make_run("A", 0, 1.0, metric=(NAN, NAN, NAN))]
    assert [p.name for p in report.plot_suite(tmp_path / ".", suite(), no_metric)] == ["s_loss.png"]


@pytest.mark.parametrize(
    ("n", "text"), [(None, "-"), (512, "512 B"), (1536, "1.5 KiB"), (3 * 2**30, "3.0 GiB")]
)
def test_bytes_format(n, text):
    assert table.fmt_bytes(n) == text


def test_log_axis_only_for_positive_values():
    pos = [make_run("A", 0, 1.0)]
    neg = [make_run("A", 0, 1.0, metric=(-1.0, 0.5, NAN))]
    assert plots.all_positive(pos, lambda r: r.loss)
    assert not plots.all_positive(neg, lambda r: r.metric)
    assert not plots.all_positive([Run(suite="s", method="A", seed=0)], lambda r: r.loss)


def test_numpy_and_torch_values_in_extra_are_written_as_json(tmp_path):
    import torch

    run = make_run(
        "A",
        0,
        1.0,
        extra={
            "reached": np.bool_(True),
            "n": np.int64(3),
            "r": np.array([0.5, 1.5]),
            "t": torch.tensor([1.0, 2.0]),
        },
    )
    report.write_json(tmp_path / "r.json", {"s": (suite(), [run])})
    want = {"reached": True, "n": 3, "r": [0.5, 1.5], "t": [1.0, 2.0]}
    assert report.read_json(tmp_path / "r.json")["s"][0].extra == want
    bad = make_run("A", 0, 1.0, extra={"o": object()})
    with pytest.raises(TypeError, match=r"Invalid Run\.extra value: object"):
        report.write_json(tmp_path / "bad.json", {"s": (suite(), [bad])})


def test_table_columns_follow_what_the_suite_defines():
    from rich.console import Console

    def header(s, runs):
        console = Console(width=200, record=True)
        report.print_table(console, s, report.summarize(s, runs))
        return console.export_text()

    runs = [make_run("SGD", 0, 1.0), make_run("Adam", 0, 2.0, metric=(0.2, 0.95))]
    full = header(suite(baseline="SGD", target=0.5, metric_name="acc"), runs)
    assert "final acc" in full and "CPU s to acc >= 0.5" in full and "step time / SGD" in full
    lines = {line.split()[1]: line for line in full.splitlines() if line.startswith("│")}
    assert "0.95 *" in lines["Adam"] and "*" not in lines["SGD"]  # the best metric is marked
    assert lines["Adam"].split("│")[5].strip() == "2"  # step time ratio 2.0 / 1.0
    bare = header(suite(baseline=None), [make_run("A", 0, 1.0, metric=(NAN,))])
    assert "step time" not in bare and "CPU s to" not in bare and "final metric" not in bare
    assert "peak memory" in bare

"""The runner and the CLI end to end, on a fake suite registered for the test."""

import csv
import json

import pytest

from torchsteer.bench import registry, report
from torchsteer.bench.cli import main
from torchsteer.bench.registry import Run, Suite
from torchsteer.bench.runner import resolve, run_suites


def fake_runs(ctx):
    runs = []
    for seed in ctx.seeds:
        for method, step_time in (("SGD", 0.25), ("Fancy", 1.0)):
            run = Run(
                suite="fake",
                method=method,
                seed=seed,
                step_time=step_time + seed,
                peak_memory=1000 * (seed + 1),
            )
            for i, metric in enumerate((0.1, 0.4, 0.8)):
                run.record(5 * i, 0.5 * i + 0.125 * seed, 2.0**-i, metric)
            runs.append(run)
            ctx.advance()
    return runs


@pytest.fixture
def fake(monkeypatch):
    calls = []

    def run(ctx):
        calls.append(ctx)
        return fake_runs(ctx)

    suite = Suite(
        name="fake",
        description="a fake suite",
        run=run,
        units=lambda quick, seeds: 2 * len(seeds),
        metric_name="acc",
        target=0.4,
        quick_default=False,
    )
    registry.suites()  # discover the real suites before patching
    monkeypatch.setitem(registry._SUITES, "fake", suite)
    suite.calls = calls
    return suite


def test_fake_suite_end_to_end_writes_exactly_its_numbers(fake, tmp_path):
    out = tmp_path / "out"
    results = run_suites(["fake"], quick=True, seeds=[0, 1], out=out)
    expected = fake_runs(registry.Context(quick=True, seeds=[0, 1]))
    for r in expected:  # the runner fills time to target from the curve: first metric >= 0.4
        r.time_to_target = r.cpu_time[1]
    dump = lambda runs: [json.dumps(r.to_dict(), sort_keys=True) for r in runs]  # noqa: E731
    assert dump(results["fake"][1]) == dump(expected)
    assert dump(report.read_json(out / "results.json")["fake"]) == dump(expected)
    assert dump(report.read_csv(out / "results.csv")) == dump(expected)
    assert fake.calls[0].quick is True and fake.calls[0].seeds == [0, 1]
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["quick"] is True and meta["seeds"] == [0, 1]
    with open(out / "summary.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    # Fancy: median(1, 2) = 1.5 over SGD: median(0.25, 1.25) = 0.75 -> 2
    assert float(rows["Fancy"]["step_time_ratio"]) == 2.0
    assert float(rows["Fancy"]["time_to_target"]) == 0.5625  # median(0.5, 0.625)
    assert int(rows["Fancy"]["peak_memory"]) == 2000
    assert sorted(p.name for p in out.glob("*.png")) == ["fake_loss.png", "fake_metric.png"]


def test_resolve_defaults_to_the_quick_default_suites(fake):
    default = [s.name for s in resolve(None)]
    assert "fake" not in default and {"regression", "digits-mlp"} <= set(default)
    assert [s.name for s in resolve(["fake", "fake"])] == ["fake"]
    with pytest.raises(ValueError, match="Invalid suite: 'nope'"):
        resolve(["fake", "nope"])


def test_a_suite_returning_foreign_runs_is_an_error(monkeypatch, tmp_path):
    bad = Suite(
        name="bad",
        description="",
        units=lambda q, s: 1,
        run=lambda ctx: [Run(suite="other", method="SGD", seed=0)],
    )
    registry.suites()
    monkeypatch.setitem(registry._SUITES, "bad", bad)
    with pytest.raises(ValueError, match=r"Invalid Run\.suite: 'other'"):
        run_suites(["bad"], out=tmp_path, plots=False, keep_going=False)


def test_cli_list_names_the_registered_suites(fake, capsys):
    assert main(["bench", "--list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == sorted(registry.suites())
    assert {"fake", "regression", "digits-mlp"} <= set(names)


def test_cli_runs_a_named_suite_with_seeds(fake, tmp_path):
    assert main(["bench", "fake", "--seeds", "3", "--out", str(tmp_path)]) == 0
    assert fake.calls[0].quick is False and fake.calls[0].seeds == [0, 1, 2]
    runs = report.read_json(tmp_path / "results.json")["fake"]
    assert sorted({r.seed for r in runs}) == [0, 1, 2]
    assert main(["bench", "fake", "--quick", "--out", str(tmp_path)]) == 2  # an earlier run
    assert len(fake.calls) == 1  # refused before any suite ran
    assert main(["bench", "fake", "--quick", "--out", str(tmp_path), "--overwrite"]) == 0
    assert fake.calls[1].quick is True and fake.calls[1].seeds == [0]
    assert {r.seed for r in report.read_json(tmp_path / "results.json")["fake"]} == {0}


def test_an_earlier_run_is_not_overwritten_silently(fake, tmp_path, capsys):
    assert main(["bench", "fake", "--out", str(tmp_path)]) == 0
    before = (tmp_path / "results.json").read_bytes()
    assert main(["bench", "fake", "--quick", "--out", str(tmp_path)]) == 2
    assert "holds an earlier run (fake_loss.png" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_bytes() == before


def test_no_file_is_written_through_a_symbolic_link(fake, tmp_path, capsys):
    outside = tmp_path / "outside.json"
    outside.write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").symlink_to(outside)
    for extra in ([], ["--overwrite"]):
        assert main(["bench", "fake", "--out", str(out), *extra]) == 2
        assert "symbolic links ['results.json']" in capsys.readouterr().err
    assert outside.read_text() == "keep" and not fake.calls
    link = tmp_path / "linked"
    link.symlink_to(out, target_is_directory=True)
    assert main(["bench", "fake", "--out", str(link)]) == 2
    assert "is a symbolic link" in capsys.readouterr().err


def test_open_output_refuses_a_link_planted_after_the_check(tmp_path):
    from torchsteer.bench.output import open_output

    target = tmp_path / "target"
    target.write_text("keep")
    (tmp_path / "summary.csv").symlink_to(target)
    with pytest.raises(ValueError, match="is a symbolic link"):
        open_output(tmp_path / "summary.csv")
    assert target.read_text() == "keep"


def test_cli_rejects_bad_arguments(fake, capsys, tmp_path):
    assert main(["bench", "nope", "--out", str(tmp_path)]) == 2
    assert "Invalid suite: 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--seeds", "0"])
    assert "Invalid seeds: 0" in capsys.readouterr().err


def test_the_docs_example_suite_runs_and_lbfgs_solves_it(monkeypatch, capsys):
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "bench.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    example = next(b for b in blocks if "register(" in b and "run_suites(" in b)
    registry.suites()
    monkeypatch.setattr(registry, "_SUITES", dict(registry._SUITES))  # undo the registration
    scope = {}
    exec(compile(example, "docs/bench.md", "exec"), scope)
    _, runs = scope["results"]["least-squares"]
    assert [(r.method, r.seed) for r in runs] == [
        (m, s) for s in (0, 1) for m in ("SGD", "Adam", "L-BFGS")
    ]
    lbfgs = [r for r in runs if r.method == "L-BFGS"]
    assert all(r.final_loss < 1e-8 for r in lbfgs)  # y = x w exactly: the optimum is 0
    assert "least-squares" in capsys.readouterr().out


def test_a_failing_suite_is_reported_and_the_others_still_written(fake, monkeypatch, tmp_path):
    def explode(ctx):
        ctx.advance()
        raise RuntimeError("boom")

    broken = Suite(name="broken", description="", units=lambda q, s: 2, run=explode)
    monkeypatch.setitem(registry._SUITES, "broken", broken)
    assert main(["bench", "broken", "fake", "--quick", "--out", str(tmp_path)]) == 1
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["failed"] == {"broken": "RuntimeError: boom"}
    assert list(data["suites"]) == ["fake"]
    assert len(data["suites"]["fake"]["runs"]) == 2
    with pytest.raises(RuntimeError, match="boom"):
        run_suites(["broken"], out=tmp_path, keep_going=False, overwrite=True)


def test_each_table_is_printed_when_its_suite_ends(fake, monkeypatch, tmp_path):
    import io

    from rich.console import Console

    console = Console(width=80, record=True, file=io.StringIO())
    seen = []

    def second(ctx):  # runs after "fake": its table must be out already
        seen.append(console.export_text(clear=False))
        return [Run(suite="second", method="SGD", seed=s) for s in ctx.seeds]

    suite = Suite(name="second", description="the second", run=second, units=lambda q, s: 0)
    monkeypatch.setitem(registry._SUITES, "second", suite)
    run_suites(["fake", "second"], seeds=[0], out=tmp_path, console=console, plots=False)
    assert "fake: a fake suite" in seen[0] and "second: the second" not in seen[0]
    assert "second: the second" in console.export_text()


def test_progress_shows_on_a_terminal_only(fake, tmp_path):
    import io

    from rich.console import Console

    plain = Console(width=80, record=True, file=io.StringIO())
    run_suites(["fake"], seeds=[0, 1], out=tmp_path / "a", console=plain, plots=False)
    tty = Console(width=80, record=True, file=io.StringIO(), force_terminal=True)
    run_suites(["fake"], seeds=[0, 1], out=tmp_path / "b", console=tty, plots=False)
    bar = [line for line in tty.export_text().splitlines() if "4/4" in line]  # 2 arms x 2 seeds
    assert len(bar) == 1 and bar[0].split()[0] == "fake" and "━" in bar[0]
    assert not [line for line in plain.export_text().splitlines() if "4/4" in line]


def one_line_error(capsys, argv) -> str:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("torchsteer bench: ")
    return err


def test_bad_arguments_give_one_clear_line(fake, capsys, tmp_path):
    afile = tmp_path / "results.txt"
    afile.write_text("not a folder")
    err = one_line_error(capsys, ["bench", "fake", "--out", str(afile)])
    assert f"Invalid --out: {afile} is a file, not a folder" in err
    err = one_line_error(capsys, ["bench", "fake", "--out", str(afile / "sub")])
    assert f"Invalid --out: {afile} is a file, not a folder" in err
    assert afile.read_text() == "not a folder" and not fake.calls
    err = one_line_error(capsys, ["bench", "--seeds", "abc"])
    assert "Invalid seeds: 'abc' (must be a whole number >= 1)" in err
    err = one_line_error(capsys, ["bench", "nope", "--out", str(tmp_path / "o")])
    assert "Invalid suite: 'nope'; known suites: " in err and "regression" in err


HEAVY = ("torch", "numpy", "scipy", "sklearn", "matplotlib", "rich", "lightning")


def test_list_imports_no_heavy_module():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from torchsteer.bench.cli import main\n"
        "main(['bench', '--list'])\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}\n"
        "    or m.startswith('torchsteer.bench.suites'))\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines()[-1] == "HEAVY []"
    names = [line.split()[0] for line in out.splitlines()[:-1]]
    assert names == sorted(registry.suites())  # the catalog lists exactly the registered ones


def test_the_catalog_matches_what_the_suite_modules_register():
    from torchsteer.bench.catalog import BUILTIN

    real = {
        n: (s.run.__module__.rsplit(".", 1)[1], s.description, s.quick_default)
        for n, s in registry.suites().items()
        if s.run.__module__.startswith("torchsteer.bench.suites.")
    }
    assert real == BUILTIN

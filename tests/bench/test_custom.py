"""Your own workload: the docs' ``my_suite.py`` through the CLI and from Python, end to end."""

import csv
import json
from pathlib import Path

import pytest

from torchsteer.bench import report
from torchsteer.bench.cli import main
from torchsteer.bench.custom import load
from torchsteer.bench.runner import run_suites

DOCS = Path(__file__).parents[2] / "docs" / "bench.md"


def docs_blocks() -> list[str]:
    return [b.split("```", 1)[0] for b in DOCS.read_text().split("```python\n")[1:]]


@pytest.fixture
def my_suite(tmp_path, monkeypatch):
    """The docs' ``my_suite.py`` written into a fresh folder, which becomes the cwd."""
    source = next(b for b in docs_blocks() if b.startswith("# my_suite.py"))
    (tmp_path / "my_suite.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "my_suite.py"


def test_the_docs_user_suite_runs_through_the_cli(my_suite, tmp_path, capsys):
    out = tmp_path / "out"
    spec = f"{my_suite}:make_suite"
    assert main(["bench", "--suite", spec, "--quick", "--seeds", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "my-least-squares: linear least squares" in printed  # its table
    data = json.loads((out / "results.json").read_text())
    assert list(data["suites"]) == ["my-least-squares"] and data["meta"]["seeds"] == [0, 1]
    runs = report.read_json(out / "results.json")["my-least-squares"]
    assert [(r.method, r.seed) for r in runs] == [
        (m, s) for s in (0, 1) for m in ("SGD lr=0.05", "Adam lr=0.05", "L-BFGS")
    ]
    # quick_steps = 100, eval every 10: points at 0, 10, ..., 100; L-BFGS 10 steps, every 1
    assert [r.steps for r in runs[:2]] == [list(range(0, 101, 10))] * 2
    assert runs[2].steps == list(range(11))
    lbfgs = [r for r in runs if r.method == "L-BFGS"]
    # y = X W exactly and the model is linear: the optimum is 0, train and validation
    assert all(r.final_loss < 1e-9 and r.final_metric < 1e-9 for r in lbfgs)
    assert all(r.time_to_target is not None for r in lbfgs)
    assert all(r.peak_memory is not None and r.peak_memory > 0 for r in runs)
    with open(out / "results.csv") as f:
        lines = list(csv.reader(f))
    assert len(lines) == 1 + sum(len(r.steps) for r in runs)
    assert sorted(p.name for p in out.glob("*.png")) == [
        "my-least-squares_loss.png",
        "my-least-squares_metric.png",
    ]


def test_the_same_from_python(my_suite, tmp_path):
    block = next(b for b in docs_blocks() if 'run_suites(["my_suite.py:make_suite"]' in b)
    scope = {}
    exec(compile(block, "docs/bench.md", "exec"), scope)
    _, runs = scope["results"]["my-least-squares"]
    suite = load(f"{my_suite}:make_suite")
    again = run_suites([suite], quick=True, seeds=[0, 1], out=tmp_path / "again", plots=False)
    # the same seeds give the same curves (CPU times differ)
    assert [r.loss for r in again["my-least-squares"][1]] == [r.loss for r in runs]
    assert [r.metric for r in again["my-least-squares"][1]] == [r.metric for r in runs]


@pytest.mark.parametrize(
    ("content", "spec", "message"),
    [
        (None, "missing.py:make_suite", "no file missing.py"),
        ("import no_such_module_xyz\n", "bad.py", "importing it raised ModuleNotFoundError"),
        ("x = 1\n", "bad.py:make_suite", "bad.py has no function make_suite()"),
        ("def make_suite():\n    return 3\n", "bad.py", "returned int, not a torchsteer"),
        ("def f():\n    raise KeyError('k')\n", "bad.py:f", "f() raised KeyError: 'k'"),
    ],
)
def test_a_bad_suite_file_gives_one_line(tmp_path, monkeypatch, capsys, content, spec, message):
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / "bad.py").write_text(content)
    assert main(["bench", "--suite", spec, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"Invalid --suite {spec!r}: " in err
    assert message in err and not (tmp_path / "out").exists()

"""Every Python code block of the README and of docs/*.md runs as written.

The blocks of one page run in order in one namespace, as a reader runs them: a later block may
use what an earlier one defined (the Sven page's functional path uses the model of its graph
path). They run in a temporary folder, one thread, on CPU. A block that cannot run here is
marked on the line before its fence with ``<!-- docs-test: skip: REASON -->`` (it needs a GPU,
or processes started by ``torchrun``); the test reports it as skipped with that reason and
fails if a page marks a block without a reason. A block marked
``<!-- docs-test: file: NAME.py -->`` is a file the reader saves: it is written to ``NAME.py``
in the folder the later blocks run in. A block marked ``<!-- docs-test: script -->``
is a whole program that starts its own processes (``mp.spawn``, Lightning's ``strategy="ddp"``
on CPU): it is written to a file and run as ``python file.py``, as its reader would, in a test
marked ``distributed`` and ``slow`` (1-2 minutes each of process start-up on the shared 2-core
machine, so ``make test-all`` runs them; ``tests/distributed/`` checks the same DDP fits'
numbers in ``make test``). The assertions inside the examples (and the numbers they print) are
theirs; this test checks that none raises.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
MARK = re.compile(r"<!-- docs-test: skip:(.*?)-->\s*$")
SCRIPT = "<!-- docs-test: script -->"
FILE = re.compile(r"<!-- docs-test: file: (\S+) -->\s*$")


def blocks(page: str):
    """``(line, code, mark)`` for each Python block of ``page``; ``mark`` is None, ``"script"``
    or the reason of a skip."""
    text = (ROOT / page).read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARK.search(before)
        reason = mark.group(1).strip() if mark else None
        if mark and not reason:
            raise AssertionError(f"{page}: a docs-test skip mark without a reason")
        if before.strip() == SCRIPT:
            reason = "script"
        named = FILE.search(before)
        if named:
            reason = "file:" + named.group(1)
        out.append((text[: m.start()].count("\n") + 2, m.group(1), reason))
    return out


SCRIPTS = [(page, line) for page in PAGES for line, _, mark in blocks(page) if mark == "script"]


def test_blocks_are_found():
    found = {page: len(blocks(page)) for page in PAGES}
    assert found["README.md"] == 1 and found["docs/sven.md"] >= 5
    assert sum(found.values()) >= 25


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)])
def test_every_python_block_runs(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "docs_example"}
    skipped = []
    for line, code, reason in blocks(page):
        if reason == "script":
            continue  # test_script_blocks_run
        if reason is not None and reason.startswith("file:"):
            (tmp_path / reason[5:]).write_text(code)  # a file the page's later blocks use
            continue
        if reason is not None:
            skipped.append(f"line {line}: {reason}")
            continue
        exec(compile(code, f"{page}:{line}", "exec"), namespace)
    capsys.readouterr()
    if skipped and len(skipped) == len(blocks(page)):
        pytest.skip(f"{page}: every block is marked: " + "; ".join(skipped))


@pytest.mark.slow  # 1-2 min each on a loaded 2-core machine (process start-up): make test-all
@pytest.mark.distributed
@pytest.mark.parametrize(("page", "line"), SCRIPTS)
def test_script_blocks_run(page, line, tmp_path):
    code = next(c for n, c, _ in blocks(page) if n == line)
    script = tmp_path / "example.py"
    script.write_text(code)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, f"{page}:{line}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"


def test_scaling_page_runs_its_cpu_form():
    assert [line for page, line in SCRIPTS if page == "docs/scaling.md"] == [
        line for line, code, _ in blocks("docs/scaling.md") if 'accelerator="cpu"' in code
    ] + [line for line, code, _ in blocks("docs/scaling.md") if "mp.spawn" in code]

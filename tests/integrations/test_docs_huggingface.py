"""The examples of docs/huggingface.md run as written (in one namespace, in order), and what
they print agrees with the objects' own state."""

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")

from tests.integrations import _hf  # noqa: F401  (offline mode, quiet logging)

PAGE = Path(__file__).resolve().parents[2] / "docs" / "huggingface.md"


def test_every_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
    assert len(blocks) == 8
    ns = {"__name__": "example"}
    for code in blocks:
        exec(compile(code, str(PAGE), "exec"), ns)
    assert ns["radius"].limiter.steps == 3 and ns["radius"].limiter.limited >= 1
    assert ns["kl_control"].updates == 3
    assert ns["dro"].weighting.step == 3
    assert next(iter(ns["sven"].state.values()))["step"] == 3
    assert ns["grpo"].beta == ns["ctl"].coef and ns["grpo"].beta_control.updates == 3
    assert ns["gkd"].state.global_step == 2

"""The README's and the core page's examples run as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("page", ["README.md", "docs/core.md"])
def test_first_python_example_runs(page):
    text = (ROOT / page).read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, page, "exec"), {"__name__": "example"})

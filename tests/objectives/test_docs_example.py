"""The RL objectives page's first example runs and reaches pi* (the oracle it prints)."""

import contextlib
import io
import re
from pathlib import Path

PAGE = Path(__file__).resolve().parents[2] / "docs" / "objectives.md"


def test_first_example_reaches_the_kl_regularized_target():
    code = re.search(r"```python\n(.*?)```", PAGE.read_text(), re.S).group(1)
    out = io.StringIO()
    scope = {"__name__": "example"}
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(PAGE), "exec"), scope)
    import torch

    err = (torch.softmax(scope["theta"], 0) - scope["target"]).abs().max().item()
    assert err < 1e-9, out.getvalue()

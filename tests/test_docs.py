"""The docs site: it builds with ``mkdocs build --strict``, its math is rendered by a MathJax
served from the site itself, and the API page lists exactly the public names.

Oracles: the HTML that ``pymdownx.arithmatex`` writes (``<span class="arithmatex">\\(..\\)``
and ``<div class="arithmatex">\\[..\\]``, the containers MathJax typesets), the site's own
files, and the ``__all__`` of each public package.
"""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = [
    "torchsteer.optim",
    "torchsteer.control",
    "torchsteer.callbacks",
    "torchsteer.jacobian",
    "torchsteer.linalg",
    "torchsteer.divergence",
    "torchsteer.extras",
]
MATH_PAGES = ["sven", "mfac", "kl_control", "dro", "divergences"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    mkdocs = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)]
    run = subprocess.run(mkdocs, cwd=ROOT, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.mark.parametrize("page", MATH_PAGES)
def test_math_is_in_mathjax_containers(site, page):
    html = (site / page / "index.html").read_text()
    source = (ROOT / "docs" / f"{page}.md").read_text()
    displays = sum(line.strip() == "$$" for line in source.splitlines()) // 2
    assert html.count('<div class="arithmatex">\\[') == displays > 0
    assert '<span class="arithmatex">\\(' in html
    # the page loads the configuration, then MathJax from the site itself
    scripts = re.findall(r'<script src="([^"]+)"', html)
    assert scripts[-2:] == ["../javascripts/mathjax.js", "../javascripts/mathjax/tex-mml-chtml.js"]


def test_mathjax_is_served_from_the_site(site):
    js = site / "javascripts" / "mathjax" / "tex-mml-chtml.js"
    assert js.is_file() and js.stat().st_size > 100_000
    fonts = list((site / "javascripts/mathjax/output/chtml/fonts/woff-v2").glob("*.woff"))
    assert len(fonts) >= 20
    config = (site / "javascripts" / "mathjax.js").read_text()
    assert 'processHtmlClass: "arithmatex"' in config


def api_entries() -> set[str]:
    text = (ROOT / "docs" / "api.md").read_text()
    return set(re.findall(r"^::: (torchsteer\.\S+)$", text, re.M))


def test_api_page_lists_every_public_name():
    entries = api_entries()
    missing = {
        f"{mod}.{name}"
        for mod in PUBLIC
        for name in importlib.import_module(mod).__all__
        if f"{mod}.{name}" not in entries
    }
    assert not missing, sorted(missing)
    assert "torchsteer.linalg.randomized_svd" in entries


def test_api_page_lists_nothing_that_is_not_public():
    public = {f"{mod}.{name}" for mod in PUBLIC for name in importlib.import_module(mod).__all__}
    listed = {e for e in api_entries() if e.rsplit(".", 1)[0] in PUBLIC}
    assert listed == listed & public, sorted(listed - public)

"""MkDocs hook: serve MathJax from the installed ``django-static-mathjax`` package.

The ``docs`` extra installs that package (MathJax 3's browser files, no Python dependency). At
build time the files the pages need -- ``tex-mml-chtml.js``, its CommonHTML fonts and the
TeX extensions it loads on demand -- are added to the site under ``javascripts/mathjax/``, so
the built site renders its math offline and nothing is downloaded, at build time or in the
browser. ``mkdocs.yml`` loads ``javascripts/mathjax.js`` (the configuration) and then
``javascripts/mathjax/tex-mml-chtml.js``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mkdocs.structure.files import File

DEST = "javascripts/mathjax"
PARTS = ("tex-mml-chtml.js", "output/chtml/fonts", "input/tex/extensions", "a11y", "ui")


def mathjax_root() -> Path:
    spec = importlib.util.find_spec("mathjax")
    root = None
    if spec is not None and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax" / "es5"
    if root is None or not (root / "tex-mml-chtml.js").is_file():
        raise RuntimeError(
            "the docs need MathJax from the package django-static-mathjax, which is not "
            "installed: pip install 'torchsteer[docs]'"
        )
    return root


def on_files(files, config):
    root = mathjax_root()
    for part in PARTS:
        path = root / part
        for src in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            uri = f"{DEST}/{src.relative_to(root).as_posix()}"
            files.append(File.generated(config, uri, abs_src_path=str(src)))
    return files

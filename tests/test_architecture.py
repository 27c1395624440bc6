"""The arrows run one way: callbacks -> control, optim -> linalg, jacobian.

Checked on the source (imports parsed with ``ast``) and at run time (a fresh interpreter
imports the Lightning-free packages and must not have loaded Lightning; nothing but
``integrations/`` may import transformers, trl or their companions). Also: no private
module (``_name.py``) is imported from outside the folder that holds it, and no module but
``distributed.py`` imports ``torch.distributed``. Modules stay small: at most 400 lines of code
(docstrings, comments and blank lines not counted: the class docstrings carry the algorithms'
math, written before the code) and at most 550 lines in all.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "torchsteer"

# package -> torchsteer packages it may import
ALLOWED = {
    "jacobian": {"jacobian"},
    "linalg": {"linalg"},
    "optim": {"optim", "jacobian", "linalg", "distributed"},
    "control": {"control", "jacobian", "linalg", "distributed"},
    "callbacks": {"callbacks", "control", "optim", "jacobian", "linalg", "distributed", "extras"},
    "bench": {
        "bench",
        "callbacks",
        "control",
        "optim",
        "jacobian",
        "linalg",
        "distributed",
        "extras",
        "divergence",
        "objectives",
    },
    "divergence": {"divergence", "distributed"},
    "objectives": {"objectives", "control", "distributed"},
    "integrations": {
        "integrations",
        "control",
        "optim",
        "divergence",
        "objectives",
        "jacobian",
        "linalg",
        "distributed",
        "extras",
    },
    "distributed.py": set(),
    "extras.py": set(),
}
LIGHTNING_OK = {"callbacks", "bench"}
HF = ("transformers", "trl", "accelerate", "datasets", "tokenizers", "peft")
HF_OK = {"integrations"}


def sources(package: str):
    """The ``.py`` files of a package folder, or the one module ``package`` names."""
    path = SRC / package
    return [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))


def imported_modules(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_it_may(package):
    bad = []
    for path in sources(package):
        for mod in imported_modules(path):
            parts = mod.split(".")
            if parts[0] == "torchsteer" and len(parts) > 1 and parts[1] not in ALLOWED[package]:
                bad.append(f"{path.name}: {mod}")
            if parts[0] in ("lightning", "pytorch_lightning") and package not in LIGHTNING_OK:
                bad.append(f"{path.name}: {mod}")
            if parts[0] in HF and package not in HF_OK:
                bad.append(f"{path.name}: {mod}")
    assert not bad, bad


def test_every_package_is_checked():
    found = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    found |= {p.name for p in SRC.glob("*.py") if p.name != "__init__.py"}
    assert found == set(ALLOWED), found ^ set(ALLOWED)


def private_module_of(mod: str) -> tuple[str, ...] | None:
    """The folder parts of the first private module in a dotted path, or None."""
    parts = mod.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return tuple(parts[:i])
    return None


def test_no_private_module_is_imported_across_folders():
    bad = []
    for path in SRC.rglob("*.py"):
        here = ("torchsteer", *path.relative_to(SRC).parent.parts)
        for mod in imported_modules(path):
            folder = private_module_of(mod) if mod.startswith("torchsteer.") else None
            if folder is not None and folder != here:
                bad.append(f"{path.relative_to(SRC)}: {mod}")
    assert not bad, bad


def test_only_distributed_py_calls_torch_distributed():
    bad = [
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if path.name != "distributed.py"
        and any(m.startswith("torch.distributed") for m in imported_modules(path))
    ]
    assert not bad, bad


def test_lightning_free_packages_do_not_load_lightning():
    code = (
        "import sys, torchsteer.optim, torchsteer.control, torchsteer.jacobian, "
        "torchsteer.linalg, torchsteer.distributed, torchsteer.divergence, torchsteer.objectives; "
        "print(any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_only_integrations_load_hugging_face():
    """Importing every other package (and ``torchsteer.integrations`` itself) loads neither
    transformers nor trl: only ``torchsteer.integrations.transformers`` / ``.trl`` do."""
    code = (
        "import sys, torchsteer.optim, torchsteer.control, torchsteer.jacobian, "
        "torchsteer.linalg, torchsteer.distributed, torchsteer.divergence, torchsteer.bench, "
        "torchsteer.integrations; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HF!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def code_lines(path: Path) -> int:
    """Lines of ``path`` that are neither blank, nor a comment, nor part of a docstring."""
    text = path.read_text()
    docs: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    docs.update(range(first.lineno, first.end_lineno + 1))
    lines = text.splitlines()
    return sum(
        1
        for i, line in enumerate(lines, 1)
        if i not in docs and line.strip() and not line.strip().startswith("#")
    )


def test_code_lines_counts_only_code(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        '"""Doc.\n\nMore."""\n\n# note\nx = 1\n\n\ndef f():\n    """D."""\n    return x\n'
    )
    assert code_lines(path) == 3


def test_modules_are_small():
    big = {
        str(path.relative_to(SRC)): (code_lines(path), len(path.read_text().splitlines()))
        for path in SRC.rglob("*.py")
    }
    bad = {name: n for name, n in big.items() if n[0] > 400 or n[1] > 550}
    assert not bad, bad

"""The arrows run one way: callbacks -> control, optim -> linalg, jacobian.

Checked on the source (imports parsed with ``ast``) and at run time (a fresh interpreter
imports the Lightning-free packages and must not have loaded Lightning).
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
    "callbacks": {"callbacks", "control", "optim", "jacobian", "linalg", "distributed"},
}


def imported_modules(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            if node.module == "torchsteer":
                yield from (f"torchsteer.{a.name}" for a in node.names)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_it_may(package):
    bad = []
    for path in (SRC / package).rglob("*.py"):
        for mod in imported_modules(path):
            parts = mod.split(".")
            if parts[0] == "torchsteer" and len(parts) > 1 and parts[1] not in ALLOWED[package]:
                bad.append(f"{path.name}: {mod}")
            if parts[0] in ("lightning", "pytorch_lightning") and package != "callbacks":
                bad.append(f"{path.name}: {mod}")
    assert not bad, bad


def test_lightning_free_packages_do_not_load_lightning():
    code = (
        "import sys, torchsteer.optim, torchsteer.control, torchsteer.jacobian, "
        "torchsteer.linalg, torchsteer.distributed; "
        "print(any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

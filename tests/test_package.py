"""The package as a user gets it: a wheel and an sdist that ``twine check`` passes, a wheel that
installs on its own into a fresh environment, imports, carries ``py.typed`` and the LICENSE,
and whose metadata, ``torchsteer.__version__`` and ``torchsteer --version`` agree.

The oracle is the installed distribution itself (``importlib.metadata`` and the wheel's
RECORD). Nothing is downloaded: the build runs without isolation (setuptools of this
environment) and the wheel is installed with ``--no-deps --no-index``; the fresh environment
finds torch, NumPy and SciPy through a ``.pth`` line naming this environment's site-packages.
A ``.pth`` *line* does not run that folder's own ``.pth`` files, so the editable install of
the work tree stays invisible there: ``import torchsteer`` must find the wheel. The build runs
on a copy of the work tree without earlier build outputs (a stale ``build/lib`` would hide a
file missing from the package data), and the wheel is built from the sdist.
"""

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import torchsteer

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout}\n{out.stderr}"
    return out.stdout


# what a build must not see: outputs of earlier builds in the work tree, environments, caches
LEFT_OUT = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "site", "bench-*"
)


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """The sdist, and the wheel built from that sdist (``python -m build``'s default)."""
    src = tmp_path_factory.mktemp("src") / "torchsteer"
    shutil.copytree(ROOT, src, ignore=LEFT_OUT)
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src))
    (wheel,) = out.glob("torchsteer-*.whl")
    (sdist,) = out.glob("torchsteer-*.tar.gz")
    return wheel, sdist


def test_twine_check_passes(dists):
    text = run(sys.executable, "-m", "twine", "check", "--strict", *map(str, dists))
    assert text.count("PASSED") == 2, text


def test_wheel_carries_py_typed_license_and_version(dists):
    wheel, sdist = dists
    assert wheel.name.startswith(f"torchsteer-{torchsteer.__version__}-")
    assert sdist.name == f"torchsteer-{torchsteer.__version__}.tar.gz"
    names = zipfile.ZipFile(wheel).namelist()
    assert "torchsteer/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith("/LICENSE") for n in names)
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert f"Version: {torchsteer.__version__}" in text
    assert "License-Expression: Apache-2.0" in text
    assert "Provides-Extra: lightning" in text and "Provides-Extra: bench" in text


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()


def test_wheel_installs_into_a_fresh_venv_and_imports(dists, tmp_path):
    wheel, _ = dists
    env = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", str(env))
    py = env / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(run(str(py), "-c", purelib).strip())
    # the dependencies (torch, numpy, scipy) of this environment, not its editable torchsteer
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(py),
        "install",
        "--no-deps",
        "--no-index",
        "--quiet",
        str(wheel),
    )
    code = (
        "import json, importlib.metadata as md, pathlib, torchsteer, torchsteer.optim, "
        "torchsteer.control;"
        "p = pathlib.Path(torchsteer.__file__).parent;"
        "print(json.dumps({'file': str(p), 'typed': (p / 'py.typed').is_file(),"
        "'version': torchsteer.__version__, 'meta': md.version('torchsteer'),"
        "'optim': sorted(torchsteer.optim.__all__)}))"
    )
    got = json.loads(run(str(py), "-c", code, cwd=tmp_path))
    assert Path(got["file"]).is_relative_to(site), got["file"]  # the wheel, not the work tree
    assert got["typed"]
    assert got["version"] == got["meta"] == torchsteer.__version__
    assert got["optim"] == [
        "MFAC",
        "RegularizedNewton",
        "Sven",
        "mfac_max_ngrads",
        "mfac_window_bytes",
    ]
    version = run(str(env / "bin" / "torchsteer"), "--version", cwd=tmp_path)
    assert version.strip() == f"torchsteer {torchsteer.__version__}"

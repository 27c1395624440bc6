"""A missing optional dependency names the extra that installs it.

Missing modules are simulated with ``sys.modules[name] = None`` (Python's own way to make an
import fail with ``ModuleNotFoundError``), in a fresh interpreter where the import under test
must not have happened yet.
"""

import json
import subprocess
import sys

import pytest

from torchsteer.extras import EXTRAS, MissingExtraError, install_hint, require


def test_require_returns_the_module_when_installed():
    import rich.table

    assert require("rich.table", "tables") is rich.table


def test_missing_module_names_its_extra(monkeypatch):
    for name in ("lightning", "lightning.pytorch"):  # also when another test imported it
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingExtraError, match=r"pip install 'torchsteer\[lightning\]'") as e:
        require("lightning.pytorch", "torchsteer.callbacks")
    assert isinstance(e.value, ModuleNotFoundError)  # `except ImportError` still catches it
    assert e.value.name.split(".")[0] == "lightning"
    assert "torchsteer.callbacks needs 'lightning'" in str(e.value)


def test_each_optional_module_maps_to_a_declared_extra():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    declared = set(meta["project"]["optional-dependencies"])
    assert set(EXTRAS.values()) <= declared
    assert install_hint("bench") == "pip install 'torchsteer[bench]'"


def test_an_error_inside_an_installed_package_is_not_relabelled(tmp_path, monkeypatch):
    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text("import not_a_module_anywhere_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as e:
        require("brokenpkg", "a test", extra="bench")
    assert not isinstance(e.value, MissingExtraError)
    assert e.value.name == "not_a_module_anywhere_xyz"


def test_unknown_module_without_an_extra_is_refused():
    with pytest.raises(ValueError, match="Invalid module: 'numpy'"):
        require("numpy", "a test")


# One fresh interpreter without any extra (starting one costs seconds on a loaded machine): the
# core imports; each entry point that needs an extra raises, or prints, the error naming it.
WITHOUT_EXTRAS = """
import contextlib, io, json, sys, traceback
out = {}
import torchsteer.optim, torchsteer.control, torchsteer.linalg, torchsteer.jacobian
out["core"] = "ok"


def attempt(key, fn):
    try:
        fn()
        out[key] = "no error"
    except Exception as e:
        out[key] = f"{type(e).__name__}: {e}"


def callbacks():
    import torchsteer.callbacks


def suites():
    from torchsteer.bench.runner import run_suites

    run_suites(["regression"], quick=True, out=sys.argv[1] + "/a", plots=False)


def cli():
    from torchsteer.bench.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        out["cli_status"] = main(["bench", "regression", "--quick", "--out", sys.argv[1] + "/b"])
    out["cli_stderr"] = err.getvalue()


def digits():
    from torchsteer.bench.data import digits

    digits()


for key, fn in [("callbacks", callbacks), ("suites", suites), ("cli", cli), ("digits", digits)]:
    attempt(key, fn)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def without_extras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("out")
    hide = "".join(
        f"sys.modules[{m!r}] = None\n" for m in ("lightning", "rich", "matplotlib", "sklearn")
    )
    code = "import sys\n" + hide + WITHOUT_EXTRAS
    run = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1]), folder


def test_core_imports_without_any_extra(without_extras):
    assert without_extras[0]["core"] == "ok"


def test_callbacks_without_lightning_name_the_extra(without_extras):
    assert without_extras[0]["callbacks"] == (
        "MissingExtraError: torchsteer.callbacks needs 'lightning', which is not installed: "
        "pip install 'torchsteer[lightning]'"
    )


def test_run_suites_without_rich_names_the_bench_extra(without_extras):
    got, folder = without_extras
    assert got["suites"] == (
        "MissingExtraError: torchsteer bench needs 'rich', which is not installed: "
        "pip install 'torchsteer[bench]'"
    )
    assert not (folder / "a").exists()  # refused before anything was written


def test_cli_without_rich_prints_one_line(without_extras):
    got, folder = without_extras
    assert got["cli"] == "no error" and got["cli_status"] == 2
    assert got["cli_stderr"].strip().splitlines() == [
        "torchsteer bench: torchsteer bench needs 'rich', which is not installed: "
        "pip install 'torchsteer[bench]'"
    ]
    assert not (folder / "b").exists()


def test_digits_without_scikit_learn_names_the_bench_extra(without_extras):
    assert without_extras[0]["digits"] == (
        "MissingExtraError: the digits data needs 'sklearn', which is not installed: "
        "pip install 'torchsteer[bench]'"
    )


def test_version_flag(capsys):
    import torchsteer
    from torchsteer.bench.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"torchsteer {torchsteer.__version__}"

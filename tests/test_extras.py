"""A missing optional dependency names the extra that installs it.

Missing modules are simulated with ``sys.modules[name] = None`` (Python's own way to make an
import fail with ``ModuleNotFoundError``), in a fresh interpreter where the import under test
must not have happened yet.
"""

import subprocess
import sys

import pytest

from torchsteer.extras import EXTRAS, MissingExtraError, install_hint, require


def fresh(code: str, *hide: str):
    """Run ``code`` in a new interpreter in which the modules ``hide`` cannot be imported."""
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in hide)
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True)


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
    declared = set(meta["project"]["optional-dependencies"]) | {"transformers"}  # planned
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


def test_callbacks_without_lightning_name_the_extra():
    out = fresh("import torchsteer.callbacks", "lightning")
    assert out.returncode == 1
    assert "MissingExtraError" in out.stderr
    assert "torchsteer.callbacks needs 'lightning'" in out.stderr
    assert "pip install 'torchsteer[lightning]'" in out.stderr


def test_core_imports_without_any_extra():
    out = fresh(
        "import torchsteer.optim, torchsteer.control, torchsteer.linalg, torchsteer.jacobian",
        "lightning",
        "rich",
        "matplotlib",
        "sklearn",
    )
    assert out.returncode == 0, out.stderr


def test_run_suites_without_rich_names_the_bench_extra(tmp_path):
    code = (
        "from torchsteer.bench.runner import run_suites\n"
        f"run_suites(['regression'], quick=True, out={str(tmp_path / 'o')!r}, plots=False)\n"
    )
    out = fresh(code, "rich")
    assert out.returncode == 1
    assert "torchsteer bench needs 'rich'" in out.stderr
    assert "pip install 'torchsteer[bench]'" in out.stderr
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_cli_without_rich_prints_one_line(tmp_path):
    code = (
        "from torchsteer.bench.cli import main\n"
        f"raise SystemExit(main(['bench', 'regression', '--quick', '--out', "
        f"{str(tmp_path / 'o')!r}]))\n"
    )
    out = fresh(code, "rich")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "torchsteer bench: torchsteer bench needs 'rich', which is not installed: "
        "pip install 'torchsteer[bench]'"
    ]


def test_digits_without_scikit_learn_names_the_bench_extra():
    out = fresh("from torchsteer.bench.data import digits\ndigits()", "sklearn")
    assert out.returncode == 1
    assert "the digits data needs 'sklearn'" in out.stderr
    assert "pip install 'torchsteer[bench]'" in out.stderr


def test_version_flag(capsys):
    import torchsteer
    from torchsteer.bench.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"torchsteer {torchsteer.__version__}"

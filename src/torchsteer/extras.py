"""Optional dependencies: import one, or say which extra of torchsteer installs it.

The core (``torchsteer.optim``, ``control``, ``jacobian``, ``linalg``, ``divergence``) needs
only torch, NumPy and SciPy. The rest comes with an extra of the package:

- ``lightning``: ``lightning``, for ``torchsteer.callbacks``;
- ``bench``: ``rich``, ``matplotlib``, ``scikit-learn``, ``threadpoolctl``, for
  ``torchsteer bench``;
- ``hf``: ``transformers``, ``accelerate``, ``trl``, for ``torchsteer.integrations``.

:func:`require` imports a module and, when it (or the top-level package it lives in) is not
installed, raises :class:`MissingExtraError` whose message names the module, what needs it and
the command that installs it, e.g. ``pip install 'torchsteer[lightning]'``. The error is a
``ModuleNotFoundError``, so code that already catches that (or ``ImportError``) keeps working.
An import error *inside* an installed package (a broken install, a missing sub-dependency of
its own) is not relabelled: only the named module's own absence is.

This module imports nothing of torchsteer and nothing optional.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtraError", "install_hint", "require"]

# top-level module name -> the extra of torchsteer that installs it
EXTRAS: dict[str, str] = {
    "lightning": "lightning",
    "rich": "bench",
    "matplotlib": "bench",
    "sklearn": "bench",
    "threadpoolctl": "bench",
    "transformers": "hf",
    "accelerate": "hf",
    "trl": "hf",
}


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def install_hint(extra: str) -> str:
    """The command that installs ``extra``: ``pip install 'torchsteer[extra]'``."""
    return f"pip install 'torchsteer[{extra}]'"


def require(module: str, feature: str, extra: str | None = None) -> ModuleType:
    """Import ``module`` (a dotted name) for ``feature``, or raise :class:`MissingExtraError`.

    Args:
        module: the module to import, e.g. ``"lightning.pytorch"`` or ``"rich.table"``.
        feature: what needs it, for the message (e.g. ``"torchsteer.callbacks"``).
        extra: the extra that installs it; default: looked up in :data:`EXTRAS` from the
            top-level name of ``module``.

    Raises:
        MissingExtraError: ``module`` or one of its parent packages is not installed.
        ValueError: ``extra`` is None and the top-level name of ``module`` is not in
            :data:`EXTRAS`.
    """
    top = module.split(".")[0]
    if extra is None:
        if top not in EXTRAS:
            raise ValueError(
                f"Invalid module: {module!r} is not an optional dependency of torchsteer "
                f"(known: {', '.join(sorted(EXTRAS))}); pass extra="
            )
        extra = EXTRAS[top]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        prefixes = {".".join(module.split(".")[: i + 1]) for i in range(module.count(".") + 1)}
        if e.name not in prefixes:
            raise  # something inside the installed package is missing: not ours to relabel
        raise MissingExtraError(
            f"{feature} needs {top!r}, which is not installed: {install_hint(extra)}",
            name=e.name,
        ) from e

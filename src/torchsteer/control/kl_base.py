"""Deprecated: moved to :mod:`torchsteer.control.kl.base`; this path goes next release.

``from torchsteer.control.kl_base import X`` still returns the same object, with a
DeprecationWarning; import it from ``torchsteer.control.kl`` (or ``.kl.base``) instead.
Moved: KLController, as_statistic, finite_hparam.
"""

import importlib
import warnings

_NEW = "torchsteer.control.kl.base"


def __getattr__(name: str):
    module = importlib.import_module(_NEW)
    if name.startswith("__") or not hasattr(module, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"{__name__}.{name} moved to {_NEW}.{name}; the old path goes in the next release",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(module, name)

"""Deprecated: moved to :mod:`torchsteer.control.kl.base`; this path goes next release.

``from torchsteer.control.kl_base import X`` still returns the same object, with a
DeprecationWarning; import it from ``torchsteer.control.kl`` (or ``.kl.base``) instead.
Moved: KLController, as_statistic, finite_hparam.
"""

from torchsteer.control._moved import moved_getattr

__getattr__ = moved_getattr(__name__, "torchsteer.control.kl.base")

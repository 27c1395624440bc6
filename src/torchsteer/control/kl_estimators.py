"""Deprecated: moved to :mod:`torchsteer.control.kl.estimators`; this path goes next release.

``from torchsteer.control.kl_estimators import X`` still returns the same object, with a
DeprecationWarning; import it from ``torchsteer.control.kl`` (or ``.kl.estimators``) instead.
Moved: double_softmin, kl_estimate, kl_exact, masked_mean.
"""

from torchsteer.control._moved import moved_getattr

__getattr__ = moved_getattr(__name__, "torchsteer.control.kl.estimators")

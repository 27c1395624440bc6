"""Deprecated: moved to :mod:`torchsteer.control.kl.safe`; this path goes next release.

``from torchsteer.control.safe import X`` still returns the same object, with a
DeprecationWarning; import it from ``torchsteer.control.kl`` (or ``.kl.safe``) instead.
Moved: SAFEController.
"""

from torchsteer.control._moved import moved_getattr

__getattr__ = moved_getattr(__name__, "torchsteer.control.kl.safe")

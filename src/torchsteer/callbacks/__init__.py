"""Thin Lightning callbacks over :mod:`torchsteer.control` and :mod:`torchsteer.optim`.

Needs the ``lightning`` extra. Each callback wires one controller into Lightning's hooks,
logs its signals with ``pl_module.log``, checkpoints its state, and reduces across ranks.
"""

from torchsteer.callbacks.dro_reweighting import DROReweighting
from torchsteer.callbacks.kl_control import KLControl
from torchsteer.callbacks.radius_limit import RadiusLimit

__all__ = ["DROReweighting", "KLControl", "RadiusLimit"]

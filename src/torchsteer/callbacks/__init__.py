"""Thin Lightning callbacks over :mod:`torchsteer.control` and :mod:`torchsteer.optim`.

Needs the ``lightning`` extra (``pip install 'torchsteer[lightning]'``; without it, importing
this package raises :class:`torchsteer.extras.MissingExtraError` saying so). Each callback
wires one controller into Lightning's hooks, logs its signals with ``pl_module.log``, checkpoints
its state, and reduces across ranks.
"""

from torchsteer.extras import require

require("lightning.pytorch", "torchsteer.callbacks")

from torchsteer.callbacks.dro_reweighting import DROReweighting  # noqa: E402
from torchsteer.callbacks.kl_control import KLControl  # noqa: E402
from torchsteer.callbacks.radius_limit import RadiusLimit  # noqa: E402

__all__ = ["DROReweighting", "KLControl", "RadiusLimit"]

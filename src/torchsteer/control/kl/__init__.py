"""KL control for RLHF-style fine-tuning: the controllers, SAFE, and the KL estimators.

- :mod:`.base`: :class:`KLController`, the interface every controller shares, and the
  validation of hyperparameters and statistics.
- :mod:`.controllers`: fixed, adaptive (Ziegler et al., 2019) and PID Lagrangian
  (Stooke et al., 2020) controllers.
- :mod:`.safe`: SAFE (Maity, 2026), entropy-gated and phase-aware.
- :mod:`.estimators`: the k1 / k2 / k3 estimators of KL(pi || pi_ref), the exact KL, the
  double soft-min critic value.
- :mod:`.statistics`: :class:`KLStatistics`, a step's statistics averaged over accumulated
  batches and ranks (one all-reduce), for any training loop.

Every name is importable from ``torchsteer.control.kl`` directly.
"""

from torchsteer.control.kl.base import KLController, as_statistic, finite_hparam
from torchsteer.control.kl.controllers import (
    AdaptiveKLController,
    FixedKLController,
    PIDKLController,
)
from torchsteer.control.kl.estimators import double_softmin, kl_estimate, kl_exact, masked_mean
from torchsteer.control.kl.safe import SAFEController
from torchsteer.control.kl.statistics import KLStatistics

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KLController",
    "KLStatistics",
    "PIDKLController",
    "SAFEController",
    "as_statistic",
    "double_softmin",
    "finite_hparam",
    "kl_estimate",
    "kl_exact",
    "masked_mean",
]

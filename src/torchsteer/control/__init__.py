"""Controllers as plain objects, usable in any training loop. Never imports Lightning.

- :mod:`.radius`: the softmax step-radius limiter ("ghosts of softmax").
- :mod:`.kl`: KL control (fixed, adaptive, PID, SAFE) and the KL estimators.
- :mod:`.dro`: KL-regularized DRO instance reweighting.
"""

from torchsteer.control.dro import DROWeighting, kl_dro_value, kl_dro_weights
from torchsteer.control.kl import (
    AdaptiveKLController,
    FixedKLController,
    KLController,
    KLStatistics,
    PIDKLController,
    SAFEController,
    double_softmin,
    kl_estimate,
    kl_exact,
)
from torchsteer.control.radius import (
    RadiusLimiter,
    logit_derivative,
    logit_spread,
    normalized_step,
)

__all__ = [
    "AdaptiveKLController",
    "DROWeighting",
    "FixedKLController",
    "KLController",
    "KLStatistics",
    "PIDKLController",
    "RadiusLimiter",
    "SAFEController",
    "double_softmin",
    "kl_dro_value",
    "kl_dro_weights",
    "kl_estimate",
    "kl_exact",
    "logit_derivative",
    "logit_spread",
    "normalized_step",
]

"""KL-regularized RL and preference objectives (framework-free: torch only).

- :mod:`.target`: the KL-regularized optimum pi_ref exp(r / beta) / Z and its value.
- :mod:`.preference`: f-DPO (DPO under reverse KL, JS, alpha and forward-KL constraints).
- :mod:`.penalties`: per-token reverse-KL / forward-KL / JS penalties whose value and gradient
  are the named divergence, on policy or reference (DPH-RL rehearsal) samples.
- :mod:`.reference`: a SALSA weight-soup reference (averaged state dicts).
- :mod:`.weights`: PACED Beta-kernel weights, APO's difficulty-adaptive KL (a KL controller) and
  its length-aware advantage (STCR).

Which divergence each gradient follows is declared in :data:`PENALTIES` (and, for the k1 / k2 /
k3 estimators, in :data:`torchsteer.control.kl.estimators.ESTIMATORS`).
"""

from torchsteer.objectives.penalties import PENALTIES, divergence_penalty, rehearsal_prompts
from torchsteer.objectives.preference import DIVERGENCES, f_dpo_logits, f_dpo_loss
from torchsteer.objectives.reference import soup_reference
from torchsteer.objectives.target import kl_regularized_target, kl_regularized_value
from torchsteer.objectives.weights import (
    DifficultyAdaptiveKL,
    PACEDWeights,
    apo_kl_weight,
    pass_rates,
    stcr_advantages,
)

__all__ = [
    "DIVERGENCES",
    "PENALTIES",
    "DifficultyAdaptiveKL",
    "PACEDWeights",
    "apo_kl_weight",
    "divergence_penalty",
    "f_dpo_logits",
    "f_dpo_loss",
    "kl_regularized_target",
    "kl_regularized_value",
    "pass_rates",
    "rehearsal_prompts",
    "soup_reference",
    "stcr_advantages",
]

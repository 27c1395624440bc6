"""Hugging Face Transformers adapters: ``TrainerCallback``s and ``SteeringTrainer``.

- :class:`RadiusLimitCallback`, :class:`KLControlCallback`, :class:`DROReweightingCallback`
  (:mod:`.callbacks`): the controllers of :mod:`torchsteer.control` in a ``Trainer``, their
  state in its checkpoints (:mod:`.base`).
- :class:`SteeringTrainer` (:mod:`.trainer`): logs the callbacks' signals through the
  Trainer's ``log``, the DRO-weighted ``compute_loss``, and Sven / RegularizedNewton through
  a closure; :func:`per_sample_losses`, :func:`dro_compute_loss` for a ``Trainer`` of your own.
- M-FAC needs nothing: ``Trainer(optimizers=(MFAC(model.parameters(), ...), scheduler))``.

Needs ``pip install torchsteer[hf]``.
"""

from torchsteer.extras import require

require("transformers", "torchsteer.integrations.transformers")

from torchsteer.integrations.transformers.base import SteeringCallback  # noqa: E402
from torchsteer.integrations.transformers.callbacks import (  # noqa: E402
    DROReweightingCallback,
    KLControlCallback,
    RadiusLimitCallback,
    model_logits,
)
from torchsteer.integrations.transformers.trainer import (  # noqa: E402
    SteeringTrainer,
    dro_compute_loss,
    per_sample_losses,
)

__all__ = [
    "DROReweightingCallback",
    "KLControlCallback",
    "RadiusLimitCallback",
    "SteeringCallback",
    "SteeringTrainer",
    "dro_compute_loss",
    "model_logits",
    "per_sample_losses",
]

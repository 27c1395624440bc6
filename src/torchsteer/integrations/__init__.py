"""Adapters for other training frameworks: the only package that imports ``transformers`` / ``trl``.

- :mod:`torchsteer.integrations.transformers`: ``transformers.TrainerCallback`` adapters over
  the framework-free controllers of :mod:`torchsteer.control` (radius limiter, KL control,
  DRO reweighting) and :class:`SteeringTrainer`, the ``Trainer`` subclass that logs their
  signals, computes per-sample losses and runs the closure optimizers (Sven,
  RegularizedNewton).
- :mod:`torchsteer.integrations.trl`: :class:`KLControlledGRPOTrainer`, TRL's GRPO trainer
  with its KL coefficient ``beta`` set by a KL controller after every step;
  :class:`FDivergenceGKDTrainer`, TRL's GKD trainer with a :mod:`torchsteer.divergence` loss.

Needs the ``hf`` extra (``pip install torchsteer[hf]``); importing this package alone imports
neither library.
"""

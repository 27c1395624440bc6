"""Adapters for other training frameworks: the only package that imports ``transformers`` / ``trl``.

- :mod:`torchsteer.integrations.transformers`: ``transformers.TrainerCallback`` adapters over
  the framework-free controllers of :mod:`torchsteer.control` (radius limiter, KL control,
  DRO reweighting) and :class:`SteeringTrainer`, the ``Trainer`` subclass that logs their
  signals, computes per-sample losses and runs the closure optimizers (Sven,
  RegularizedNewton).

Needs the ``hf`` extra (``pip install torchsteer[hf]``); importing this package alone imports
neither library.
"""

"""The Lightning Trainer the tests build: quiet, on CPU, nothing written unless asked.

``trainer(**kw)`` is ``lightning.pytorch.Trainer`` with no logger, progress bar, model summary
or checkpointing; any keyword overrides a default. ``ddp_trainer(**kw)`` adds
``strategy="ddp", devices=2`` (gloo on CPU). Import it only in tests that need Lightning.
"""

from __future__ import annotations

import lightning.pytorch as pl

__all__ = ["ddp_trainer", "trainer"]

QUIET = {
    "accelerator": "cpu",
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
}


def trainer(**kw) -> pl.Trainer:
    """A quiet CPU ``Trainer``; ``kw`` overrides the defaults in :data:`QUIET`."""
    return pl.Trainer(**{**QUIET, **kw})


def ddp_trainer(**kw) -> pl.Trainer:
    """:func:`trainer` with ``strategy="ddp"`` on 2 CPU processes."""
    return trainer(**{"strategy": "ddp", "devices": 2, **kw})

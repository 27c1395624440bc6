"""Lightning callback for KL-DRO instance reweighting (:class:`DROWeighting`).

The weighting itself is applied by the user's ``training_step``: the module holds the
:class:`DROWeighting` and calls it on the per-sample losses,

.. code-block:: python

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = ...
            self.dro = DROWeighting(temperature=1.0, mode="streaming")

        def training_step(self, batch, batch_idx):
            x, y = batch
            losses = F.cross_entropy(self.net(x), y, reduction="none")  # shape (B,)
            return self.dro(losses)  # weighted mean, weights detached

    trainer = L.Trainer(callbacks=[DROReweighting(model.dro, temperature_schedule=...)])

The callback wires the rest: it sets the temperature from a schedule before each batch,
logs the weighting's signals (``dro/ess_fraction``, ``dro/max_weight``,
``dro/weight_entropy``, ...) after it, and saves / restores the weighting's state (step,
streaming normalizer, class weights, running class losses) in the checkpoint. The weighting
moves in ``training_step``, before the optimizer step: if the run fails between the two (an
exception before the step, a crash in a callback), ``on_exception`` puts the weighting back
to its state at the start of that optimizer step (its first micro-batch), so the checkpoint
``OnExceptionCheckpoint`` writes (Lightning runs checkpoint callbacks last) holds a weighting
that matches the parameters, and the resumed run does not count the failed batch twice.
Under DDP the weighting reduces its normalizers across ranks itself
(:mod:`torchsteer.distributed`), so the signals are global.

References:
    Sow, Lin, Wang, Liang, "Doubly Robust Instance-Reweighted Adversarial Training",
    ICLR 2024 (arXiv 2308.00311).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from torchsteer.control.dro import DROWeighting, check_reweighting_args

__all__ = ["DROReweighting"]


class DROReweighting(pl.Callback):
    """Schedule, log and checkpoint a :class:`DROWeighting` held by the LightningModule.

    Args:
        weighting: the :class:`DROWeighting` that ``training_step`` calls.
        temperature_schedule: ``schedule(global_step) -> r`` (> 0), applied before every
            training batch; ``None`` keeps the weighting's temperature.
        log_prefix: prefix of the logged signal names. It also names the callback's state in a
            checkpoint, so that one Trainer can hold several ``DROReweighting``s (one per
            weighting, each with its own prefix); with the default prefix the key is the class
            name, as in checkpoints written before.
    """

    def __init__(
        self,
        weighting: DROWeighting,
        temperature_schedule: Callable[[int], float] | None = None,
        log_prefix: str = "dro/",
    ):
        check_reweighting_args(weighting, temperature_schedule)
        self.weighting = weighting
        self.temperature_schedule = temperature_schedule
        self.log_prefix = log_prefix
        self._snapshot: tuple[int, dict[str, Any]] | None = None  # (global_step, state)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._snapshot = None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # the state at the start of this optimizer step (kept over its micro-batches)
        if self._snapshot is None or self._snapshot[0] != trainer.global_step:
            self._snapshot = (trainer.global_step, copy.deepcopy(self.weighting.state_dict()))
        if self.temperature_schedule is not None:
            self.weighting.temperature = float(self.temperature_schedule(trainer.global_step))

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        for name, value in self.weighting.signals().items():
            # the signals are already global (reduced by the weighting): no sync_dist
            pl_module.log(self.log_prefix + name, value, on_step=True, on_epoch=False)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # the optimizer step of this snapshot never ran: the weighting goes back with it
        if self._snapshot is not None and self._snapshot[0] == trainer.global_step:
            self.weighting.load_state_dict(self._snapshot[1])
        self._snapshot = None

    @property
    @override
    def state_key(self) -> str:
        if self.log_prefix == "dro/":
            return type(self).__qualname__
        return self._generate_state_key(log_prefix=self.log_prefix)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"weighting": self.weighting.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "weighting" in state_dict:
            self.weighting.load_state_dict(state_dict["weighting"])

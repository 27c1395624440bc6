"""Lightning callback that runs a KL controller once per optimizer step.

``training_step`` returns a dict with the step's statistics (``loss`` plus, by default,
``kl``, ``entropy``, ``reward``, and optionally ``n_steps``); the callback averages them over
the batches of one optimizer step (gradient accumulation) and over ranks
(:class:`~torchsteer.control.kl.KLStatistics`, usable without Lightning), updates the
controller, writes ``controller.coef`` to ``pl_module.<coef_attr>`` for the next step, and
logs every signal of the controller under ``kl_control/<name>``.

Example::

    class Policy(L.LightningModule):
        def __init__(self, controller):
            super().__init__()
            self.kl_controller = controller   # same object as the callback's
            self.kl_coef = controller.coef

        def training_step(self, batch, batch_idx):
            ...
            pen = kl_estimate(logp, logp_ref, mask, kind="k2")  # gradient: reverse KL
            loss = pg_loss + self.kl_coef * pen           # or self.kl_controller.penalty(pen)
            kl = kl_estimate(logp.detach(), logp_ref, mask, kind="k3")  # unbiased value
            return {"loss": loss, "kl": kl, "entropy": ent, "reward": r.mean()}

    ctl = PIDKLController(target=0.3)
    trainer = L.Trainer(callbacks=[KLControl(ctl)])

References:
    Stooke, Achiam, Abbeel, ICML 2020; Ziegler et al., arXiv 1909.08593 (2019);
    Maity, arXiv 2602.04651 (2026).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from torchsteer import distributed
from torchsteer.control.kl import KLController, KLStatistics, as_statistic

_STATISTICS_KEYS = ("sums", "batches", "n_steps")  # what KLStatistics.state_dict writes
__all__ = ["KLControl"]

_NAMES = ("kl", "entropy", "reward")
_SLOTS = ("output", *_NAMES, "n_steps")  # what a batch's check can fail on


def _sample_count(value: Any) -> int:
    """The batch's ``n_steps`` entry: a positive whole number (or a one-element tensor)."""
    n = value.detach().item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    if isinstance(n, bool) or not isinstance(n, numbers.Real) or not math.isfinite(n):
        raise ValueError(f"Invalid n_steps: {value!r} (expected a positive integer)")
    if n != int(n) or n < 1:
        raise ValueError(f"Invalid n_steps: {value!r} (expected a positive integer)")
    return int(n)


class KLControl(pl.Callback):
    """Update a KL controller from ``training_step`` outputs once per optimizer step.

    Args:
        controller: a :class:`~torchsteer.control.kl.KLController`.
        kl_key, entropy_key, reward_key: keys of the statistics in the ``training_step``
            output dict; the controller's required ones must be present.
        coef_attr: attribute of the LightningModule that receives ``controller.coef``. It also
            names the callback: with another value than ``"kl_coef"`` the signals are logged
            under ``kl_control/<coef_attr>/<name>`` and the checkpoint state under a key of its
            own, so one Trainer can hold several ``KLControl``s (one per penalty).
        n_steps_key: optional key with the samples of the batch (default: 1 per batch); the
            value passed to the controller is its sum over accumulated batches and ranks.
        log: log the controller's signals with ``pl_module.log``.
    """

    def __init__(
        self,
        controller: KLController,
        kl_key: str = "kl",
        entropy_key: str = "entropy",
        reward_key: str = "reward",
        coef_attr: str = "kl_coef",
        n_steps_key: str = "n_steps",
        log: bool = True,
    ):
        if not isinstance(controller, KLController):
            raise ValueError(f"Invalid controller: {controller!r} (not a KLController)")
        for name, key in (
            ("kl_key", kl_key),
            ("entropy_key", entropy_key),
            ("reward_key", reward_key),
            ("coef_attr", coef_attr),
        ):
            if not isinstance(key, str) or not key:
                raise ValueError(f"Invalid {name}: {key!r}")
        self.controller = controller
        self.keys = {"kl": kl_key, "entropy": entropy_key, "reward": reward_key}
        self.coef_attr = coef_attr
        self.n_steps_key = n_steps_key
        self.log = log
        self.statistics = KLStatistics()  # the batches of the current optimizer step
        self._last_step = 0
        self.updates = 0

    def _read_checked(self, outputs):
        """``(stats, n, failed, error)``: the batch's validated statistics (floats) and sample
        count; ``failed`` names what was wrong (one of ``_SLOTS``) and ``error`` is the error
        to raise (``KeyError`` for a missing required key, ``ValueError`` for a bad value),
        both ``None`` when the batch is valid."""
        slot = "output"
        try:
            if not isinstance(outputs, dict):
                raise ValueError(
                    f"Invalid training_step output: {type(outputs).__name__}; KLControl needs "
                    f"a dict with the keys {sorted(self.keys.values())}"
                )
            stats = {}
            for name, key in self.keys.items():
                slot = name
                required = name in self.controller.needs
                if key not in outputs:
                    if required:
                        raise KeyError(
                            f"KLControl: training_step output has no key {key!r} ({name})"
                        )
                    continue
                value = outputs[key]
                stats[name] = as_statistic(name, value, required=required, nonneg=name == "entropy")
            slot = "n_steps"
            return stats, _sample_count(outputs.get(self.n_steps_key, 1)), None, None
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            return {}, 0, slot, error

    def _agree(self, stats, failed, error, device) -> None:
        """Under DDP: one all-reduce (a sum) of a small float64 flag vector -- which check
        failed on how many ranks, and on how many ranks each statistic is present -- before
        any other collective of the batch. A bad batch on any rank then raises on every rank
        (the failing rank its own error, the others a ``ValueError`` naming the statistic),
        with nothing changed, instead of leaving the others in a reduction it never joins."""
        flags = [float(failed == slot) for slot in _SLOTS] + [float(n in stats) for n in _NAMES]
        total = distributed.all_reduce_sum(torch.tensor(flags, dtype=torch.float64, device=device))
        counts = total.tolist()
        bad = [slot for slot, c in zip(_SLOTS, counts) if c > 0]
        if bad:
            if error is not None:
                raise error
            raise ValueError(
                f"Invalid {', '.join(bad)} in the training_step output on another rank: every "
                "rank raises, the controller's state is unchanged"
            )
        world = distributed.world_size()
        partial = [n for n, c in zip(_NAMES, counts[len(_SLOTS) :]) if 0 < c < world]
        if partial:
            raise ValueError(
                f"Invalid training_step outputs: {partial} given on some ranks only (give each "
                "statistic on every rank or on none)"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        setattr(pl_module, self.coef_attr, self.controller.coef)
        self._last_step = trainer.global_step

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats, n, failed, error = self._read_checked(outputs)
        if distributed.is_distributed():
            self._agree(stats, failed, error, pl_module.device)  # every rank, every batch
        elif error is not None:
            raise error  # before touching any state
        self.statistics.add(n_steps=n, **stats)
        if trainer.global_step == self._last_step:
            return  # still accumulating gradients: no optimizer step yet
        self._last_step = trainer.global_step
        self._step(pl_module)

    def _step(self, pl_module) -> None:
        stats, n_steps = self.statistics.reduce(pl_module.device)
        self.controller.update(**stats, n_steps=n_steps)
        self.updates += 1
        setattr(pl_module, self.coef_attr, self.controller.coef)
        if self.log:
            for name, value in self.controller.signals().items():
                pl_module.log(self._log_prefix + name, float(value), on_step=True, on_epoch=False)

    @property
    def _log_prefix(self) -> str:
        attr = self.coef_attr
        return "kl_control/" if attr == "kl_coef" else f"kl_control/{attr}/"

    @property
    @override
    def state_key(self) -> str:
        if self.coef_attr == "kl_coef":  # the key of checkpoints written before
            return type(self).__qualname__
        return self._generate_state_key(coef_attr=self.coef_attr)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "controller": self.controller.state_dict(),
            "updates": self.updates,
            **self.statistics.state_dict(),  # keys sums, batches, n_steps
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the controller, the update count and a half-accumulated step. Atomic:
        everything is checked first; a bad state raises ``ValueError`` and changes nothing."""
        if not isinstance(state_dict, dict):
            raise ValueError(f"Invalid KLControl state: {type(state_dict).__name__}")
        statistics = KLStatistics()
        # validates (raises before anything changes); the statistics' own keys only
        statistics.load_state_dict({k: v for k, v in state_dict.items() if k in _STATISTICS_KEYS})
        updates = state_dict.get("updates", self.updates)
        if isinstance(updates, torch.Tensor) and updates.numel() == 1:
            updates = updates.item()
        if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
            raise ValueError(f"Invalid KLControl state updates: {updates!r}")
        self.controller.load_state_dict(state_dict.get("controller", {}))  # atomic itself
        self.updates, self.statistics = updates, statistics

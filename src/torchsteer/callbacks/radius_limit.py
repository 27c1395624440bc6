"""Lightning callback for the softmax step-radius limiter (:class:`RadiusLimiter`).

Every optimizer step is measured by its normalized step ``r = max_x Delta_a(x; p) / pi``
(``p`` the optimizer's actual update, ``Delta_a`` the spread of the directional logit
derivatives) and rescaled by ``min(1, r_max / r)``:

.. code-block:: python

    trainer = L.Trainer(callbacks=[RadiusLimit(r_max=1.0)])
    trainer.fit(model, loader)

Hooks: the parameters are snapshot in ``on_before_optimizer_step`` (after backward, before
the update; with LBFGS, which evaluates its closure several times in one step, at the first
call) and the update is measured and corrected in ``on_train_batch_end``. The logits
are ``logits_fn(pl_module, batch)``; by default ``pl_module(batch[0])`` for a tuple/list
batch, else ``pl_module(batch)``. Logged: ``radius/r``, ``radius/rho_a``, ``radius/scale``,
``radius/fraction_limited``. Checkpointed: the limiter's counters and last signals. Under DDP
the spread is reduced with a maximum across ranks (:mod:`torchsteer.distributed`). With
gradient accumulation the last micro-batch is measured. Cost: one JVP and one copy of the
parameters per step; with the default logits and a ``training_step`` that calls
``self(x)`` on a chain of Linear/LayerNorm/elementwise modules, only the JVP's tangent, from
that forward's activations (see :class:`RadiusLimiter`, ``reuse_forward``; its forward hooks
on the module are removed in ``teardown``).

Several optimizers (manual optimization): each one's ``on_before_optimizer_step`` adds its
parameters to the batch's snapshot, and ``on_train_batch_end`` measures and rescales their
combined update. A failure after a step and before ``on_train_batch_end`` (an exception in
``training_step`` after ``opt.step()``, in another callback's ``on_train_batch_end``) restores
the snapshot in ``on_exception``, which runs before ``OnExceptionCheckpoint`` saves (Lightning
orders checkpoint callbacks last): no unlimited step is written. ``direction="neg_grad"``
with ``Trainer(gradient_clip_val=...)`` raises in ``setup``: Lightning clips the gradients
after ``on_before_optimizer_step``, so the radius would be measured along the unclipped
gradient and the step limited twice (``direction="update"`` measures the update after
clipping). ``state_key`` carries the configuration, so several instances (say a limiter and
a monitor of the applied step with another ``log_prefix``) can share a Trainer.

References:
    P. Sao, "Ghosts of Softmax: Complex Singularities That Limit Safe Step Sizes in
    Cross-Entropy", arXiv:2603.13552 (2026).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from torchsteer.control.radius import RadiusLimiter

__all__ = ["RadiusLimit", "default_logits_fn"]


def _model_input(batch: Any) -> Any:
    return batch[0] if isinstance(batch, tuple | list) else batch


def default_logits_fn(module: torch.nn.Module, batch: Any) -> torch.Tensor:
    """``module(batch[0])`` for a tuple or list batch, else ``module(batch)``."""
    return module(_model_input(batch))


class RadiusLimit(pl.Callback):
    """Limit every step to ``r_max`` times the softmax radius (or only monitor it).

    Args:
        r_max: the allowed normalized step (``mode="rho_set"``: the target).
        mode: ``"limit"``, ``"rho_set"`` or ``"monitor"`` (a diagnostic: r is logged, the
            steps are the optimizer's).
        logits_fn: ``logits_fn(pl_module, batch) -> logits``.
        log_every_n_steps: log the signals every this many optimizer steps.
        log_prefix: prefix of the logged names.
        **limiter_kwargs: ``direction``, ``eval_mode``, ``temperature``, ``method``, ``fd_eps``,
            ``nonfinite`` of :class:`RadiusLimiter`.
    """

    def __init__(
        self,
        r_max: float = 1.0,
        mode: str = "limit",
        logits_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
        log_every_n_steps: int = 1,
        log_prefix: str = "radius/",
        **limiter_kwargs: Any,
    ):
        if not (isinstance(log_every_n_steps, int) and log_every_n_steps >= 1):
            raise ValueError(f"Invalid log_every_n_steps: {log_every_n_steps}")
        # validates the hyperparameters now; the real limiter is bound to the module in setup
        RadiusLimiter(torch.nn.Linear(1, 1), r_max=r_max, mode=mode, **limiter_kwargs)
        self.r_max, self.mode = r_max, mode
        # the default measures pl_module(batch[0]) as the limiter's own forward, so the
        # limiter can reuse the activations of the training step's self(x)
        self._default_logits = logits_fn is None
        self.logits_fn = logits_fn or default_logits_fn
        self.log_every_n_steps, self.log_prefix = log_every_n_steps, log_prefix
        self.limiter_kwargs = limiter_kwargs
        self.limiter: RadiusLimiter | None = None
        self._state: dict[str, Any] = {}
        self._batch: Any = None

    @property
    @override
    def state_key(self) -> str:
        config = {"r_max": self.r_max, "mode": self.mode, "log_prefix": self.log_prefix}
        config.update(sorted(self.limiter_kwargs.items()))
        if config == {"r_max": 1.0, "mode": "limit", "log_prefix": "radius/"}:
            return type(self).__qualname__  # the key of checkpoints written before
        return self._generate_state_key(**config)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        clip = getattr(trainer, "gradient_clip_val", None)
        if self.limiter_kwargs.get("direction") == "neg_grad" and clip:
            raise ValueError(
                f"Invalid direction: 'neg_grad' with Trainer(gradient_clip_val={clip}): "
                "Lightning clips the gradients after on_before_optimizer_step, where the "
                "limiter measures -lr g, so the step would be limited twice; use "
                "direction='update' (the actual update, after clipping) or no clipping"
            )
        logits_fn = None if self._default_logits else self.logits_fn
        self._remove_hooks()  # a limiter from an earlier fit or stage
        if self.limiter is not None:  # its counters go on (validate() or a second fit)
            self._state = self.limiter.state_dict()
        self.limiter = RadiusLimiter(
            pl_module, r_max=self.r_max, mode=self.mode, logits_fn=logits_fn,
            **self.limiter_kwargs,
        )  # fmt: skip
        self.limiter.load_state_dict(self._state)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()  # the limiter (and its counters) stays for state_dict

    def _remove_hooks(self) -> None:
        if self.limiter is not None:
            self.limiter.remove_hooks()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.limiter is not None:
            self.limiter.abort()  # a step not yet limited: theta_old back (or the lrs)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch
        if self.limiter is not None and self.limiter.pending:
            self.limiter.cancel()  # a snapshot the last batch never consumed (no step ran)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer
        if self.limiter.pending_for(optimizer):
            # a later closure call of the same step (LBFGS evaluates it several times inside
            # step(), and Lightning runs this hook after each): theta_old is the first call's
            return
        # another optimizer of this batch (manual optimization) joins the pending step; under
        # a GradScaler (fp16 AMP) an Inf gradient is the scaler's to skip, not an error
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        self.limiter.before_step(optimizer, self._inputs(self._batch), check_gradients=not scaled)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.limiter is None or not self.limiter.pending:
            return
        signals = self.limiter.after_step(self._inputs(batch))
        self._batch = None
        if (self.limiter.steps - 1) % self.log_every_n_steps == 0:
            for key in ("r", "rho_a", "scale", "fraction_limited"):
                pl_module.log(self.log_prefix + key, float(signals[key]), on_step=True,
                              on_epoch=False, batch_size=1)  # fmt: skip

    def _inputs(self, batch: Any) -> Any:
        """What the limiter hands to its logits: ``batch[0]`` (tuple/list) by default."""
        return _model_input(batch) if self._default_logits else batch

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.limiter.state_dict() if self.limiter is not None else dict(self._state)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._state = dict(state_dict)
        if self.limiter is not None:
            self.limiter.load_state_dict(self._state)

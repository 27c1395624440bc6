"""``transformers.TrainerCallback`` adapters over :mod:`torchsteer.control`.

Each callback is a thin adapter: the math lives in the framework-free object
(:class:`~torchsteer.control.RadiusLimiter`, a :class:`~torchsteer.control.kl.KLController`
with :class:`~torchsteer.control.kl.KLStatistics`, :class:`~torchsteer.control.DROWeighting`),
as in the Lightning callbacks of :mod:`torchsteer.callbacks`; a step taken by the Trainer with a
callback equals the same step written by hand with the object. State and logging:
:mod:`torchsteer.integrations.transformers.base`.

References:
    P. Sao, arXiv:2603.13552 (2026) (radius); Stooke, Achiam, Abbeel, ICML 2020 and Ziegler
    et al., arXiv 1909.08593 (KL control); Sow et al., ICLR 2024, arXiv 2308.00311 (DRO).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from torchsteer.control.dro import DROWeighting, check_reweighting_args
from torchsteer.control.kl import KLController, KLStatistics, as_statistic
from torchsteer.control.radius import RadiusLimiter
from torchsteer.integrations.transformers.base import SteeringCallback

__all__ = ["DROReweightingCallback", "KLControlCallback", "RadiusLimitCallback", "model_logits"]

_NOT_MODEL_INPUTS = ("labels", "num_items_in_batch")


def model_logits(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """``model(**inputs).logits`` without ``labels``, attention in PyTorch's math backend.

    The fused CPU / flash kernels of ``scaled_dot_product_attention`` have no forward-mode
    derivative; the math backend computes the same attention with operations that do, so
    the limiter's JVP runs through any ``attn_implementation="sdpa"`` model.
    """
    kwargs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
    with sdpa_kernel([SDPBackend.MATH]):
        out = model(**kwargs)
    return out.logits if hasattr(out, "logits") else out


def _inner_optimizer(optimizer):
    """The ``torch.optim.Optimizer`` under accelerate's ``AcceleratedOptimizer``."""
    return getattr(optimizer, "optimizer", optimizer)


class RadiusLimitCallback(SteeringCallback):
    """The softmax step-radius limiter around the Trainer's ``optimizer.step()``.

    .. math::
        p = \\theta_{new} - \\theta_{old}, \\quad r = \\max_x \\Delta_a(x; p) / \\pi, \\quad
        \\theta \\leftarrow \\theta_{old} + \\min(1, r_{max} / r)\\, p

    ``on_pre_optimizer_step`` runs :meth:`RadiusLimiter.before_step` (the snapshot of
    theta_old; after gradient clipping) and ``on_optimizer_step`` runs
    :meth:`RadiusLimiter.after_step` (measure ``p``, rescale), both before the learning-rate
    scheduler steps. These two hooks are enough: they bracket exactly the one
    ``optimizer.step()`` of every optimizer step (no optimizer wrapper needed). What the hooks
    do not receive is the batch; the callback records the keyword inputs of the model's
    latest train-mode forward with a forward pre-hook (the last micro-batch under gradient
    accumulation, as the Lightning callback). Tokens of a sequence model are samples of the
    maximum. Logged: ``radius/r``, ``radius/rho_a``, ``radius/scale``,
    ``radius/fraction_limited``; checkpointed: the limiter's counters and last signals.

    Args:
        r_max: the allowed normalized step (``mode="rho_set"``: the target).
        mode: ``"limit"``, ``"rho_set"`` or ``"monitor"``.
        logits_fn: ``logits_fn(model, inputs) -> logits``; default :func:`model_logits`.
        log_prefix: prefix of the logged names (and of the checkpoint key).
        **limiter_kwargs: ``direction``, ``eval_mode``, ``temperature``, ``method``,
            ``fd_eps``, ``nonfinite`` of :class:`RadiusLimiter`.
    """

    def __init__(
        self,
        r_max: float = 1.0,
        mode: str = "limit",
        logits_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
        log_prefix: str = "radius/",
        **limiter_kwargs: Any,
    ):
        super().__init__(log_prefix)
        if logits_fn is not None and not callable(logits_fn):
            raise ValueError(f"Invalid logits_fn: {logits_fn!r}")
        # validates every hyperparameter now; the limiter is bound to the model in on_train_begin
        RadiusLimiter(torch.nn.Linear(1, 1), r_max=r_max, mode=mode, **limiter_kwargs)
        self.r_max, self.mode = r_max, mode
        self.logits_fn = logits_fn or model_logits
        self.limiter_kwargs = limiter_kwargs
        self.limiter: RadiusLimiter | None = None
        self._state: dict[str, Any] = {}
        self._inputs: dict[str, Any] | None = None
        self._hook = None
        self._measuring = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.limiter is not None:  # a second train(): the counters go on
            self._state = self.limiter.state_dict()
        if self.limiter is None or self.limiter.model is not model:
            self.limiter = RadiusLimiter(
                model, r_max=self.r_max, mode=self.mode, logits_fn=self.logits_fn,
                **self.limiter_kwargs,
            )  # fmt: skip
        self.limiter.load_state_dict(self._state)
        self.restore(state)
        self._remove_hook()
        self._hook = model.register_forward_pre_hook(self._record_inputs, with_kwargs=True)

    def _record_inputs(self, module, args, kwargs) -> None:
        if module.training and not self._measuring:  # a training forward, not the limiter's
            self._inputs = dict(kwargs)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._inputs is None:
            raise RuntimeError(
                "RadiusLimitCallback: no training forward with keyword inputs was seen before "
                "the optimizer step; the model must be called as model(**inputs)"
            )
        self.limiter.before_step(_inner_optimizer(optimizer), self._inputs)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._measuring = True
        try:
            signals = self.limiter.after_step(self._inputs)
        finally:
            self._measuring, self._inputs = False, None
        self._set_logs({k: signals[k] for k in ("r", "rho_a", "scale", "fraction_limited")})

    def on_step_end(self, args, state, control, **kwargs):
        self.store(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hook()

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def state_dict(self) -> dict[str, Any]:
        return self.limiter.state_dict() if self.limiter is not None else dict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = dict(state)
        if self.limiter is not None:
            self.limiter.load_state_dict(self._state)


class KLControlCallback(SteeringCallback):
    """Update a KL controller once per optimizer step from what ``compute_loss`` records.

    The Trainer subclass's ``compute_loss`` adds ``callback.penalty(kl)`` (``= coef * kl``)
    to its loss and calls ``callback.record(kl=..., entropy=..., reward=..., n_steps=B)``
    once per micro-batch; at ``on_step_end`` the callback averages the records of the step
    (:class:`KLStatistics`: over micro-batches, then over ranks), calls
    ``controller.update(**stats, n_steps=n)``, and the next step's ``coef`` is the new
    coefficient. Logged: every ``controller.signals()`` under ``kl_control/<name>``;
    checkpointed: the controller, the update count and a half-accumulated step.

    Args:
        controller: a :class:`~torchsteer.control.kl.KLController`.
        log_prefix: prefix of the logged names (and of the checkpoint key).
    """

    def __init__(self, controller: KLController, log_prefix: str = "kl_control/"):
        super().__init__(log_prefix)
        if not isinstance(controller, KLController):
            raise ValueError(f"Invalid controller: {controller!r} (not a KLController)")
        self.controller = controller
        self.statistics = KLStatistics()
        self.updates = 0

    @property
    def coef(self) -> float:
        """The KL coefficient of the current step."""
        return self.controller.coef

    def penalty(self, kl: torch.Tensor) -> torch.Tensor:
        """``coef * kl`` (differentiable in ``kl``)."""
        return self.controller.penalty(kl)

    def record(self, *, kl=None, entropy=None, reward=None, n_steps: int = 1) -> None:
        """Add one micro-batch's statistics (0-d tensors or floats; detached here).

        Raises:
            ValueError: a statistic the controller needs is missing, or one is not finite
                (or a negative entropy); nothing is recorded.
        """
        needs = self.controller.needs
        raw = {"kl": kl, "entropy": entropy, "reward": reward}
        stats = {
            name: as_statistic(name, value, required=name in needs, nonneg=name == "entropy")
            for name, value in raw.items()
        }
        self.statistics.add(n_steps=n_steps, **{k: v for k, v in stats.items() if v is not None})

    def on_train_begin(self, args, state, control, **kwargs):
        self.restore(state)

    def on_step_end(self, args, state, control, **kwargs):
        if self.statistics.batches == 0:
            raise RuntimeError(
                "KLControlCallback: no statistics this step; compute_loss must call "
                "callback.record(kl=...) for every micro-batch"
            )
        stats, n_steps = self.statistics.reduce()
        self.controller.update(**stats, n_steps=n_steps)
        self.updates += 1
        self._set_logs(self.controller.signals())
        self.store(state)

    def state_dict(self) -> dict[str, Any]:
        return {
            "controller": self.controller.state_dict(),
            "updates": self.updates,
            **self.statistics.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state.get("controller", {}))
        self.updates = state.get("updates", self.updates)
        self.statistics.load_state_dict(
            {k: v for k, v in state.items() if k in ("sums", "batches", "n_steps")}
        )


class DROReweightingCallback(SteeringCallback):
    """Schedule, log and checkpoint a :class:`DROWeighting` that ``compute_loss`` applies.

    The weighting is applied to per-sample losses in ``compute_loss``
    (:func:`~torchsteer.integrations.transformers.trainer.dro_compute_loss`, which
    :class:`~torchsteer.integrations.transformers.trainer.SteeringTrainer` calls by itself
    when this callback is registered): ``loss = mean_i w_i l_i``, ``w`` detached. The
    callback sets ``weighting.temperature = temperature_schedule(global_step)`` at each
    step's start, logs ``weighting.signals()`` (``dro/ess_fraction``, ``dro/max_weight``,
    ...) and checkpoints the weighting's state (step, streaming normalizer, class weights).

    Args:
        weighting: the :class:`DROWeighting`.
        temperature_schedule: ``schedule(global_step) -> r > 0``, or ``None``.
        log_prefix: prefix of the logged names (and of the checkpoint key).
    """

    def __init__(
        self,
        weighting: DROWeighting,
        temperature_schedule: Callable[[int], float] | None = None,
        log_prefix: str = "dro/",
    ):
        super().__init__(log_prefix)
        check_reweighting_args(weighting, temperature_schedule)
        self.weighting = weighting
        self.temperature_schedule = temperature_schedule

    def on_train_begin(self, args, state, control, **kwargs):
        self.restore(state)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.temperature_schedule is not None:
            self.weighting.temperature = float(self.temperature_schedule(state.global_step))

    def on_step_end(self, args, state, control, **kwargs):
        self._set_logs(self.weighting.signals())
        self.store(state)

    def state_dict(self) -> dict[str, Any]:
        return self.weighting.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weighting.load_state_dict(state)

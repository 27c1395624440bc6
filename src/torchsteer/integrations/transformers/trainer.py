"""``SteeringTrainer``: a ``transformers.Trainer`` that logs the torchsteer callbacks' signals,
applies DRO weights to per-sample losses, and runs the closure optimizers.

Per-sample losses (:func:`per_sample_losses`). For a causal LM (logits ``(B, T, V)``), with
the labels shifted by one and ``m_{bt} = [y_{b,t+1} != -100]``:

.. math::
    l_b = \\frac{\\sum_t m_{bt}\\, \\mathrm{CE}(z_{bt}, y_{b,t+1})}{\\max(1, \\sum_t m_{bt})},

the mean token loss of sequence ``b``; for a classifier (logits ``(B, C)``) the cross-entropy
of each sample. With equal-length unpadded sequences ``mean_b l_b`` is the model's own loss.

DRO (:func:`dro_compute_loss`): ``loss = (1/B) sum_b w_b l_b`` with the detached weights of
:class:`~torchsteer.control.DROWeighting`.

Closure optimizers (Sven, RegularizedNewton). Their ``step`` needs a closure that the
Trainer's loop (``optimizer.step()``) does not pass. ``training_step`` builds the closure of the
batch and a step pre-hook on the optimizer (``Optimizer.register_step_pre_hook``) hands it to
the Trainer's own ``optimizer.step()`` call, so the step still happens between
``on_pre_optimizer_step`` and ``on_optimizer_step`` (a :class:`RadiusLimitCallback` measures it
like any other step). What the closure returns follows the optimizer's contract: Sven the
per-sample losses (it zeroes the gradients first); RegularizedNewton the mean loss
(``"hessian"``, ``"dense"``), the per-sample losses (``"empirical_fisher"``) or
``(mean loss, logits)`` (``"gauss_newton"``), without ``backward``. ``training_step``
returns the batch's mean loss from one extra forward without graph (for the Trainer's loss
log). Gradient accumulation and gradient clipping do not apply to these optimizers
(``gradient_accumulation_steps`` must be 1; set ``max_grad_norm=0``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from torchsteer.control.dro import DROWeighting
from torchsteer.integrations.transformers.base import SteeringCallback
from torchsteer.integrations.transformers.callbacks import DROReweightingCallback
from torchsteer.optim import RegularizedNewton, Sven

__all__ = ["SteeringTrainer", "dro_compute_loss", "per_sample_losses"]

PerSampleLoss = Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]
CLOSURE_OPTIMIZERS = (Sven, RegularizedNewton)


def per_sample_losses(
    model: torch.nn.Module, inputs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(l, logits)``: the per-sample losses ``l`` (shape ``(B,)``, with graph) and the logits.

    ``inputs["labels"]`` are the targets (``-100`` ignored); the other entries go to the model.
    """
    if "labels" not in inputs:
        raise ValueError("Invalid inputs: per-sample losses need inputs['labels']")
    labels = inputs["labels"]
    out = model(**{k: v for k, v in inputs.items() if k != "labels"})
    logits = out.logits if hasattr(out, "logits") else out
    if logits.dim() == 2:
        return F.cross_entropy(logits, labels, reduction="none"), logits
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"Invalid logits / labels: shapes {tuple(logits.shape)} / {tuple(labels.shape)}"
        )
    z, y = logits[:, :-1].float(), labels[:, 1:]
    ce = F.cross_entropy(z.transpose(1, 2), y, reduction="none", ignore_index=-100)
    mask = (y != -100).to(ce.dtype)
    return (ce * mask).sum(1) / mask.sum(1).clamp(min=1), logits


def dro_compute_loss(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    weighting: DROWeighting,
    loss_fn: PerSampleLoss = per_sample_losses,
    return_outputs: bool = False,
):
    """The DRO-weighted mean of the per-sample losses, for a Trainer's ``compute_loss``.

    ``weighting(l) = (1/B) sum_b w_b l_b`` (weights detached; the weighting's state is
    updated). Returns the loss, or ``(loss, logits)`` with ``return_outputs``.
    """
    losses, logits = loss_fn(model, inputs)
    loss = weighting(losses)
    return (loss, logits) if return_outputs else loss


class NoLearningRate:
    """The scheduler of an optimizer that has no learning rate: ``step`` does nothing."""

    def step(self, *args, **kwargs) -> None:
        pass

    def get_last_lr(self) -> list[float]:
        return [math.nan]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class SteeringTrainer(Trainer):
    """A ``Trainer`` for the torchsteer callbacks and optimizers.

    - ``log``: merges every torchsteer callback's pending signals into the Trainer's logs.
    - ``compute_loss``: with a :class:`DROReweightingCallback` registered, the DRO-weighted
      per-sample loss (:func:`dro_compute_loss`); else the Trainer's own.
    - ``training_step``: with a Sven or RegularizedNewton optimizer, builds the closure the
      Trainer's ``optimizer.step()`` then runs (see the module docstring).

    Args:
        *args, **kwargs: those of ``transformers.Trainer``.
        per_sample_loss: ``loss_fn(model, inputs) -> (losses (B,), logits)``; default
            :func:`per_sample_losses`.
    """

    def __init__(self, *args, per_sample_loss: PerSampleLoss | None = None, **kwargs):
        if per_sample_loss is not None and not callable(per_sample_loss):
            raise ValueError(f"Invalid per_sample_loss: {per_sample_loss!r}")
        super().__init__(*args, **kwargs)
        self.per_sample_loss = per_sample_loss or per_sample_losses
        self._closure = None
        self._hooked: set[int] = set()

    def steering_callbacks(self) -> list[SteeringCallback]:
        return [c for c in self.callback_handler.callbacks if isinstance(c, SteeringCallback)]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for callback in self.steering_callbacks():
            logs.update(callback.pop_logs())
        super().log(logs, start_time)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        dro = [c for c in self.steering_callbacks() if isinstance(c, DROReweightingCallback)]
        if not dro:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if len(dro) > 1:
            raise ValueError(
                "Invalid callbacks: SteeringTrainer applies one DROReweightingCallback"
            )
        # a mean over this micro-batch: the Trainer divides it by the accumulation steps
        self.loss_is_scaled_for_ga = False
        return dro_compute_loss(
            model, inputs, dro[0].weighting, self.per_sample_loss, return_outputs
        )

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The Trainer's scheduler; for an optimizer without ``lr`` (RegularizedNewton, whose
        step size is its own ``gamma``) a no-op one that logs the learning rate as NaN."""
        optimizer = optimizer if optimizer is not None else self.optimizer
        groups = getattr(optimizer, "param_groups", [])
        if self.lr_scheduler is None and groups and "lr" not in groups[0]:
            self.lr_scheduler = NoLearningRate()
        return super().create_scheduler(num_training_steps, optimizer)

    def _closure_optimizer(self) -> Sven | RegularizedNewton | None:
        opt = getattr(self.optimizer, "optimizer", self.optimizer)
        return opt if isinstance(opt, CLOSURE_OPTIMIZERS) else None

    def training_step(self, model, inputs, num_items_in_batch=None):
        opt = self._closure_optimizer()
        if opt is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                f"Invalid gradient_accumulation_steps: {self.args.gradient_accumulation_steps} "
                f"({type(opt).__name__} takes one closure per step; use 1)"
            )
        model.train()
        inputs = self._prepare_inputs(inputs)
        if id(opt) not in self._hooked:
            opt.register_step_pre_hook(self._pass_closure)
            self._hooked.add(id(opt))
        self._closure = self._make_closure(opt, model, inputs)
        with torch.no_grad():
            losses, _ = self.per_sample_loss(model, inputs)
        return losses.mean().detach()

    def _make_closure(self, opt, model, inputs) -> Callable[[], Any]:
        loss_fn = self.per_sample_loss
        if isinstance(opt, Sven):

            def closure():
                opt.zero_grad()
                return loss_fn(model, inputs)[0]

            return closure
        curvature = opt.param_groups[0]["curvature"]

        def closure():
            losses, logits = loss_fn(model, inputs)
            if curvature == "empirical_fisher":
                return losses
            return (losses.mean(), logits) if curvature == "gauss_newton" else losses.mean()

        return closure

    def _pass_closure(self, optimizer, args, kwargs):
        """Step pre-hook: give the Trainer's ``optimizer.step()`` this batch's closure."""
        given = args[1] if len(args) > 1 else kwargs.get("closure")
        if given is not None:
            return None  # the caller passed its own closure
        if self._closure is None:
            raise RuntimeError(f"{type(optimizer).__name__}.step() without a closure")
        closure, self._closure = self._closure, None
        # accelerate calls step(closure) with closure=None positionally
        return args[:1], {**kwargs, "closure": closure}

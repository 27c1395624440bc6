"""TRL: a KL controller drives the KL coefficient ``beta`` of TRL's GRPO trainer.

GRPO's loss is ``policy term + beta * KL`` per token, with the k3 estimate
``KL = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1``, which the trainer records in its
metrics (``kl``) for every micro-batch. :class:`KLControlledGRPOTrainer` closes the loop once
per optimizer step ``t``:

.. math::
    \\overline{\\mathrm{KL}}_t = \\operatorname{mean}(\\text{KL recorded in step } t), \\qquad
    \\beta_{t+1} = \\texttt{controller.update}(kl=\\overline{\\mathrm{KL}}_t, n_{steps}=N_t)

(with ``entropy`` and ``reward`` from the same metrics when the controller needs them;
``N_t`` = the step's samples over all processes). The first step uses ``controller.coef``. A
coefficient of 0 is passed to GRPO as ``MIN_BETA`` (1e-12): GRPO computes the KL only while
``beta != 0``, and the controller needs it to move. The controller's state is saved in the
checkpoints (``trainer_state.json``, as the callbacks of
:mod:`torchsteer.integrations.transformers`) and its signals are logged under
``kl_control/``. PPO is not wired: TRL 1.16 keeps its adaptive KL controller inside the PPO
trainer's loop, which has no per-step hook to replace it.

GKD: :func:`gkd_f_divergence_loss` is :func:`torchsteer.divergence.f_divergence` in the form
of TRL's ``GKDTrainer.generalized_jsd_loss`` (shifted logits, labels ``-100`` masked, the sum
over the unmasked tokens divided by ``num_items_in_batch`` or by their count), and
:class:`FDivergenceGKDTrainer` is TRL's GKD trainer with that loss, any generator of
:mod:`torchsteer.divergence` (``"generalized_js"`` with GKD's ``beta`` by default, the
divergence GKD computes itself). With q the student and p the teacher at temperature T:

.. math::
    \\mathcal{L} = \\frac{1}{N} \\sum_{(b,t):\\, y_{bt} \\ne -100} D_f(p_{bt} \\,\\|\\, q_{bt}),

with N = ``num_items_in_batch``, or the count of those tokens.

References:
    Shao et al., "DeepSeekMath", arXiv 2402.03300 (2024) (GRPO); Stooke, Achiam, Abbeel,
    ICML 2020 (PID Lagrangian); Agarwal et al., "On-Policy Distillation of Language Models:
    Learning from Self-Generated Mistakes", arXiv 2306.13649 (2023) (GKD).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from torchsteer.control.kl import KLController
from torchsteer.divergence import f_divergence, generator
from torchsteer.extras import require
from torchsteer.integrations.transformers.base import SteeringCallback

require("trl", "torchsteer.integrations.trl")
from trl import GRPOTrainer  # noqa: E402
from trl.experimental.gkd import GKDTrainer  # noqa: E402

__all__ = [
    "MIN_BETA",
    "FDivergenceGKDTrainer",
    "KLControlledGRPOTrainer",
    "gkd_f_divergence_loss",
]

MIN_BETA = 1e-12
_STATISTICS = {"kl": "kl", "entropy": "entropy", "reward": "reward"}


class _BetaControl(SteeringCallback):
    """The per-step hook of :class:`KLControlledGRPOTrainer` (state, logs, the update)."""

    def __init__(self, trainer: KLControlledGRPOTrainer, controller: KLController, log_prefix):
        super().__init__(log_prefix)
        self.trainer, self.controller = trainer, controller
        self.seen = dict.fromkeys(_STATISTICS, 0)
        self.updates = 0

    def new_values(self, name: str) -> list[float]:
        values = self.trainer._metrics["train"].get(_STATISTICS[name], [])
        new, self.seen[name] = values[self.seen[name] :], len(values)
        return [float(v) for v in new if not math.isnan(float(v))]

    def on_train_begin(self, args, state, control, **kwargs):
        self.restore(state)
        self.trainer.beta = max(self.controller.coef, MIN_BETA)

    def on_step_end(self, args, state, control, **kwargs):
        stats = {}
        for name in _STATISTICS:
            values = self.new_values(name)
            if values:
                stats[name] = sum(values) / len(values)
        if "kl" not in stats:
            raise RuntimeError("KLControlledGRPOTrainer: GRPO recorded no KL in this step")
        n = args.per_device_train_batch_size * args.gradient_accumulation_steps
        n *= self.trainer.accelerator.num_processes
        wanted = {k: v for k, v in stats.items() if k == "kl" or k in self.controller.needs}
        self.controller.update(**wanted, n_steps=n)
        self.updates += 1
        self.trainer.beta = max(self.controller.coef, MIN_BETA)
        self._set_logs(self.controller.signals())
        self.store(state)

    def after_log(self) -> None:
        """GRPO empties its metrics when it logs: count from their new length."""
        for name in _STATISTICS:
            self.seen[name] = len(self.trainer._metrics["train"].get(_STATISTICS[name], []))

    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state.get("controller", {}))
        self.updates = state.get("updates", self.updates)


class KLControlledGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose ``beta`` is set by a KL controller after every step.

    Args:
        *args, **kwargs: those of ``trl.GRPOTrainer``; ``GRPOConfig(beta=...)`` must be > 0 so
            that GRPO builds its reference model (its value is replaced by the controller's).
        kl_controller: a :class:`~torchsteer.control.kl.KLController`.
        log_prefix: prefix of the logged signals (and of the checkpoint key).
    """

    def __init__(self, *args, kl_controller: KLController, log_prefix="kl_control/", **kwargs):
        if not isinstance(kl_controller, KLController):
            raise ValueError(f"Invalid kl_controller: {kl_controller!r} (not a KLController)")
        super().__init__(*args, **kwargs)
        if self.beta == 0.0:
            raise ValueError(
                "Invalid beta: 0.0 (GRPO then builds no reference model and computes no KL; "
                "set GRPOConfig(beta=...) > 0, the controller replaces it)"
            )
        self.kl_controller = kl_controller
        self.beta_control = _BetaControl(self, kl_controller, log_prefix)
        self.add_callback(self.beta_control)
        self.beta = max(kl_controller.coef, MIN_BETA)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            logs.update(self.beta_control.pop_logs())
        super().log(logs, start_time)
        self.beta_control.after_log()


def gkd_f_divergence_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    kind: str = "generalized_js",
    temperature: float = 1.0,
    num_items_in_batch: torch.Tensor | int | None = None,
    **kind_args,
) -> torch.Tensor:
    """``sum over unmasked tokens of D_f(p || q) / N`` (see the module docstring).

    Args:
        student_logits, teacher_logits: ``(B, T, V)``, already shifted (position t predicts
            token t + 1); the teacher's without graph.
        labels: ``(B, T)``, ``-100`` where nothing is scored; ``None`` scores every token
            and divides by ``B`` (TRL's ``batchmean`` without labels).
        kind, **kind_args: the generator of :func:`~torchsteer.divergence.f_divergence`.
        temperature: T, both logits divided by it.
        num_items_in_batch: the Trainer's token count across accumulated batches (``N``).
    """
    mask = None if labels is None else labels != -100
    total = f_divergence(
        student_logits, teacher_logits, kind, temperature=temperature, mask=mask,
        reduction="sum", **kind_args,
    )  # fmt: skip
    if num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, device=total.device)
    if mask is None:
        return total / max(student_logits.shape[0], 1)
    return total / mask.sum().clamp_min(1)


class FDivergenceGKDTrainer(GKDTrainer):
    """TRL's ``GKDTrainer`` whose distillation loss is :func:`gkd_f_divergence_loss`.

    Args:
        *args, **kwargs: those of ``trl.experimental.gkd.GKDTrainer``.
        divergence: the generator's kind (default ``"generalized_js"``, which then takes
            GKD's ``beta``; another kind ignores ``beta``).
        divergence_args: the generator's arguments (e.g. ``{"alpha": 0.5}``).
    """

    def __init__(self, *args, divergence: str = "generalized_js", divergence_args=None, **kw):
        generator(divergence, **self._kind_args(divergence, divergence_args, 0.5))  # validates
        self.divergence, self.divergence_args = divergence, dict(divergence_args or {})
        super().__init__(*args, **kw)

    @staticmethod
    def _kind_args(kind, args, beta) -> dict[str, Any]:
        args = dict(args or {})
        if kind == "generalized_js":
            args.setdefault("beta", beta)
        return args

    def generalized_jsd_loss(
        self,
        student_logits,
        teacher_logits,
        labels=None,
        beta=0.5,
        temperature=1.0,
        reduction="batchmean",
        num_items_in_batch=None,
    ):
        """GKD's loss hook (its signature): :func:`gkd_f_divergence_loss` of the chosen kind."""
        if reduction != "batchmean":
            raise ValueError(f"Invalid reduction: {reduction!r} (only 'batchmean')")
        return gkd_f_divergence_loss(
            student_logits, teacher_logits, labels, kind=self.divergence,
            temperature=temperature, num_items_in_batch=num_items_in_batch,
            **self._kind_args(self.divergence, self.divergence_args, beta),
        )  # fmt: skip

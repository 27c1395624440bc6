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

References:
    Shao et al., "DeepSeekMath", arXiv 2402.03300 (2024) (GRPO); Stooke, Achiam, Abbeel,
    ICML 2020 (PID Lagrangian).
"""

from __future__ import annotations

import math
from typing import Any

from trl import GRPOTrainer

from torchsteer.control.kl import KLController
from torchsteer.integrations.transformers.base import SteeringCallback

__all__ = ["MIN_BETA", "KLControlledGRPOTrainer"]

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

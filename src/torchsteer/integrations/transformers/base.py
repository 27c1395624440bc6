"""What every torchsteer ``TrainerCallback`` shares: checkpointed state and pending log values.

State. A callback's state (its controller's ``state_dict``, made JSON-native: tensors become
lists) is written into ``TrainerState.stateful_callbacks[checkpoint_key]`` at the end of every
optimizer step (``on_step_end``, before the Trainer saves a checkpoint), so it lands in the
checkpoint's ``trainer_state.json`` beside the Trainer's own state. ``trainer.train(
resume_from_checkpoint=...)`` reads that file back before ``on_train_begin``, where the
callback restores its controller from it. (The Trainer's ``ExportableState`` route is not used:
it rebuilds the callback from constructor arguments, which would cut the link between the
callback and the controller object the user's ``compute_loss`` holds.)

Logging. After each step a callback keeps its signals in ``pending_logs``;
:meth:`SteeringTrainer.log <torchsteer.integrations.transformers.trainer.SteeringTrainer.log>`
merges them into the Trainer's next ``log`` call (so they reach ``state.log_history`` and
every reporter: TensorBoard, W&B, ...). With a plain ``Trainer`` they stay readable as
``callback.pending_logs``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

__all__ = ["SteeringCallback", "to_json_state"]


def to_json_state(value: Any) -> Any:
    """``value`` with tensors as (nested) lists and tuples as lists: what ``json`` can write.

    Non-finite floats stay floats (``trainer_state.json`` is written with ``allow_nan``).
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.dim() == 0 else value.tolist()
    if isinstance(value, dict):
        return {str(k): to_json_state(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_state(v) for v in value]
    return value


class SteeringCallback(TrainerCallback):
    """Base of the torchsteer callbacks: state in the Trainer's checkpoints, pending logs.

    Subclasses implement ``state_dict()`` / ``load_state_dict(state)`` and set
    ``pending_logs`` after each optimizer step.

    Args:
        log_prefix: prefix of the logged names; it also names the state in a checkpoint
            (``"torchsteer/" + log_prefix``), so one Trainer can hold two callbacks of a kind
            with different prefixes.
    """

    def __init__(self, log_prefix: str):
        if not isinstance(log_prefix, str) or not log_prefix:
            raise ValueError(f"Invalid log_prefix: {log_prefix!r}")
        self.log_prefix = log_prefix
        self.pending_logs: dict[str, float] = {}

    @property
    def checkpoint_key(self) -> str:
        """The key of this callback's state in ``TrainerState.stateful_callbacks``."""
        return "torchsteer/" + self.log_prefix

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def restore(self, trainer_state) -> None:
        """Load the state a resumed checkpoint holds (nothing happens in a fresh run)."""
        saved = (trainer_state.stateful_callbacks or {}).get(self.checkpoint_key)
        if saved is not None:
            self.load_state_dict(saved)

    def store(self, trainer_state) -> None:
        """Write the current state where the next checkpoint's ``trainer_state.json`` reads it."""
        if trainer_state.stateful_callbacks is None:
            trainer_state.stateful_callbacks = {}
        trainer_state.stateful_callbacks[self.checkpoint_key] = to_json_state(self.state_dict())

    def pop_logs(self) -> dict[str, float]:
        """The pending signals (prefixed names), cleared: each step's values are logged once."""
        logs, self.pending_logs = self.pending_logs, {}
        return logs

    def _set_logs(self, signals: dict[str, float]) -> None:
        self.pending_logs = {self.log_prefix + k: float(v) for k, v in signals.items()}

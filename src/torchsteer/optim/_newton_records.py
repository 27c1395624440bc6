"""The records of :class:`~torchsteer.optim.RegularizedNewton`'s search: where one step's
tries start (:class:`SearchStart`) and what they did (:class:`TryRecord`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["SearchStart", "TryRecord"]


@dataclasses.dataclass
class TryRecord:
    """What the tries of one step did; :meth:`as_record` is the public per-step record."""

    tries: int = 0
    accepted: bool = False
    cg_iterations: int = 0
    evals: int = 0
    reasons: list[str] = dataclasses.field(default_factory=list)
    gamma: float | None = None
    M: float | None = None
    lam: float = float("nan")
    margin: bool | None = None  # set on acceptance only
    new_loss: float = float("nan")

    def as_record(self, reused: bool, loss: float, grad_norm: float) -> dict[str, Any]:
        """The dict of ``state["record"]``, keys in their documented order."""
        rec: dict[str, Any] = dict(
            tries=self.tries,
            accepted=self.accepted,
            cg_iterations=self.cg_iterations,
            reasons=self.reasons,
            gamma=self.gamma,
            M=self.M,
        )
        if self.margin is not None:
            rec["margin"] = self.margin
        rec.update(new_loss=self.new_loss, reused=reused)
        rec["lambda"] = self.lam
        rec.update(loss=loss, grad_norm=grad_norm)
        return rec


@dataclasses.dataclass(frozen=True)
class SearchStart:
    """Where the tries of one step start and how a trial is evaluated.

    ``loss`` = f(x0), ``grad_norm`` = |g(x0)|, ``scale`` = gamma (gns rule) or M (sqrt rule)
    of the first try; ``keep``: keep the accepted trial's evaluation for the next step;
    ``work``: the dtype the trials are computed in; ``inv``: ``1 / c`` of the solves
    (``_newton_inputs``); ``lr``: the multiplier of the accepted step.
    """

    closure: Callable[[], Any]
    params: list[torch.Tensor]
    loss: float
    grad_norm: float
    scale: float
    keep: bool
    work: torch.dtype
    inv: float = 1.0  # 1 / c, the loss-scale normalization of the solves
    lr: float = 1.0

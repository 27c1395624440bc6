"""The statistics of one optimizer step, averaged over accumulated batches and over ranks.

Each batch b = 1..B of a step on rank r = 1..R adds its statistics s_{r,b} (KL, entropy,
reward: whichever it has) and its sample count n_{r,b}. :meth:`KLStatistics.reduce` returns

.. math::
    \\bar s = \\frac1R \\sum_r \\frac1B \\sum_b s_{r,b}, \\qquad
    n = \\sum_r \\sum_b n_{r,b},

with one all-reduce (a sum) of one float64 tensor ``[mean_b s_{r,b} (names sorted), sum_b
n_{r,b}]``, the exact values :class:`~torchsteer.callbacks.kl_control.KLControl` gives its
controller. Statistics are not validated here: ``controller.update`` checks the reduced
values, so a NaN on one rank makes every rank raise together (none is left waiting in a
collective).

Example (a hand-written DDP loop, no Lightning)::

    acc = KLStatistics()
    for step in range(steps):
        for micro in range(accumulate):
            ...
            acc.add(kl=kl.detach(), entropy=ent, reward=r.mean(), n_steps=len(batch))
        opt.step(); opt.zero_grad()
        stats, n_steps = acc.reduce()          # the same on every rank
        controller.update(**stats, n_steps=n_steps)
"""

from __future__ import annotations

from typing import Any

import torch

from torchsteer import distributed
from torchsteer.control.kl.base import state_number

__all__ = ["KLStatistics"]


class KLStatistics:
    """Accumulate per-batch KL statistics; :meth:`reduce` averages them over batches and ranks."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.batches = 0
        self.n_steps = 0

    def add(self, n_steps: int = 1, **stats) -> None:
        """Add one batch: ``stats`` name -> float or one-element tensor; ``n_steps`` its samples.

        Raises:
            ValueError: ``n_steps`` not a positive integer, or a statistic not a scalar
                (nothing is added).
        """
        if isinstance(n_steps, torch.Tensor):
            n_steps = n_steps.item()
        if isinstance(n_steps, bool) or n_steps != int(n_steps) or int(n_steps) < 1:
            raise ValueError(f"Invalid n_steps: {n_steps}")
        values = {}
        for name, value in stats.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"Invalid {name}: a tensor of shape {tuple(value.shape)}")
                value = value.detach().item()
            try:
                values[name] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"Invalid {name}: {value!r} (a number)") from None
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.batches += 1
        self.n_steps += int(n_steps)

    def reduce(self, device: torch.device | str = "cpu") -> tuple[dict[str, float], int]:
        """The step's statistics averaged over batches and ranks, and the total sample count.

        A collective: every rank calls it once per step, with the same statistic names. The
        accumulator is emptied for the next step.
        """
        if self.batches == 0:
            raise ValueError("Invalid reduce: no batch was added since the last reduce")
        names = sorted(self.sums)
        local = torch.tensor(
            [self.sums[k] / self.batches for k in names] + [self.n_steps],
            dtype=torch.float64,
            device=device,
        )
        total = distributed.all_reduce_sum(local)
        mean = total / distributed.world_size() if distributed.is_distributed() else total
        stats = dict(zip(names, mean[:-1].tolist()))
        n_steps = round(total[-1].item())
        self.sums, self.batches, self.n_steps = {}, 0, 0
        return stats, n_steps

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "batches": self.batches, "n_steps": self.n_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a half-accumulated step. Atomic: ``sums`` (name -> finite number),
        ``batches`` and ``n_steps`` (integers >= 0) are checked first, and no other key is
        accepted; a bad value or an unknown key raises ``ValueError`` naming it and leaves the
        accumulator as it was."""
        if not isinstance(state, dict):
            raise ValueError(f"Invalid KLStatistics state: {type(state).__name__}, not a dict")
        unknown = sorted(set(state) - {"sums", "batches", "n_steps"})
        if unknown:  # e.g. another object's state: refused, not read as an empty one
            raise ValueError(f"Invalid KLStatistics state: unknown keys {unknown}")
        sums = state.get("sums", {})
        if not isinstance(sums, dict) or not all(isinstance(k, str) for k in sums):
            raise ValueError(f"Invalid KLStatistics state sums: {sums!r}")
        sums = {k: state_number(f"sums[{k!r}]", v) for k, v in sums.items()}
        counts = []
        for key in ("batches", "n_steps"):
            value = state.get(key, 0)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Invalid KLStatistics state {key}: {value!r}")
            counts.append(value)
        if bool(sums) and counts[0] == 0:
            raise ValueError("Invalid KLStatistics state: sums of statistics but 0 batches")
        self.sums, (self.batches, self.n_steps) = sums, counts

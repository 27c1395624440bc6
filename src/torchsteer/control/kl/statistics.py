"""The statistics of one optimizer step, averaged over accumulated batches and over ranks.

Each batch b = 1..B of a step on rank r = 1..R adds its statistics s_{r,b} (KL, entropy,
reward: whichever it has) and its sample count n_{r,b}. :meth:`KLStatistics.reduce` returns

.. math::
    \\bar s = \\frac1R \\sum_r \\frac1B \\sum_b s_{r,b}, \\qquad
    n = \\sum_r \\sum_b n_{r,b},

with one all-reduce (a sum) of one float64 tensor, the exact values
:class:`~torchsteer.callbacks.kl_control.KLControl` gives its controller. Statistics are not
validated here: ``controller.update`` checks the reduced values, so a NaN on one rank makes
every rank raise together (none is left waiting in a collective).

Under a process group the tensor has a fixed size, whatever the names, so that ranks that
disagree still meet in the same collective: ``CAPACITY`` slots for ``mean_b s_{r,b}`` (names
sorted, zeros after them), then ``sum_b n_{r,b}``, the name count ``c_r`` and ``c_r^2``, a
fingerprint ``h_r`` of the names (CRC-32 of the sorted names, mod ``2^20``) and ``h_r^2``, and
an error flag ``e_r``. By Cauchy-Schwarz ``(sum_r c_r)^2 <= R sum_r c_r^2`` with equality iff
every ``c_r`` is the same (likewise ``h_r``; all sums are integers below ``2^53``, compared
exactly), so every rank learns from the one all-reduce whether all passed the same names, and
if not every rank raises ``ValueError`` and keeps its accumulator (the attack's "a statistic
missing on rank 1" waited at the gloo timeout before). ``e_r = 1`` for a rank with nothing
to reduce (no batch, more than ``CAPACITY`` names): it raises its own error, the others a
``ValueError`` naming it.

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

import zlib
from typing import Any

import torch

from torchsteer import distributed
from torchsteer.control.kl.base import state_number

__all__ = ["CAPACITY", "KLStatistics"]

CAPACITY = 64  # statistic names one reduce carries under a process group (a fixed size)


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

        A collective: every rank calls it once per step, with the same statistic names (at
        most ``CAPACITY`` under a process group). The accumulator is emptied for the next step.

        Raises:
            ValueError: no batch since the last reduce, or (under a process group) the ranks
                passed different names, or one rank could not reduce: every rank raises
                together and keeps its accumulator.
        """
        names = sorted(self.sums)
        error = None
        if self.batches == 0:
            error = ValueError("Invalid reduce: no batch was added since the last reduce")
        if not distributed.is_distributed():
            if error is not None:
                raise error
            local = [self.sums[k] / self.batches for k in names] + [self.n_steps]
            total = torch.tensor(local, dtype=torch.float64, device=device)
            stats, n_steps = dict(zip(names, total[:-1].tolist())), round(total[-1].item())
        else:
            stats, n_steps = self._reduce_ranks(names, error, device)
        self.sums, self.batches, self.n_steps = {}, 0, 0
        return stats, n_steps

    def _reduce_ranks(self, names: list[str], error, device) -> tuple[dict[str, float], int]:
        """The fixed-size all-reduce of the module docstring; raises before anything changes."""
        count = len(names)
        if error is None and count > CAPACITY:
            error = ValueError(f"Invalid statistics: {count} names, at most {CAPACITY} under DDP")
        fingerprint = zlib.crc32("\0".join(names).encode()) % (1 << 20)
        values = [0.0] * CAPACITY
        if error is None:
            values[:count] = [self.sums[k] / self.batches for k in names]
        tail = [self.n_steps, count, count**2, fingerprint, fingerprint**2, error is not None]
        local = torch.tensor(values + tail, dtype=torch.float64, device=device)
        total = distributed.all_reduce_sum(local)
        world = distributed.world_size()
        mean = total / world
        read = total[CAPACITY:].tolist()  # one transfer: the count, the checks
        if error is not None:
            raise error
        if read[5]:
            raise ValueError(
                f"Invalid statistics on {round(read[5])} other rank(s): nothing to reduce there "
                "(no batch, or too many names), so every rank raises (nothing changed)"
            )
        c, c2, h, h2 = (round(v) for v in read[1:5])
        if c * c != world * c2 or h * h != world * h2:
            raise ValueError(
                f"Invalid statistics: the ranks passed different statistic names (this rank: "
                f"{names}); every rank raises and keeps its accumulator"
            )
        return dict(zip(names, mean[:count].tolist())), round(read[0])

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

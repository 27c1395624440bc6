"""KLControl under DDP (2 gloo ranks) with a bad batch on one rank only.

Every kind of bad ``training_step`` output on rank 1 alone (a missing required key, NaN, a
non-scalar tensor, a bad ``n_steps``, not a dict, an optional statistic given on one rank
only) must raise on **both** ranks at that batch, leave both controllers as they were, and
leave the ranks in step: the good batch after each bad one is reduced together. The oracle is
one process fed the rank mean of the good batches (KLControl's documented reduction). Without
the agreement, rank 1 raised alone and rank 0 paired its reduction with rank 1's next step
(wrong statistics), then waited at the gloo timeout.

The callback is driven through its hooks with a stand-in trainer (the hooks read only
``global_step`` and the module's ``device`` / ``log``), so no Lightning process launch is
needed.
"""

from __future__ import annotations

import copy

import pytest
import torch

from torchsteer.callbacks.kl_control import KLControl
from torchsteer.control.kl import PIDKLController, SAFEController

from .harness import run_ranks


class _Trainer:
    global_step = 0


class _Module:
    device = torch.device("cpu")

    def log(self, *args, **kwargs):
        pass


def _good(step, rank):
    return {"kl": 0.1 * step + rank, "entropy": 1.0 + rank, "reward": 0.5 * rank}


def _spoil(case, out):
    if case == "missing":
        del out["reward"]  # SAFE needs it
    elif case == "nan":
        out["kl"] = float("nan")
    elif case == "shape":
        out["kl"] = torch.ones(3)
    elif case == "n_steps":
        out["n_steps"] = 0
    elif case == "not_a_dict":
        return torch.tensor(1.0)
    elif case == "partial":
        del out["entropy"]  # optional for this PID: given on rank 0 only
    return out


CASES = ("missing", "nan", "shape", "n_steps", "not_a_dict", "partial")


def _make():
    return SAFEController(base_threshold=0.005, penalty_scale=50.0), PIDKLController(target=0.3)


def _worker(rank, world_size):
    safe, pid = _make()
    callbacks = [KLControl(safe), KLControl(pid, coef_attr="pid_coef")]
    trainer, module = _Trainer(), _Module()
    for cb in callbacks:
        cb.on_train_start(trainer, module)
    out, step = {}, 0
    for case in CASES:
        cb = callbacks[1] if case == "partial" else callbacks[0]
        step += 1
        trainer.global_step = step
        before = copy.deepcopy((cb.controller.state_dict(), cb.statistics.state_dict()))
        batch = _good(step, rank)
        if rank == 1:
            batch = _spoil(case, batch)
        try:
            cb.on_train_batch_end(trainer, module, batch, None, step)
            raised = None
        except (KeyError, ValueError) as error:
            raised = (type(error).__name__, str(error))
        unchanged = before == (cb.controller.state_dict(), cb.statistics.state_dict())
        out[case] = (raised, unchanged, cb.updates)
        step += 1  # a good batch on both ranks: they must still reduce together
        trainer.global_step = step
        for c in callbacks:
            c.on_train_batch_end(trainer, module, _good(step, rank), None, step)
    out["safe"], out["pid"] = safe.state_dict(), pid.state_dict()
    return out


@pytest.mark.distributed
def test_a_bad_batch_on_one_rank_raises_on_every_rank_and_keeps_them_in_step():
    ranks = run_ranks(_worker, 2)
    safe, pid = _make()
    for k, case in enumerate(CASES):
        for r in (0, 1):
            raised, unchanged, updates = ranks[r][case]
            assert raised is not None, (case, r)  # every rank raises
            assert unchanged, (case, r)
            assert updates == k  # one update per good step before, none for the bad batch
            name, message = raised
            if case == "partial":
                assert "some ranks only" in message and "entropy" in message
            elif r == 0:  # the good rank names what failed on the other
                assert name == "ValueError" and "another rank" in message
            else:  # the bad rank raises its own error
                assert name == ("KeyError" if case == "missing" else "ValueError")
            if case in ("missing", "nan", "shape"):
                assert ("reward" if case == "missing" else "kl") in message
        step = 2 * (k + 1)  # the good batch after case k: the rank mean, one sample each
        mean = {n: sum(_good(step, r)[n] for r in (0, 1)) / 2 for n in ("kl", "entropy", "reward")}
        safe.update(**mean, n_steps=2)
        pid.update(**mean, n_steps=2)
    for r in (0, 1):
        for got, want in (
            (ranks[r]["safe"], safe.state_dict()),
            (ranks[r]["pid"], pid.state_dict()),
        ):
            assert got.keys() == want.keys()
            for key, value in want.items():
                assert got[key] == (
                    value if isinstance(value, str) else pytest.approx(value, rel=1e-12)
                )

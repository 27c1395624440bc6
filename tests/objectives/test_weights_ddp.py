"""PACED and APO statistics on 2 gloo ranks equal one process on the whole batch."""

from __future__ import annotations

import pytest
import torch

from torchsteer.objectives import DifficultyAdaptiveKL, PACEDWeights

from ..distributed.harness import run_ranks

pytestmark = pytest.mark.distributed

RATES = torch.tensor([0.125, 0.5, 0.875, 0.0, 0.25, 0.75, 0.375], dtype=torch.float64)
ADV = torch.tensor([1.0, -1.0, 2.0, 0.5, 1.0, 1.0, -0.5], dtype=torch.float64)
SPLIT = (3, 4)  # ragged: rank 0 holds 3 prompts, rank 1 holds 4


def _ranks(rank, world_size):
    lo = sum(SPLIT[:rank])
    mine = slice(lo, lo + SPLIT[rank])
    paced = PACEDWeights(1.0, 2.0)
    w = paced.update(RATES[mine])
    ctl = DifficultyAdaptiveKL(0.1)
    ctl.weights(RATES[mine], ADV[mine])
    # bad input on rank 1 only: every rank raises, and the state stays as it was
    bad = RATES[mine].clone()
    if rank == 1:
        bad[0] = 2.0
    before = paced.state_dict()
    try:
        paced.update(bad)
        raised = False
    except ValueError:
        raised = True
    return {
        "w": w,
        "signals": paced.signals(),
        "dads_mean": ctl.mean_weight,
        "raised": raised,
        "kept": paced.state_dict() == before,
    }


def test_paced_and_apo_statistics_are_global():
    one = PACEDWeights(1.0, 2.0)
    w_all = one.update(RATES)
    ctl = DifficultyAdaptiveKL(0.1)
    d_all = ctl.weights(RATES, ADV)
    out = run_ranks(_ranks, 2)
    torch.testing.assert_close(torch.cat([o["w"] for o in out]), w_all, rtol=1e-14, atol=0)
    for o in out:
        assert o["signals"] == pytest.approx(one.signals(), rel=1e-14)
        assert o["dads_mean"] == pytest.approx(d_all.mean().item(), rel=1e-14)
        assert o["raised"] and o["kept"]

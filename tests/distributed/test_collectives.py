"""``torchsteer.distributed``: exact no-ops in one process, the right reductions on 2 ranks."""

import pytest
import torch

from torchsteer import distributed as tdist

from .harness import run_ranks


def test_noops_without_a_process_group():
    x = torch.tensor([1.0, -2.0, 3.0])
    assert not tdist.is_distributed() and tdist.world_size() == 1 and tdist.rank() == 0
    for f in (
        tdist.all_reduce_sum,
        tdist.all_reduce_mean,
        tdist.all_reduce_max,
        tdist.all_gather_cat,
        tdist.broadcast,
    ):
        assert f(x) is x
    assert tdist.all_gather(x)[0] is x


def _collectives(rank, world_size):
    x = torch.tensor([float(rank + 1), -float(rank)])
    ragged = torch.full((rank + 1, 2), float(rank))  # rank 0: 1 row, rank 1: 2 rows
    b = torch.tensor([float(rank) * 10])
    return {
        "sum": tdist.all_reduce_sum(x),
        "mean": tdist.all_reduce_mean(x),
        "max": tdist.all_reduce_max(x),
        "gather": torch.stack(tdist.all_gather(x)),
        "cat": tdist.all_gather_cat(ragged),
        "bcast": tdist.broadcast(b, src=1),
        "x_unchanged": x,
        "rank": tdist.rank(),
        "world": tdist.world_size(),
    }


@pytest.mark.distributed
def test_collectives_on_two_gloo_ranks():
    res = run_ranks(_collectives, 2)
    for r, out in enumerate(res):
        assert out["rank"] == r and out["world"] == 2
        assert torch.equal(out["sum"], torch.tensor([3.0, -1.0]))
        assert torch.equal(out["mean"], torch.tensor([1.5, -0.5]))
        assert torch.equal(out["max"], torch.tensor([2.0, 0.0]))
        assert torch.equal(out["gather"], torch.tensor([[1.0, 0.0], [2.0, -1.0]]))
        assert torch.equal(out["cat"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
        assert torch.equal(out["bcast"], torch.tensor([10.0]))
        assert torch.equal(out["x_unchanged"], torch.tensor([float(r + 1), -float(r)]))

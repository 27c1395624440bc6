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


def test_column_bounds_cover_every_column_once():
    for P in (0, 1, 5, 7, 64):
        for R in (1, 2, 3, 5):
            b = tdist.column_bounds(P, R)
            widths = [b[s + 1] - b[s] for s in range(R)]
            assert b[0] == 0 and b[-1] == P and len(b) == R + 1
            assert max(widths) - min(widths) <= 1 and widths == sorted(widths, reverse=True)
    assert tdist.column_bounds(7, 3) == (0, 3, 5, 7)
    with pytest.raises(ValueError, match="Invalid column split"):
        tdist.column_bounds(4, 0)


def test_one_rank_shard_is_the_identity():
    x = torch.arange(6.0).reshape(3, 2)
    shard = tdist.Shard.create(3)
    assert shard == tdist.Shard((3,), 0) and shard.total == 3 and shard.offset == 0
    assert shard.gather(x) is x and shard.local(x) is x
    assert tdist.rows_to_columns(x, shard, (0, 2)) is x
    assert tdist.agree(True) and not tdist.agree(False)
    with pytest.raises(ValueError, match="Invalid bounds"):
        tdist.rows_to_columns(x, shard, (0, 1))


def _layouts(rank, world_size):
    # rank 0 holds rows 0-1, rank 1 row 2 of the 3 x 5 matrix arange(15)
    full = torch.arange(15.0).reshape(3, 5)
    shard = tdist.Shard.create(2 - rank)
    mine = shard.local(full)
    bounds = tdist.column_bounds(5)
    cols = tdist.rows_to_columns(mine, shard, bounds)
    vec = torch.arange(5.0)[bounds[rank] : bounds[rank + 1]]
    sizes = [bounds[s + 1] - bounds[s] for s in range(world_size)]
    return {
        "shard": shard,
        "gathered": shard.gather(mine),
        "cols": cols,
        "vec": tdist.all_gather_cat(vec, sizes=sizes),
        "agree": (tdist.agree(True), tdist.agree(rank == 0)),
    }


@pytest.mark.distributed
def test_row_and_column_layouts_on_two_gloo_ranks():
    full = torch.arange(15.0).reshape(3, 5)
    for r, out in enumerate(run_ranks(_layouts, 2)):
        assert out["shard"] == tdist.Shard((2, 1), r)
        assert torch.equal(out["gathered"], full)
        lo, hi = (0, 3) if r == 0 else (3, 5)
        assert torch.equal(out["cols"], full[:, lo:hi])
        assert torch.equal(out["vec"], torch.arange(5.0))
        assert out["agree"] == (True, False)  # one rank's False is every rank's

"""KLStatistics: the mean over batches and ranks and the summed count, against closed forms."""

import pytest
import torch

from torchsteer.control.kl import KLStatistics, PIDKLController

# rank r, batch b: kl = 0.1 * (b + 1) + r, entropy = 1 + r * b, n = 2 + b (b = 0, 1, 2)
BATCHES = 3


def _rank_batches(rank):
    return [
        {"kl": 0.1 * (b + 1) + rank, "entropy": 1.0 + rank * b, "n_steps": 2 + b}
        for b in range(BATCHES)
    ]


def test_one_process_mean_over_batches_and_summed_count():
    acc = KLStatistics()
    for batch in _rank_batches(0):
        acc.add(**batch)
    kl = torch.tensor(0.4, dtype=torch.float64)
    acc.add(kl=kl, entropy=torch.ones(1), n_steps=torch.tensor(1))
    stats, n = acc.reduce()
    assert stats == pytest.approx({"kl": (0.1 + 0.2 + 0.3 + 0.4) / 4, "entropy": 1.0}, rel=1e-15)
    assert n == 2 + 3 + 4 + 1
    assert acc.state_dict() == {"sums": {}, "batches": 0, "n_steps": 0}  # emptied


def test_state_round_trip_resumes_a_step_half_way():
    a, b = KLStatistics(), KLStatistics()
    batches = _rank_batches(1)
    a.add(**batches[0])
    b.load_state_dict(a.state_dict())
    for batch in batches[1:]:
        a.add(**batch)
        b.add(**batch)
    assert a.reduce() == b.reduce()


def test_bad_input_raises_and_adds_nothing():
    acc = KLStatistics()
    acc.add(kl=0.5)
    before = acc.state_dict()
    for kwargs in ({"kl": 0.1, "n_steps": 0}, {"kl": 0.1, "n_steps": 1.5}, {"kl": torch.ones(2)}):
        with pytest.raises(ValueError, match="Invalid"):
            acc.add(**kwargs)
        assert acc.state_dict() == before
    with pytest.raises(ValueError, match="no batch"):
        KLStatistics().reduce()


def test_a_nan_reaches_the_controller_which_raises_and_keeps_state():
    acc, ctl = KLStatistics(), PIDKLController(target=0.1)
    acc.add(kl=float("nan"))
    before = ctl.state_dict()
    stats, n = acc.reduce()
    with pytest.raises(ValueError, match="kl"):
        ctl.update(**stats, n_steps=n)
    assert ctl.state_dict() == before


def _two_ranks(rank, world_size):
    acc = KLStatistics()
    for batch in _rank_batches(rank):
        acc.add(**batch)
    return acc.reduce()


@pytest.mark.distributed
def test_reduce_on_two_gloo_ranks_is_the_mean_over_the_union():
    from tests.distributed.harness import run_ranks

    results = run_ranks(_two_ranks, 2)
    union = _rank_batches(0) + _rank_batches(1)  # equal batches per rank: mean of rank means
    expected = {k: sum(b[k] for b in union) / len(union) for k in ("kl", "entropy")}
    for stats, n in results:
        assert stats == pytest.approx(expected, rel=1e-14)
        assert n == sum(b["n_steps"] for b in union)
    assert results[0] == results[1]

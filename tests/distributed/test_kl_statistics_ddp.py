"""KLStatistics.reduce under DDP (2 gloo ranks) when the ranks disagree (issue 18, the attack's
"a statistic missing on rank 1", which waited at the gloo timeout before).

Oracle: the accumulator's state before the failed reduce (every rank keeps it, bitwise), and
after it the good reduce's values equal the rank mean of each rank's batch mean, computed here
by hand.
"""

from __future__ import annotations

import pytest

from .harness import run_ranks


def _worker(rank, world, case):
    from torchsteer.control.kl import KLStatistics
    from torchsteer.control.kl.statistics import CAPACITY

    acc = KLStatistics()
    if case == "missing" and rank == 1:
        acc.add(kl=0.2, n_steps=3)
    elif case == "renamed" and rank == 1:
        acc.add(kl=0.2, entropie=1.0, n_steps=3)
    elif case == "too_many" and rank == 1:
        acc.add(n_steps=3, **{f"s{i}": 1.0 for i in range(CAPACITY + 1)})
    elif case == "empty" and rank == 1:
        pass
    else:
        acc.add(kl=0.2 + rank, entropy=1.0, n_steps=3)
    before = acc.state_dict()
    try:
        acc.reduce()
        error = None
    except ValueError as exc:
        error = str(exc)
    kept = acc.state_dict() == before
    acc.load_state_dict({"sums": {}, "batches": 0, "n_steps": 0})
    acc.add(kl=0.1 * (rank + 1), entropy=2.0, n_steps=rank + 1)
    acc.add(kl=0.3 * (rank + 1), entropy=4.0, n_steps=1)
    return error, kept, acc.reduce()


@pytest.mark.parametrize("case", ["missing", "renamed", "too_many", "empty"])
def test_ranks_that_disagree_all_raise_keep_their_accumulator_and_go_on(case):
    results = run_ranks(_worker, 2, case)
    for rank, (error, kept, _) in enumerate(results):
        assert error is not None and error.startswith("Invalid"), (rank, error)
        assert kept, f"rank {rank}: the accumulator changed after the error"
    # the next reduce meets: rank means of the batch means (0.2, 0.4 for kl), n summed
    stats, n = results[0][2]
    assert results[1][2] == (stats, n)
    assert stats["kl"] == pytest.approx(((0.1 + 0.3) / 2 + (0.2 + 0.6) / 2) / 2, abs=1e-15)
    assert stats["entropy"] == 3.0 and n == (1 + 1) + (2 + 1)


def test_ranks_that_agree_reduce_as_before():
    results = run_ranks(_worker, 2, "good")
    for error, kept, _ in results:
        assert error is None and kept is False  # emptied by the reduce
    assert results[0][2] == results[1][2]

"""Context.grid: the (seed, arm) loop of the suites, seed-major, one progress tick a run."""

from torchsteer.bench.registry import Context, Run


def test_grid_runs_every_arm_on_every_seed_in_seed_major_order():
    ticks, calls = [], []

    def train(arm, seed):
        calls.append((seed, arm))
        return Run(suite="s", method=arm, seed=seed)

    ctx = Context(quick=True, seeds=[3, 5], advance=lambda: ticks.append(len(calls)))
    runs = ctx.grid(iter(["a", "b", "c"]), train)  # an iterator is consumed once
    assert calls == [(3, "a"), (3, "b"), (3, "c"), (5, "a"), (5, "b"), (5, "c")]
    assert [(r.seed, r.method) for r in runs] == calls
    assert ticks == [1, 2, 3, 4, 5, 6]  # advance after each run, never before

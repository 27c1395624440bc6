"""RegularizedNewton's host synchronizations (issue 17): one transfer at the start of a step,
one per accept test, and CG's reads every ``cg_check_every`` iterations; the steps do not
depend on ``cg_check_every`` (bit for bit)."""

import pytest
import torch
from torch import nn

from tests._sync import SyncCounter
from torchsteer.linalg.shifted_solvers import shifted_cg
from torchsteer.optim import RegularizedNewton


def _problem(convex=False):
    torch.manual_seed(0)
    if convex:  # multinomial logistic regression: CG never breaks down, tries get rejected
        model = nn.Linear(5, 3).double()
    else:
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 5, generator=g, dtype=torch.float64) * (3.0 if convex else 1.0)
    y = torch.randint(0, 3, (24,), generator=g)
    return model, lambda: nn.functional.cross_entropy(model(x), y)


def _run(every, steps=4, convex=False, cg_reads=None, **kw):
    model, closure = _problem(convex)
    opt = RegularizedNewton(
        model.parameters(), curvature="hessian", solver="cg", cg_maxiter=10,
        cg_check_every=every, **kw,
    )  # fmt: skip
    counts, records = [], []
    for _ in range(steps):
        if cg_reads is not None:
            cg_reads.append([])
        with SyncCounter() as c:
            opt.step(closure)
        counts.append(c.total)
        records.append(dict(opt.state[next(iter(model.parameters()))]["record"]))
    return model, counts, records


@pytest.mark.parametrize("convex", [False, True])
def test_one_sync_at_the_start_one_per_accept_test_and_cg_reads(convex, monkeypatch):
    """A step's syncs: 1 (the start) + CG's reads + 1 per accept test (a try whose solve
    gave a step). With k = cg_maxiter = 10 a cold solve reads once, a warm start (after a
    rejected trial) once or twice (before its first iteration and at its stop)."""
    import torchsteer.optim._newton_solvers as solvers

    reads: list[list[int]] = []

    def counted(*args, **kwargs):
        with SyncCounter() as inner:
            out = shifted_cg(*args, **kwargs)
        reads[-1].append((inner.total, args[5] is not None))  # (reads, warm)
        return out

    monkeypatch.setattr(solvers, "shifted_cg", counted)
    _, counts, records = _run(10, steps=5, convex=convex, cg_reads=reads, gamma0=10.0)
    for total, rec, cg in zip(counts, records, reads):
        trials = rec["tries"] - sum(
            why not in ("decrease", "nonfinite trial") for why in rec["reasons"]
        )
        assert total == 1 + sum(n for n, _ in cg) + trials
        assert all(n == 1 for n, warm in cg if not warm) and all(n in (1, 2) for n, _ in cg)
    reasons = {why for rec in records for why in rec["reasons"]}
    assert reasons == ({"decrease"} if convex else {"breakdown"})  # both kinds of retry seen
    assert min(counts) == 3  # an accepted first try: start, CG, accept test


def test_the_steps_do_not_depend_on_cg_check_every():
    a, counts_a, rec_a = _run(1)
    b, counts_b, rec_b = _run(10)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert rec_a == rec_b and sum(counts_b) < sum(counts_a)


@pytest.mark.parametrize("every", [1, 3, 7])
def test_cg_syncs_ceil_k_over_check_every_times(every):
    """A cold solve that stops after k iterations reads the host ceil(k / every) times."""
    torch.manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64))
    H = q @ torch.diag(torch.arange(1.0, 10.0, dtype=torch.float64)) @ q.T
    b = torch.randn(9, dtype=torch.float64)
    with SyncCounter() as c:
        out = shifted_cg(lambda v: H @ v, b, 0.1, tol=1e-12, check_every=every)
    assert out.converged and out.iterations == 9  # nine distinct eigenvalues
    assert c.total == -(-9 // every)
    torch.testing.assert_close(out.x, torch.linalg.solve(H + 0.1 * torch.eye(9).double(), b))


def test_invalid_cg_check_every_raises():
    model, _ = _problem()
    for bad in (0, 1.5, -2):
        with pytest.raises(ValueError, match="Invalid cg_check_every"):
            RegularizedNewton(model.parameters(), cg_check_every=bad)

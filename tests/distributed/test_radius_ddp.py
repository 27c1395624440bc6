"""RadiusLimiter on 2 gloo ranks (real DDP, half the batch each) against one process."""

import math

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from torchsteer.control.radius import RadiusLimiter, logit_spread

from .harness import run_ranks

F64 = torch.float64
LRS = (0.05, 3.0, 0.05, 2.0)  # the spikes push r above r_max; the small steps stay below
R_MAX = 0.5


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 4))
    model = model.to(F64)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 5, generator=gen, dtype=F64)
    x[11] *= 4.0  # one far sample on rank 1's half: it sets the batch maximum
    y = torch.randint(0, 4, (16,), generator=gen)
    return model, x, y


def train(model, x, y):
    """SGD with momentum under the limiter; returns ``[(r, scale, params), ...]``."""
    opt = torch.optim.SGD(model.parameters(), lr=LRS[0], momentum=0.5)
    limiter = RadiusLimiter(model, r_max=R_MAX)
    out = []
    for lr in LRS:
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        limiter.step(opt, x)
        params = [p.detach().clone() for p in model.parameters()]
        out.append((limiter.last["r"], limiter.last["scale"], params))
    return out


def _worker(rank, world_size):
    model, x, y = problem()
    half = x.shape[0] // world_size
    sl = slice(rank * half, (rank + 1) * half)
    return train(DDP(model), x[sl], y[sl])


@pytest.mark.distributed
def test_radius_limiter_under_ddp_equals_one_process():
    ranks = run_ranks(_worker, 2)
    model, x, y = problem()
    start = [p.detach().clone() for p in model.parameters()]
    single = train(model, x, y)
    assert any(s < 1.0 for _, s, _ in single) and any(s == 1.0 for _, s, _ in single)
    for out in ranks:
        for (r, s, params), (r1, s1, params1) in zip(out, single, strict=True):
            assert r == pytest.approx(r1, rel=1e-10)
            assert s == pytest.approx(s1, rel=1e-10)
            for a, b in zip(params, params1):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for (r0, s0, p0), (r1, s1, p1) in zip(*ranks):
        assert r0 == r1 and s0 == s1  # the same decision on both ranks
        assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    # the maximum over ranks matters: on the first limited step the halves' own maxima
    # differ, so a rank measuring only its half would have chosen another scale
    step = next(i for i, (_, s, _) in enumerate(single) if s < 1.0)
    before = start if step == 0 else single[step - 1][2]
    names = [n for n, _ in model.named_parameters()]
    p = {n: a - b for n, a, b in zip(names, single[step][2], before)}  # the applied s p
    with torch.no_grad():
        for q, b in zip(model.parameters(), before):
            q.copy_(b)
        spread = logit_spread(model, x, p)
    r_halves = [float(spread[:8].max()) / math.pi, float(spread[8:].max()) / math.pi]
    r_full = single[step][0] * single[step][1]  # r of the limited update s p
    assert max(r_halves) == pytest.approx(r_full, rel=1e-9)
    assert min(r_halves) < 0.9 * max(r_halves)

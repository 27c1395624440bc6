"""The radius limiter with a bad input on one rank of two (gloo, CPU): every rank refuses the
step and nothing changes (parameters, Adam's state, the limiter's counters), and the ranks go
on in step (issue 18 #4). Oracle: the state before the refused step, bitwise, and the
parameters of both ranks equal after a good step that follows it.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.distributed.harness import run_ranks


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def _worker(rank, world, bad):
    from torchsteer.control import RadiusLimiter

    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.3)
    lim = RadiusLimiter(model, r_max=0.2)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)

    def step(xb, measured):
        opt.zero_grad()
        F.cross_entropy(model(xb), y).backward()
        for p in model.parameters():  # the DDP average of the gradients
            dist.all_reduce(p.grad)
            p.grad /= world
        lim.step(opt, measured)

    step(x, x)
    bad_x = x.clone()
    bad_x[0, 0] = math.nan
    train_x = bad_x if bad == "input" and rank == 1 else x
    measured = bad_x if rank == 1 else x
    frozen = [copy.deepcopy(o.state_dict()) for o in (model, opt, lim)]
    try:
        step(train_x, measured)
        error = None
    except ValueError as exc:
        error = str(exc)
    unchanged = _same(frozen, [o.state_dict() for o in (model, opt, lim)])
    step(x, x)
    return error, unchanged, torch.cat([p.detach().flatten() for p in model.parameters()])


def _check(results):
    for rank, (error, unchanged, _) in enumerate(results):
        assert error is not None and "NaN or Inf" in error, (rank, error)
        assert unchanged, f"rank {rank}: state changed after the error"
    assert torch.equal(results[0][2], results[1][2])


def test_nan_in_one_ranks_measurement_batch_only_is_refused_on_both():
    _check(run_ranks(_worker, 2, "measurement"))


def test_nan_input_on_one_rank_leaves_every_rank_as_it_was():
    _check(run_ranks(_worker, 2, "input"))

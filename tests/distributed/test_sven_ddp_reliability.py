"""Sven on 2 gloo ranks with one bad rank (issue 18 #1): a NaN Jacobian on rank 1 only is the
same decision on both ranks (skip or raise, nothing changed, no hang), and float32 losses
scaled by 1e20 give the one-process step of the unscaled losses (float32, equal to rounding)."""

import pytest
import torch
from torch import nn

from torchsteer.optim.sven import Sven

from .._autograd import NaNGrad
from .harness import run_ranks

F64 = torch.float64
PATHS = {
    "dense_exact": dict(jacobian="dense", svd="exact"),  # the sharded Gram
    "dense_randomized": dict(jacobian="dense", svd="randomized", rank=3, oversample=2),
    "matrix_free": dict(jacobian="matrix_free", svd="randomized", rank=3, oversample=2),
}


def mlp(dtype=F64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)


def data(dtype=F64):
    gen = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(12, 3, generator=gen, dtype=F64),
        torch.randn(12, 2, generator=gen, dtype=F64),
    )
    return x.to(dtype), y.to(dtype)


def per_sample(out, y):
    return ((out - y) ** 2).sum(dim=1)


def _worker(rank, world_size):
    x, y = data()
    xs, ys = x[rank * 6 : rank * 6 + 6], y[rank * 6 : rank * 6 + 6]
    nonfinite = {}
    for name, opts in PATHS.items():
        for mode in ("skip", "raise"):
            model = mlp()
            opt = Sven(model.parameters(), lr=0.5, seed=0, nonfinite=mode, **opts)
            before = [p.detach().clone() for p in model.parameters()]

            def closure(model=model):
                out = model(xs)
                return per_sample(NaNGrad.apply(out) if rank == 1 else out, ys)

            try:
                opt.step(closure)
                raised = None
            except ValueError as err:
                raised = str(err)
            unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            skipped = int(opt.state[next(model.parameters())].get("skipped_steps", -1))
            nonfinite[name, mode] = (raised, skipped, unchanged)
    scaled = {}
    x32, y32 = xs.float(), ys.float()
    for name, opts in PATHS.items():
        model = mlp(torch.float32)
        opt = Sven(model.parameters(), lr=0.5, seed=0, rtol=1e-2, **opts)
        opt.step(lambda model=model: 1e20 * per_sample(model(x32), y32))
        scaled[name] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return nonfinite, scaled


@pytest.mark.distributed
def test_one_rank_with_a_nan_jacobian_and_scaled_float32_losses():
    ranks = run_ranks(_worker, 2)
    for nonfinite, _ in ranks:
        for name in PATHS:
            assert nonfinite[name, "skip"] == (None, 1, True)
            assert nonfinite[name, "raise"] == ("Invalid Jacobian: contains NaN or Inf", -1, True)
    x, y = data(torch.float32)
    for name, opts in PATHS.items():  # the one-process float32 step of the unscaled losses
        model = mlp(torch.float32)  # (float32: the randomized sketch is drawn in that dtype)
        opt = Sven(model.parameters(), lr=0.5, seed=0, rtol=1e-2, **opts)
        opt.step(lambda model=model: per_sample(model(x), y))
        want = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        t0 = torch.cat([p.detach().reshape(-1) for p in mlp(torch.float32).parameters()])
        for _, scaled in ranks:
            torch.testing.assert_close(scaled[name] - t0, want - t0, rtol=1e-3, atol=1e-5)
        assert torch.equal(ranks[0][1][name], ranks[1][1][name])

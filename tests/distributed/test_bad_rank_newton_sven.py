"""A bad input on one rank of two (gloo, CPU): every rank raises a ValueError, nothing changes,
and the ranks are still in step afterwards (issue 18 #4: the ranks agree on validity by a flag
before any collective of the step, so none is left waiting in a collective the other skips).

Oracle: the state before the failed step (parameters and ``state_dict``) compared bitwise, and
a good step after it that completes on both ranks with equal parameters (the ranks' data differ
but the step is global).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def _data(rank, n=8):
    g = torch.Generator().manual_seed(rank)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _state(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _attempt(model, opt, closure):
    before = _state(model, opt)
    try:
        opt.step(closure)
        error = None
    except ValueError as exc:
        error = str(exc)
    return error, _same(before, _state(model, opt))


def _sven_bad_shape(rank, world):
    from torchsteer.optim import Sven

    model = _model()
    opt = Sven(model.parameters(), lr=0.1, rank=8)
    x, y = _data(rank)

    def closure(bad=False):
        losses = F.cross_entropy(model(x), y, reduction="none")
        return losses[:, None] if bad and rank == 1 else losses

    opt.step(closure)
    out = _attempt(model, opt, lambda: closure(True))
    opt.step(closure)  # both ranks still in step
    return out, torch.cat([p.detach().flatten() for p in model.parameters()])


def _newton(rank, world, bad, curvature):
    from torchsteer.optim import RegularizedNewton

    model = _model()
    opt = RegularizedNewton(model.parameters(), curvature=curvature)
    x, y = _data(rank)

    def closure(now=False):
        xb, yb = (x[:0], y[:0]) if now and bad == "empty" and rank == 1 else (x, y)
        losses = F.cross_entropy(model(xb), yb, reduction="none")
        if curvature == "empirical_fisher" or (now and bad == "shape" and rank == 1):
            return losses
        return losses.mean()

    opt.step(closure)
    out = _attempt(model, opt, lambda: closure(True))
    opt.step(closure)
    return out, torch.cat([p.detach().flatten() for p in model.parameters()])


def _check(results):
    (out0, params0), (out1, params1) = results
    for rank, (error, unchanged) in enumerate((out0, out1)):
        assert error is not None, f"rank {rank} did not raise"
        assert error.startswith("Invalid"), error
        assert unchanged, f"rank {rank}: state changed after the error"
    assert torch.equal(params0, params1)  # the step after it was taken alike
    return out0[0], out1[0]


def test_sven_losses_of_shape_b1_on_one_rank_raise_on_both():
    err0, err1 = _check(run_ranks(_sven_bad_shape, 2))
    assert "(B,)" in err1 and "rank 1" in err0


def test_newton_vector_loss_on_one_rank_raises_on_both():
    err0, err1 = _check(run_ranks(_newton, 2, "shape", "hessian"))
    assert "another rank" in err0 and "scalar" in err1


def test_newton_empirical_fisher_empty_batch_on_one_rank_raises_on_both():
    err0, err1 = _check(run_ranks(_newton, 2, "empty", "empirical_fisher"))
    assert "another rank" in err0 and "(0,)" in err1

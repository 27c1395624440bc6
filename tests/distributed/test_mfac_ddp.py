"""Sharded M-FAC on 2 gloo ranks (real DDP) against one process on the concatenated batch."""

import copy
import os

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from torchsteer.optim.mfac import MFAC

from .harness import run_ranks

F64 = torch.float64
NGRADS, DAMP, STEPS, MORE = 3, 1e-2, 5, 3  # 8 steps: the ring of 3 wraps twice
GROUPS = [
    dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
    dict(lr=0.02, momentum=0.0, weight_decay=0.0),
]


def problem():
    torch.manual_seed(0)
    # 48 + 8 + 32 + 4 = 92 parameters: the shard boundary (46) splits the first weight
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(F64)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 6, generator=gen, dtype=F64)
    y = torch.randn(12, 4, generator=gen, dtype=F64)
    return model, x, y


def make_opt(model, **kw):
    w1, b1, w2, b2 = model.parameters()
    groups = [dict(params=[w1, b1], **GROUPS[0]), dict(params=[w2, b2], **GROUPS[1])]
    return MFAC(groups, ngrads=NGRADS, damp=DAMP, **kw)


def loss_fn(model, x, y):
    return 0.5 * ((model(x) - y) ** 2).sum(1).mean()


def train(model, opt, x, y, steps):
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        out.append([p.detach().clone() for p in opt.param_groups[0]["params"]] + [
            p.detach().clone() for p in opt.param_groups[1]["params"]
        ])  # fmt: skip
    return out


def _worker(rank, world_size, tmpdir):
    model, x, y = problem()
    half = x.shape[0] // world_size
    xs, ys = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
    ddp = DDP(model)  # averages the gradients over the ranks
    opt = make_opt(model)
    history = train(ddp, opt, xs, ys, STEPS)
    first = next(model.parameters())
    out = {"window_numel": opt.state[first]["window_grads"].numel(), "history": history}
    try:
        opt.state_dict()
        out["unconsolidated_raises"] = False
    except RuntimeError:
        out["unconsolidated_raises"] = True
    opt.consolidate_state_dict()
    path = os.path.join(tmpdir, "mfac.pt")
    if rank == 0:
        torch.save(opt.state_dict(), path)
    torch.distributed.barrier()
    # resume on every rank from rank 0's checkpoint; both continue in lockstep
    twin = copy.deepcopy(model)
    twin_opt = make_opt(twin)
    twin_opt.load_state_dict(torch.load(path, weights_only=True))
    out["history"] += train(ddp, opt, xs, ys, MORE)
    out["resumed"] = train(DDP(twin), twin_opt, xs, ys, MORE)
    # a one-process checkpoint (shard=False on the whole batch, no DDP) resumed sharded
    solo, _, _ = problem()
    solo_opt = make_opt(solo, shard=False)
    train(solo, solo_opt, x, y, STEPS)
    sharded_opt = make_opt(solo)
    sharded_opt.load_state_dict(solo_opt.state_dict())
    out["from_one_process"] = train(DDP(solo), sharded_opt, xs, ys, MORE)
    # shard=False keeps the whole window on each rank
    whole = make_opt(model, shard=False)
    train(ddp, whole, xs, ys, 1)
    out["unsharded_numel"] = whole.state[first]["window_grads"].numel()
    out["nonfinite"] = _nonfinite_in_one_shard(ddp, model, xs, ys)
    return out


def _nonfinite_in_one_shard(ddp, model, xs, ys):
    """A NaN only in rank 1's columns: both ranks skip (or raise) and change nothing."""
    results = []
    for mode in ("skip", "raise"):
        opt = make_opt(model, nonfinite=mode)
        train(ddp, opt, xs, ys, 1)
        opt.zero_grad()
        loss_fn(ddp, xs, ys).backward()
        last = list(model.parameters())[-1]  # columns 88..91: rank 1's shard only
        last.grad[0] = float("nan")
        before = [p.detach().clone() for p in model.parameters()]
        window = opt.state[next(model.parameters())]["window_grads"].clone()
        try:
            opt.step()
            raised = False
        except ValueError:
            raised = True
        state = opt.state[next(model.parameters())]
        unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        unchanged &= torch.equal(window, state["window_grads"])
        results.append((mode, raised, int(state["skipped_steps"]), int(state["step"]), unchanged))
    return results


@pytest.mark.distributed
def test_sharded_mfac_equals_one_process_and_resumes(tmp_path):
    ranks = run_ranks(_worker, 2, str(tmp_path))
    model, x, y = problem()
    single = make_opt(model)
    reference = train(model, single, x, y, STEPS)
    saved = copy.deepcopy(single.state_dict())  # the live buffers change as it continues
    reference += train(model, single, x, y, MORE)
    d = sum(p.numel() for p in model.parameters())
    for out in ranks:
        assert out["window_numel"] == NGRADS * d // 2  # m d / R per rank
        assert out["unsharded_numel"] == NGRADS * d
        assert out["unconsolidated_raises"]
        for got, want in zip(out["history"], reference, strict=True):
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for got, want in zip(out["from_one_process"], reference[STEPS:], strict=True):
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        # resumed from the consolidated checkpoint: the same run, bit for bit
        for got, want in zip(out["resumed"], out["history"][STEPS:], strict=True):
            assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert out["nonfinite"] == [("skip", False, 1, 1, True), ("raise", True, 0, 1, True)]
    for a, b in zip(ranks[0]["history"][-1], ranks[1]["history"][-1]):
        assert torch.equal(a, b)  # the ranks hold identical parameters
    # the 2-rank checkpoint is the one-process format: it resumes in one process
    ckpt = torch.load(tmp_path / "mfac.pt", weights_only=True)
    for key in ("window_grads", "window_gram", "window_inverse"):
        torch.testing.assert_close(
            ckpt["state"][0][key], saved["state"][0][key], rtol=1e-10, atol=1e-12
        )
    model2, _, _ = problem()
    with torch.no_grad():
        for p, q in zip(model2.parameters(), ranks[0]["history"][STEPS - 1]):
            p.copy_(q)
    opt2 = make_opt(model2)
    opt2.load_state_dict(ckpt)
    for got, want in zip(train(model2, opt2, x, y, MORE), reference[STEPS:], strict=True):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _blocked_worker(rank, world_size, tmpdir):
    model, x, y = problem()
    half = x.shape[0] // world_size
    xs, ys = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
    opt = make_opt(model, block_size=10)  # shard=None: a blocked window is kept whole
    history = train(DDP(model), opt, xs, ys, STEPS + MORE)
    return {
        "history": history,
        "window_shape": tuple(opt.state[next(model.parameters())]["window_grads"].shape),
    }


@pytest.mark.distributed
def test_blocked_mfac_under_ddp_is_replicated_and_equals_one_process(tmp_path):
    """Blocks (92 parameters, blocks of 10 crossing the shard boundary) are not sharded:
    every rank holds the whole window and takes the one-process steps on the whole batch."""
    ranks = run_ranks(_blocked_worker, 2, str(tmp_path))
    model, x, y = problem()
    reference = train(model, make_opt(model, block_size=10), x, y, STEPS + MORE)
    d = sum(p.numel() for p in model.parameters())
    for out in ranks:
        assert out["window_shape"] == (NGRADS, d)
        for got, want in zip(out["history"], reference, strict=True):
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(ranks[0]["history"][-1], ranks[1]["history"][-1]):
        assert torch.equal(a, b)

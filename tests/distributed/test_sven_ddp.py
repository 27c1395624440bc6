"""Sven on 2 gloo ranks (each with part of the batch) against one process on the whole batch."""

import itertools

import pytest
import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import torchsteer.distributed as tsdist
from torchsteer.optim.sven import Sven

from .harness import run_ranks

F64 = torch.float64
B, STEPS = 12, 3
RECORDS = ("kept_rank", "sigma_max", "sigma_min", "linearized_reduction")

# name -> (widths, split of the 12 samples, graph path?, Sven options)
CASES = {
    "dense_graph": (
        (3, 16, 2),
        (6, 6),
        True,
        dict(jacobian="dense", svd="exact", lr=0.5, momentum=0.5, rtol=1e-6),
    ),
    "dense_functional": (
        (3, 16, 2),
        (6, 6),  # micro-batches of 2 never straddle two ranks
        False,
        dict(jacobian="dense", svd="exact", lr=0.3, kappa=1.0, microbatch_size=2, rtol=1e-6),
    ),
    "dense_tall_functional": (  # P = 3 < B = 12: the P x P Gram matrix
        (2, 1),
        (5, 7),
        False,
        dict(jacobian="dense", svd="exact", lr=0.5, rtol=1e-6),
    ),
    "dense_damped_functional": (  # damping on the sharded Gram (B = 12 <= P)
        (3, 16, 2),
        (5, 7),
        False,
        dict(jacobian="dense", svd="exact", lr=0.5, kappa=1.0, rtol=1e-6, damping=1e-2),
    ),
    "dense_tall_damped_functional": (  # damping on the all-reduced P x P Gram
        (2, 1),
        (5, 7),
        False,
        dict(jacobian="dense", svd="exact", lr=0.5, rtol=1e-6, damping=1e-2),
    ),
    "randomized_matrix_free": (
        (3, 16, 2),
        (5, 7),
        False,
        dict(jacobian="matrix_free", svd="randomized", rank=3, oversample=1, power_iters=1)
        | dict(lr=0.5, param_fraction=0.8, rtol=1e-6),
    ),
    "randomized_dense_graph": (
        (3, 16, 2),
        (7, 5),
        True,
        dict(jacobian="dense", svd="randomized", rank=3, oversample=1, power_iters=2)
        | dict(lr=0.5, rtol=1e-6),
    ),
}


F32_CASES = ("dense_functional", "randomized_matrix_free")  # also run in float32


def mlp(widths, dtype=F64):
    torch.manual_seed(0)
    layers = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(F64).to(dtype)


def data(widths, dtype=F64):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, widths[0], generator=gen, dtype=F64)
    y = torch.randn(B, widths[-1], generator=gen, dtype=F64)
    return x.to(dtype), y.to(dtype)


def per_sample(out, y):
    return ((out - y) ** 2).sum(dim=1)


def make(case, model, net, seed):
    _, _, graph, opts = CASES[case]
    if graph:
        return Sven(model.parameters(), seed=seed, **opts)
    return Sven(model.parameters(), seed=seed, model=net, loss_fn=per_sample, **opts)


def train(case, opt, net, x, y, steps=STEPS):
    graph = CASES[case][2]
    out = []
    for _ in range(steps):
        if graph:
            loss = opt.step(lambda: per_sample(net(x), y))
        else:
            loss = opt.step(batch=(x, y))
        state = opt.state[opt.param_groups[0]["params"][0]]
        params = torch.cat([p.detach().reshape(-1) for p in opt.param_groups[0]["params"]])
        out.append(dict(params=params, loss=loss, **{k: state[k].clone() for k in RECORDS}))
    return out


class Recorder:
    """Records (collective, elements this rank sends) for every collective Sven issues."""

    def __init__(self, monkeypatch_targets):
        self.calls = []
        self.saved = []
        for module, name in monkeypatch_targets:
            original = getattr(module, name)
            self.saved.append((module, name, original))
            setattr(module, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def wrapped(*args, **kwargs):
            if name == "all_to_all_single":  # (out, in, out_splits, in_splits): what leaves
                splits = args[3]
                sent = sum(splits) - splits[tdist.get_rank()]
            else:
                sent = args[0].numel()
            self.calls.append((name, sent))
            return original(*args, **kwargs)

        return wrapped

    def restore(self):
        for module, name, original in self.saved:
            setattr(module, name, original)


def _worker(rank, world_size):
    results = {}
    for case, (widths, split, _, _) in CASES.items():
        model = mlp(widths)
        x, y = data(widths)
        lo = sum(split[:rank])
        xs, ys = x[lo : lo + split[rank]], y[lo : lo + split[rank]]
        net = DDP(model)  # the closure runs through DDP; the functional path unwraps it
        opt = make(case, model, net, seed=7 + rank)  # different seeds: rank 0's is used
        targets = [(tsdist, "all_gather"), (tsdist, "all_reduce_sum"), (tdist, "all_to_all_single")]
        rec = Recorder(targets)
        try:
            history = train(case, opt, net, xs, ys)
        finally:
            rec.restore()
        results[case] = dict(history=history, calls=rec.calls)
    for case in F32_CASES:
        widths, split, _, _ = CASES[case]
        model = mlp(widths, torch.float32)
        x, y = data(widths, torch.float32)
        lo = sum(split[:rank])
        net = DDP(model)
        opt = make(case, model, net, seed=7)
        results[case + "_f32"] = train(
            case, opt, net, x[lo : lo + split[rank]], y[lo : lo + split[rank]]
        )
    results["nonfinite"] = _nonfinite(rank)
    return results


def _nonfinite(rank):
    """NaN in rank 1's losses only: both ranks skip (or both raise); nothing changes."""
    widths = (3, 16, 2)
    model = mlp(widths)
    x, y = data(widths)
    xs, ys = x[rank * 6 : rank * 6 + 6], y[rank * 6 : rank * 6 + 6].clone()
    if rank == 1:
        ys[2, 0] = float("nan")
    out = []
    for mode in ("skip", "raise"):
        opt = Sven(
            model.parameters(), lr=0.5, seed=0, nonfinite=mode, model=model, loss_fn=per_sample
        )
        before = [p.detach().clone() for p in model.parameters()]
        try:
            opt.step(batch=(xs, ys))
            raised = False
        except ValueError:
            raised = True
        state = opt.state[next(model.parameters())]
        unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        out.append((mode, raised, int(state.get("skipped_steps", -1)), unchanged))
    return out


def reference(case, dtype=F64):
    widths = CASES[case][0]
    model = mlp(widths, dtype)
    x, y = data(widths, dtype)
    return train(case, make(case, model, model, seed=7), model, x, y)


def comm_bound(case):
    """The largest collective each path should need (elements sent by one rank)."""
    widths, split, _, opts = CASES[case]
    P = sum(p.numel() for p in mlp(widths).parameters())
    if opts["svd"] == "randomized":
        ell = opts["rank"] + opts["oversample"]
        return P, max(max(split) * ell, P * ell)  # sketches B_r x l, products P x l
    if B <= P:  # all-to-all of half a rank's rows, Gram B x B, direction P / 2
        return P, max(max(split) * P // 2, B * B, P // 2 + 1)
    return P, P * (P + 1)


@pytest.mark.distributed
def test_sven_ddp_equals_one_process():
    ranks = run_ranks(_worker, 2)
    for case in CASES:
        want = reference(case)
        for out in ranks:
            got = out[case]["history"]
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g["params"], w["params"], rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(g["loss"], w["loss"], rtol=1e-10, atol=0)
                assert g["kept_rank"] == w["kept_rank"]
                for key in ("sigma_max", "sigma_min", "linearized_reduction"):
                    torch.testing.assert_close(g[key], w[key], rtol=1e-10, atol=1e-12)
        # bit-identical across ranks: parameters and recorded statistics
        for g0, g1 in zip(ranks[0][case]["history"], ranks[1][case]["history"]):
            assert all(torch.equal(g0[k], g1[k]) for k in ("params", "loss", *RECORDS))
        # no rank receives the Jacobian: every collective is at most the documented size
        P, bound = comm_bound(case)
        assert bound < min(CASES[case][1]) * P
        for out in ranks:
            sizes = [n for _, n in out[case]["calls"]]
            assert sizes and max(sizes) <= bound, (case, out[case]["calls"])
    # float32: the 2-rank run is as close to the float64 run as one float32 process is
    # (the randomized sketch is drawn in the parameters' dtype, so float64 draws another one:
    # there the bound is float32 rounding of the one-process float32 step)
    eps = torch.finfo(torch.float32).eps
    for case in F32_CASES:
        exact, single = reference(case), reference(case, torch.float32)
        for out in ranks:
            for g, s, w in zip(out[case + "_f32"], single, exact, strict=True):
                scale = w["params"].norm()
                diff = (g["params"] - s["params"]).double().norm()
                if CASES[case][3]["svd"] == "randomized":
                    assert diff <= 64 * eps * scale, (case, diff)
                    continue
                err_single = (s["params"].double() - w["params"]).norm()
                assert err_single < 1e-4 * scale  # float32 solves the same problem
                assert diff <= 4 * err_single + 8 * eps * scale, (case, diff, err_single)
    for out in ranks:
        assert out["nonfinite"] == [("skip", False, 1, True), ("raise", True, -1, True)]

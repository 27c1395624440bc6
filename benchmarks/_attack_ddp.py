"""A bad rank under DDP: 2 gloo processes on CPU, one rank gets NaN / an empty batch / a wrong
shape. Held: every rank raises alike (or every rank skips alike) with its state unchanged,
within the timeout; a rank left waiting past it is a hang (a defect).

Each scenario is a module-level function ``scenario(rank) -> (raised or None, unchanged)``
run on 2 fresh processes (spawn) with a gloo group whose own timeout is the same 60 s.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _attack_common import add, bitwise_equal, defect, documented, held, snapshot

KIND = "bad rank under DDP"
TIMEOUT = 60
NAN = float("nan")


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, outdir, name):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=TIMEOUT),
    )
    try:
        result = SCENARIOS[name][0](rank)
    except Exception:
        result = ("harness: " + traceback.format_exc()[-300:], False)
    torch.save(result, os.path.join(outdir, f"{rank}.pt"))
    try:
        dist.destroy_process_group()
    except Exception:
        pass


def run_pair(name):
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as outdir:
        port = _port()
        procs = [ctx.Process(target=_worker, args=(r, port, outdir, name)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(TIMEOUT + 30)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = []
        for r in range(2):
            path = os.path.join(outdir, f"{r}.pt")
            results.append(torch.load(path, weights_only=False) if os.path.exists(path) else None)
        return hung, results


def _guard(call, state):
    before = snapshot(*state())
    try:
        call()
        raised = None
    except Exception as exc:
        clear = "clear" if isinstance(exc, ValueError | TypeError) else "raw"
        raised = f"{clear} {type(exc).__name__}: {str(exc)[:120]}"
    return raised, bitwise_equal(before, snapshot(*state()))


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def _data(rank, n=8):
    g = torch.Generator().manual_seed(rank)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _bad_inputs(rank, bad, x, y):
    if rank != 1:
        return x, y
    if bad == "nan":
        x = x.clone()
        x[0, 0] = NAN
    elif bad == "empty":
        x, y = x[:0], y[:0]
    return x, y


def mfac(bad, policy="raise"):
    def scenario(rank):
        from torch.nn.parallel import DistributedDataParallel as DDP

        from torchsteer.optim import MFAC

        model = _model()
        ddp = DDP(model)
        opt = MFAC(model.parameters(), lr=0.01, ngrads=4, nonfinite=policy)
        x, y = _data(rank)

        def step(xb, yb):
            opt.zero_grad()
            F.cross_entropy(ddp(xb), yb).backward()
            opt.step()

        step(x, y)
        xb, yb = _bad_inputs(rank, bad, x, y)
        out = _guard(
            lambda: step(xb, yb), lambda: (model, [dict(s) for s in opt.state.values()])
        )  # sharded: no
        step(x, y)  # the ranks are still in step afterwards                 # state_dict()
        return out

    return scenario


def sven(bad, policy="raise", **kw):
    def scenario(rank):
        from torchsteer.optim import Sven

        model = _model()
        opt = Sven(model.parameters(), lr=0.1, rank=8, nonfinite=policy, **kw)
        x, y = _data(rank)

        def closure_for(xb, yb, now=False):
            def closure():
                losses = F.cross_entropy(model(xb), yb, reduction="none")
                if bad == "shape" and rank == 1 and now:
                    return losses[:, None]
                if bad == "nan_loss" and rank == 1 and now:
                    return losses * torch.tensor([NAN] + [1.0] * (len(yb) - 1))
                return losses

            return closure

        opt.step(closure_for(x, y))
        xb, yb = _bad_inputs(rank, bad, x, y)
        out = _guard(lambda: opt.step(closure_for(xb, yb, True)), lambda: (model, opt))
        opt.step(closure_for(x, y))
        return out

    return scenario


def newton(bad, policy="raise", curvature="hessian"):
    def scenario(rank):
        from torchsteer.optim import RegularizedNewton

        model = _model()
        opt = RegularizedNewton(model.parameters(), curvature=curvature, nonfinite=policy)
        x, y = _data(rank)

        def closure_for(xb, yb, now=False):
            def closure():
                losses = F.cross_entropy(model(xb), yb, reduction="none")
                if bad == "nan_loss" and rank == 1 and now:
                    losses = losses * NAN
                if bad == "shape" and rank == 1 and now:
                    return losses  # (B,) where a scalar is expected
                return losses if curvature == "empirical_fisher" else losses.mean()

            return closure

        opt.step(closure_for(x, y))
        xb, yb = _bad_inputs(rank, bad, x, y)
        out = _guard(lambda: opt.step(closure_for(xb, yb, True)), lambda: (model, opt))
        opt.step(closure_for(x, y))
        return out

    return scenario


def dro(bad, **kw):
    def scenario(rank):
        from torchsteer.control import DROWeighting

        w = DROWeighting(0.5, **kw)
        classes = 3 if kw.get("class_level") else None
        g = torch.Generator().manual_seed(rank)

        def batch():
            return torch.rand(6, generator=g), torch.randint(0, 3, (6,), generator=g)

        losses, labels = batch()
        w.weights(losses, labels if classes else None)
        losses, labels = batch()
        if rank == 1:
            if bad == "nan":
                losses[0] = NAN
            elif bad == "empty":
                losses, labels = losses[:0], labels[:0]
            elif bad == "shape":
                losses = losses[:, None]
            elif bad == "float_labels":
                labels = labels.float()
        out = _guard(lambda: w.weights(losses, labels if classes else None), lambda: (w,))
        losses, labels = batch()
        w.weights(losses, labels if classes else None)
        return out

    return scenario


def paced(bad):
    def scenario(rank):
        from torchsteer.objectives import PACEDWeights

        p = PACEDWeights()
        p.update(torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64))
        rates = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
        if rank == 1:
            rates = {
                "nan": torch.tensor([NAN, 0.5, 0.5], dtype=torch.float64),
                "empty": rates[:0],
                "range": torch.tensor([1.5, 0.5, 0.5]),
            }[bad]
        out = _guard(lambda: p.update(rates), lambda: (p,))
        p.update(torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64))
        return out

    return scenario


def kl_statistics(bad):
    def scenario(rank):
        from torchsteer.control import KLStatistics, PIDKLController

        acc, ctrl = KLStatistics(), PIDKLController(target=0.1)
        acc.add(kl=0.1, entropy=1.0)
        ctrl.update(**acc.reduce()[0])
        if rank == 1 and bad == "nan":
            acc.add(kl=NAN, entropy=1.0)
        elif rank == 1 and bad == "missing":
            acc.add(kl=0.2)
        else:
            acc.add(kl=0.2, entropy=1.0)

        def go():
            stats, n = acc.reduce()
            ctrl.update(**stats, n_steps=n)

        out = _guard(go, lambda: (ctrl,))
        acc.add(kl=0.1, entropy=1.0)
        ctrl.update(**acc.reduce()[0])
        return out

    return scenario


def limiter(bad):
    def scenario(rank):
        from torchsteer.control import RadiusLimiter

        model = _model()
        opt = torch.optim.Adam(model.parameters(), lr=0.3)
        lim = RadiusLimiter(model, r_max=0.2)
        x, y = _data(rank)

        def step(xb, yb):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            for p in model.parameters():  # the DDP average of the gradients
                dist.all_reduce(p.grad)
                p.grad /= 2
            lim.step(opt, xb)

        step(x, y)
        xb, yb = _bad_inputs(rank, bad, x, y)
        if bad == "nan_inputs_only" and rank == 1:
            xb = x.clone()
            xb[0, 0] = NAN  # the measurement batch only, the gradients are fine
            out = _guard(
                lambda: (
                    opt.zero_grad(),
                    F.cross_entropy(model(x), y).backward(),
                    [dist.all_reduce(p.grad) for p in model.parameters()],
                    lim.step(opt, xb),
                ),
                lambda: (model, opt, lim),
            )
        elif bad == "nan_inputs_only":
            out = _guard(
                lambda: (
                    opt.zero_grad(),
                    F.cross_entropy(model(x), y).backward(),
                    [dist.all_reduce(p.grad) for p in model.parameters()],
                    lim.step(opt, x),
                ),
                lambda: (model, opt, lim),
            )
        else:
            out = _guard(lambda: step(xb, yb), lambda: (model, opt, lim))
        step(x, y)
        lim.remove_hooks()
        return out

    return scenario


SCENARIOS = {
    "MFAC + DDP: NaN input on rank 1": (mfac("nan"), "raise"),
    "MFAC + DDP: NaN input on rank 1, nonfinite=skip": (mfac("nan", "skip"), "skip"),
    # an empty local batch: the user's loss is the mean of nothing (its gradient is 0 on that
    # rank) and DDP averages; the global batch is not empty, going on is right
    "MFAC + DDP: empty batch on rank 1": (mfac("empty"), "either"),
    "Sven: NaN input on rank 1": (sven("nan"), "raise"),
    "Sven: NaN input on rank 1, nonfinite=skip": (sven("nan", "skip"), "skip"),
    "Sven matrix_free: NaN loss on rank 1": (sven("nan_loss", jacobian="matrix_free"), "raise"),
    "Sven: empty batch on rank 1": (sven("empty"), "either"),  # the global batch is not empty
    "Sven: (B, 1) losses on rank 1": (sven("shape"), "raise"),
    "RegularizedNewton: NaN loss on rank 1": (newton("nan_loss"), "raise"),
    "RegularizedNewton: NaN loss on rank 1, nonfinite=skip": (newton("nan_loss", "skip"), "skip"),
    "RegularizedNewton: (B,) loss on rank 1": (newton("shape"), "raise"),
    "RegularizedNewton empirical_fisher: empty batch on rank 1": (
        newton("empty", curvature="empirical_fisher"),
        "raise",
    ),
    "DROWeighting streaming: NaN loss on rank 1": (dro("nan", mode="streaming"), "raise"),
    "DROWeighting batch: empty batch on rank 1": (dro("empty"), "raise"),
    "DROWeighting batch: 2-d losses on rank 1": (dro("shape"), "raise"),
    "DROWeighting class_level: float labels on rank 1": (
        dro("float_labels", class_level=True, num_classes=3),
        "raise",
    ),
    "PACEDWeights: NaN pass rate on rank 1": (paced("nan"), "raise"),
    "PACEDWeights: pass rate 1.5 on rank 1": (paced("range"), "raise"),
    "PACEDWeights: empty batch on rank 1": (paced("empty"), "either"),
    "KLStatistics + PID: NaN kl on rank 1": (kl_statistics("nan"), "raise"),
    "KLStatistics + PID: a statistic missing on rank 1": (kl_statistics("missing"), "raise"),
    "RadiusLimiter + Adam: NaN input on rank 1": (limiter("nan"), "either"),
    "RadiusLimiter + Adam: NaN in rank 1's measurement batch only": (
        limiter("nan_inputs_only"),
        "raise",
    ),
}


def ddp_case(name):
    expected = SCENARIOS[name][1]

    def run():
        hung, results = run_pair(name)
        if hung:
            return defect(f"rank(s) {hung} still running after {TIMEOUT + 30} s: a hang")
        if any(r is None for r in results):
            return defect("a rank died without a result")
        (raised0, same0), (raised1, same1) = results
        for r in (raised0, raised1):
            if r and r.startswith("harness"):
                return defect(r.splitlines()[-1][:150])
        if (raised0 is None) != (raised1 is None):
            return defect(f"the ranks disagree: rank 0 {raised0!r}, rank 1 {raised1!r}")
        if raised0 is not None:
            if not (same0 and same1):
                return defect(f"state changed after the error ({raised0})")
            if expected == "skip":
                return defect(f"nonfinite='skip' raised on both ranks: {raised0}")
            if not (raised0.startswith("clear") and raised1.startswith("clear")):
                return defect(f"raw error: rank 0 {raised0}; rank 1 {raised1}")
            return held(f"both ranks raise: {raised1}"[:140])
        if expected == "raise":
            return defect("accepted on both ranks")
        return held("both ranks skip alike" if expected == "skip" else "both ranks go on alike")

    return run


def register() -> None:
    for name in SCENARIOS:
        add(
            KIND,
            name.split(":")[0],
            name.split(": ", 1)[1],
            ddp_case(name),
            f"2 gloo ranks: {name}",
        )
    _ = documented

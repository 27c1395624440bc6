"""Resume cases: ``k`` steps == ``j`` steps + a ``torch.save`` / ``torch.load(weights_only=True)``
round trip of every state + ``k - j`` steps, bit for bit; and ``copy.deepcopy`` / ``pickle``
at step ``j`` then the remaining steps, bit for bit.

A *stepper* is ``make() -> bundle``, ``step(bundle, i) -> output`` (what the user sees at
step ``i``), ``save(bundle) -> state`` and ``load(bundle, state)``.
"""

from __future__ import annotations

import copy
import pickle

import torch
import torch.nn.functional as F
from _attack_common import add, bitwise_equal, defect, held, roundtrip, snapshot

import torchsteer.control as control
import torchsteer.divergence as div
import torchsteer.linalg as la
import torchsteer.objectives as obj
from torchsteer.optim import MFAC, RegularizedNewton, Sven

KIND = "resume"
K, J = 7, 3


def _data(i, n=12):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def _per_sample_ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def optimizer_stepper(kind, sched=False, **kw):
    def make():
        model = _model()
        if kind == "MFAC":
            opt = MFAC(model.parameters(), **{"lr": 1e-2, "ngrads": 4, **kw})
        elif kind == "Sven":
            if kw.get("functional"):
                kw2 = {k: v for k, v in kw.items() if k != "functional"}
                opt = Sven(
                    model.parameters(), lr=0.1, rank=8, model=model, loss_fn=_per_sample_ce, **kw2
                )
            else:
                opt = Sven(model.parameters(), **{"lr": 0.1, "rank": 8, **kw})
        else:
            opt = RegularizedNewton(model.parameters(), **kw)
        s = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if sched else None
        return {"model": model, "opt": opt, "sched": s}

    def step(b, i):
        model, opt = b["model"], b["opt"]
        x, y = _data(i)
        if kind == "MFAC":
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        elif kind == "Sven" and kw.get("functional"):
            opt.step(batch=(x, y))
        elif kind == "Sven":
            opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"))
        else:
            curv = kw.get("curvature", "hessian")
            if curv == "gauss_newton":

                def closure():
                    out = model(x)
                    return F.cross_entropy(out, y), out
            elif curv == "empirical_fisher":

                def closure():
                    return F.cross_entropy(model(x), y, reduction="none")
            else:

                def closure():
                    return F.cross_entropy(model(x), y)

            opt.step(closure)
        if b["sched"] is not None:
            b["sched"].step()
        return [p.detach().clone() for p in model.parameters()]

    def save(b):
        out = {"model": b["model"].state_dict(), "opt": b["opt"].state_dict()}
        if b["sched"] is not None:
            out["sched"] = b["sched"].state_dict()
        return out

    def load(b, s):
        b["model"].load_state_dict(s["model"])
        b["opt"].load_state_dict(s["opt"])
        if b["sched"] is not None:
            b["sched"].load_state_dict(s["sched"])

    return make, step, save, load


def controller_stepper(make_ctrl, feed):
    def make():
        return {"c": make_ctrl()}

    def step(b, i):
        return feed(b["c"], i)

    def save(b):
        return b["c"].state_dict()

    def load(b, s):
        b["c"].load_state_dict(s)

    return make, step, save, load


def _kl_feed(c, i):
    g = torch.Generator().manual_seed(i)
    kl = float(torch.rand((), generator=g)) * 0.3
    return c.update(kl=kl, entropy=1.0 + 0.1 * i, reward=0.05 * i)


def _dro_feed(w, i):
    g = torch.Generator().manual_seed(i)
    losses = torch.rand(8, generator=g) * (1 + i)
    labels = torch.randint(0, 3, (8,), generator=g) if w.class_level else None
    return w.weights(losses, labels)


def _paced_feed(p, i):
    g = torch.Generator().manual_seed(i)
    return p.update(torch.rand(6, generator=g, dtype=torch.float64))


def _dak_feed(d, i):
    g = torch.Generator().manual_seed(i)
    w = d.weights(torch.rand(5, generator=g), torch.randn(5, generator=g))
    if hasattr(d, "update"):
        d.update(kl=0.1)
    return w


def _stats_feed(s, i):
    s.add(kl=0.1 * i, entropy=1.0, n_steps=2)
    return s.reduce() if i % 3 == 2 else None


def _pskd_feed(t, i):
    g = torch.Generator().manual_seed(i)
    idx = torch.randint(0, 10, (4,), generator=g)
    t.update(idx, torch.randn(4, 5, generator=g))
    return t.targets(idx, torch.randint(0, 5, (4,), generator=g), alpha=0.5)


def _window_feed(w, i):
    g = torch.Generator().manual_seed(i)
    return w.add_and_solve(torch.randn(9, generator=g))


def limiter_stepper(**kw):
    def make():
        model = _model()
        opt = torch.optim.Adam(model.parameters(), lr=0.3)
        return {"model": model, "opt": opt, "lim": control.RadiusLimiter(model, r_max=0.2, **kw)}

    def step(b, i):
        x, y = _data(i)
        b["opt"].zero_grad()
        F.cross_entropy(b["model"](x), y).backward()
        b["lim"].step(b["opt"], x)
        return [p.detach().clone() for p in b["model"].parameters()]

    def save(b):
        return {k: b[k].state_dict() for k in ("model", "opt", "lim")}

    def load(b, s):
        for k in ("model", "opt", "lim"):
            b[k].load_state_dict(s[k])

    return make, step, save, load


def _outputs_equal(a, b):
    return bitwise_equal(snapshot(a), snapshot(b))


def resume_case(stepper):
    make, step, save, load = stepper

    def run():
        a = make()
        ref = [step(a, i) for i in range(K)]
        b = make()
        for i in range(J):
            step(b, i)
        state = roundtrip(save(b))
        c = make()
        load(c, state)
        got = [step(c, i) for i in range(J, K)]
        for i, (x, y) in enumerate(zip(ref[J:], got, strict=True)):
            if not _outputs_equal(x, y):
                return defect(
                    f"step {J + i} after the round trip differs from the uninterrupted run"
                )
        if not bitwise_equal(snapshot(save(a)), snapshot(save(c))):
            return defect("final state_dict differs from the uninterrupted run's")
        return held(f"{K} steps == {J} + save/load(weights_only) + {K - J}, bit for bit")

    return run


def copy_case(stepper, how):
    make, step, _save, _load = stepper

    def run():
        a = make()
        ref = [step(a, i) for i in range(K)]
        b = make()
        for i in range(J):
            step(b, i)
        c = copy.deepcopy(b) if how == "deepcopy" else pickle.loads(pickle.dumps(b))
        got = [step(c, i) for i in range(J, K)]
        for i, (x, y) in enumerate(zip(ref[J:], got, strict=True)):
            if not _outputs_equal(x, y):
                return defect(f"step {J + i} of the {how} differs from the original's")
        return held(f"a {how} at step {J} steps like the original, bit for bit")

    return run


def steppers():
    out = {
        "MFAC": optimizer_stepper("MFAC"),
        "MFAC mid-window (ngrads 4 wraps), momentum, weight_decay": optimizer_stepper(
            "MFAC", momentum=0.5, weight_decay=1e-3
        ),
        "MFAC blocked (block_size 16)": optimizer_stepper("MFAC", block_size=16),
        "MFAC float64 window": optimizer_stepper("MFAC", window_dtype=torch.float64),
        "MFAC nonfinite=skip": optimizer_stepper("MFAC", nonfinite="skip"),
        "MFAC + StepLR mid-schedule": optimizer_stepper("MFAC", sched=True),
        "Sven dense": optimizer_stepper("Sven"),
        "Sven matrix_free, randomized SVD": optimizer_stepper(
            "Sven", jacobian="matrix_free", svd="randomized", rank=4
        ),
        "Sven momentum, max_step_norm": optimizer_stepper("Sven", momentum=0.5, max_step_norm=0.5),
        "Sven functional path (model=, loss_fn=)": optimizer_stepper("Sven", functional=True),
        "Sven param_fraction 0.5": optimizer_stepper("Sven", param_fraction=0.5, seed=3),
        "Sven + StepLR mid-schedule": optimizer_stepper("Sven", sched=True),
        "RegularizedNewton hessian": optimizer_stepper("RegularizedNewton"),
        "RegularizedNewton gauss_newton": optimizer_stepper(
            "RegularizedNewton", curvature="gauss_newton"
        ),
        "RegularizedNewton empirical_fisher": optimizer_stepper(
            "RegularizedNewton", curvature="empirical_fisher"
        ),
        "RegularizedNewton dense, reuse_trial": optimizer_stepper(
            "RegularizedNewton", curvature="dense", reuse_trial=True
        ),
        "RegularizedNewton lanczos": optimizer_stepper("RegularizedNewton", solver="lanczos"),
        "RegularizedNewton + StepLR mid-schedule": optimizer_stepper(
            "RegularizedNewton", sched=True
        ),
        "FixedKLController": controller_stepper(lambda: control.FixedKLController(0.1), _kl_feed),
        "AdaptiveKLController": controller_stepper(
            lambda: control.AdaptiveKLController(0.2, target=0.1, horizon=100), _kl_feed
        ),
        "PIDKLController": controller_stepper(
            lambda: control.PIDKLController(target=0.1, delay=2, entropy_floor=1.2), _kl_feed
        ),
        "SAFEController": controller_stepper(lambda: control.SAFEController(window=4), _kl_feed),
        "DROWeighting batch": controller_stepper(lambda: control.DROWeighting(0.5), _dro_feed),
        "DROWeighting streaming": controller_stepper(
            lambda: control.DROWeighting(0.5, mode="streaming", warmup_steps=2), _dro_feed
        ),
        "DROWeighting class_level": controller_stepper(
            lambda: control.DROWeighting(0.5, class_level=True, num_classes=3), _dro_feed
        ),
        "PACEDWeights": controller_stepper(lambda: obj.PACEDWeights(1.0, 2.0), _paced_feed),
        "DifficultyAdaptiveKL (PID base)": controller_stepper(
            lambda: obj.DifficultyAdaptiveKL(control.PIDKLController(target=0.1)), _dak_feed
        ),
        "KLStatistics mid-accumulation": controller_stepper(control.KLStatistics, _stats_feed),
        "PSKDTargets": controller_stepper(lambda: div.PSKDTargets(10, 5), _pskd_feed),
        "GradientWindow mid-window": controller_stepper(
            lambda: la.GradientWindow(4, 9), _window_feed
        ),
        "RadiusLimiter + Adam (update)": limiter_stepper(),
        "RadiusLimiter + Adam (neg_grad, nonfinite=skip)": limiter_stepper(
            direction="neg_grad", nonfinite="skip"
        ),
    }
    return out


def register() -> None:
    for name, stepper in steppers().items():
        add(
            KIND,
            name,
            "save / load(weights_only=True) mid-run",
            resume_case(stepper),
            f"{name}: {K} steps vs {J} + torch.save/torch.load(weights_only=True) + {K - J}",
        )
        for how in ("deepcopy", "pickle"):
            add(
                KIND,
                name,
                f"{how} then step",
                copy_case(stepper, how),
                f"{name}: {how} at step {J}, then {K - J} steps vs the original",
            )

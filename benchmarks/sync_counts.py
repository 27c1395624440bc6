"""Host synchronizations per steady-state step of each part, counted on CPU (issue 17's baseline).

Counts the Python-level calls that would make the host wait for a GPU (``item``, ``bool``,
``float``, ``int``, ``tolist``, ``cpu``, ``nonzero``; ``tests/_sync.py``) during the third step
of each part, on small CPU models, in the library's code and in the torch.optim code it calls.
The GPU issue asks for 0 in MFAC, Sven (dense), the radius limiter, DROWeighting and the KL
controllers' tensor path, and 1 per accept test in RegularizedNewton: this file says how far
each part is today. Usage: ``python benchmarks/sync_counts.py``; writes
``benchmarks/results/sync_counts.{json,md}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests._sync import SyncCounter  # noqa: E402

from torchsteer.control import DROWeighting, RadiusLimiter  # noqa: E402
from torchsteer.control.kl import AdaptiveKLController, PIDKLController  # noqa: E402
from torchsteer.optim import MFAC, RegularizedNewton, Sven  # noqa: E402

torch.set_num_threads(1)
RESULTS = Path(__file__).parent / "results"
g = torch.Generator().manual_seed(0)
X, Y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
ce = torch.nn.functional.cross_entropy


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def parts():
    """name -> one step (the counter wraps the whole call)."""
    out = {}
    m = mlp()
    adam = torch.optim.Adam(m.parameters(), lr=1e-3)

    def adam_step():
        adam.zero_grad()
        ce(m(X), Y).backward()
        adam.step()

    out["Adam (reference)"] = adam_step
    m1 = mlp()
    mfac = MFAC(m1.parameters(), lr=1e-3, ngrads=8)

    def mfac_step():
        mfac.zero_grad()
        ce(m1(X), Y).backward()
        mfac.step()

    out["MFAC"] = mfac_step
    for name, extra in (("", {}), (" blocked", {"block_size": 64})):
        mc = mlp()
        opt_c = MFAC(mc.parameters(), lr=1e-3, ngrads=8, nonfinite="skip", capturable=True, **extra)

        def mfac_capturable(mc=mc, opt_c=opt_c):
            opt_c.zero_grad()
            ce(mc(X), Y).backward()
            opt_c.step()

        out[f"MFAC{name} (capturable, skip)"] = mfac_capturable
    m2 = mlp()
    sven = Sven(
        m2.parameters(),
        lr=0.1,
        rank=8,
        jacobian="dense",
        model=m2,
        loss_fn=lambda o, t: ce(o, t, reduction="none"),
    )
    out["Sven dense (functional)"] = lambda: sven.step(batch=(X, Y))
    m3 = mlp()
    sven_c = Sven(m3.parameters(), lr=0.1, rank=8, jacobian="dense")
    out["Sven dense (closure)"] = lambda: sven_c.step(lambda: ce(m3(X), Y, reduction="none"))
    for kind in ("functional", "closure"):  # nonfinite="skip": the masked step
        m8 = mlp()
        extra = dict(model=m8, loss_fn=lambda o, t: ce(o, t, reduction="none"))
        sven_s = Sven(
            m8.parameters(),
            lr=0.1,
            rank=8,
            jacobian="dense",
            nonfinite="skip",
            **(extra if kind == "functional" else {}),
        )
        if kind == "functional":
            out[f"Sven dense ({kind}, skip)"] = lambda o=sven_s: o.step(batch=(X, Y))
        else:
            out[f"Sven dense ({kind}, skip)"] = lambda o=sven_s, m=m8: o.step(
                lambda: ce(m(X), Y, reduction="none")
            )
    m4 = mlp()
    adam4 = torch.optim.Adam(m4.parameters(), lr=1e-3)
    lim = RadiusLimiter(m4, r_max=1.0)

    def limited():
        adam4.zero_grad()
        ce(m4(X), Y).backward()
        lim.step(adam4, X)

    out["Adam + RadiusLimiter.step"] = limited
    for nonfinite in ("skip", "raise"):  # a base optimizer that does not sync
        m6 = mlp()
        sgd = torch.optim.SGD(m6.parameters(), lr=0.1, momentum=0.9)
        lim6 = RadiusLimiter(m6, r_max=1.0, nonfinite=nonfinite)

        def limited_sgd(m6=m6, sgd=sgd, lim6=lim6):
            sgd.zero_grad()
            ce(m6(X), Y).backward()
            lim6.step(sgd, X)

        out[f"SGD(momentum) + RadiusLimiter.step ({nonfinite})"] = limited_sgd
    dro = DROWeighting(temperature=1.0)
    losses = torch.rand(32, generator=g)
    out["DROWeighting.weights"] = lambda: dro.weights(losses)
    dro_s = DROWeighting(temperature=1.0, mode="streaming", nonfinite="skip")
    out["DROWeighting.weights (streaming, skip)"] = lambda: dro_s.weights(losses)
    for name, ctl in (
        ("AdaptiveKL", AdaptiveKLController()),
        ("PIDKL", PIDKLController(target=0.1)),
    ):
        kl = torch.tensor(0.3)
        out[f"{name}.update (tensor kl)"] = lambda ctl=ctl, kl=kl: ctl.update(kl=kl, n_steps=32)
        skip = type(ctl)(**({} if name == "AdaptiveKL" else {"target": 0.1, "delay": 1}))
        skip.nonfinite = "skip"
        out[f"{name}.update (tensor kl, skip)"] = lambda c=skip, kl=kl: c.update(kl=kl, n_steps=32)
    m5 = mlp()
    rn = RegularizedNewton(m5.parameters(), curvature="hessian", solver="cg", cg_maxiter=10)
    out["RegularizedNewton (Hessian, CG <= 10)"] = lambda: rn.step(lambda: ce(m5(X), Y))
    m7 = mlp()
    rn7 = RegularizedNewton(
        m7.parameters(), curvature="hessian", solver="cg", cg_maxiter=10, cg_check_every=10
    )
    out["RegularizedNewton (Hessian, CG <= 10, cg_check_every=10)"] = lambda: rn7.step(
        lambda: ce(m7(X), Y)
    )
    return out


def main() -> None:
    counts = {}
    for name, step in parts().items():
        step()
        step()
        with SyncCounter() as c:
            step()
        counts[name] = {"total": c.total, **dict(c.counts)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sync_counts.json").write_text(json.dumps(counts, indent=2) + "\n")
    lines = [
        "# Host synchronizations per steady-state step (counted on CPU)",
        "",
        "`python benchmarks/sync_counts.py`: the third step of each part, small CPU models;",
        "the calls that would make the host wait for a GPU (tests/_sync.py). Goals (issue 17):",
        "0 for MFAC, Sven dense, the limiter, DROWeighting and the KL controllers' tensor path,",
        "1 per accept test for RegularizedNewton. CPU counts (a 2-core machine shared by eight",
        "sessions); nothing here was measured on a GPU.",
        "",
        "| part | total | by call |",
        "|---|---:|---|",
    ]
    for name, c in counts.items():
        detail = ", ".join(f"{k} {v}" for k, v in c.items() if k != "total")
        lines.append(f"| {name} | {c['total']} | {detail} |")
    lines += [
        "",
        "`torch.optim.Adam` (not capturable) reads its step counter with `item()` once per",
        "parameter: 4 here, all 4 of the limiter's `item` calls under Adam; under SGD (no sync",
        'of its own) the limiter\'s steady-state step has 0 with `nonfinite="skip"` and 1 (the',
        'check, read with the signals in one transfer) with `"raise"`; a limiter\'s first step',
        "(the optimizer creates its state) reads once. MFAC: one read a step (the verdict and",
        'the checks in one transfer) unless `capturable=True` with `nonfinite="skip"`: then',
        "one read every `check_every` (16) steps and where a refresh may be due (docs/mfac.md).",
        "RegularizedNewton: 1 transfer at the",
        "start, 1 per accept test, and CG's reads (every `cg_check_every` iterations; the",
        "iterates do not depend on it). The KL rows with `skip`: PID with `delay=1` (its delay",
        "line full from the first update). Baseline at 4394e63: limiter 6, DROWeighting 1, KL",
        "controllers 1, RegularizedNewton 27; MFAC 6 (__bool__ 1, __float__ 4, tolist 1).",
        'Sven dense: the default `nonfinite="raise"` reads its verdict once per step; with',
        '`"skip"` the step is masked (0), and one step in `SKIP_WARNING` (5) reads the run of',
        "skips (docs/sven.md); 2 each at 06f44c7.",
    ]
    (RESULTS / "sync_counts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""The call the README teaches against the tuned call, side by side (issue 16, part 1).

Per part, on MLPs 1-16-16-16-1 (P = 593) and 1-256-256-1 (P = 66,561), GELU, B = 128,
float32, 1 thread, CPU time (``time.process_time``), arms interleaved in one process, median
of repeats, each against an SGD step of the same model:

- Sven: the README's closure path ``Sven(model.parameters(), lr=0.1, rank=64)`` with a closure
  returning ``(model(x).squeeze(-1) - y) ** 2``, against the functional path
  (``model=``, ``loss_fn=``, ``step(batch=...)``). Goals: closure within 1.2x of the
  functional path at both sizes, and <= 3x an SGD step at P = 593.
- The radius limiter: ``limiter.step(opt, x)`` as the README shows it (``reuse_forward``
  on) against ``reuse_forward=False``, both around Adam, against Adam alone.
- RegularizedNewton: its one path, the closure (Gauss-Newton, CG), against SGD.

Usage: ``python benchmarks/closure_path.py [--repeats N]``; writes
``benchmarks/results/closure_path.{json,md}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import sys

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved

from torchsteer.control import RadiusLimiter
from torchsteer.optim import RegularizedNewton, Sven

torch.set_num_threads(1)
RESULTS = Path(__file__).parent / "results"
B = 128
SIZES = {"P = 593": (1, 16, 16, 16, 1), "P = 66,561": (1, 256, 256, 1)}


def mlp(widths, seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers[:-1])


def per_sample(out, y):
    return (out.squeeze(-1) - y) ** 2


def arms_for(widths, x, y):
    arms = {}
    m = mlp(widths)
    sgd = torch.optim.SGD(m.parameters(), lr=1e-3)

    def sgd_step():
        sgd.zero_grad()
        per_sample(m(x), y).mean().backward()
        sgd.step()

    arms["SGD"] = sgd_step
    m1 = mlp(widths)
    readme = Sven(m1.parameters(), lr=0.1, rank=64)
    arms["Sven closure (README)"] = lambda: readme.step(lambda: per_sample(m1(x), y))
    m2 = mlp(widths)
    tuned = Sven(m2.parameters(), lr=0.1, rank=64, model=m2, loss_fn=per_sample)
    arms["Sven model= (functional)"] = lambda: tuned.step(batch=(x, y))
    for reuse in (True, False):
        mr = mlp(widths)
        opt = torch.optim.Adam(mr.parameters(), lr=1e-3)
        lim = RadiusLimiter(mr, r_max=1.0, reuse_forward=reuse)

        def lim_step(mr=mr, opt=opt, lim=lim):
            opt.zero_grad()
            per_sample(mr(x), y).mean().backward()
            lim.step(opt, x)

        name = (
            "Adam + limiter.step (README, reuse_forward)"
            if reuse
            else "Adam + limiter.step, reuse_forward=False"
        )
        arms[name] = lim_step
    ma = mlp(widths)
    adam = torch.optim.Adam(ma.parameters(), lr=1e-3)

    def adam_step():
        adam.zero_grad()
        per_sample(ma(x), y).mean().backward()
        adam.step()

    arms["Adam"] = adam_step
    mn = mlp(widths)
    newton = RegularizedNewton(
        mn.parameters(), curvature="gauss_newton", solver="cg", cg_maxiter=10
    )

    def newton_closure():
        out = mn(x)
        return per_sample(out, y).mean(), out

    arms["RegularizedNewton closure (GN, CG <= 10)"] = lambda: newton.step(newton_closure)
    return arms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, 1, generator=g) * 2 - 1
    y = torch.sin(3 * x).squeeze(-1)
    out = {"B": B, "repeats": args.repeats, "threads": 1, "clock": "process_time", "sizes": {}}
    for label, widths in SIZES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # RN's all-rejected steps
            med = interleaved(arms_for(widths, x, y), args.repeats, time.process_time)
        out["sizes"][label] = {
            "ms": {k: 1e3 * v for k, v in med.items()},
            "ratio_to_sgd": {k: v / med["SGD"] for k, v in med.items()},
            "closure_over_functional": med["Sven closure (README)"]
            / med["Sven model= (functional)"],
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "closure_path.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# The README's call against the tuned call",
        "",
        f"`python benchmarks/closure_path.py --repeats {args.repeats}`: B = {B}, float32, 1 thread,"
        " CPU time, arms interleaved, median of the repeats.",
        "",
    ]
    for label, res in out["sizes"].items():
        lines += [f"## {label}", "", "| arm | ms | / SGD |", "|---|---:|---:|"]
        for k, v in res["ms"].items():
            lines.append(f"| {k} | {v:.2f} | {res['ratio_to_sgd'][k]:.2f} |")
        lines += ["", f"Sven closure / functional: **{res['closure_over_functional']:.2f}x**", ""]
    (RESULTS / "closure_path.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

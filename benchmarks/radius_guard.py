"""Cost of the radius limiter's pre-step gradient check (issue 18 #2).

The limiter checks ``max_i |g_i|`` of the gradients before the base optimizer steps (one
infinity-norm reduction per tensor and one flag to the host), so that a NaN/Inf gradient never
reaches Adam's moments. Measured here on the lr-spike models (digits, full batch, 1 thread),
the arms interleaved step by step in one process, ``time.process_time``, median over steps:

- ``plain``: forward, backward, ``Adam.step()``;
- ``limiter``: the same with ``RadiusLimiter.step`` (the check included);
- ``limiter, no check``: ``before_step(check_gradients=False)``, ``Adam.step()``,
  ``after_step`` (what the limiter did before the check);
- ``check alone``: the check on the step's gradients, timed by itself (the sum of the
  per-tensor 2-norms decides; the infinity norm runs only when that sum is not finite);
- ``inf-norm check``: the same decision by the infinity norm alone, for comparison.

Results: ``benchmarks/results/radius_guard.{json,md}``.
Run: ``OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src python benchmarks/radius_guard.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import math

import torch
import torch.nn.functional as F

from torchsteer.bench import data
from torchsteer.bench.suites import lr_spike
from torchsteer.control.radius import RadiusLimiter
from torchsteer.control.radius.limiter import _gradients_finite

RESULTS = Path(__file__).parent / "results"
ARMS = ("plain", "limiter", "limiter, no check")


def measure(name: str, steps: int, warmup: int = 3) -> dict:
    x, y, _, _ = data.digits()
    arms = {}
    for arm in ARMS:
        model = lr_spike.make_model(name, 0)
        opt = torch.optim.Adam(model.parameters(), lr=lr_spike.LR)
        arms[arm] = (model, opt, None if arm == "plain" else RadiusLimiter(model))
    times = {a: [] for a in (*ARMS, "check alone", "inf-norm check")}
    for i in range(warmup + steps):
        for arm, (model, opt, lim) in arms.items():
            start = time.process_time()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            if lim is None:
                opt.step()
            elif arm == "limiter":
                lim.step(opt, x)
            else:
                lim.before_step(opt, x, check_gradients=False)
                opt.step()
                lim.after_step(x)
            if i >= warmup:
                times[arm].append(time.process_time() - start)
            if arm == "limiter, no check":  # the check alone, on these gradients
                named = [(None, p) for p in model.parameters()]
                start = time.process_time()
                _gradients_finite(named)
                if i >= warmup:
                    times["check alone"].append(time.process_time() - start)
                grads = [p.grad for p in model.parameters()]
                start = time.process_time()
                bool(torch.stack(torch._foreach_norm(grads, ord=math.inf)).isfinite().all())
                if i >= warmup:
                    times["inf-norm check"].append(time.process_time() - start)
    med = {a: 1e3 * statistics.median(t) for a, t in times.items()}
    return {
        "step_ms": med,
        "ratio_to_plain": {a: med[a] / med["plain"] for a in ARMS},
        "check_share_of_limited_step": med["check alone"] / med["limiter"],
        "steps": steps,
        "parameters": sum(p.numel() for p in arms["plain"][0].parameters()),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {
        "models": {
            "MLP+LN": measure("MLP+LN", args.steps),
            "CNN+BN": measure("CNN+BN", max(args.steps // 10, 10)),
        },
        "meta": {
            "torch": torch.__version__,
            "machine": platform.machine(),
            "threads": 1,
            "clock": "time.process_time, arms interleaved step by step",
            "load_average": os.getloadavg(),
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "radius_guard.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# Radius limiter: cost of the pre-step gradient check (issue 18 #2)",
        "",
        "`PYTHONPATH=src python benchmarks/radius_guard.py` (digits, full batch, 1 thread, "
        "CPU time, arms interleaved; median ms per training step).",
        "",
        "| model | P | plain | limiter | limiter, no check | check alone | inf-norm check "
        "| check / limited step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in out["models"].items():
        ms = m["step_ms"]
        lines.append(
            f"| {name} | {m['parameters']} | {ms['plain']:.3f} | {ms['limiter']:.3f} "
            f"({m['ratio_to_plain']['limiter']:.2f}x) | {ms['limiter, no check']:.3f} "
            f"({m['ratio_to_plain']['limiter, no check']:.2f}x) | {ms['check alone']:.4f} | "
            f"{ms['inf-norm check']:.4f} | "
            f"{100 * m['check_share_of_limited_step']:.1f} % |"
        )
    lines += [
        "",
        f"Load average at the end: {os.getloadavg()[0]:.1f} on this shared machine: the "
        "'limiter' and 'limiter, no check' columns differ by less than their run-to-run "
        "spread; the check's own time is the figure to read.",
    ]
    (RESULTS / "radius_guard.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

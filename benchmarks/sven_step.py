"""Sven step cost, memory and sketch accuracy.

Writes ``benchmarks/results/sven_step.{json,md}``. Everything runs on 1 thread and is timed
with ``time.process_time`` (CPU time), arms interleaved in one process, median of repeats.

1. Step cost: Sven / SGD for rank in {8, 32, 64, 128}, dense and matrix-free (functional
   path, ``step(batch=...)``), plus the dense graph path (``step(closure)``) at rank 64, on
   MLPs 1-16-16-16-1 (P = 593) and 1-256-256-1 (P = 66,561), GELU, B = 128, float32.
   Goals: <= 7x SGD at P = 593; <= 100 ms per step at P = 66,561.
2. Peak extra memory (growth of the peak RSS, VmHWM reset just before the step, in a fresh
   subprocess with ``MALLOC_MMAP_THRESHOLD_=65536``, after a warm-up that loads the
   libraries): the dense path at P = 66,561 against the size of its Jacobian (goal <= 3x),
   and the matrix-free path on 1-1000-1000-1 (P = 1,004,001), B = 128 (goal <= 2 GB).
3. Sketch accuracy on the paper's regression task along a Sven run: the relative error of the
   randomized step (float32) against the exact truncated step (float64 Gram) at rank 8 (the
   defaults and the reference implementation's oversample 5 / 1 power iteration), the rank kept by
   rtol = 1e-3 when up to 128 triplets are allowed.

Usage: ``python benchmarks/sven_step.py [--quick]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
from torch import nn

from torchsteer.bench.data import regression_1d
from torchsteer.jacobian.per_sample import per_sample_jacobian
from torchsteer.optim._sven_step import SolveConfig, solve_dense
from torchsteer.optim.sven import Sven

torch.set_num_threads(1)
RESULTS = Path(__file__).parent / "results"
B = 128
RANKS = (8, 32, 64, 128)


def mlp(widths, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    layers = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def loss_fn(out, y):
    return ((out - y) ** 2).reshape(out.shape[0], -1).sum(1)


def make_arms(widths, x, y):
    """name -> step function; each arm owns a model copy with the same initialization."""
    arms = {}
    model = mlp(widths)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3)

    def sgd_step(model=model, opt=sgd):
        opt.zero_grad()
        loss_fn(model(x), y).mean().backward()
        opt.step()

    arms["SGD"] = sgd_step
    for jac, rank in itertools.product(("dense", "matrix_free"), RANKS):
        m = mlp(widths)
        opt = Sven(m.parameters(), lr=1e-3, rank=rank, jacobian=jac, model=m, loss_fn=loss_fn)
        arms[f"Sven {jac} rank {rank}"] = lambda opt=opt: opt.step(batch=(x, y))
    m = mlp(widths)
    opt = Sven(m.parameters(), lr=1e-3, rank=64, jacobian="dense")
    arms["Sven dense rank 64 (graph path)"] = lambda opt=opt, m=m: opt.step(
        lambda: loss_fn(m(x), y)
    )
    return arms


def step_cost(widths, repeats):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, 1, generator=g) * 2 - 1
    y = torch.sin(3 * x)
    arms = make_arms(widths, x, y)
    times = {name: [] for name in arms}
    for step in arms.values():  # warm-up
        step()
    for _ in range(repeats):
        for name, step in arms.items():
            t0 = time.process_time()
            step()
            times[name].append(time.process_time() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    P = sum(p.numel() for p in mlp(widths).parameters())
    return {
        "P": P,
        "widths": list(widths),
        "B": B,
        "repeats": repeats,
        "ms": {k: 1e3 * v for k, v in med.items()},
        "ratio_to_sgd": {k: v / med["SGD"] for k, v in med.items()},
    }


# ---------------------------------------------------------------- memory (subprocess)
def _status_bytes(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak():
    """Reset the peak-RSS counter (VmHWM) to the current RSS (Linux ``clear_refs`` 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def memory_probe(kind):
    """Runs in a fresh process: peak RSS growth of one Sven step."""
    widths = (1, 256, 256, 1) if kind == "dense" else (1, 1000, 1000, 1)
    jac = "dense" if kind == "dense" else "matrix_free"
    warm = mlp((1, 8, 1))  # load the linear-algebra and functorch code paths
    xs, ys = torch.randn(B, 1), torch.randn(B, 1)
    for j in ("dense", "matrix_free"):
        Sven(warm.parameters(), rank=4, jacobian=j, model=warm, loss_fn=loss_fn).step(
            batch=(xs, ys)
        )
    model = mlp(widths)
    P = sum(p.numel() for p in model.parameters())
    x, y = torch.randn(B, 1), torch.randn(B, 1)
    loss_fn(model(x), y).mean().backward()  # parameters' grads and autograd buffers exist
    opt = Sven(model.parameters(), lr=1e-3, rank=64, jacobian=jac, model=model, loss_fn=loss_fn)
    _reset_peak()
    before = _status_bytes("VmRSS")
    t0 = time.process_time()
    opt.step(batch=(x, y))
    cpu = time.process_time() - t0
    extra = _status_bytes("VmHWM") - before
    state = opt.state[next(model.parameters())]
    print(
        json.dumps(
            {
                "kind": kind,
                "P": P,
                "B": B,
                "rank": 64,
                "jacobian_bytes": B * P * 4,
                "peak_extra_bytes": extra,
                "ratio_to_jacobian": extra / (B * P * 4),
                "step_cpu_s": cpu,
                "kept_rank": int(state["kept_rank"]),
            }
        )
    )


def memory(kind):
    out = subprocess.run(
        [sys.executable, __file__, "--memory-probe", kind],
        capture_output=True,
        text=True,
        check=True,
        # large blocks always mmapped, so freed memory leaves the RSS and peaks are honest
        env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- sketch accuracy
def accuracy(seeds, steps, checkpoints):
    xt, yt, _, _ = regression_1d(2_000, 10, seed=0)
    settings = {"defaults (oversample 10, power_iters 2)": (10, 2), "reference (5, 1)": (5, 1)}
    errors = {k: [] for k in settings}
    kept = []
    for seed in seeds:
        model = mlp((1, 16, 16, 16, 1), seed=seed)
        opt = Sven(model.parameters(), lr=0.1, rank=64, model=model, loss_fn=loss_fn, seed=seed)
        g = torch.Generator().manual_seed(seed)
        for it in range(steps + 1):
            idx = torch.randint(0, xt.shape[0], (B,), generator=g)
            x, y = xt[idx], yt[idx]
            if it in checkpoints:
                named = dict(model.named_parameters())
                losses, M = per_sample_jacobian(model, loss_fn, x, y, named, return_values=True)
                exact = solve_dense(M, losses, SolveConfig(8, 1e-3, 0, 0, torch.float64), None)
                full = solve_dense(M, losses, SolveConfig(128, 1e-3, 0, 0, torch.float64), None)
                kept.append(int(full.kept_rank))
                for name, (p, q) in settings.items():
                    for s in range(3):
                        gen = torch.Generator().manual_seed(1000 * seed + s)
                        r = solve_dense(M, losses, SolveConfig(8, 1e-3, p, q, exact_svd=False), gen)
                        err = (r.direction - exact.direction).norm() / exact.direction.norm()
                        errors[name].append(float(err))
            opt.step(batch=(x, y))
    return {
        "rank": 8,
        "rtol": 1e-3,
        "points": f"seeds {list(seeds)} x steps {list(checkpoints)} x 3 sketches",
        "relative_step_error": {
            k: {"median": statistics.median(v), "max": max(v)} for k, v in errors.items()
        },
        "kept_rank_rtol_1e-3_of_128": {
            "min": min(kept),
            "median": statistics.median(kept),
            "max": max(kept),
        },
    }


# ---------------------------------------------------------------- report
def write_markdown(res):
    lines = [
        "# Sven step cost, memory and sketch accuracy",
        "",
        f"`python benchmarks/sven_step.py{' --quick' if res['quick'] else ''}`; 1 thread, CPU "
        "time (`time.process_time`), arms interleaved, median. **The machine was shared with "
        f"other jobs** (load average {res['load_average']:.1f} on {os.cpu_count()} cores at the "
        "start), so absolute times are inflated; the ratios are the robust figure.",
        "",
    ]
    for c in res["step_cost"]:
        lines += [
            f"## Step cost, P = {c['P']:,} (MLP {'-'.join(map(str, c['widths']))}), B = {c['B']}",
            "",
            "| arm | ms / step | x SGD |",
            "|---|---:|---:|",
        ]
        for k, ms in c["ms"].items():
            lines.append(f"| {k} | {ms:.2f} | {c['ratio_to_sgd'][k]:.1f} |")
        lines.append("")
    lines += [
        "## Peak extra memory of one step",
        "",
        "| path | P | Jacobian (MB) | peak extra (MB) | x Jacobian | step CPU s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in res["memory"]:
        lines.append(
            f"| {m['kind']} | {m['P']:,} | {m['jacobian_bytes'] / 2**20:.0f} | "
            f"{m['peak_extra_bytes'] / 2**20:.0f} | {m['ratio_to_jacobian']:.2f} | "
            f"{m['step_cpu_s']:.2f} |"
        )
    a = res["accuracy"]
    lines += [
        "",
        f"## Randomized vs exact truncated step, rank {a['rank']}, rtol {a['rtol']}",
        "",
        f"Regression task (MLP 1-16-16-16-1) along a Sven run: {a['points']}.",
        "",
        "| sketch | median rel. error | max rel. error |",
        "|---|---:|---:|",
    ]
    for k, v in a["relative_step_error"].items():
        lines.append(f"| {k} | {v['median']:.1e} | {v['max']:.1e} |")
    k = a["kept_rank_rtol_1e-3_of_128"]
    lines += [
        "",
        f"Kept rank under rtol = 1e-3 (rank cap 128): min {k['min']}, median "
        f"{k['median']}, max {k['max']}.",
        "",
    ]
    if "regression" in res:  # recorded by hand (see the note), rendered when present
        r = res["regression"]
        lines += [
            "## Regression suite, Adam grid vs Sven (lr 0.1, rank 64)",
            "",
            r["note"],
            "",
            "| seed | best Adam final | Sven final | fastest Adam to 1e-4 (s) | Sven to 1e-4 (s) "
            "| fine eval: Adam / Sven (s, steps) |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for row in r["rows"]:
            lines.append(
                f"| {row['seed']} | {row['adam_final']:.2e} ({row['adam_final_arm']}) | "
                f"{row['sven_final']:.2e} | {row['adam_ttt']:.2f} | {row['sven_ttt']:.2f} | "
                f"{row['fine_adam_ttt']:.2f} ({row['fine_adam_steps']}) / "
                f"{row['fine_sven_ttt']:.2f} ({row['fine_sven_steps']}) |"
            )
        lines.append("")
    (RESULTS / "sven_step.md").write_text("\n".join(lines))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-probe", choices=("dense", "matrix_free"))
    parser.add_argument(
        "--only", choices=("cost", "memory", "accuracy"), help="rerun one section, keep the rest"
    )
    args = parser.parse_args()
    if args.memory_probe:
        memory_probe(args.memory_probe)
        return
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "sven_step.json"
    res = json.loads(path.read_text()) if args.only and path.exists() else {}
    res.update(quick=args.quick, torch=torch.__version__)
    res.setdefault("load_average", os.getloadavg()[0])
    if args.only in (None, "cost"):
        res["step_cost"] = [
            step_cost((1, 16, 16, 16, 1), 10 if args.quick else 40),
            step_cost((1, 256, 256, 1), 3 if args.quick else 9),
        ]
    if args.only in (None, "memory"):
        res["memory"] = [memory("dense"), memory("matrix_free")]
    if args.only in (None, "accuracy"):
        res["accuracy"] = accuracy(
            range(1) if args.quick else range(3), 100 if args.quick else 300, (0, 100, 300)
        )
    (RESULTS / "sven_step.json").write_text(json.dumps(res, indent=2))
    write_markdown(res)
    print((RESULTS / "sven_step.md").read_text())


if __name__ == "__main__":
    main()

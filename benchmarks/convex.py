"""RegularizedNewton vs SciPy and L-BFGS to f - f* <= 1e-8: the full ``convex`` suite + d = 1e5.

Runs every arm of :mod:`torchsteer.bench.suites.convex` on its full problem set (logistic
regression d = 100 and 1000, breast-cancer, digits softmax, the digits MLP) and on a sparse
logistic regression with d = 100 000 (n = 2000, 200 nonzeros per row), where only the
matrix-free arms can run (a P x P float64 matrix would take 80 GB). One thread for torch and
for NumPy's BLAS, ``time.process_time``; arms interleaved; every arm whose first run took under
``--repeat-below`` CPU seconds is run ``--repeats`` times and the median CPU time reported.

Writes ``benchmarks/results/convex.json`` (every run's counts) and ``convex.md`` (the table).

    python benchmarks/convex.py [--repeats 3] [--skip-big]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from torchsteer.bench.suites import _convex_problems as problems
from torchsteer.bench.suites import convex

OUT = Path(__file__).parent / "results"


def big_problem():
    p = problems.logistic_synthetic(100_000, sparse=True)
    _, p.f_star, gnorm = problems.newton_polish(p, np.zeros(p.d), maxiter=100)
    print(f"{p.name}: f* = {p.f_star:.15g} (|g| = {gnorm:.1e})", flush=True)
    return p


def runnable(arm, problem) -> str | None:
    """Why an arm is not run on a problem (None if it is)."""
    if arm.needs_numpy and problem.fg is None:
        return "no NumPy oracle (torch-only problem)"
    if arm.dense and problem.d > 20_000:
        gb = problem.d**2 * 8 / 2**30
        return f"cannot run: needs a {problem.d} x {problem.d} float64 matrix ({gb:.0f} GiB)"
    if not arm.fits(problem, False):
        return (
            f"not run: the dense per-sample / output-space matrices (n = {problem.n_samples}, "
            f"{problem.n_outputs} outputs, d = {problem.d}) cost too much on this machine"
        )
    return None


def summarize(runs):
    r0 = runs[0]
    times = [r.time_to_target for r in runs if r.time_to_target is not None]
    e = r0.extra
    return {
        "problem": e["problem"],
        "arm": e["arm"],
        "d": e["d"],
        "reached": bool(e["reached"]),
        "iterations": e["iterations"],
        "fg_calls": e["fg_calls"],
        "hvp_calls": e["hvp_calls"],
        "hessians": e["hessians"],
        "cpu_to_target_median": statistics.median(times) if times else None,
        "cpu_to_target_all": times,
        "cpu_total_first": r0.cpu_time[-1],
        "final_metric": r0.metric[-1],
        "repeats": len(runs),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeat-below", type=float, default=5.0)
    ap.add_argument("--skip-big", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows, skipped = [], []
    with threadpool_limits(limits=1):
        probs = convex.make_problems(quick=False)
        if not args.skip_big:
            probs.append(big_problem())
        for problem in probs:
            arm_list = []
            for arm in convex.arms(nonconvex=not problem.convex):
                why = runnable(arm, problem)
                if why is None:
                    arm_list.append(arm)
                else:
                    skipped.append({"problem": problem.name, "arm": arm.name, "why": why})
            runs = {a.name: [] for a in arm_list}
            for rep in range(args.repeats):  # interleaved: every arm once per round
                for arm in arm_list:
                    if rep and runs[arm.name][0].cpu_time[-1] > args.repeat_below:
                        continue
                    runs[arm.name].append(convex.run_arm(arm, problem, quick=False))
            for arm in arm_list:
                row = summarize(runs[arm.name])
                rows.append(row)
                print(
                    f"{row['problem']:20s} {row['arm']:30s} it={row['iterations']:5d} "
                    f"reached={row['reached']!s:5s} cpu={row['cpu_to_target_median']} "
                    f"fg={row['fg_calls']} hv={row['hvp_calls']} H={row['hessians']}",
                    flush=True,
                )
    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": 1,
        "repeats": args.repeats,
        "repeat_below_s": args.repeat_below,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "note": "shared 2-core machine loaded by other jobs: absolute CPU times are inflated "
        "and noisy; compare arms within a problem (interleaved, same process)",
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "convex.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "skipped": skipped}, indent=1)
    )
    (OUT / "convex.md").write_text(markdown(rows, skipped, meta))


def _fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def goals(rows) -> list[str]:
    by = {(r["problem"], r["arm"]): r for r in rows}
    out = []
    for prob in sorted({r["problem"] for r in rows}):
        te = by.get((prob, "SciPy trust-exact"))
        rn = by.get((prob, "RN hessian/cg"))
        ncg = by.get((prob, "SciPy Newton-CG (Hv)"))
        if te and rn and te["reached"]:
            ok = rn["reached"] and rn["iterations"] <= te["iterations"]
            out.append(
                f"- {prob}: RN hessian/cg {rn['iterations']} iterations vs trust-exact "
                f"{te['iterations']}: {'met' if ok else 'NOT met'}"
            )
        if rn and ncg and ncg["cpu_to_target_median"] and rn["cpu_to_target_median"]:
            ratio = rn["cpu_to_target_median"] / ncg["cpu_to_target_median"]
            out.append(
                f"- {prob}: CPU time RN hessian/cg / SciPy Newton-CG(Hv) = {ratio:.2f} "
                f"({'met' if ratio <= 1 else 'NOT met'})"
            )
    return out


def markdown(rows, skipped, meta) -> str:
    lines = [
        "# convex: RegularizedNewton vs SciPy and L-BFGS (f - f* <= 1e-8)",
        "",
        f"`python benchmarks/convex.py`, {meta['date']}, torch {meta['torch']}, 1 thread "
        f"(torch and BLAS), CPU seconds by `time.process_time`, median of up to "
        f"{meta['repeats']} interleaved runs (arms over {meta['repeat_below_s']} s: one run).",
        f"**{meta['note']}.** The MLP row's target is f <= {convex.MLP_TARGET} "
        "(non-convex, no f*).",
        "",
        "| problem | arm | reached | iterations | f/g calls | Hv calls | dense Hessians "
        "| CPU s to target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['problem']} | {r['arm']} | {'yes' if r['reached'] else 'no'} | "
            f"{r['iterations']} | {r['fg_calls']} | {r['hvp_calls']} | {r['hessians']} | "
            f"{_fmt(r['cpu_to_target_median'])} |"
        )
    lines += ["", "Not run:", ""]
    lines += [f"- {s['problem']} / {s['arm']}: {s['why']}" for s in skipped]
    lines += ["", "Goals:", "", *goals(rows), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

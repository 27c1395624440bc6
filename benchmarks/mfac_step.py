"""M-FAC step cost against its physical limit, float32/float64 accuracy, and peak memory.

For each (d, m) a fresh subprocess (so that ``ru_maxrss`` is a clean high-water mark) builds an
``MFAC`` optimizer on one parameter of ``d`` float32 numbers, fills its window with random
gradients (``GradientWindow.rebuild``), then times, interleaved and repeated (median,
``time.process_time``, 2 threads, ``OMP_WAIT_POLICY=PASSIVE``):

* ``step``:  ``opt.step()`` with a fresh gradient (the full optimizer step);
* ``limit``: ``G @ v`` followed by ``G.T @ c`` on the same window ``G`` -- the two passes over
  the window that any step needs.

The O(m^3) Cholesky refresh of the m x m inverse runs once every ``m`` steps; it is timed
separately and reported amortized (``ratio_amortized = (step + refresh / m) / limit``).

Accuracy: relative error of the float32 product (window, Gram row, product) against the same
computation in float64 on the same float32-representable gradients, damp 1e-5, through a
ring wrap-around, for two gradient models (isotropic Gaussian; low-rank signal plus noise).
The primal Woodbury form ``(g - G^T c) / damp`` is shown beside the form the step uses.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/mfac_step.py          # full grid
    OMP_WAIT_POLICY=PASSIVE python benchmarks/mfac_step.py --quick  # d = 1e5 only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from torchsteer.linalg.gradient_window import GradientWindow
from torchsteer.optim.mfac import MFAC

RESULTS = Path(__file__).resolve().parent / "results"
# The measurements of the official code (patched to run on CPU), step / limit.
OFFICIAL = {(10**6, 64): 1.21, (10**6, 256): 1.12, (10**6, 1024): 1.19,
            (10**5, 64): 3.6, (10**5, 256): 1.6, (10**5, 1024): 3.2}  # fmt: skip


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _cpu(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def worker(d: int, m: int, reps: int) -> dict:
    """One configuration in this process (called in a subprocess by ``main``)."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    grads = [torch.randn(d) / d**0.5 for _ in range(4)]
    param = torch.nn.Parameter(torch.zeros(d))
    v, c = torch.randn(d), torch.randn(m)
    warm = MFAC([torch.nn.Parameter(torch.zeros(1000))], ngrads=8)  # load kernels and libraries
    for _ in range(10):
        warm.param_groups[0]["params"][0].grad = torch.randn(1000)
        warm.step()
    warm._window.rebuild()
    del warm
    rss0 = _maxrss_bytes()
    opt = MFAC([param], lr=1e-3, ngrads=m, damp=1e-5)
    param.grad = grads[0]
    opt.step()  # creates the window
    window = opt._window
    for start in range(0, m, 64):  # fill with random rows, then Gram + inverse from them
        window.grads[start : start + 64].normal_().div_(d**0.5)
    window.rebuild(block_size=max(16, 2**16 // m))  # float64 temporaries of 0.5 MB
    rss_filled = _maxrss_bytes()

    def limit():
        window.grads @ v
        window.grads.T @ c

    steps, limits = [], []
    for r in range(reps):
        param.grad = grads[r % len(grads)]
        steps.append(_cpu(opt.step))
        limits.append(_cpu(limit))
    rss_end = _maxrss_bytes()
    refresh = statistics.median(_cpu(window.refresh) for _ in range(3))
    step_t, limit_t = statistics.median(steps), statistics.median(limits)
    window_bytes = m * d * 4
    return {
        "d": d,
        "m": m,
        "reps": reps,
        "step_s": step_t,
        "limit_s": limit_t,
        "ratio": step_t / limit_t,
        "refresh_s": refresh,
        "ratio_amortized": (step_t + refresh / m) / limit_t,
        "window_bytes": window_bytes,
        "peak_extra_bytes": rss_end - rss0,
        "peak_beyond_window_bytes": rss_end - rss0 - window_bytes,
        "step_peak_growth_bytes": rss_end - rss_filled,
        "official_ratio": OFFICIAL.get((d, m)),
        "robust_refreshes": window.robust_refreshes,
    }


def _cuda_timed(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def cuda_config(d: int, m: int, reps: int = 20) -> dict:
    """Step / limit on CUDA (float32), timed with CUDA events, arms interleaved, median."""
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.zeros(d, device="cuda"))
    grads = [torch.randn(d, device="cuda") / d**0.5 for _ in range(4)]
    v, c = torch.randn(d, device="cuda"), torch.randn(m, device="cuda")
    opt = MFAC([param], lr=1e-3, ngrads=m, damp=1e-5)
    param.grad = grads[0]
    opt.step()
    window = opt._window
    window.grads.normal_().div_(d**0.5)
    window.rebuild()

    def limit():
        window.grads @ v
        window.grads.T @ c

    steps, limits = [], []
    for r in range(reps + 3):
        param.grad = grads[r % len(grads)]
        step_r, limit_r = _cuda_timed(opt.step), _cuda_timed(limit)
        if r >= 3:  # warm-up
            steps.append(step_r)
            limits.append(limit_r)
    refresh = statistics.median(_cuda_timed(window.refresh) for _ in range(3))
    step_t, limit_t = statistics.median(steps), statistics.median(limits)
    return {"d": d, "m": m, "step_s": step_t, "limit_s": limit_t, "ratio": step_t / limit_t,
            "refresh_s": refresh, "ratio_amortized": (step_t + refresh / m) / limit_t,
            "device": torch.cuda.get_device_name()}  # fmt: skip


def _gradients(kind: str, n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn(n, d, generator=gen) / d**0.5
    basis = torch.randn(d, 8, generator=gen) / d**0.5
    signal = torch.randn(n, 8, generator=gen) @ basis.T
    return (signal + 0.1 * torch.randn(n, d, generator=gen) / d**0.5).to(torch.float32)


def accuracy(d: int, m: int, kind: str, damp: float = 1e-5) -> dict:
    """Max relative error over the last 8 steps (after a wrap-around) of float32 vs float64."""
    gen = torch.Generator().manual_seed(1)
    gs = _gradients(kind, m + 8, d, gen).to(torch.float32)
    w32 = GradientWindow(m, d, damp, dtype=torch.float32)
    w64 = GradientWindow(m, d, damp, dtype=torch.float64)
    err_dual, err_primal = 0.0, 0.0
    for t in range(m + 8):
        u32 = w32.add_and_solve(gs[t]).double()
        u64 = w64.add_and_solve(gs[t].double())
        if t >= m:
            scale = u64.norm()
            err_dual = max(err_dual, float((u32 - u64).norm() / scale))
            primal = w32.solve(gs[t]).double()  # (g - G^T c) / damp in float32
            err_primal = max(err_primal, float((primal - u64).norm() / scale))
    return {"d": d, "m": m, "gradients": kind, "damp": damp,
            "rel_err_step": err_dual, "rel_err_primal_form": err_primal}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d = 1e5 only, fewer repeats")
    parser.add_argument("--worker", nargs=3, type=int, metavar=("D", "M", "REPS"))
    parser.add_argument("--cuda", action="store_true", help="CUDA step/limit grid only")
    args = parser.parse_args()
    if args.cuda:
        rows = []
        for d, m in [(10**6, 256), (10**6, 1024), (10**7, 256), (10**7, 1024)]:
            rows.append(cuda_config(d, m))
            print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "mfac_step_cuda.json").write_text(json.dumps(rows, indent=1))
        return
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="2")
    dims = [10**5] if args.quick else [10**5, 10**6]
    rows = []
    for d in dims:
        for m in (64, 256, 1024):
            reps = (7 if d * m >= 2 * 10**8 else 15) if not args.quick else 7
            cmd = [sys.executable, __file__, "--worker", str(d), str(m), str(reps)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    torch.set_num_threads(2)
    acc = [accuracy(d, m, kind) for kind in ("gaussian", "lowrank")
           for d, m in ((10**5, 64), (10**5, 256), (2 * 10**4, 1024))]  # fmt: skip
    for a in acc:
        print(json.dumps(a), flush=True)
    meta = {"torch": torch.__version__, "threads": 2, "OMP_WAIT_POLICY": "PASSIVE",
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "note": "shared 2-core machine loaded by other jobs; CPU time, medians"}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    name = "mfac_step_quick" if args.quick else "mfac_step"
    (RESULTS / f"{name}.json").write_text(
        json.dumps({"meta": meta, "step": rows, "accuracy": acc}, indent=1)
    )
    (RESULTS / f"{name}.md").write_text(_markdown(meta, rows, acc))


def _markdown(meta: dict, rows: list[dict], acc: list[dict]) -> str:
    lines = [
        "# M-FAC step cost, accuracy, memory",
        "",
        f"`OMP_WAIT_POLICY=PASSIVE python benchmarks/mfac_step.py` -- torch {meta['torch']}, "
        f"float32, {meta['threads']} threads, CPU time (medians, arms interleaved). "
        "The machine was shared with other jobs: ratios are noisier than on an idle machine.",
        "",
        "limit = `G @ v` + `G.T @ c` on the same window; amortized adds the O(m^3) refresh / m; "
        "official = the issue's measurement of the official code patched for CPU.",
        "",
        "| d | m | step ms | limit ms | step/limit | amortized | official | window MB "
        "| peak beyond window MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['d']:.0e} | {r['m']} | {1e3 * r['step_s']:.1f} | {1e3 * r['limit_s']:.1f} "
            f"| {r['ratio']:.3f} | {r['ratio_amortized']:.3f} | {r['official_ratio']} "
            f"| {r['window_bytes'] / 2**20:.0f} | {r['peak_beyond_window_bytes'] / 2**20:.1f} |"
        )
    lines += ["", "Relative error, float32 vs float64, damp 1e-5, after a ring wrap-around:", "",
              "| gradients | d | m | step (m G^T M e_j) | primal (g - G^T c)/damp |",
              "|---|---|---|---|---|"]  # fmt: skip
    for a in acc:
        lines.append(
            f"| {a['gradients']} | {a['d']:.0e} | {a['m']} | {a['rel_err_step']:.2e} "
            f"| {a['rel_err_primal_form']:.2e} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""M-FAC step cost and window bytes: dense vs blocked vs bfloat16 window, at d ~ 1e6.

One float32 parameter of ``d`` numbers; for each window size ``m`` four (or more) MFAC arms:

* ``dense``: the default float32 window (the baseline of the ratios);
* ``blocked``: ``block_size`` 2^16 (16 blocks) and 2^18 (4 blocks), float32;
* ``bf16``: ``window_dtype=torch.bfloat16`` (stored in bf16, passes in float32);
* ``blocked bf16``: both.

Every arm first fills its window (``m`` steps), then the arms are timed interleaved
(``time.process_time`` around ``opt.step()`` with a fresh random gradient, 1 thread,
``OMP_NUM_THREADS=1``), over ``2 m`` steps each so the Cholesky refreshes (every ``m`` steps,
per block) are included in the mean. Bytes: ``mfac_window_bytes`` (checked against the
tensors the optimizer holds). Agreement: the relative difference of each arm's last update
from the dense float32 arm's on the same gradients (blocked arms differ by design: block-
diagonal curvature).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/mfac_blocked.py           # d = 2^20, m = 32, 64
    OMP_NUM_THREADS=1 python benchmarks/mfac_blocked.py --quick   # d = 2^18, m = 16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from torchsteer.optim import MFAC, mfac_window_bytes

RESULTS = Path(__file__).resolve().parent / "results"

ARMS = {
    "dense": dict(),
    "blocked 2^18": dict(block_size=1 << 18),
    "blocked 2^16": dict(block_size=1 << 16),
    "bf16": dict(window_dtype=torch.bfloat16),
    "blocked 2^16 bf16": dict(block_size=1 << 16, window_dtype=torch.bfloat16),
}


def held_bytes(opt: MFAC) -> int:
    state = opt.state[opt.param_groups[0]["params"][0]]
    keys = ("window_grads", "window_gram", "window_inverse")
    return sum(state[k].numel() * state[k].element_size() for k in keys) + (
        opt._flat.numel() * opt._flat.element_size()
    )


def run(d: int, m: int, damp: float = 1e-4) -> list[dict]:
    gen = torch.Generator().manual_seed(m)
    arms = {}
    for name, kw in ARMS.items():
        p = torch.nn.Parameter(torch.zeros(d))
        arms[name] = (p, MFAC([p], lr=1e-3, ngrads=m, damp=damp, **kw), [])
    for _ in range(m):  # fill every window with the same gradients
        g = torch.randn(d, generator=gen)
        for p, opt, _ in arms.values():
            p.grad = g.clone()
            opt.step()
    updates = {}
    for _ in range(2 * m):  # interleaved: every arm steps on the same gradient in turn
        g = torch.randn(d, generator=gen)
        for name, (p, opt, times) in arms.items():
            p.grad = g.clone()
            before = p.detach().clone()
            start = time.process_time()
            opt.step()
            times.append(time.process_time() - start)
            updates[name] = before - p.detach()
    base = statistics.fmean(arms["dense"][2])
    rows = []
    for name, (_p, opt, times) in arms.items():
        kw = ARMS[name]
        dtype = kw.get("window_dtype", torch.float32)
        nbytes = mfac_window_bytes(d, m, kw.get("block_size"), dtype)
        assert nbytes == held_bytes(opt), name
        ref = updates["dense"]
        rows.append(
            dict(
                d=d,
                m=m,
                arm=name,
                step_ms=1e3 * statistics.fmean(times),
                median_ms=1e3 * statistics.median(times),
                ratio=statistics.fmean(times) / base,
                window_bytes=nbytes,
                vs_dense=float((updates[name] - ref).norm() / ref.norm()),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    grid = [(1 << 18, 16)] if args.quick else [(1 << 20, 32), (1 << 20, 64)]
    rows = [row for d, m in grid for row in run(d, m)]
    meta = dict(
        torch=torch.__version__,
        platform=platform.platform(),
        threads=1,
        note="CPU time, 1 thread, on a 2-core machine shared by eight engineers",
    )
    stem = "mfac_blocked_quick" if args.quick else "mfac_blocked"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [
        "# M-FAC: dense vs blocked vs bfloat16 window",
        "",
        f"`OMP_NUM_THREADS=1 python benchmarks/mfac_blocked.py{' --quick' if args.quick else ''}`"
        f" (torch {torch.__version__}, CPU time, 1 thread, arms interleaved, mean over 2 m "
        "steps after the window is full, refreshes included; a 2-core machine shared by "
        "eight engineers). `ratio`: step time / dense float32 step time. `vs dense`: "
        "relative difference of the update from the dense float32 arm's on the same "
        "gradients (blocks change the curvature by design; bf16 rounds the stored window).",
        "",
        "| d | m | arm | step ms | median ms | ratio | window bytes | vs dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['d']:,} | {r['m']} | {r['arm']} | {r['step_ms']:.1f} | {r['median_ms']:.1f} "
            f"| {r['ratio']:.2f} | {r['window_bytes']:,} | {r['vs_dense']:.2e} |"
        )
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

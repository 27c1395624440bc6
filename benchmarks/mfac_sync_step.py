"""Cost of M-FAC's device-decided step (issue 17) against the host-decided one, CPU.

``MFAC([p], lr=1e-3, ngrads=m)`` on a float32 parameter of ``d`` numbers fed fresh random
gradients (no check fires); CPU time (``time.process_time``, 1 thread) per step after 3
steps (the passes cover all m rows, filled or not), fastest of ``--repeats`` blocks of
``--steps`` steps, in a fresh interpreter per (checkout, setting), the checkouts
alternating (``--rounds R``: R times, each arm's fastest kept). The new checkout runs the
default (one read a step) and
``capturable=True, nonfinite="skip"`` (no read). On a CPU a read costs nothing, so this
measures what deciding on the device adds: the masked writes and the checks computed every
step (O(m^2) each).

    git archive 06f44c7 src | tar -x -C /tmp/old     # the host-decided step
    python benchmarks/mfac_sync_step.py --old /tmp/old/src --new src

Writes ``benchmarks/results/mfac_sync_step.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from torchsteer.optim import MFAC
m, d, steps, repeats, extra = json.loads(sys.argv[1])
gen = torch.Generator().manual_seed(0)
p = torch.nn.Parameter(torch.zeros(d))
opt = MFAC([p], lr=1e-3, ngrads=m, **extra)
grads = iter([torch.randn(d, generator=gen) for _ in range(3 + steps * repeats)])
for t in range(3):  # the cost of a step does not depend on the fill
    p.grad = next(grads)
    opt.step()
times = []
for r in range(repeats):
    t0 = time.process_time()
    for t in range(steps):
        p.grad = next(grads)  # fresh: repeated gradients are the near-duplicate regime
        opt.step()
    times.append((time.process_time() - t0) / steps)
w = opt._window
assert w.float64_passes == w.gram_rebuilds == w.accuracy_refreshes == 0  # no check fired
print(json.dumps({"ms": 1e3 * min(times)}))
"""

SETTINGS = [(64, 100_000), (256, 100_000), (1024, 20_000), (64, 1_000_000)]
MODES = {"default": {}, "capturable, skip": {"capturable": True, "nonfinite": "skip"}}


def run(src: str, setting, steps: int, repeats: int, extra: dict) -> float:
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "OMP_NUM_THREADS": "1"}
    arg = json.dumps([*setting, steps, repeats, extra])
    out = subprocess.run([sys.executable, "-c", PROBE, arg], env=env, check=True,
                         capture_output=True, text=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="src folder of the host-decided checkout")
    ap.add_argument("--new", default="src")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate the arms this many times; keep each arm's fastest")  # fmt: skip
    ap.add_argument("--out", default="benchmarks/results/mfac_sync_step")
    args = ap.parse_args()
    rows = []
    for s in SETTINGS:
        row = {"setting": s}
        for _ in range(args.rounds):  # old, default, capturable, old, ...: fastest of each
            arms = [("old", args.old, {})] + [(k, args.new, v) for k, v in MODES.items()]
            for name, src, extra in arms:
                ms = run(src, s, args.steps, args.repeats, extra)
                row[name] = min(row.get(name, ms), ms)
        rows.append(row)
        print(row, flush=True)
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1))
    lines = [
        "# M-FAC step: decided on the device against decided on the host (CPU)",
        "",
        "`" + " ".join(["python", *sys.argv]) + "`; ms of CPU time per step (fastest of "
        f"{args.repeats} blocks of {args.steps} steps, 1 thread, the fastest of {args.rounds} "
        "alternating fresh interpreters per arm), float32, random gradients, "
        "2-core machine shared with other jobs.",
        "",
        "| m | d | host-decided (before) | device-decided, default | capturable, skip |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        m, d = r["setting"]
        lines.append(f"| {m} | {d:.0e} | {r['old']:.2f} | {r['default']:.2f} | "
                     f"{r['capturable, skip']:.2f} |")  # fmt: skip
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

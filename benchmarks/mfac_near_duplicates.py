"""M-FAC on nearly dependent float32 gradients (issue 18, item 6), two checkouts side by side.

One gradient ``g0`` (``|g0| = scale * sqrt(d)``) is fed ``steps`` times with relative noise
``noise`` to ``MFAC([p], lr=1.0, ngrads=m)`` (float32 window, default damp 1e-5). Counted:
steps with ``g^T Δp >= 0`` (uphill), and the CPU time of all steps (``time.process_time``, 1
thread). Each (checkout, setting) runs in a fresh interpreter with ``PYTHONPATH`` set to the
checkout's ``src``; the checkouts alternate per setting.

    git archive 62357f1 src | tar -x -C /tmp/old     # the code before the fix
    python benchmarks/mfac_near_duplicates.py --old /tmp/old/src --new src

``--cases 0,2`` runs a subset of ``SETTINGS``; ``--options '{"capturable": true,
"nonfinite": "skip"}'`` passes MFAC options to the new checkout only (held: steps with
``Δp = 0``, counted in uphill too).

Writes ``benchmarks/results/mfac_near_duplicates.json`` and ``.md``.
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
m, d, noise, scale, steps = json.loads(sys.argv[1])
options = json.loads(sys.argv[2])
gen = torch.Generator().manual_seed(0)
g0 = torch.randn(d, generator=gen) * scale
p = torch.nn.Parameter(torch.zeros(d))
opt = MFAC([p], lr=1.0, ngrads=m, **options)
up, held, t0 = 0, 0, time.process_time()
for _ in range(steps):
    g = g0 * (1 + noise * torch.randn(d, generator=gen))
    before = p.detach().double().clone()
    p.grad = g.clone()
    opt.step()
    up += float(g.double() @ (p.detach().double() - before)) >= 0
    held += bool((p.detach().double() == before).all())
w = opt._window
print(json.dumps({"uphill": up, "held": held, "cpu_s": time.process_time() - t0,
                  "gram_rebuilds": getattr(w, "gram_rebuilds", None),
                  "robust_refreshes": w.robust_refreshes}))
"""

SETTINGS = [  # m, d, noise, scale, steps
    (1024, 1000, 1e-6, 1.0, 200),
    (1024, 1000, 1e-6, 10.0, 200),
    (256, 1000, 1e-6, 1.0, 200),
    (1024, 1000, 1e-4, 1.0, 200),
    (64, 600, 1e-6, 10.0, 200),
]


def run(src: str, setting, options: str = "{}") -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(setting), options], env=env,
                         check=True, capture_output=True, text=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="src folder of the checkout before the fix")
    ap.add_argument("--new", default="src")
    ap.add_argument("--out", default="benchmarks/results/mfac_near_duplicates")
    ap.add_argument("--cases", default=None, help="comma-separated indices into SETTINGS")
    ap.add_argument("--options", default="{}", help="JSON: MFAC options for --new")
    ap.add_argument("--title", default="before and after the float64 Gram")
    args = ap.parse_args()
    cases = range(len(SETTINGS)) if args.cases is None else map(int, args.cases.split(","))
    rows = []
    for s in [SETTINGS[i] for i in cases]:
        old, new = run(args.old, s), run(args.new, s, args.options)
        rows.append({"setting": s, "old": old, "new": new})
        print(s, old, new, flush=True)
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1))
    lines = [
        f"# M-FAC on nearly dependent float32 gradients: {args.title}",
        "",
        "`" + " ".join(["python", *sys.argv]) + "`; 1 thread, CPU s of all steps "
        "(`time.process_time`), 2-core machine shared with other jobs. Uphill: steps with "
        "g^T Δp >= 0. `MFAC([p], lr=1.0, ngrads=m)`, default damp 1e-5, float32 window.",
        "",
        "| m | d | noise | \\|g\\| | steps | uphill before | uphill after | CPU s before "
        "| CPU s after | float64 Gram rebuilds | held after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, d, noise, scale, steps = r["setting"]
        o, n = r["old"], r["new"]
        lines.append(
            f"| {m} | {d} | {noise:g} | {scale * d**0.5:.0f} | {steps} | {o['uphill']} | "
            f"{n['uphill']} | {o['cpu_s']:.1f} | {n['cpu_s']:.1f} | {n['gram_rebuilds']} | "
            f"{n['held']} |"
        )
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

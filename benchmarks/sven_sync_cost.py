"""CPU cost of Sven's sync-free dense step (issue 17) against the code before it.

With ``nonfinite="skip"`` the sync-free step adds two passes over M (``max |M|`` and the
multiplication by its power-of-two scale, 1 in the common case), a clean-up of the B x B
Gram matrix and a masked write of the parameters; with ``"raise"`` the step solves M
unscaled and reads once, as 06f44c7 did (less one read). This measures what each costs on
the CPU, where no sync is saved. Alternate the runs (before, after, before, after, ...).
Times a dense functional-path step (``step(batch=...)``) on an MLP 1-256-256-1 (P = 66,561)
and 1-16-16-16-1 (P = 593), GELU, B = 128, float32, rank 64, with ``nonfinite="raise"`` and
``"skip"``: 1 thread, ``time.process_time``, median of ``--repeats`` steps after 3 warm-up
steps. Run it once per code version, with ``--label``; each run adds its rows to
``benchmarks/results/sven_sync_cost.json`` and rewrites ``sven_sync_cost.md``:

    git archive 06f44c7 src | tar -x -C /tmp/before   # the code before
    PYTHONPATH=/tmp/before/src python benchmarks/sven_sync_cost.py --label "before (06f44c7)"
    python benchmarks/sven_sync_cost.py --label after
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

import torchsteer
from torchsteer.optim import Sven

RESULTS = Path(__file__).parent / "results"


def mlp(widths):
    torch.manual_seed(0)
    layers = []
    for a, b in itertools.pairwise(widths):
        layers += [torch.nn.Linear(a, b), torch.nn.GELU()]
    return torch.nn.Sequential(*layers[:-1])


def squared(out, target):
    return ((out - target) ** 2).sum(dim=1)


def time_steps(widths, nonfinite: str, repeats: int) -> float:
    model = mlp(widths)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 1, generator=g)
    y = torch.sin(3 * x)
    opt = Sven(
        model.parameters(),
        lr=0.05,
        rank=64,
        jacobian="dense",
        svd="exact",
        nonfinite=nonfinite,
        model=model,
        loss_fn=squared,
        seed=0,
    )
    times = []
    for i in range(3 + repeats):
        t0 = time.process_time()
        opt.step(batch=(x, y))
        if i >= 3:
            times.append(time.process_time() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", required=True)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for widths in ((1, 16, 16, 16, 1), (1, 256, 256, 1)):
        n = sum(p.numel() for p in mlp(widths).parameters())
        for nonfinite in ("raise", "skip"):
            ms = 1e3 * time_steps(widths, nonfinite, args.repeats)
            rows.append(dict(label=args.label, P=n, nonfinite=nonfinite, ms=ms))
            print(f"{args.label}: P = {n}, nonfinite={nonfinite}: {ms:.2f} ms")
    path = RESULTS / "sven_sync_cost.json"
    old = json.loads(path.read_text()) if path.exists() else []
    old = [r for r in old if r["label"] != args.label] + rows
    path.write_text(json.dumps(old, indent=2) + "\n")
    lines = [
        "# Sven dense step, CPU cost before and after the sync-free step",
        "",
        "`python benchmarks/sven_sync_cost.py --label ...` (see its docstring): functional",
        "path, B = 128, rank 64, float32, 1 thread, median CPU ms of the steps (a 2-core",
        f"machine shared with other sessions; torch {torch.__version__}, torchsteer",
        f"{torchsteer.__version__}). On a CPU no synchronization is saved: this is the cost.",
        "",
        "| code | P | nonfinite | ms / step |",
        "|---|---:|---|---:|",
    ]
    for r in old:
        lines.append(f"| {r['label']} | {r['P']:,} | {r['nonfinite']} | {r['ms']:.2f} |")
    (RESULTS / "sven_sync_cost.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

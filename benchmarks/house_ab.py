"""Step cost of two checkouts of torchsteer, side by side: did a refactor move the numbers?

Each arm is a fresh interpreter with ``PYTHONPATH`` set to one checkout's ``src``; the two
checkouts alternate (A B A B ...), and every run times the same steps through the public API
only (so an old checkout runs it too): Sven (``model=`` path and closure path), M-FAC,
RegularizedNewton (Hessian / CG) and a RadiusLimiter-wrapped Adam, each against an SGD step of
the same model in the same process. CPU time (``time.process_time``), 1 thread. It also
prints the parameters after the timed steps, so that the two checkouts can be checked for
the same results (``same_params``).

    python benchmarks/house_ab.py --old /tmp/old/src --new src --rounds 5

Writes ``benchmarks/results/house_ab.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import json, time, torch
torch.set_num_threads(1)
from torchsteer.optim import MFAC, RegularizedNewton, Sven
from torchsteer.control.radius import RadiusLimiter

def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))

g = torch.Generator().manual_seed(1)
x, y = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
ce = torch.nn.functional.cross_entropy
per_sample = lambda out, t: ce(out, t, reduction="none")

def timed(step, n=20):
    step(); step()
    t = time.process_time()
    for _ in range(n):
        step()
    return (time.process_time() - t) / n

def arms():
    m = mlp(); sgd = torch.optim.SGD(m.parameters(), lr=1e-2)
    def sgd_step():
        sgd.zero_grad(); ce(m(x), y).backward(); sgd.step()
    out = {"sgd": (timed(sgd_step), m)}
    m = mlp(); sven = Sven(m.parameters(), lr=0.1, rank=16, model=m, loss_fn=per_sample)
    out["sven_model"] = (timed(lambda: sven.step(batch=(x, y))), m)
    m = mlp(); sven_c = Sven(m.parameters(), lr=0.1, rank=16)
    def sven_closure():
        def closure():
            sven_c.zero_grad()
            return per_sample(m(x), y)
        sven_c.step(closure)
    out["sven_closure"] = (timed(sven_closure), m)
    m = mlp(); mfac = MFAC(m.parameters(), lr=1e-2, ngrads=16)
    def mfac_step():
        mfac.zero_grad(); ce(m(x), y).backward(); mfac.step()
    out["mfac"] = (timed(mfac_step), m)
    m = mlp(); rn = RegularizedNewton(m.parameters())
    def rn_step():
        def closure():
            return ce(m(x), y)
        rn.step(closure)
    out["newton_cg"] = (timed(rn_step, 5), m)
    m = mlp(); adam = torch.optim.Adam(m.parameters(), lr=1e-2)
    lim = RadiusLimiter(m, r_max=0.5)
    def radius_step():
        adam.zero_grad(); ce(m(x), y).backward()
        lim.before_step(adam, x); adam.step(); lim.after_step(x)
    out["radius_adam"] = (timed(radius_step), m)
    return out

res = {}
for name, (sec, model) in arms().items():
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    flat = flat.double()
    res[name] = {"sec": sec, "param_sum": float(flat.sum()), "param_sq": float(flat.square().sum())}
print(json.dumps(res))
"""


def run(src: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="src folder of the earlier checkout")
    ap.add_argument("--new", default="src", help="src folder of this checkout")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/house_ab")
    args = ap.parse_args()
    runs = {"old": [], "new": []}
    for i in range(args.rounds):
        for arm in ("old", "new") if i % 2 == 0 else ("new", "old"):
            runs[arm].append(run(getattr(args, arm)))
            print(f"round {i + 1}/{args.rounds} {arm} done", flush=True)
    names = [n for n in runs["old"][0] if n != "sgd"]
    sgd_ms = {a: 1e3 * statistics.median(r["sgd"]["sec"] for r in runs[a]) for a in runs}
    table = {}
    for n in names:
        ratio = {a: statistics.median(r[n]["sec"] / r["sgd"]["sec"] for r in runs[a]) for a in runs}
        same = all(
            runs["old"][0][n][k] == r[n][k] for r in runs["new"] for k in ("param_sum", "param_sq")
        )
        ms = {a: 1e3 * statistics.median(r[n]["sec"] for r in runs[a]) for a in runs}
        table[n] = {
            "old_ms": ms["old"],
            "new_ms": ms["new"],
            "old_x_sgd": ratio["old"],
            "new_x_sgd": ratio["new"],
            "new_over_old": ratio["new"] / ratio["old"],
            "same_params": same,
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"old": args.old, "new": args.new, "rounds": args.rounds, "threads": 1, "sgd_ms": sgd_ms}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "arms": table}, indent=2))
    lines = [
        "# Step cost before and after the house moves (CPU time, 1 thread, median of rounds)",
        "",
        f"`python benchmarks/house_ab.py --old {args.old} --new {args.new} "
        f"--rounds {args.rounds}`; MLP 16-32-4, batch 64; each step as a multiple of an SGD "
        "step in the same process; checkouts interleaved.",
        "",
        f"SGD step: old {sgd_ms['old']:.3f} ms, new {sgd_ms['new']:.3f} ms (CPU, median).",
        "",
        "| arm | old ms | new ms | old x SGD | new x SGD | new / old (x SGD) | same parameters |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, r in table.items():
        lines.append(
            f"| {n} | {r['old_ms']:.3f} | {r['new_ms']:.3f} | {r['old_x_sgd']:.2f} "
            f"| {r['new_x_sgd']:.2f} | {r['new_over_old']:.3f} "
            f"| {'yes' if r['same_params'] else 'NO'} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

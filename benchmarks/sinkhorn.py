"""Sinkhorn divergence: 64 histogram pairs over 1000 bins, ours against geomloss and POT.

Problem: a_k = softmax(z_k), b_k = softmax(w_k) (z, w standard normal, float64), bins
x = linspace(0, 1, 1000), cost (x_i - x_j)^2 / 2 (geomloss's p = 2), debiased S_eps at
eps = 1e-2 and 1e-3. Reference: ours at tol 1e-11 (float64, converged), its gradient
checked by central finite differences along random directions. Arms (forward + backward
w.r.t. the logits z, CPU time ``time.process_time``, 1 thread, arms interleaved):

* ours: ``sinkhorn_divergence(z, w, epsilon=eps)`` with its defaults (tol 1e-6);
* ours with ``overrelax=1.8``: the fixed over-relaxation target with the safe rule;
* geomloss's default: ``SamplesLoss("sinkhorn", p=2, blur=sqrt(eps))`` (default scaling
  0.5, debias True, tensorized), batched, float32 (torch's default dtype) and float64;
* POT in a loop: ``ot.solve(M, a, b, reg=eps, reg_type="KL", grad="envelope")`` per pair
  (the same OT_eps, debiased by three solves); ``--pot-pairs`` pairs timed, the time
  scaled to 64 (said in the output).

Errors: value |S - S_ref| / |S_ref| (sum over pairs), gradient ||g - g_ref|| / ||g_ref||.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/sinkhorn.py [--pot-pairs 8] [--skip-pot]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from torchsteer.divergence import sinkhorn_divergence
from torchsteer.divergence.sinkhorn import grid_cost

OUT = Path(__file__).resolve().parent / "results"


def _ours(z, w, eps, **kw):
    x = z.clone().requires_grad_(True)
    v, rep = sinkhorn_divergence(x, w, epsilon=eps, reduction="sum", return_report=True, **kw)
    v.backward()
    return v.item(), x.grad, rep


def _geomloss(z, w, eps, dtype):
    from geomloss import SamplesLoss

    B, n = z.shape
    pts = torch.linspace(0, 1, n, dtype=dtype)[None, :, None].expand(B, n, 1).contiguous()
    loss = SamplesLoss("sinkhorn", p=2, blur=math.sqrt(eps), backend="tensorized")
    x = z.to(dtype).requires_grad_(True)
    v = loss(torch.softmax(x, -1), pts, torch.softmax(w.to(dtype), -1), pts).sum()
    v.backward()
    return v.item(), x.grad.double(), None


def _pot(z, w, eps, pairs):
    import ot

    C = grid_cost(z.shape[1])
    total, grads = 0.0, []
    for k in range(pairs):
        x = z[k].detach().clone().requires_grad_(True)
        a, b = torch.softmax(x, -1), torch.softmax(w[k], -1)

        def val(p, q):
            return ot.solve(C, p, q, reg=eps, reg_type="KL", grad="envelope").value

        s = val(a, b) - 0.5 * val(a, a) - 0.5 * val(b, b.detach())
        (gx,) = torch.autograd.grad(s, x, allow_unused=True)
        total += s.item()
        grads.append(gx if gx is not None else torch.full_like(x, math.nan))
    return total, torch.stack(grads), None


def _fd_check(z, w, eps, g_ref, directions=2, h=1e-5):
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    kw = dict(epsilon=eps, reduction="sum", tol=1e-12, n_iters=100000)
    for _ in range(directions):
        d = torch.randn(z.shape, generator=gen, dtype=z.dtype)
        fd = sinkhorn_divergence(z + h * d, w, **kw) - sinkhorn_divergence(z - h * d, w, **kw)
        fd = fd.item() / (2 * h)
        worst = max(worst, abs(fd - float((g_ref * d).sum())) / abs(fd))
    return worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--bins", type=int, default=1000)
    ap.add_argument("--pot-pairs", type=int, default=8)
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-2, 1e-3])
    ap.add_argument("--skip-geomloss64", action="store_true")
    ap.add_argument("--skip-pot", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(args.pairs, args.bins, generator=gen, dtype=torch.float64)
    w = torch.randn(args.pairs, args.bins, generator=gen, dtype=torch.float64)
    rows = []
    for eps in args.eps:
        ref_v, ref_g, ref_rep = _ours(z, w, eps, tol=1e-11, n_iters=100000)
        fd_err = _fd_check(z, w, eps, ref_g)
        arms = {
            "ours (defaults, tol 1e-6)": lambda eps=eps: _ours(z, w, eps),
            "ours overrelax=1.8 (tol 1e-6)": lambda eps=eps: _ours(z, w, eps, overrelax=1.8),
            "geomloss default, float32": lambda eps=eps: _geomloss(z, w, eps, torch.float32),
            "geomloss default, float64": lambda eps=eps: _geomloss(z, w, eps, torch.float64),
            "POT ot.solve KL envelope, loop": lambda eps=eps: _pot(z, w, eps, args.pot_pairs),
        }
        if args.skip_geomloss64:
            del arms["geomloss default, float64"]
        if args.skip_pot:
            del arms["POT ot.solve KL envelope, loop"]
        for name, fn in arms.items():  # one pass each, in turn
            t0 = time.process_time()
            v, g, rep = fn()
            t = time.process_time() - t0
            k = g.shape[0]
            scale = args.pairs / k
            rv = ref_v if k == args.pairs else float("nan")
            if k != args.pairs:  # POT: the same pairs of the reference
                sub = sinkhorn_divergence(
                    z[:k], w[:k], epsilon=eps, reduction="sum", tol=1e-11, n_iters=100000
                ).item()
                rv = sub
            rows.append(
                dict(
                    eps=eps,
                    arm=name,
                    cpu_s=t * scale,
                    timed_pairs=k,
                    value_rel_err=abs(v - rv) / abs(rv),
                    grad_rel_err=float((g - ref_g[:k]).norm() / ref_g[:k].norm()),
                    iterations=rep.iterations if rep else None,
                    marginal_error=rep.marginal_error if rep else None,
                    reference_fd_rel_err=fd_err,
                    reference_iterations=ref_rep.iterations,
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    OUT.mkdir(exist_ok=True)
    meta = dict(
        machine=platform.processor() or platform.machine(),
        threads=1,
        note="2-core machine shared by eight engineers; CPU time, one pass per arm",
    )
    (OUT / "sinkhorn.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [
        "# Sinkhorn divergence: 64 pairs x 1000 bins",
        "",
        f"`OMP_NUM_THREADS=1 python benchmarks/sinkhorn.py`; {meta['note']}.",
        "Reference: ours at tol 1e-11 (float64); its gradient vs central finite differences",
        "along 2 random directions in the last column. POT: time of the timed pairs x 64/k.",
        "",
        "| eps | arm | CPU s | x geomloss f32 | value rel err | grad rel err | iters |"
        " ref FD err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next(x["cpu_s"] for x in rows if x["eps"] == r["eps"] and "float32" in x["arm"])
        lines.append(
            f"| {r['eps']:g} | {r['arm']} (timed {r['timed_pairs']}) | {r['cpu_s']:.2f} | "
            f"{r['cpu_s'] / base:.3f} | {r['value_rel_err']:.1e} | {r['grad_rel_err']:.1e} | "
            f"{r['iterations'] or ''} | {r['reference_fd_rel_err']:.1e} |"
        )
    (OUT / "sinkhorn.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

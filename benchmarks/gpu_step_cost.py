"""Step cost of each optimizer as a ratio to an SGD step on the same model, on one device.

Arms are interleaved and timed with CUDA-synchronized wall time on a GPU
(``time.process_time`` on the CPU), median over repeats. Each arm is a full training step
(forward, derivatives, update). Problems:

- Sven: MLP 1-256-256-1 (P = 66,561), B = 128, per-sample squared error, rank 64; graph
  path dense, functional path dense (``model=``/``loss_fn=``), and matrix-free.
- M-FAC: one flat parameter of d numbers (its gradient given), m in {64, 256}; the ratio is
  to the physical limit of a step, one ``G @ v`` plus one ``G.T @ c`` on the same window.
- RegularizedNewton: L2-regularized logistic regression, n = 2000, d = 1000, exact Hessian
  with CG; one step (its tries included) against one SGD step.

Run: ``python benchmarks/gpu_step_cost.py --device cuda --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import clock, interleaved
from torch import nn

from torchsteer.optim.mfac import MFAC
from torchsteer.optim.regularized_newton import RegularizedNewton
from torchsteer.optim.sven import Sven


def sven_arms(dev, width=256, B=128):
    torch.manual_seed(0)

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(1, width),
            nn.GELU(),
            nn.Linear(width, width),
            nn.GELU(),
            nn.Linear(width, 1),
        ).to(dev)

    x, y = torch.randn(B, 1, device=dev), torch.randn(B, 1, device=dev)

    def per_sample(out, t):
        return ((out - t) ** 2).sum(1)

    m_sgd, m_g, m_f, m_mf = mlp(), mlp(), mlp(), mlp()
    sgd = torch.optim.SGD(m_sgd.parameters(), lr=1e-3)
    s_graph = Sven(m_g.parameters(), lr=1e-3, rank=64, jacobian="dense", seed=0)
    s_func = Sven(
        m_f.parameters(), lr=1e-3, rank=64, jacobian="dense", seed=0, model=m_f, loss_fn=per_sample
    )
    s_mf = Sven(
        m_mf.parameters(), lr=1e-3, rank=64, jacobian="matrix_free", svd="randomized", seed=0
    )

    def step_sgd():
        sgd.zero_grad()
        per_sample(m_sgd(x), y).mean().backward()
        sgd.step()

    def closure_for(opt, m):
        def closure():
            opt.zero_grad()
            return per_sample(m(x), y)

        return closure

    return {
        "SGD": step_sgd,
        "Sven dense (graph path)": lambda: s_graph.step(closure_for(s_graph, m_g)),
        "Sven dense (functional path)": lambda: s_func.step(batch=(x, y)),
        "Sven matrix-free": lambda: s_mf.step(closure_for(s_mf, m_mf)),
    }


def mfac_arms(dev, d, m):
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(d, device=dev))
    opt = MFAC([p], lr=1e-3, ngrads=m, damp=1e-5)
    grads = [torch.randn(d, device=dev) for _ in range(4)]
    for g in grads * (m // 4 + 1):  # fill the window
        p.grad = g
        opt.step()
    G = torch.randn(m, d, device=dev)
    v, c = torch.randn(d, device=dev), torch.randn(m, device=dev)
    i = [0]

    def step():
        p.grad = grads[i[0] % 4]
        i[0] += 1
        opt.step()

    return {"limit (G v + G^T c)": lambda: (G @ v, G.T @ c), f"MFAC m={m}": step}


def newton_arms(dev, n=2000, d=1000, mu=1e-4):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g).to(dev)
    y = (torch.rand(n, generator=g) < 0.5).float().to(dev)
    w_n = torch.zeros(d, device=dev, requires_grad=True)
    w_s = torch.zeros(d, device=dev, requires_grad=True)
    newton = RegularizedNewton([w_n], curvature="hessian", solver="cg")
    sgd = torch.optim.SGD([w_s], lr=0.1)

    def f(w):
        return F.binary_cross_entropy_with_logits(X @ w, y) + 0.5 * mu * (w * w).sum()

    def closure():
        newton.zero_grad()
        return f(w_n)

    def step_sgd():
        sgd.zero_grad()
        f(w_s).backward()
        sgd.step()

    return {"SGD": step_sgd, "RegularizedNewton (hessian, cg)": lambda: newton.step(closure)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dev = args.device
    if dev == "cpu":
        torch.set_num_threads(1)
    now = clock(dev)
    sizes = [(10**5, 64)] if args.quick else [(10**6, 64), (10**6, 256)]
    groups = {"sven": lambda: sven_arms(dev)}
    for d, m in sizes:
        groups[f"mfac d={d} m={m}"] = lambda d=d, m=m: mfac_arms(dev, d, m)
    groups["newton"] = lambda: newton_arms(dev)
    res = {
        "device": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "groups": {},
    }
    for name, make in groups.items():
        try:
            t = interleaved(make(), 3 if args.quick else args.repeats, now, warmup=2)
            base = next(iter(t.values()))
            res["groups"][name] = {k: {"seconds": v, "ratio": v / base} for k, v in t.items()}
        except Exception:
            res["groups"][name] = {"error": traceback.format_exc()}
        print(name, json.dumps(res["groups"][name], indent=1), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"step_cost_{dev.split(':')[0]}.json").write_text(json.dumps(res, indent=2))
    lines = [
        f"# Step cost on {res['device']} (torch {res['torch']})",
        "",
        "| group | arm | time per step | ratio to the group's first arm |",
        "|---|---|---|---|",
    ]
    for g, arms in res["groups"].items():
        if "error" in arms:
            lines.append(f"| {g} | error | | |")
            continue
        for k, v in arms.items():
            lines.append(f"| {g} | {k} | {v['seconds'] * 1e3:.3f} ms | {v['ratio']:.2f} |")
    lines += [
        "",
        "Clock: CUDA-synchronized wall time (GPU) or process time (CPU, 1 thread); "
        "arms interleaved, median of repeats.",
    ]
    (out / f"step_cost_{dev.split(':')[0]}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Cost of the core products as ratios to a plain pass, measured in one process.

- per-sample Jacobian (B, P) of an MLP with about 1e5 parameters at B = 128, by
  ``per_sample_jacobian`` (vmap(grad)), against one ``loss.backward()`` (forward included)
  of the same batch. Also the graph path (``graph_jacobian``, one batched backward) for
  comparison.
- one logit JVP (``jvp`` over ``model_fn``, forward mode) against one forward pass.

Arms are interleaved (ABAB...), timed with ``time.process_time`` (CPU time), 1 thread,
median over repeats. Results: ``benchmarks/results/core_products.{json,md}``.

Run: ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/core_products.py [--device cuda]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from _timing import clock, interleaved
from torch import nn

from torchsteer.jacobian import graph_jacobian, jvp, model_fn, param_dict, per_sample_jacobian

RESULTS = Path(__file__).parent / "results"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device
    torch.manual_seed(0)
    B, width = 128, 290
    model = nn.Sequential(
        nn.Linear(64, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, 10),
    ).to(dev)
    P = sum(p.numel() for p in model.parameters())
    x = torch.randn(B, 64, device=dev)
    y = torch.randint(0, 10, (B,), device=dev)
    params = param_dict(model)
    v = {k: torch.randn_like(p) for k, p in params.items()}

    def ce(out, t):
        return F.cross_entropy(out, t, reduction="none")

    def backward():
        model.zero_grad(set_to_none=True)
        ce(model(x), y).mean().backward()

    buf = torch.empty(B, P, device=dev)

    def jac_functional():
        per_sample_jacobian(model, ce, x, y, params, out=buf)

    def jac_fresh():
        per_sample_jacobian(model, ce, x, y, params)

    def jac_vmap():
        per_sample_jacobian(model, ce, x, y, params, method="vmap")

    def jac_graph():
        graph_jacobian(ce(model(x), y), list(model.parameters()))

    def forward():
        with torch.no_grad():
            model(x)

    def logit_jvp():
        jvp(model_fn(model, x), params, v)

    now = clock(dev)
    t = interleaved(
        {
            "backward": backward,
            "per_sample_jacobian": jac_functional,
            "per_sample_jacobian_fresh": jac_fresh,
            "per_sample_jacobian_vmap": jac_vmap,
            "graph_jacobian": jac_graph,
        },
        args.repeats,
        now,
    )
    t2 = interleaved({"forward": forward, "jvp": logit_jvp}, 3 * args.repeats, now)
    res = {
        "device": dev,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "P": P,
        "B": B,
        "dtype": "float32",
        "seconds": {**t, **t2},
        "ratio_per_sample_jacobian_to_backward": t["per_sample_jacobian"] / t["backward"],
        "ratio_per_sample_jacobian_fresh_to_backward": t["per_sample_jacobian_fresh"]
        / t["backward"],
        "ratio_per_sample_jacobian_vmap_to_backward": t["per_sample_jacobian_vmap"] / t["backward"],
        "ratio_graph_jacobian_to_backward": t["graph_jacobian"] / t["backward"],
        "ratio_jvp_to_forward": t2["jvp"] / t2["forward"],
        "jvp_flop_bound": 3 - (64 * width) / (64 * width + width * width + width * 10),
        "clock": "CUDA-synchronized wall time" if dev == "cuda" else "time.process_time (CPU)",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"core_products{'_' + dev if dev != 'cpu' else ''}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    md = [
        f"# Core product cost ({dev}, {args.threads} thread(s), float32, MLP P = {P}, B = {B})",
        "",
        "| product | median time | ratio | goal |",
        "|---|---|---|---|",
        f"| loss.backward() | {t['backward'] * 1e3:.2f} ms | 1 | |",
        f"| per_sample_jacobian (nn.Linear outer products, reused out=) | "
        f"{t['per_sample_jacobian'] * 1e3:.2f} ms | "
        f"{res['ratio_per_sample_jacobian_to_backward']:.2f}x backward | <= 3x |",
        f"| per_sample_jacobian (outer products, fresh allocation) | "
        f"{t['per_sample_jacobian_fresh'] * 1e3:.2f} ms | "
        f"{res['ratio_per_sample_jacobian_fresh_to_backward']:.2f}x backward | |",
        f"| per_sample_jacobian (method='vmap', any model) | "
        f"{t['per_sample_jacobian_vmap'] * 1e3:.2f} ms | "
        f"{res['ratio_per_sample_jacobian_vmap_to_backward']:.2f}x backward | |",
        f"| graph_jacobian (batched backward) | {t['graph_jacobian'] * 1e3:.2f} ms | "
        f"{res['ratio_graph_jacobian_to_backward']:.2f}x backward | |",
        f"| forward (no grad) | {t2['forward'] * 1e3:.3f} ms | 1 | |",
        f"| logit jvp (forward mode) | {t2['jvp'] * 1e3:.3f} ms | "
        f"{res['ratio_jvp_to_forward']:.2f}x forward | <= 2x |",
        "",
        "Flop bound of the JVP: forward mode computes z = W a and dz = dW a + W da per layer, "
        "so for this MLP it needs 3 - (first-layer share) = "
        f"{res['jvp_flop_bound']:.2f}x the matmul flops of a forward pass (da = 0 at the "
        "first layer): the 2x goal is below what any forward-mode JVP along a full "
        "parameter direction can reach here.",
        "",
        f"Clock: {res['clock']}; arms interleaved, median of {args.repeats} (JVP: "
        f"{3 * args.repeats}) repeats; torch {torch.__version__}. The machine is shared with "
        "other jobs: CPU time, not wall time, is compared.",
    ]
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

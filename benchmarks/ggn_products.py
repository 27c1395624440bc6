"""Curvature products with the kept linearization against the two-pass product (issue 16).

``J v`` by the double-VJP trick needs ``g(u) = J^T u`` with its graph (one reverse pass with
``create_graph=True``) and then one reverse pass through that graph. Before issue 16 the
first pass was redone for every product; :class:`torchsteer.jacobian.GraphJVP` keeps it. Arms,
interleaved in one process on the same model, the same forward graph and the same v (float32,
1 thread, ``time.process_time``, median of the repeats after one warm-up call each):

- ``J v`` two-pass (the old ``graph_jvp``, copied here) vs kept (``GraphJVP``, linearized in
  the warm-up);
- the Gauss-Newton product ``J^T H_out J v`` (``GGNOperator.matvec``) two-pass vs kept;
- the empirical-Fisher product ``(1/B) G^T G v`` two-pass vs kept;
- one optimizer step of the same model for scale (SGD for the MLPs, AdamW for the GPT).

Models: the MLPs of ``benchmarks/closure_path.py`` (1-16-16-16-1, P = 593, and 1-256-256-1,
P = 66,561, GELU, B = 128, squared error) and a reduced GPT (``torchsteer.bench.gpt``, 2
layers, width 64, 4 heads, vocabulary 512, B x T = 8 x 128, tied; SDPA's math kernel, as
``benchmarks/newton_scale.py``).

Memory of the kept linearization: the bytes of the tensors its graph saves that are not
already held by the forward graph, the parameters or the inputs (unique storages, found with
``torch.autograd.graph.saved_tensors_hooks`` around the forward and the linearization), and
g's own values (P numbers), which the two-pass product allocates on every product and the
kept linearization frees (it keeps only g's gradient edges).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/ggn_products.py [--repeats N]``; writes
``benchmarks/results/ggn_products.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved
from closure_path import mlp  # the MLPs of the closure-path benchmark (seed 0)

from torchsteer.bench.gpt import GPT, GPTConfig
from torchsteer.jacobian import EmpiricalFisherOperator, GGNOperator, GraphJVP, flatten_like
from torchsteer.jacobian import graph as graph_module
from torchsteer.jacobian.graph import graph_vjp
from torchsteer.optim import RegularizedNewton

torch.set_num_threads(1)
RESULTS = Path(__file__).parent / "results"


def two_pass_jvp(output, params, v):
    """The old ``graph_jvp`` (before issue 16): g's graph built afresh for every product."""
    dummy = torch.zeros_like(output, requires_grad=True)
    g = torch.autograd.grad(output, params, dummy, create_graph=True, allow_unused=True)
    gs, vs = zip(*[(gi, vi) for gi, vi in zip(g, v) if gi is not None])
    (jv,) = torch.autograd.grad(gs, dummy, vs, retain_graph=True, allow_unused=True)
    return jv


@torch.enable_grad()
def two_pass_ggn(op, v):
    """The old ``GGNOperator.matvec``."""
    op.products += 1
    jv = two_pass_jvp(op.outputs, op.params, op._split(v))
    return flatten_like(graph_vjp(op.outputs, op.params, op._hout(jv)), op.params, op.dtype)


@torch.enable_grad()
def two_pass_fisher(op, v):
    """The old ``EmpiricalFisherOperator.matvec``."""
    gv = two_pass_jvp(op.losses, op.params, op._split(v))
    return flatten_like(graph_vjp(op.losses, op.params, gv), op.params, op.dtype) / op.batch


class SavedStorages:
    """Unique storages (data pointer -> bytes) of the tensors autograd saves in a context."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}

    def pack(self, t):
        s = t.untyped_storage()
        self.seen[s.data_ptr()] = s.nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def mlp_case(widths):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(128, 1, generator=g) * 2 - 1
    y = torch.sin(3 * x).squeeze(-1)

    def forward(model):
        out = model(x)
        losses = (out.squeeze(-1) - y) ** 2
        return losses.mean(), out, losses

    return mlp(widths), forward, lambda ps: torch.optim.SGD(ps, lr=1e-3), [x]


def gpt_case():
    torch.manual_seed(0)
    cfg = GPTConfig(512, 128, 2, 4, 64, True)
    model = GPT(cfg)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (8, cfg.context + 1), generator=gen)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def forward(model):
        logits = model(x)
        b, t, v = logits.shape
        losses = F.cross_entropy(logits.reshape(b * t, v), y.reshape(b * t), reduction="none")
        return losses.mean(), logits, losses

    return model, forward, lambda ps: torch.optim.AdamW(ps, lr=3e-4), [x]


def rn_arms(case, solver):
    """RegularizedNewton steps (Gauss-Newton, 10 CG/Krylov iterations) on two copies of the
    model: one with the two-pass products patched in, one as it is (bit-identical steps)."""
    model, forward, _, _ = case
    arms, models, original = {}, {}, GGNOperator.matvec
    for label, old in (("RN step two-pass", True), ("RN step kept", False)):
        m = models[label] = copy.deepcopy(model)
        opt = RegularizedNewton(
            m.parameters(),
            curvature="gauss_newton",
            solver=solver,
            cg_maxiter=10,
            cg_tol=1e-8 if solver == "multishift" else None,
            gamma0=0.1 if solver == "multishift" else 1.0,
            max_tries=2 if solver == "multishift" else 40,
        )

        def step(opt=opt, m=m, old=old):
            GGNOperator.matvec = two_pass_ggn if old else original
            try:
                opt.step(lambda: forward(m)[:2])
            finally:
                GGNOperator.matvec = original

        arms[label] = step
    return arms, models


def measure(case, repeats, solver):
    model, forward, make_opt, inputs = case
    stepped = copy.deepcopy(model)  # the step arm's own copy: the products' graph stays valid
    opt = make_opt(stepped.parameters())
    params = list(model.parameters())
    P = sum(p.numel() for p in params)
    fwd = SavedStorages()
    with fwd.hooks():
        loss, out, losses = forward(model)
    ggn = GGNOperator(loss, out, params, torch.float32)
    fisher = EmpiricalFisherOperator(losses, params, torch.float32)
    v = torch.randn(P, generator=torch.Generator().manual_seed(2))
    vs = ggn._split(v)
    jvp = GraphJVP(out, params)

    lin = SavedStorages()  # what the kept linearization's graph saves
    linearize = graph_module.GraphJVP._linearize

    def recorded(self):
        with lin.hooks():
            return linearize(self)

    graph_module.GraphJVP._linearize = recorded
    try:
        jvp(vs)  # linearized here, its saved tensors recorded
    finally:
        graph_module.GraphJVP._linearize = linearize
    held = set(fwd.seen) | {p.untyped_storage().data_ptr() for p in params}
    held |= {t.untyped_storage().data_ptr() for t in inputs}
    extra = sum(b for ptr, b in lin.seen.items() if ptr not in held)
    # the kept products are those of the two-pass ones, bit for bit
    same = torch.equal(jvp(vs), two_pass_jvp(out, params, vs))
    same &= torch.equal(ggn.matvec(v), two_pass_ggn(ggn, v))
    same &= torch.equal(fisher.matvec(v), two_pass_fisher(fisher, v))

    def step():
        opt.zero_grad(set_to_none=True)
        forward(stepped)[0].backward()
        opt.step()

    arms = {
        "step": step,
        "J v two-pass": lambda: two_pass_jvp(out, params, vs),
        "J v kept": lambda: jvp(vs),
        "GGN product two-pass": lambda: two_pass_ggn(ggn, v),
        "GGN product kept": lambda: ggn.matvec(v),
        "EF product two-pass": lambda: two_pass_fisher(fisher, v),
        "EF product kept": lambda: fisher.matvec(v),
    }
    more, rn_models = rn_arms(case, solver)
    arms.update(more)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # RN's all-rejected steps
        med = interleaved(arms, repeats, time.process_time)
    a, b = (list(m.parameters()) for m in rn_models.values())
    rn_same = all(torch.equal(p, q) for p, q in zip(a, b))
    ms = {k: 1e3 * t for k, t in med.items()}
    return {
        "P": P,
        "ms": ms,
        "kept_over_two_pass": {
            k: med[f"{k} kept"] / med[f"{k} two-pass"]
            for k in ("J v", "GGN product", "EF product", "RN step")
        },
        "product_over_step": {k: t / med["step"] for k, t in med.items() if k != "step"},
        "bitwise_equal": bool(same),
        "rn_solver": solver,
        "rn_steps_bitwise_equal": rn_same,
        "linearization_extra_bytes": extra,
        "forward_saved_bytes": sum(fwd.seen.values()),
        "g_values_bytes": 4 * P,
    }


CASES = {  # (case, RegularizedNewton's solver: closure_path's cg, newton_scale's multishift)
    "MLP 1-16-16-16-1 (P = 593), B = 128": (lambda: mlp_case((1, 16, 16, 16, 1)), "cg"),
    "MLP 1-256-256-1 (P = 66,561), B = 128": (lambda: mlp_case((1, 256, 256, 1)), "cg"),
    "GPT 2 x 64, vocab 512, B x T = 8 x 128": (gpt_case, "multishift"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    out = {"repeats": args.repeats, "threads": 1, "clock": "process_time", "cases": {}}
    with sdpa_kernel([SDPBackend.MATH]):
        for label, (make, solver) in CASES.items():
            out["cases"][label] = res = measure(make(), args.repeats, solver)
            print(label, json.dumps(res))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ggn_products.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# Curvature products: the kept linearization against the two-pass product",
        "",
        f"`OMP_NUM_THREADS=1 python benchmarks/ggn_products.py --repeats {args.repeats}`: "
        "float32, 1 thread, CPU time (`time.process_time`), arms interleaved in one process "
        "on the same model, graph and v, median of the repeats. Step: SGD (MLPs) or AdamW "
        "(GPT), forward + backward + update of a copy of the same model.",
        "",
        "| model | P | product | two-pass ms | kept ms | kept / two-pass "
        "| two-pass / step | kept / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, res in out["cases"].items():
        ms, ps = res["ms"], res["product_over_step"]
        for k in ("J v", "GGN product", "EF product", "RN step"):
            lines.append(
                f"| {label} | {res['P']:,} | {k} | {ms[k + ' two-pass']:.3f} "
                f"| {ms[k + ' kept']:.3f} | {res['kept_over_two_pass'][k]:.2f} "
                f"| {ps[k + ' two-pass']:.2f} | {ps[k + ' kept']:.2f} |"
            )
    lines += [
        "",
        "| model | step ms | kept products bit-identical | RN solver | RN steps bit-identical "
        "| linearization's extra saved bytes | forward graph's saved bytes "
        "| g's values (not kept) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, res in out["cases"].items():
        lines.append(
            f"| {label} | {res['ms']['step']:.3f} | {res['bitwise_equal']} | {res['rn_solver']} "
            f"| {res['rn_steps_bitwise_equal']} "
            f"| {res['linearization_extra_bytes']:,} | {res['forward_saved_bytes']:,} "
            f"| {res['g_values_bytes']:,} |"
        )
    (RESULTS / "ggn_products.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Softmax radius limiter: the lr-spike table and the limiter's step cost.

1. ``--spike``: the full ``lr-spike`` experiment (digits, full-batch Adam lr 0.015, 200 steps,
   one-step spikes 1x..10,000x at step 50; Transformer, MLP+LN, CNN+BN; plain, clip, limiter,
   limiter -g; seeds 0-4), median final test accuracy per cell. The (model, arm, seed) jobs
   run in ``--jobs`` processes of one thread each. Figures: accuracy against spike size per
   arm, and r over the steps around the spike (``benchmarks/results/radius_*.png``; the
   second also as ``docs/img/radius_r.png``).
2. ``--overhead``: CPU time of one full training step (forward, backward, Adam, limiter)
   divided by a plain Adam step, on MLP+LN and CNN+BN (full batch, 1 thread), the arms
   interleaved step by step in one process, ``time.process_time``, median over repeats.
   Arms: the limiter with the exact JVP (``method="jvp"``, forward-mode AD over
   ``functional_call``), the paper's way (``torch.func.jvp`` along the unit update, a
   second parameter copy), and the finite-difference limiter (``method="fd"``) with the
   relative error of its r against the exact one.

Results: ``benchmarks/results/radius.{json,md}`` (each part updates its own section).

Run: ``OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src python benchmarks/radius.py --spike --jobs 16``
and ``... benchmarks/radius.py --overhead``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp

from torchsteer.bench import data
from torchsteer.bench.suites import lr_spike
from torchsteer.control.radius import RadiusLimiter, logit_derivative, normalized_step
from torchsteer.control.radius._buffers import FlatBuffers
from torchsteer.control.radius.measure import _eval_mode, _spread
from torchsteer.jacobian import model_fn

RESULTS = Path(__file__).parent / "results"
DOCS_IMG = Path(__file__).parent.parent / "docs" / "img"


def _job(args):
    torch.set_num_threads(1)
    model, arm, seed = args
    return [r.to_dict() for r in lr_spike.run_branches(model, arm, seed, lr_spike.FULL_SPIKES)]


def spike_table(jobs: int, seeds, models=None) -> dict:
    models = list(lr_spike.MODELS) if models is None else models
    work = [(m, a, s) for m in models for a in lr_spike.ARMS for s in seeds]
    work.sort(key=lambda w: (w[0] != "CNN+BN", not w[1].startswith("limiter")))  # long first
    start = time.perf_counter()
    with mp.get_context("spawn").Pool(jobs) as pool:
        runs = [r for part in pool.imap_unordered(_job, work) for r in part]
    cells = {}
    for r in runs:
        key = (r["extra"]["model"], r["extra"]["arm"], r["extra"]["spike"])
        cells.setdefault(key, []).append(r["metric"][-1])
    table = [
        {"model": m, "arm": a, "spike": s, "median_acc": statistics.median(v), "accs": v}
        for (m, a, s), v in sorted(cells.items())
    ]
    traces = {}
    for r in runs:
        e = r["extra"]
        if e["arm"].startswith("limiter") and e["spike"] == 10_000 and r["seed"] == seeds[0]:
            traces[f"{e['model']} | {e['arm']}"] = {"r": e["r"], "scale": e["scale"]}
    curves = {}
    for r in runs:
        e = r["extra"]
        if e["spike"] == 10_000 and r["seed"] == seeds[0]:
            curves[f"{e['model']} | {e['arm']}"] = {"steps": r["steps"], "acc": r["metric"]}
    return {
        "table": table,
        "traces": traces,
        "curves": curves,
        "seeds": list(seeds),
        "wall_s": time.perf_counter() - start,
        "jobs": jobs,
    }


def merge_models(new: dict, models) -> dict:
    """The old spike result with the rows, traces and curves of ``models`` replaced."""
    path = RESULTS / "radius.json"
    old = json.loads(path.read_text()).get("spike") if path.exists() else None
    if old is None:
        return new
    keep = [t for t in old["table"] if t["model"] not in models]
    out = dict(old)
    out["table"] = sorted(keep + new["table"], key=lambda t: (t["model"], t["arm"], t["spike"]))
    for key in ("traces", "curves"):
        out[key] = {
            **{k: v for k, v in old[key].items() if k.split(" | ")[0] not in models},
            **new[key],
        }
    out["meta"] = f"{old['meta']}; rerun of {', '.join(models)}: {new['meta']}"
    return out


def plot_spike(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(lr_spike.MODELS)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    for ax, m in zip(axes, models):
        for arm in lr_spike.ARMS:
            rows = [t for t in result["table"] if t["model"] == m and t["arm"] == arm]
            rows.sort(key=lambda t: t["spike"])
            ax.plot([t["spike"] for t in rows], [t["median_acc"] for t in rows], "o-", label=arm)
        ax.set_xscale("log")
        ax.set_title(m)
        ax.set_xlabel("lr spike at step 50 (x)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final test accuracy (median of seeds)")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "radius_accuracy.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, 3, figsize=(14, 6), sharex=True)
    for j, m in enumerate(models):
        key = f"{m} | limiter"
        if key not in result["traces"]:
            continue
        r = np.asarray(result["traces"][key]["r"])
        s = np.asarray(result["traces"][key]["scale"])
        steps = np.arange(1, len(r) + 1)
        ax = axes[0, j]
        ax.semilogy(steps, r, lw=1, label="r of the optimizer's update")
        ax.semilogy(steps, r * s, lw=1, label="r of the applied step")
        lim = s < 1
        ax.scatter(steps[lim], r[lim], s=8, color="C3", label="limited steps", zorder=3)
        ax.axhline(1.0, color="gray", ls="--", lw=0.8)
        ax.axvline(lr_spike.SPIKE_AT + 1, color="k", ls=":", lw=0.8)
        ax.set_title(f"{m}: 10,000x spike at step {lr_spike.SPIKE_AT}")
        ax.grid(alpha=0.3)
        ax = axes[1, j]
        for arm in lr_spike.ARMS:
            c = result["curves"].get(f"{m} | {arm}")
            if c:
                ax.plot(c["steps"], c["acc"], lw=1, label=arm)
        ax.axvline(lr_spike.SPIKE_AT + 1, color="k", ls=":", lw=0.8)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("normalized step r")
    axes[1, 0].set_ylabel("test accuracy")
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "radius_r.png", dpi=110)
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(DOCS_IMG / "radius_r.png", dpi=90)
    plt.close(fig)


class PaperLimiter:
    """The paper's way: copy theta_old, step, p = new - old (second copy), torch.func.jvp
    along p / |p| at theta_old, rescale (a reference for the cost only)."""

    def __init__(self, model):
        self.model = model
        self.names = [k for k, _ in model.named_parameters()]
        self.params = list(model.parameters())

    def step(self, opt, x):
        old = [p.detach().clone() for p in self.params]
        opt.step()
        with torch.no_grad():
            p = [q.detach() - o for q, o in zip(self.params, old)]
            norm = torch.sqrt(sum((t * t).sum() for t in p))
            unit = {k: t / norm for k, t in zip(self.names, p)}
            self.model.eval()
            bufs = dict(self.model.named_buffers())
            _, a = jvp(
                lambda d: functional_call(self.model, {**d, **bufs}, (x,)),
                (dict(zip(self.names, old)),),
                (unit,),
            )
            self.model.train()
            rho = math.pi / float((a.amax(1) - a.amin(1)).max())
            s = min(1.0, rho / float(norm))
            if s < 1.0:
                for q, o, t in zip(self.params, old, p):
                    q.detach().copy_(o + s * t)


OVERHEAD_ARMS = {  # the switches that apply to each model (the MLP has no conv or BatchNorm)
    "MLP+LN": ("plain", "limiter (jvp)", "limiter (jvp, no reuse)", "paper (func.jvp)",
               "limiter (fd)", "limiter (fd1)"),
    "CNN+BN": ("plain", "limiter (jvp)", "limiter (jvp, no channels-last)",
               "limiter (jvp, no channels-last, no BN folding)", "paper (func.jvp)",
               "limiter (fd)", "limiter (fd1)"),
}  # fmt: skip


def _limiter(arm, model):
    if arm == "plain":
        return None
    if arm == "paper (func.jvp)":
        return PaperLimiter(model)
    if arm == "limiter (fd)":
        return RadiusLimiter(model, method="fd")
    if arm == "limiter (fd1)":
        return RadiusLimiter(model, method="fd1")
    return RadiusLimiter(
        model,
        reuse_forward="no reuse" not in arm,
        channels_last="channels-last" not in arm,
        fold="folding" not in arm,
    )


def _fd_error(name, x, y, steps=20):
    """Relative error of r by finite differences (central "fd", one-sided "fd1") against the
    exact r, along real Adam updates of the training run."""
    model = lr_spike.make_model(name, 0)
    opt = torch.optim.Adam(model.parameters(), lr=lr_spike.LR)
    exact = RadiusLimiter(model, mode="monitor")
    errs = {"fd": [], "fd1": []}
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        old = [p.detach().clone() for p in model.parameters()]
        exact.step(opt, x)
        p = {k: q.detach() - o for (k, q), o in zip(model.named_parameters(), old)}
        for method, e in errs.items():
            r_fd, _ = normalized_step(model, x, p, params=dict(zip(p, old)), method=method)
            e.append(abs(float(r_fd) - exact.signals["r"]) / exact.signals["r"])
    return {m: {"median": statistics.median(e), "max": max(e)} for m, e in errs.items()}


def overhead(repeats: int, warmup: int = 3) -> dict:
    torch.set_num_threads(1)
    x, y, _, _ = data.digits()
    out = {}
    for name in ("MLP+LN", "CNN+BN"):
        arms = {}
        for arm in OVERHEAD_ARMS[name]:
            model = lr_spike.make_model(name, 0)
            opt = torch.optim.Adam(model.parameters(), lr=lr_spike.LR)
            arms[arm] = (model, opt, _limiter(arm, model))
        times = {a: [] for a in arms}
        n = repeats * (10 if name == "MLP+LN" else 1)  # a 6 ms step: more repeats, same time
        for i in range(warmup + n):
            for arm, (model, opt, lim) in arms.items():
                start = time.process_time()
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                if lim is None:
                    opt.step()
                else:
                    lim.step(opt, x)
                if i >= warmup:
                    times[arm].append(time.process_time() - start)
        med = {a: statistics.median(t) for a, t in times.items()}
        reused = {
            a: lim.reused / lim.steps
            for a, (_, _, lim) in arms.items()
            if isinstance(lim, RadiusLimiter) and lim.method in ("jvp", "fd1")
        }
        out[name] = {
            "step_ms": {a: 1e3 * v for a, v in med.items()},
            "ratio": {a: v / med["plain"] for a, v in med.items()},
            "reused_fraction": reused,
            "fd_rel_error_r": _fd_error(name, x, y),
            "breakdown_ms": breakdown(name, x, y, repeats),
            "repeats": n,
        }
        print(name, {a: round(v, 3) for a, v in out[name]["ratio"].items()}, flush=True)
        print(name, {a: round(v, 3) for a, v in out[name]["breakdown_ms"].items()}, flush=True)
    return out


def breakdown(name, x, y, repeats: int) -> dict:
    """CPU time of each piece of a limiter step, timed alone, pieces interleaved (ms)."""
    model = lr_spike.make_model(name, 0)
    opt = torch.optim.Adam(model.parameters(), lr=lr_spike.LR)
    lim = RadiusLimiter(model)
    rec, prefix = lim._recorder, lim._prefix
    params = [p for p in model.parameters()]
    names = [k for k, _ in model.named_parameters()]
    state = {}

    def train_fwd_bwd():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    flat = FlatBuffers(names, params)  # theta_old and p, kept from step to step as the limiter

    def snapshot():
        flat.snapshot()
        state["old"] = flat.old_views

    def adam():
        opt.step()

    def update():  # p = new - old and |p| (float64), as the limiter
        state["norm"] = flat.take_update()
        state["p"] = flat.update_views

    def eval_switch():
        with _eval_mode(model, True):
            pass

    def nograd_forward():  # the primal part of a JVP, alone
        with _eval_mode(model, True), torch.no_grad():
            model(x)

    def general_jvp(**options):
        d, pt = dict(zip(names, state["p"])), dict(zip(names, state["old"]))
        state["a"] = logit_derivative(model, x, d, params=pt, **options)

    def general_jvp_plain():
        general_jvp(channels_last=False, fold=False)

    def tangent_only():
        d, pt = dict(zip(names, state["p"])), dict(zip(names, state["old"]))
        with torch.no_grad():  # right after the forward: the parameters are the recorded ones
            a = rec.tangent(x, pt, d, prefix)
        state["reuse"] = a is not None
        if a is not None:
            state["a_reused"] = a  # the logits' tangent in the recorder's (C, N) layout

    def spread_norm_sync():  # as RadiusLimiter._measure: r and |p| in one transfer
        worst = _spread(state.get("a_reused", state["a"])).max()
        torch.stack([worst.to(state["norm"]), state["norm"]]).tolist()

    twin = copy.deepcopy(model)  # no hooks: what recording costs in the training forward
    for m in twin.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()

    def forward_recording():
        model(x)

    def forward_no_hooks():
        twin(x)

    def rescale():  # only on limited steps: theta = old + s p (a timing: the run goes on there)
        flat.apply_scaled(0.5)

    pieces = {
        "forward+backward": train_fwd_bwd,
        "training forward alone, recording (hooks)": forward_recording,
        "training forward alone, no hooks": forward_no_hooks,
        "snapshot copy": snapshot,
        "Adam step": adam,
        "update p = new - old, |p|": update,
        "eval-mode switch": eval_switch,
        "no-grad eval forward (a JVP's primal part)": nograd_forward,
        "general JVP (one forward-mode pass, as the limiter runs it)": general_jvp,
        "general JVP, no BN folding, no channels-last": general_jvp_plain,
        "spread, max, sync (r and |p| to Python)": spread_norm_sync,
        "rescale (limited steps only)": rescale,
    }
    if rec is None:  # no recorder (BatchNorm): no hooks to time
        del pieces["training forward alone, recording (hooks)"]
        del pieces["training forward alone, no hooks"]
    times = {k: [] for k in pieces}
    times["tangent only (reusing the training forward)"] = []
    for i in range(3 + repeats):
        for key, fn in pieces.items():
            start = time.process_time()
            fn()
            if i >= 3:
                times[key].append(time.process_time() - start)
            if key == "forward+backward" and "p" in state and rec is not None:  # fresh record
                start = time.process_time()
                tangent_only()
                if i >= 3 and state["reuse"]:
                    times["tangent only (reusing the training forward)"].append(
                        time.process_time() - start
                    )
    out = {k: 1e3 * statistics.median(v) for k, v in times.items() if v}
    if name == "MLP+LN":  # torch.func.linearize: a trace per step (a few calls are enough)
        ev = copy.deepcopy(model).eval()
        pt = {k: o for k, o in zip(names, state["old"])}
        d = dict(zip(names, state["p"]))
        f = model_fn(ev, x)
        lin, replay = [], []
        for _ in range(3):
            start = time.process_time()
            _, jvp_fn = torch.func.linearize(f, pt)
            mid = time.process_time()
            jvp_fn(d)
            lin.append(time.process_time() - start)
            replay.append(time.process_time() - mid)
        out["torch.func.linearize (trace + tangent)"] = 1e3 * statistics.median(lin)
        out["torch.func.linearize (the traced tangent alone)"] = 1e3 * statistics.median(replay)
    return out


def write(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "radius.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(results)
    if "overhead" in results:  # every run's ratios, to show the spread between runs
        o = results["overhead"]
        runs = old.get("overhead_runs", [])
        runs.append({"meta": o["meta"], "ratio": {m: v["ratio"] for m, v in o["models"].items()}})
        old["overhead_runs"] = runs
    path.write_text(json.dumps(old, indent=1))
    lines = ["# Softmax radius limiter", ""]
    if "spike" in old:
        s = old["spike"]
        lines += [
            f"lr-spike (digits, full-batch Adam lr 0.015, 200 steps, spike at step 50), median "
            f"final test accuracy over seeds {s['seeds']} ({s['meta']}).",
            "",
        ]
        spikes = sorted({t["spike"] for t in s["table"]})
        lines += ["| model | arm | " + " | ".join(f"{k:g}x" for k in spikes) + " |"]
        lines += ["|---|---|" + "---|" * len(spikes)]
        for m in lr_spike.MODELS:
            for a in lr_spike.ARMS:
                row = {
                    t["spike"]: t["median_acc"]
                    for t in s["table"]
                    if t["model"] == m and t["arm"] == a
                }
                cells = " | ".join(f"{100 * row[k]:.1f}" for k in spikes)
                lines.append(f"| {m} | {a} | {cells} |")
        lines += [""]
    if "overhead" in old:
        o = old["overhead"]
        counts = ", ".join(f"{v['repeats']} steps ({m})" for m, v in o["models"].items())
        lines += [
            "Step cost: one full training step (forward, backward, Adam, limiter) / a plain "
            "Adam step, digits full batch (1438 x 64), 1 thread, CPU time (process_time), arms "
            f"interleaved step by step in one process, median over {counts} ({o['meta']}). "
            "Timings on a loaded shared machine move by 10-20 % between runs; compare the "
            "arms within one table.",
            "",
            "Arms: `limiter (jvp)` is the default `RadiusLimiter` (exact JVP; on the MLP only "
            "the tangent, from the activations of the training forward; on the CNN one "
            "forward-mode pass with eval-mode BatchNorm folded into the convolutions, "
            "channels-last); the `no ...` arms switch those off one by one; `paper "
            "(func.jvp)` is the paper's way (torch.func.jvp along p / |p|, a second copy); "
            "`limiter (fd)` the central finite difference, `limiter (fd1)` the one-sided one "
            "from the training forward's logits where they can be reused (both approximate; "
            "their errors below).",
            "",
            "| model | arm | ms/step | ratio | steps on the reuse path |",
            "|---|---|---|---|---|",
        ]
        for m, v in o["models"].items():
            for a in v["ratio"]:
                reused = v.get("reused_fraction", {}).get(a)
                cell = "" if reused is None else f"{100 * reused:.0f} %"
                lines.append(
                    f"| {m} | {a} | {v['step_ms'][a]:.2f} | {v['ratio'][a]:.2f} | {cell} |"
                )
            errors = v["fd_rel_error_r"]
            if "median" in errors:  # an older result: the central difference only
                errors = {"fd": errors}
            for method, e in errors.items():
                lines.append(
                    f"| {m} | {method}: relative error of r | median {e['median']:.1e} | "
                    f"max {e['max']:.1e} | |"
                )
        runs = old.get("overhead_runs", [])[-4:]
        if len(runs) > 1:
            lines += [
                "",
                "The default limiter's ratio in the latest runs (the same code unless the note "
                "says otherwise; the spread is the machine's load):",
                "",
                "| run | " + " | ".join(o["models"]) + " |",
                "|---|" + "---|" * len(o["models"]),
            ]
            for run in runs:
                cells = " | ".join(
                    f"{run['ratio'].get(m, {}).get('limiter (jvp)', float('nan')):.2f}"
                    for m in o["models"]
                )
                lines.append(f"| {run['meta']} | {cells} |")
        models = list(o["models"])
        keys = list(dict.fromkeys(k for m in models for k in o["models"][m]["breakdown_ms"]))
        lines += [
            "",
            "Where a limiter step's time goes: each piece timed alone (ms, CPU time, median, "
            "pieces interleaved). A plain step is forward+backward + Adam; the limiter adds "
            "the snapshot, the update, one JVP (or the tangent only) and the spread.",
            "",
            "| piece | " + " | ".join(models) + " |",
            "|---|" + "---|" * len(models),
        ]
        for k in keys:
            cells = []
            for m in models:
                t = o["models"][m]["breakdown_ms"].get(k)
                cells.append("-" if t is None else f"{t:.2f}")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines += [""]
    (RESULTS / "radius.md").write_text("\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spike", action="store_true")
    ap.add_argument("--overhead", action="store_true")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--note", default="")
    ap.add_argument(
        "--models",
        nargs="+",
        choices=list(lr_spike.MODELS),
        default=None,
        help="rerun only these models; their rows replace the old ones in radius.json",
    )
    args = ap.parse_args()
    meta = f"torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} cores"
    meta += f"; {args.note}" if args.note else ""
    if args.spike:
        res = spike_table(args.jobs, args.seeds, args.models)
        res["meta"] = meta + f", {args.jobs} processes x 1 thread"
        if args.models:
            res = merge_models(res, args.models)
        write({"spike": res})
        plot_spike(res)
    if args.overhead:
        write(
            {"overhead": {"models": overhead(args.repeats), "meta": meta, "repeats": args.repeats}}
        )


if __name__ == "__main__":
    main()

"""The rlhf-toy experiment in full: KL control against reward hacking, 10 seeds.

Runs every arm of :mod:`torchsteer.bench.suites.rlhf_toy` (the six controllers plus the
sensitivity rows) on seeds 0..N-1, arms interleaved within each seed, one thread, and writes

- ``benchmarks/results/rlhf_toy.json``: per-run metrics and the per-arm summary,
- ``benchmarks/results/rlhf_toy.md``: the table and the goal checks,
- ``benchmarks/results/rlhf_toy_<arm>.png``: one figure per arm (KL against the target and,
  for SAFE, its threshold; proxy and gold reward; entropy; coefficient), mean over seeds with
  the min-max band; ``rlhf_toy_overview.png``: KL and gold of all arms.

Run: ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/rlhf_toy.py [--seeds 10] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from torchsteer.bench.suites import rlhf_toy

RESULTS = Path(__file__).parent / "results"
METRICS = (
    "kl_tracking_error",
    "kl_ratio",
    "kl_threshold_error",
    "kl_max",
    "proxy_avg",
    "gold_avg",
    "gold_final",
    "entropy_avg",
    "entropy_final",
)


def summarize(runs):
    out = {}
    for arm in dict.fromkeys(r.method for r in runs):
        rs = [r for r in runs if r.method == arm]
        row = {"seeds": len(rs)}
        for m in METRICS:
            vals = [r.extra[m] for r in rs]
            row[m] = statistics.mean(vals)
            row[m + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        row["gold_crashes"] = sum(r.extra["gold_crashes"] for r in rs)
        row["runs_with_gold_crash"] = sum(r.extra["gold_crashes"] > 0 for r in rs)
        row["proxy_crashes"] = sum(r.extra["proxy_crashes"] for r in rs)
        row["step_time_ms"] = 1e3 * statistics.median(r.step_time for r in rs)
        row["kl_tracking_error_max_seed"] = max(r.extra["kl_tracking_error"] for r in rs)
        out[arm] = row
    return out


def goals(summary):
    fixed = summary["fixed"]["gold_avg"]
    lines = []
    for arm in ("PID", "SAFE differentiable"):
        s = summary[arm]
        ok_kl = s["kl_tracking_error"] <= 0.2
        ok_crash = s["gold_crashes"] == 0
        ok_gold = s["gold_avg"] >= fixed
        lines.append(
            f"- {arm}: KL tracking error {s['kl_tracking_error']:.3f} (<= 0.20: "
            f"{'yes' if ok_kl else 'NO'}), gold crashes {s['gold_crashes']} (none: "
            f"{'yes' if ok_crash else 'NO'}), gold {s['gold_avg']:.3f} vs fixed {fixed:.3f} "
            f"(>=: {'yes' if ok_gold else 'NO'})"
        )
    rel, none = summary["SAFE released"], summary["no KL"]
    same = all(abs(rel[m] - none[m]) <= 1e-9 for m in METRICS if m != "kl_threshold_error")
    lines.append(
        f"- SAFE released vs no KL: KL ratio {rel['kl_ratio']:.2f} vs {none['kl_ratio']:.2f}, "
        f"gold {rel['gold_avg']:.3f} vs {none['gold_avg']:.3f}, crashed runs "
        f"{rel['runs_with_gold_crash']} vs {none['runs_with_gold_crash']}; identical metrics: "
        f"{'yes' if same else 'no'}"
    )
    return lines


def table(summary, cfg):
    head = (
        "| arm | KL track err | KL / d | KL vs own tau | max KL | proxy | gold | gold last 50 "
        "| gold crashes (runs) | entropy (last 50) | ms/step |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for arm, s in summary.items():
        rows.append(
            f"| {arm} | {s['kl_tracking_error']:.3f} ± {s['kl_tracking_error_std']:.3f} "
            f"| {s['kl_ratio']:.2f} | {s['kl_threshold_error']:.3f} | {s['kl_max']:.2f} "
            f"| {s['proxy_avg']:.3f} | {s['gold_avg']:.3f} ± {s['gold_avg_std']:.3f} "
            f"| {s['gold_final']:.3f} | {s['gold_crashes']} ({s['runs_with_gold_crash']}"
            f"/{s['seeds']}) | {s['entropy_avg']:.2f} ({s['entropy_final']:.2f}) "
            f"| {s['step_time_ms']:.1f} |"
        )
    return head + "\n".join(rows) + "\n"


def _band(ax, curves, label, color=None):
    t = torch.tensor(curves, dtype=torch.float64)
    x = range(1, t.shape[1] + 1)
    line = ax.plot(x, t.mean(0), label=label, color=color, lw=1.2)[0]
    ax.fill_between(x, t.min(0).values, t.max(0).values, alpha=0.2, color=line.get_color())


def plots(runs, cfg):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    arms = list(dict.fromkeys(r.method for r in runs))
    for arm in arms:
        rs = [r for r in runs if r.method == arm]
        fig, ax = plt.subplots(1, 4, figsize=(16, 3.2))
        _band(ax[0], [r.loss for r in rs], "KL per token")
        ax[0].axhline(cfg.target, color="k", ls="--", lw=0.8, label="target d")
        ax[0].axhspan(0.8 * cfg.target, 1.2 * cfg.target, color="k", alpha=0.07)
        if arm.startswith("SAFE"):
            _band(ax[0], [r.extra["curves"]["threshold"] for r in rs], "SAFE threshold")
        ax[0].set_yscale("log")
        _band(ax[1], [r.extra["curves"]["proxy"] for r in rs], "proxy")
        _band(ax[1], [r.metric for r in rs], "gold")
        _band(ax[2], [r.extra["curves"]["entropy"] for r in rs], "entropy")
        _band(ax[3], [r.extra["curves"]["coef"] for r in rs], "coef (SAFE: dP/dKL)")
        for a, title in zip(ax, ("KL", "reward", "entropy (nats/token)", "coefficient")):
            a.set_title(title)
            a.set_xlabel("step")
            a.legend(fontsize=7)
        fig.suptitle(f"rlhf-toy: {arm} ({len(rs)} seeds, mean and min-max)")
        fig.tight_layout()
        path = RESULTS / f"rlhf_toy_{re.sub(r'[^a-z0-9]+', '_', arm.lower()).strip('_')}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    for arm in arms:
        rs = [r for r in runs if r.method == arm]
        _band(ax[0], [r.loss for r in rs], arm)
        _band(ax[1], [r.metric for r in rs], arm)
    ax[0].axhline(cfg.target, color="k", ls="--", lw=0.8)
    ax[0].set_yscale("log")
    ax[0].set_title("KL per token")
    ax[1].set_title("gold reward")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    path = RESULTS / "rlhf_toy_overview.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [*paths, path]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="the quick configuration, 2 seeds")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = rlhf_toy.QUICK if args.quick else rlhf_toy.FULL
    seeds = list(range(2 if args.quick else args.seeds))
    runs, t0 = [], time.process_time()
    for seed in seeds:
        for arm in rlhf_toy.arms(cfg):
            r = rlhf_toy.train_arm(arm, seed, cfg)
            runs.append(r)
            e = r.extra
            print(
                f"seed {seed} {arm:32s} track {e['kl_tracking_error']:.3f} "
                f"gold {e['gold_avg']:.3f} crashes {e['gold_crashes']}",
                flush=True,
            )
    cpu = time.process_time() - t0
    summary = summarize(runs)
    RESULTS.mkdir(exist_ok=True)
    checks = goals(summary)
    meta = {
        "config": vars(cfg),
        "seeds": seeds,
        "cpu_seconds": cpu,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "note": "2 shared CPU cores, loaded by other jobs: times are indicative only",
    }
    per_run = [
        {"arm": r.method, "seed": r.seed, **{k: v for k, v in r.extra.items() if k != "curves"}}
        for r in runs
    ]
    (RESULTS / "rlhf_toy.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "runs": per_run, "goals": checks}, indent=1)
    )
    md = (
        f"# rlhf-toy ({len(seeds)} seeds, {cfg.steps} steps, KL target d = {cfg.target} "
        f"nats/token, warm-up {cfg.warmup} steps)\n\n"
        "KL track err: mean |KL - d| / d after warm-up (± std over seeds); KL vs own tau: the "
        "same against SAFE's moving threshold (= d for the other arms); proxy, gold: "
        "training averages; crashes: onsets where the 20-step moving average of the gold "
        "reward falls > 20 % below its max of the preceding 50 steps.\n\n"
        + table(summary, cfg)
        + "\nGoals:\n\n"
        + "\n".join(checks)
        + f"\n\nCommand: `OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/rlhf_toy.py "
        f"--seeds {len(seeds)}{' --quick' if args.quick else ''}`; {cpu:.0f} CPU s in all, "
        "1 thread, on 2 CPU cores shared with other jobs (times indicative).\n"
    )
    (RESULTS / "rlhf_toy.md").write_text(md)
    plots(runs, cfg)
    print(md)


if __name__ == "__main__":
    main()

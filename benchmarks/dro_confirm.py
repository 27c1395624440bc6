"""A confirmatory run of the KL-DRO result on fresh seeds, fixed before it was run.

Why: ``benchmarks/dro.py`` found the worst-class gain of class-level KL-DRO over uniform AT
on the stratified ``cv5`` split (+4.5 +- 6.3 points on seeds 0-4), but its spread over seeds
is larger than the gain and the hyperparameter choices were made while looking at seeds
0-4. This script tests one pre-specified hypothesis on seeds never used before.

Hypothesis (written before the run): on the ``cv5`` split, the spec's class-level arm
(``KL-DRO class level r=2``: instance temperature 2, Group-DRO class step 0.002, as in the
suite's ``ARMS``; nothing chosen here) raises the worst-class robust accuracy over uniform AT
by at least 3 points on average over seeds 5-24 (fold = seed mod 5, so every fold four
times), while the average robust accuracy stays within 1 point. Reported: the paired
differences (same seed: same initialization, data order and attack starts), their mean,
standard deviation, standard error and the count of seeds improved, at the last epoch (the
issue's metric) and averaged over the last 5 epochs; and the per-class robust accuracy
pooled over all test digits of all seeds.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/dro_confirm.py              # seeds 5-24
    OMP_WAIT_POLICY=PASSIVE python benchmarks/dro_confirm.py --seeds 5 6  # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from torchsteer.bench.suites import dro as suite

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("uniform AT", "KL-DRO class level r=2")


def paired(runs: dict, metric: str, seeds: list[int]) -> dict:
    """Mean, sd, standard error and sign count of the per-seed difference DRO - uniform."""
    base, dro = (runs[a] for a in ARMS)
    d = [100 * (dro[s][metric] - base[s][metric]) for s in seeds]
    sd = statistics.stdev(d) if len(d) > 1 else 0.0
    return {
        "mean": statistics.fmean(d),
        "sd": sd,
        "se": sd / math.sqrt(len(d)),
        "improved": sum(x > 0 for x in d),
        "worse": sum(x < 0 for x in d),
        "n": len(d),
        "per_seed": d,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(5, 25)))
    parser.add_argument("--out", default=str(RESULTS / "dro_confirm"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = dataclasses.replace(suite.FULL, split="cv5")
    arms = [suite.arm_by_name(a) for a in ARMS]
    runs: dict[str, dict[int, dict]] = {a: {} for a in ARMS}
    counts: dict[str, np.ndarray] = {a: np.zeros((2, suite.NUM_CLASSES)) for a in ARMS}
    t0 = time.process_time()
    with Progress() as progress:
        task = progress.add_task("dro confirm", total=len(args.seeds) * len(arms))
        for seed in args.seeds:
            dataset = suite.load_split(config, seed)
            per_class_n = torch.bincount(dataset[3], minlength=suite.NUM_CLASSES).numpy()
            for arm in arms:
                extra = suite.train_arm(arm, seed, config, dataset).extra
                runs[arm.name][seed] = {
                    k: extra[k]
                    for k in (
                        "clean_acc",
                        "robust_acc",
                        "worst_class_robust_acc",
                        "tail_robust_acc",
                        "tail_worst_class_robust_acc",
                        "per_class_robust_acc",
                    )
                }
                counts[arm.name][0] += np.asarray(extra["per_class_robust_acc"]) * per_class_n
                counts[arm.name][1] += per_class_n
                progress.advance(task)
    cpu = time.process_time() - t0
    seeds = args.seeds
    summary = {
        metric: paired(runs, metric, seeds)
        for metric in ("worst_class_robust_acc", "robust_acc", "tail_worst_class_robust_acc")
    }
    summary["tail_robust_acc"] = paired(runs, "tail_robust_acc", seeds)
    pooled = {a: (counts[a][0] / counts[a][1] * 100).round(1).tolist() for a in ARMS}
    absolute = {
        a: {
            m: (
                100 * statistics.fmean(runs[a][s][m] for s in seeds),
                100 * statistics.stdev(runs[a][s][m] for s in seeds) if len(seeds) > 1 else 0.0,
            )
            for m in ("clean_acc", "robust_acc", "worst_class_robust_acc")
        }
        for a in ARMS
    }
    w, r = summary["worst_class_robust_acc"], summary["robust_acc"]
    met = w["mean"] >= 3.0 and r["mean"] >= -1.0
    payload = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
        "config": dataclasses.asdict(config),
        "arms": list(ARMS),
        "seeds": seeds,
        "cpu_seconds": cpu,
        "paired": summary,
        "absolute": absolute,
        "pooled_per_class": pooled,
        "runs": runs,
        "goal_met": met,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))

    def row(name: str, d: dict) -> str:
        return (
            f"| {name} | {d['mean']:+.1f} | {d['sd']:.1f} | {d['se']:.1f} | "
            f"{d['improved']} / {d['worse']} / {d['n']} |"
        )

    lines = [
        "# KL-DRO confirmatory run on fresh seeds (`benchmarks/dro_confirm.py`)",
        "",
        f"{payload['date_utc']} UTC, torch {torch.__version__}, 1 thread, {cpu:.0f} CPU s "
        "(shared 2-core machine). Hypothesis fixed before the run (see the script's "
        f"docstring): the spec's class-level arm vs uniform AT on the stratified `cv5` split, "
        f"seeds {seeds[0]}-{seeds[-1]} (never used before; fold = seed mod 5). Same suite "
        "config as `benchmarks/dro.py` (MLP 64-128-10, Adam 3e-3, PGD-5 AT eps 0.1, PGD-20 "
        "evaluation, 30 epochs).",
        "",
        "Paired difference class level - uniform AT, points:",
        "",
        "| metric | mean | sd | se | seeds better / worse / all |",
        "|---|---|---|---|---|",
        row("worst-class robust (last epoch)", w),
        row("average robust (last epoch)", r),
        row("worst-class robust (last 5 epochs)", summary["tail_worst_class_robust_acc"]),
        row("average robust (last 5 epochs)", summary["tail_robust_acc"]),
        "",
        "Absolute, mean ± sd over seeds (%):",
        "",
        "| arm | clean | robust | worst-class robust |",
        "|---|---|---|---|",
    ]
    for a in ARMS:
        ab = absolute[a]
        lines.append(
            f"| {a} | " + " | ".join(f"{ab[m][0]:.1f} ± {ab[m][1]:.1f}" for m in ab) + " |"
        )
    lines += ["", "Per-class robust accuracy pooled over all test digits of all seeds (%):", ""]
    lines += [f"- {a}: " + " ".join(f"{v:.0f}" for v in pooled[a]) for a in ARMS]
    lines += [
        "",
        f"Goal (worst class >= +3 points, average robust >= -1 point): "
        f"worst class {w['mean']:+.1f} ± {w['se']:.1f} (se), average {r['mean']:+.1f}: "
        + ("**met**." if met else "**NOT met**."),
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

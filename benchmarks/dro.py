"""KL-DRO adversarial training on digits: the full ``dro`` suite and the reweighting overhead.

Runs :mod:`torchsteer.bench.suites.dro` in full mode (MLP 64-128-10, l_inf PGD AT with
eps 0.1, 5 steps; PGD-20 evaluation; 30 epochs) for every arm on every seed, on two splits:

* ``legacy``: the data loader's split (the first 359 rows are the test set), as before;
* ``cv5``: seed ``s`` tests on fold ``s`` of a stratified 5-fold partition (all 1797 digits
  are tested once over the 5 seeds; the per-class accuracy pooled over the folds rests on
  ~180 digits per class instead of ~36).

Per arm it reports the mean and spread over seeds of clean, average robust and worst-class
robust accuracy, and the paired differences to uniform AT (same seed: same initialization,
data order and attack starts until the weights differ), at the last epoch (the issue's
metric) and averaged over the last 5 epochs (``tail``, less noise). Besides the spec's arms,
the "selected on validation" arm is the DRO configuration that
:func:`~torchsteer.bench.suites.dro.select` picks on a validation split carved from the
training part (legacy: once, 3 seeds; cv5: per fold, 2 seeds) out of the spec's DRO arms and
``CANDIDATES``; the test set plays no part in the choice. The goal of issue 8 (worst class up
by >= 3 points, average robust within 1 point) is checked on that arm, and, as the issue
words it, on the best spec arm by test worst-class accuracy (a choice made on the test set,
so optimistic).

The overhead is measured by :func:`~torchsteer.bench.suites.dro.measure_overhead`: whole AT
steps of every arm interleaved in random order (``time.process_time``, 1 thread, median over
repeats), plus the weighting call alone minus a plain ``mean`` on the same losses.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/dro.py             # 5 seeds, 30 epochs
    OMP_WAIT_POLICY=PASSIVE python benchmarks/dro.py --seeds 2 --epochs 5   # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from torchsteer.bench.suites import dro as suite

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = (
    "clean_acc",
    "robust_acc",
    "worst_class_robust_acc",
    "tail_robust_acc",
    "tail_worst_class_robust_acc",
)
SELECTED = "selected on validation"
SELECT_SEEDS = {"legacy": [0, 1, 2], "cv5": [0, 100]}  # cv5: fold s uses seeds s, s + 100


def _mean_sd(values: list[float]) -> tuple[float, float]:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), sd


def run_split(split: str, seeds: list[int], epochs: int, log) -> dict:
    """Spec arms and the validation-selected arm on every seed of one split."""
    config = dataclasses.replace(suite.FULL, split=split, epochs=epochs)
    select_config = dataclasses.replace(config, eval_every=config.epochs)  # tail evals only
    test_config = dataclasses.replace(config, diagnose=True)
    candidates = suite.ARMS[1:] + suite.CANDIDATES
    runs, selections = [], {}
    selection = None
    if split == "legacy":  # one training set: one choice
        dataset = suite.load_split(config, 0)
        selection = suite.select(candidates, dataset, select_config, SELECT_SEEDS["legacy"])
    for seed in seeds:
        dataset = suite.load_split(config, seed)
        if split == "cv5":  # fold `seed`: choose on its own training part
            select_seeds = [seed + k for k in SELECT_SEEDS["cv5"]]
            selection = suite.select(candidates, dataset, select_config, select_seeds)
        selections[seed] = selection
        log(f"{split} seed {seed}: selected {selection['selected']}")
        for arm in suite.ARMS:
            runs.append(suite.train_arm(arm, seed, test_config, dataset))
        name = selection["selected"]
        twin = next((r for r in runs if r.method == name and r.seed == seed), None)
        chosen = (
            copy.deepcopy(twin)
            if twin is not None
            else suite.train_arm(suite.arm_by_name(name), seed, test_config, dataset)
        )
        chosen.method = SELECTED
        chosen.extra["selected"] = name
        runs.append(chosen)
    return {"config": dataclasses.asdict(config), "runs": runs, "selections": selections}


def summarize(runs) -> dict:
    """Per arm: mean/sd over seeds, paired deltas to uniform AT, per-class means."""
    by_arm: dict[str, dict[int, dict]] = {}
    for r in runs:
        by_arm.setdefault(r.method, {})[r.seed] = r.extra
    base = by_arm[suite.ARMS[0].name]
    out = {}
    for name, per_seed in by_arm.items():
        seeds = sorted(per_seed)
        row = {"seeds": seeds}
        for m in METRICS:
            row[m] = _mean_sd([per_seed[s][m] for s in seeds])
            deltas = [per_seed[s][m] - base[s][m] for s in seeds]
            row["delta_" + m] = _mean_sd(deltas)
            row["wins_" + m] = sum(d > 0 for d in deltas)
        for key in ("per_class_robust_acc", "train_per_class_robust_acc"):
            row[key + "_mean"] = [
                statistics.fmean(per_seed[s][key][c] for s in seeds)
                for c in range(suite.NUM_CLASSES)
            ]
        # pooled over the seeds' test sets, weighted by their class counts (cv5: every digit once)
        hits = [
            sum(
                per_seed[s]["per_class_robust_acc"][c] * per_seed[s]["per_class_count"][c]
                for s in seeds
            )
            for c in range(suite.NUM_CLASSES)
        ]
        counts = [
            sum(per_seed[s]["per_class_count"][c] for s in seeds) for c in range(suite.NUM_CLASSES)
        ]
        row["pooled_per_class_robust_acc"] = [h / n for h, n in zip(hits, counts)]
        row["pooled_worst_class_robust_acc"] = min(row["pooled_per_class_robust_acc"])
        row["worst_classes"] = [per_seed[s]["worst_class"] for s in seeds]
        row["mean_ess_fraction"] = statistics.fmean(
            per_seed[s].get("mean_ess_fraction", 1.0) for s in seeds
        )
        if all("class_weights" in per_seed[s] for s in seeds):
            row["class_weights_mean"] = [
                statistics.fmean(per_seed[s]["class_weights"][c] for s in seeds)
                for c in range(suite.NUM_CLASSES)
            ]
        if name == SELECTED:
            row["selected"] = [per_seed[s]["selected"] for s in seeds]
        out[name] = row
    return out


def goal(summary: dict, arm: str) -> dict:
    d_worst = 100 * summary[arm]["delta_worst_class_robust_acc"][0]
    d_avg = 100 * summary[arm]["delta_robust_acc"][0]
    return {
        "arm": arm,
        "delta_worst_points": d_worst,
        "delta_avg_points": d_avg,
        "met": d_worst >= 3.0 and d_avg >= -1.0,
    }


def goals(summary: dict) -> dict:
    """The goal on the validation-selected arm and on the best spec arm by test worst class."""
    spec = [a.name for a in suite.ARMS[1:]]
    best = max(spec, key=lambda a: summary[a]["worst_class_robust_acc"][0])
    return {"selected": goal(summary, SELECTED), "best_spec_on_test": goal(summary, best)}


def _pct(ms: tuple[float, float]) -> str:
    return f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"


def _pc(values) -> str:
    return " ".join(f"{100 * v:.0f}" for v in values)


SPLIT_TEXT = {
    "legacy": "the loader's split: test = the first 359 rows (~36 per class, one digit = "
    "2.8 pts of a class), train = the other 1438",
    "cv5": "stratified 5-fold: seed s tests on fold s (~36 per class, ~364 digits) and trains "
    "on the other 4 (~1433); over the 5 seeds every digit is tested once ('pooled': ~180 per "
    "class)",
}


def split_section(split: str, result: dict) -> list[str]:
    summary, g = result["summary"], result["goals"]
    lines = [
        f"## Split `{split}`: {SPLIT_TEXT[split]}",
        "",
        "| arm | clean % | robust % | worst-class robust % | Δ robust (pts) "
        "| Δ worst class (pts) | wins | worst class, pooled % | tail Δ robust "
        "| tail Δ worst class | mean ESS / B |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    n = len(next(iter(summary.values()))["seeds"])
    for name, row in summary.items():
        lines.append(
            f"| {name} | {_pct(row['clean_acc'])} | {_pct(row['robust_acc'])} "
            f"| {_pct(row['worst_class_robust_acc'])} | {_pct(row['delta_robust_acc'])} "
            f"| {_pct(row['delta_worst_class_robust_acc'])} "
            f"| {row['wins_worst_class_robust_acc']}/{n} "
            f"| {100 * row['pooled_worst_class_robust_acc']:.1f} "
            f"| {_pct(row['delta_tail_robust_acc'])} "
            f"| {_pct(row['delta_tail_worst_class_robust_acc'])} "
            f"| {row['mean_ess_fraction']:.2f} |"
        )
    sel = summary[SELECTED]["selected"]
    lines += [
        "",
        f"Selected on validation (per seed): {', '.join(f'`{s}`' for s in sel)}.",
        "",
        "Robust accuracy per class (%, classes 0-9; test: pooled over the seeds, train: the "
        "training set at the end, mean over seeds):",
        "",
    ]
    for name, row in summary.items():
        lines.append(
            f"- {name}: test {_pc(row['pooled_per_class_robust_acc'])} | train "
            f"{_pc(row['train_per_class_robust_acc_mean'])}"
        )
    for name, row in summary.items():
        if "class_weights_mean" in row:
            lines.append(
                f"- final class weights C·q, {name}: "
                + " ".join(f"{10 * v:.2f}" for v in row["class_weights_mean"])
            )
    for key, text in (
        ("selected", "validation-selected arm"),
        ("best_spec_on_test", "best spec arm by test worst class (optimistic)"),
    ):
        r = g[key]
        verdict = "met" if r["met"] else "NOT met"
        lines.append(
            f"\nGoal on the {text} ({r['arm']}): worst class {r['delta_worst_points']:+.1f} pts "
            f"(goal >= +3), average robust {r['delta_avg_points']:+.1f} pts (goal >= -1): "
            f"**{verdict}**."
        )
    return [*lines, ""]


def markdown(payload: dict) -> str:
    c = payload["config"]
    lines = [
        "# KL-DRO adversarial training on digits (`benchmarks/dro.py`)",
        "",
        f"MLP 64-{c['hidden']}-10, Adam lr {c['lr']:g}, batch {c['batch_size']}, l_inf PGD AT "
        f"eps {c['eps']:g} ({c['train_steps']} steps, random start), PGD-{c['eval_steps']} "
        f"evaluation, {c['epochs']} epochs, {len(payload['seeds'])} seeds (mean ± sd over "
        "seeds; Δ: paired difference to uniform AT, same seed; wins: seeds with Δ worst > 0; "
        "tail: per-class accuracy averaged over the last 5 epochs, then the worst class). "
        f"CPU time of the run: {payload['cpu_seconds']:.0f} s.",
        "",
        "`legacy` is the split of the earlier results; `cv5` was added because the legacy "
        "test rows are not exchangeable with the training rows (a logistic regression tells "
        "them apart, cross-validated AUC 0.57) and ~36 digits per class make its worst class "
        "noisy. `selected on validation`: the DRO arm that `select` picks (spec arms and "
        "`CANDIDATES`) on a stratified 25 % validation split carved from the training part "
        "(legacy: once, 3 seeds; cv5: per fold, 2 seeds): the largest gain of the worst class "
        "of the seed-averaged validation accuracy (last 5 epochs) among the arms within 1 "
        "point of uniform AT's validation robust accuracy; the validation runs take as many "
        "optimizer steps as the test runs (40 epochs on the smaller fit split). The test set "
        "plays no part in it. Earlier variants of the selection, same test runs otherwise: "
        "1 seed per fold (legacy: 2), 30 epochs (commit 6fa7146): cv5 +5.7 ± 9.7 worst / "
        "-0.9 ± 0.9 average, legacy +3.7 ± 5.6 / -1.7 ± 1.6; 2 seeds (legacy: 3), 30 epochs "
        "(commit feb749c): cv5 +3.0 ± 12.5 / -1.8 ± 0.7, legacy +0.6 ± 2.4 / -2.0 ± 0.8.",
        "",
    ]
    for split in payload["splits"]:
        lines += split_section(split, payload["splits"][split])
    overhead = payload["overhead"]
    base_step = overhead[suite.ARMS[0].name]["step"]
    lines += [
        "## Overhead",
        "",
        "| arm | step / plain AT | weighting cost / AT step |",
        "|---|---|---|",
    ]
    for name, o in overhead.items():
        lines.append(f"| {name} | {o['ratio']:.3f} | {100 * o['weighting'] / base_step:.2f} % |")
    lines += [
        "",
        f"Plain AT step {1e3 * base_step:.2f} ms (median). `step / plain AT`: whole AT steps of "
        "the arm against a plain-AT twin, single steps alternating in random order, median of "
        "the paired ratios over the repeats; the uniform AT row is the A/A control, a gauge of "
        "the noise of that figure. `weighting cost`: the weighting call alone minus a plain "
        "mean on the same 128 losses, as a share of the plain AT step.",
        "The machine (2 cores) was shared with other jobs during the run: timings are CPU time "
        "(`time.process_time`, 1 thread) but still carry that noise.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=suite.FULL.epochs)
    parser.add_argument("--splits", default=",".join(suite.SPLITS))
    parser.add_argument("--overhead-repeats", type=int, default=30)
    parser.add_argument("--out", default=str(RESULTS / "dro"))
    parser.add_argument(
        "--markdown-only", action="store_true", help="rewrite the .md from the .json"
    )
    args = parser.parse_args()
    out = Path(args.out)
    if args.markdown_only:
        text = markdown(json.loads(out.with_suffix(".json").read_text()))
        out.with_suffix(".md").write_text(text)
        print(text)
        return
    torch.set_num_threads(1)
    seeds = list(range(args.seeds))
    t0 = time.process_time()
    splits = {}
    for split in args.splits.split(","):
        res = run_split(split, seeds, args.epochs, print)
        raw = out.with_name(out.name + f".{split}.partial.json")  # kept until the end
        raw.write_text(json.dumps([r.to_dict() for r in res["runs"]]))
        summary = summarize(res["runs"])
        splits[split] = {
            "summary": summary,
            "goals": goals(summary),
            "selections": {str(k): v for k, v in res["selections"].items()},
            "runs": [r.to_dict() for r in res["runs"]],
        }
        print(f"{split}: {time.process_time() - t0:.0f} CPU s so far", flush=True)
    config = dataclasses.replace(suite.FULL, epochs=args.epochs)
    chosen = {n for res in splits.values() for n in res["summary"][SELECTED]["selected"]}
    extra = [suite.arm_by_name(n) for n in sorted(chosen) if n not in suite.ARMS_BY_NAME]
    overhead = suite.measure_overhead(config, suite.ARMS + extra, repeats=args.overhead_repeats)
    payload = {
        "config": dataclasses.asdict(config),
        "seeds": seeds,
        "splits": splits,
        "overhead": overhead,
        "cpu_seconds": time.process_time() - t0,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_average": os.getloadavg(),
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    text = markdown(payload)
    out.with_suffix(".md").write_text(text)
    for split in splits:
        out.with_name(out.name + f".{split}.partial.json").unlink(missing_ok=True)
    print(text)


if __name__ == "__main__":
    main()

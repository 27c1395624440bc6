"""Knowledge distillation on digits: the full ``distill`` suite, 5 seeds, paired to labels only.

Runs :mod:`torchsteer.bench.suites.distill` in full mode (teacher MLP 64-256-256-10, 60 epochs;
student 64-4-10, 150 epochs; split cv5: seed s tests on fold s, so five seeds test all 1797
digits once) for every arm on every seed. Per arm it reports the mean and spread over seeds
of the student's test accuracy, the paired difference to labels only (same seed: same teacher,
initialization and batch order), the seeds it wins, the accuracy pooled over the five folds
(every digit once), the test cross-entropy gap to the teacher, the KL from the teacher, the
top-1 agreement with the teacher and the calibration error (ECE, 15 bins).

Usage::

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/distill.py            # 5 seeds
    OMP_NUM_THREADS=1 python benchmarks/distill.py --seeds 1 --student-epochs 3 --no-write
    OMP_NUM_THREADS=1 python benchmarks/distill.py --append   # also append the tables to
                                                               # benchmarks/results/distill.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from torchsteer.bench.registry import Context, Run
from torchsteer.bench.suites import distill as suite

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("test_acc", "test_ce", "ce_gap", "kl_to_teacher", "agreement", "ece", "train_ce")


def _ms(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    mean = statistics.fmean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def summarize(runs, seeds: list[int]) -> dict:
    """Per method: the metrics per seed, the paired differences to labels only, wins."""
    by = {(r.method, r.seed): r for r in runs}
    methods = list(dict.fromkeys(r.method for r in runs))
    base = suite.ARMS[0].name
    out = {}
    for m in methods:
        rows = [by[(m, s)].extra for s in seeds]
        entry = {k: [row[k] for row in rows] for k in METRICS if k in rows[0]}
        entry["n_test"] = [len(suite.load_split(s)[3]) for s in seeds]
        entry["cpu_s"] = [by[(m, s)].cpu_time[-1] for s in seeds]
        if m != suite.TEACHER:
            base_rows = [by[(base, s)].extra for s in seeds]
            for k in ("test_acc", "ece", "kl_to_teacher", "agreement"):
                entry["delta_" + k] = [a[k] - b[k] for a, b in zip(rows, base_rows)]
            entry["wins"] = sum(d > 0 for d in entry["delta_test_acc"])
        correct = sum(a * n for a, n in zip(entry["test_acc"], entry["n_test"]))
        entry["pooled_acc"] = correct / sum(entry["n_test"])
        out[m] = entry
    return out


def markdown(summary: dict, seeds: list[int], config, cpu: float) -> str:
    lines = [
        f"## Results ({len(seeds)} seeds: {', '.join(map(str, seeds))})",
        "",
        f"Teacher {config.teacher_epochs} epochs, students {config.student_epochs} epochs; "
        f"T = {config.temperature:g}, a = {config.alpha:g}. Mean ± sd over seeds; Δ: paired "
        "difference to labels only (same seed); wins: seeds with Δ acc > 0; pooled: accuracy "
        "over the five test folds together (every digit once). CE gap: student minus teacher "
        "test cross-entropy (nats). KL: KL(teacher || student) on the test fold at T = 1. "
        f"CPU time of the whole run: {cpu:.0f} s (shared 2-core machine, 1 thread).",
        "",
        "| arm | test acc % | Δ acc (pts) | wins | pooled % | CE gap | KL to teacher "
        "| agreement % | ECE % | Δ ECE (pts) | train CE |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, e in summary.items():
        teacher = m == suite.TEACHER
        lines.append(
            "| "
            + " | ".join(
                [
                    m,
                    _ms(e["test_acc"], 100),
                    "-" if teacher else _ms(e["delta_test_acc"], 100),
                    "-" if teacher else f"{e['wins']}/{len(seeds)}",
                    f"{100 * e['pooled_acc']:.1f}",
                    _ms(e["ce_gap"], 1, 3),
                    _ms(e["kl_to_teacher"], 1, 3),
                    _ms(e["agreement"], 100),
                    _ms(e["ece"], 100),
                    "-" if teacher else _ms(e["delta_ece"], 100),
                    _ms(e["train_ce"], 1, 3),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


# (arm, reference): the paired comparisons the hypotheses name besides "against labels only"
PAIRS = (
    ("reverse KL", "forward KL"),
    ("GJS beta=0.9", "forward KL"),
    ("GJS beta=0.1", "forward KL"),
    ("GJS beta=0.9", "reverse KL"),
    ("NKD", "forward KL"),
)


def paired(runs, seeds: list[int]) -> str:
    """Paired differences between two arms (same seed), accuracy and KL to the teacher."""
    by = {(r.method, r.seed): r.extra for r in runs}
    lines = [
        "| arm - reference | Δ acc per seed (pts) | mean ± sd | median | wins "
        "| Δ KL to teacher | Δ ECE (pts) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, ref in PAIRS:
        if not all((m, s) in by for m in (arm, ref) for s in seeds):
            continue
        d = {
            k: [by[(arm, s)][k] - by[(ref, s)][k] for s in seeds]
            for k in ("test_acc", "kl_to_teacher", "ece")
        }
        acc = d["test_acc"]
        lines.append(
            f"| {arm} - {ref} | {' '.join(f'{100 * a:+.1f}' for a in acc)} | {_ms(acc, 100)} "
            f"| {100 * statistics.median(acc):+.1f} | {sum(a > 0 for a in acc)}/{len(seeds)} "
            f"| {_ms(d['kl_to_teacher'], 1, 3)} | {_ms(d['ece'], 100)} |"
        )
    return "\n".join(lines) + "\n"


def per_seed(summary: dict) -> str:
    """Test accuracy of every arm on every seed."""
    lines = ["| arm | test acc % per seed |", "|---|---|"]
    for m, e in summary.items():
        lines.append(f"| {m} | {' '.join(f'{100 * a:.1f}' for a in e['test_acc'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--student-epochs", type=int, default=suite.FULL.student_epochs)
    parser.add_argument("--teacher-epochs", type=int, default=suite.FULL.teacher_epochs)
    parser.add_argument("--temperature", type=float, default=suite.FULL.temperature)
    parser.add_argument("--alpha", type=float, default=suite.FULL.alpha)
    parser.add_argument("--tag", default="distill", help="results/TAG.json (and TAG.md)")
    parser.add_argument("--arms", help="comma-separated arm names (default: all)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--append", action="store_true", help="append the tables to distill.md")
    parser.add_argument(
        "--from-json", action="store_true", help="print the tables of results/distill.json"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads((RESULTS / f"{args.tag}.json").read_text())
        runs = [Run(**r) for r in saved["runs"]]
        seeds, config = saved["meta"]["seeds"], suite.Config(**saved["meta"]["config"])
        summary = summarize(runs, seeds)
        print(markdown(summary, seeds, config, saved["meta"]["cpu_s"]))
        print(per_seed(summary) + "\n" + paired(runs, seeds))
        return
    torch.set_num_threads(1)
    config = dataclasses.replace(
        suite.FULL,
        student_epochs=args.student_epochs,
        teacher_epochs=args.teacher_epochs,
        temperature=args.temperature,
        alpha=args.alpha,
    )
    seeds = list(range(args.seeds))
    t0, w0 = time.process_time(), time.perf_counter()
    arms = suite.ARMS
    if args.arms:
        by_name = {a.name: a for a in suite.ARMS}
        arms = [by_name[n.strip()] for n in args.arms.split(",")]
    runs = suite.run(Context(quick=False, seeds=seeds), config, arms)
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    summary = summarize(runs, seeds)
    text = markdown(summary, seeds, config, cpu)
    text += "\n" + per_seed(summary) + "\n" + paired(runs, seeds)
    print(text)
    if args.no_write:
        return
    meta = {
        "config": dataclasses.asdict(config),
        "seeds": seeds,
        "cpu_s": cpu,
        "wall_s": wall,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }
    payload = {"meta": meta, "summary": summary, "runs": [r.to_dict() for r in runs]}
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(payload, indent=1) + "\n")
    if args.append:
        with open(RESULTS / f"{args.tag}.md", "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()

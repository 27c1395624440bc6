"""The rlvr-diversity experiment in full: pass@k under reverse KL, forward KL, JS, DPH-RL.

Runs every arm of :mod:`torchsteer.bench.suites.rlvr_diversity` (``FULL``: the beta sweeps,
no penalty, the PID arms) on seeds 0..N-1, arms interleaved within each seed, one thread, and
writes ``benchmarks/results/rlvr_diversity.json`` (per-run metrics and curves). ``--analyze``
(also run after the training) reads that file, tests the hypothesis written in
``benchmarks/results/rlvr_diversity.md`` (pass@256 at equal pass@1, interpolated along each
penalty's beta sweep) and rewrites the part of the .md below the line ``## Results`` with the
tables, and the plots ``rlvr_diversity_frontier.png`` (pass@256 against pass@1) and
``rlvr_diversity_curves.png`` (reward, pass@1, pass@256, KL against steps).

Run: ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/rlvr_diversity.py --seeds 10``
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from torchsteer.bench.suites import rlvr_diversity as rd

RESULTS = Path(__file__).parent / "results"
JSON = RESULTS / "rlvr_diversity.json"
MD = RESULTS / "rlvr_diversity.md"
METRICS = ("reward_avg", "pass@1", "pass@8", "pass@32", "pass@256", "distinct@256", "kl")
PENALTIES = ("reverse KL", "forward KL", "JS", "DPH-RL")
LEVELS = (0.25, 0.5, 0.75)


def train(seeds, cfg, out):
    torch.set_num_threads(1)
    data = {"config": {**vars(cfg)}, "reference": {}, "runs": [], "meta": {}}
    data["quick"] = cfg is rd.QUICK
    t0 = time.process_time()
    for seed in seeds:
        data["reference"][str(seed)] = rd.reference_metrics(seed, cfg)
        for arm in rd.arms(cfg):
            r = rd.train_arm(arm, seed, cfg)
            data["runs"].append({"method": r.method, "seed": r.seed, "step_time": r.step_time,
                                 "extra": r.extra})  # fmt: skip
        print(f"seed {seed} done, {time.process_time() - t0:.0f} CPU s", flush=True)
    data["meta"] = {"cpu_s": time.process_time() - t0, "torch": torch.__version__,
                    "machine": platform.machine(), "threads": 1}  # fmt: skip
    out.write_text(json.dumps(data))
    return data


def interpolate(points, level):
    """pass@256 at pass@1 = level, linear between the points sorted by pass@1 (None outside)."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= level <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (level - x0) / (x1 - x0)
    return None


def matched(data, seed, label, f, key="pass@256"):
    """(level, ``key`` at that level) of one penalty's sweep on one seed."""
    ref = data["reference"][str(seed)]
    runs = [r for r in data["runs"] if r["seed"] == seed]
    none = next(r["extra"] for r in runs if r["method"] == "no penalty")
    level = ref["pass@1"] + f * (none["pass@1"] - ref["pass@1"])
    pts = [(ref["pass@1"], ref[key]), (none["pass@1"], none[key])]
    pts += [(r["extra"]["pass@1"], r["extra"][key]) for r in runs
            if r["method"].startswith(label + " beta=")]  # fmt: skip
    return level, interpolate(pts, level)


def _mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(data):
    """Per arm: mean and std over seeds of each metric (and the reference's row)."""
    rows = {"reference (pi_ref)": {m: _mean_std([ref[m] for ref in data["reference"].values()])
                                   for m in METRICS if m != "reward_avg"}}  # fmt: skip
    rows["reference (pi_ref)"]["reward_avg"] = rows["reference (pi_ref)"]["pass@1"]
    for arm in dict.fromkeys(r["method"] for r in data["runs"]):
        rs = [r["extra"] for r in data["runs"] if r["method"] == arm]
        rows[arm] = {m: _mean_std([e[m] for e in rs]) for m in METRICS}
        if arm.startswith("PID"):
            kl = [statistics.mean(e["curves"]["kl"][len(e["curves"]["kl"]) // 2 :]) for e in rs]
            rows[arm]["kl_second_half"] = _mean_std(kl)
        if arm.startswith("DPH-RL"):
            rows[arm]["dph_pef"] = _mean_std([e["dph_pef"] for e in rs])
    return rows


def verdict(data):
    """Per level f: per-seed pass@256 differences (penalty - reverse KL) at equal pass@1."""
    seeds = sorted(int(s) for s in data["reference"])
    out = {}
    for f in LEVELS:
        row = {"level": [], "pass@256": {lab: [] for lab in PENALTIES}}
        for seed in seeds:
            for lab in PENALTIES:
                level, v = matched(data, seed, lab, f)
                row["pass@256"][lab].append(v)
            row["level"].append(level)
        rev = row["pass@256"]["reverse KL"]
        row["diff"] = {lab: [None if a is None or b is None else a - b
                             for a, b in zip(row["pass@256"][lab], rev)]
                       for lab in PENALTIES if lab != "reverse KL"}  # fmt: skip
        row["wins"] = {lab: sum(d is not None and d >= 0.02 for d in ds)
                       for lab, ds in row["diff"].items()}  # fmt: skip
        out[f] = row
    return out


def posthoc(data):
    seeds = sorted(int(s) for s in data["reference"])
    rows = []
    for key, f, unit, bar in (("pass@256", 0.9, 100, 2), ("pass@8", 0.5, 100, 2),
                              ("pass@32", 0.5, 100, 2), ("distinct@256", 0.5, 1, 0.1)):  # fmt: skip
        cells = []
        for lab in ("forward KL", "JS"):
            d = []
            for seed in seeds:
                a, r = (
                    matched(data, seed, lab, f, key)[1],
                    matched(data, seed, "reverse KL", f, key)[1],
                )
                if a is not None and r is not None:
                    d.append(unit * (a - r))
            cells.append(f"{statistics.mean(d):+.2f} ({sum(x >= bar for x in d)}/{len(seeds)})")
        rows.append(f"| {key} | {f:g} | {cells[0]} | {cells[1]} |")
    return rows


def _fmt(ms):
    m, s = ms
    return f"{m:.3f} ± {s:.3f}"


def report(data, rows, ver):
    n = len(data["reference"])
    lines = ["## Results", ""]
    cfg = data["config"]
    lines += [
        f"{n} seeds ({', '.join(sorted(data['reference'], key=int))}), {cfg['steps']} steps; "
        f"mean ± std over seeds; everything exact from the policy's probabilities at the end "
        f"(reward: the batch reward averaged over training). distinct@256: expected distinct "
        f"correct answers in 256 samples (of 4).",
        "",
        "### The test: pass@256 at equal pass@1",
        "",
        "Per seed, pass@256 interpolated along each penalty's beta sweep at pass@1 = L = "
        "pass@1(ref) + f (pass@1(no penalty) - pass@1(ref)); difference to reverse KL; a seed "
        "counts when the difference is >= 0.02.",
        "",
        "| f | mean L | penalty | pass@256 at L | diff vs reverse KL (per seed) | seeds >= +0.02 |",
        "|---|---|---|---|---|---|",
    ]
    for f, row in ver.items():
        for lab in PENALTIES:
            vals = [v for v in row["pass@256"][lab] if v is not None]
            mean = f"{statistics.mean(vals):.3f}" if vals else "n/a"
            if lab == "reverse KL":
                diffs, wins = "", ""
            else:
                ds = row["diff"][lab]
                diffs = " ".join("n/a" if d is None else f"{100 * d:+.1f}" for d in ds)
                wins = f"{row['wins'][lab]}/{n}"
            lines.append(f"| {f:g} | {statistics.mean(row['level']):.3f} | {lab} | {mean} "
                         f"| {diffs} | {wins} |")  # fmt: skip
    prim = ver[0.5]["wins"]
    holds = prim["forward KL"] >= 8 and prim["JS"] >= 8
    lines += [
        "",
        f"(differences in points of pass@256.) **Verdict at the primary level f = 0.5: forward "
        f"KL counts on {prim['forward KL']}/{n} seeds, JS on {prim['JS']}/{n}: the hypothesis "
        f"{'HOLDS' if holds else 'is REJECTED'}.**",
        "",
        "### After the run (post hoc, not part of the test)",
        "",
        "The same interpolation for other metrics and levels; mean difference to reverse KL "
        "in points, and the seeds where it is >= +2 points (distinct@256: >= +0.1 answers):",
        "",
        "| metric | f | forward KL | JS |",
        "|---|---|---|---|",
        *posthoc(data),
        "",
        "### Every arm",
        "",
        "| arm | reward | pass@1 | pass@8 | pass@32 | pass@256 | distinct@256 | KL(pi‖ref) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, r in rows.items():
        lines.append(f"| {arm} | " + " | ".join(_fmt(r[m]) for m in METRICS) + " |")
    pid = [a for a in rows if a.startswith("PID")]
    lines += [
        "",
        "PID arms, KL averaged over the second half of training (target 0.5): "
        + ", ".join(f"{a} {_fmt(rows[a]['kl_second_half'])}" for a in pid)
        + ".",
    ]
    dph = [a for a in rows if a.startswith("DPH-RL")]
    if dph:
        lines += [
            f"DPH-RL's D_pef (prompts the reference solves 8/8): "
            f"{_fmt(rows[dph[0]]['dph_pef'])} of {cfg['prompts']} prompts."
        ]
    meta = data["meta"]
    quick = " --quick" if data.get("quick") else ""
    lines += [
        "",
        "![pass@256 against pass@1](rlvr_diversity_frontier.png)",
        "",
        "![curves](rlvr_diversity_curves.png)",
        "",
        f"Command: `OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/rlvr_diversity.py "
        f"--seeds {n}{quick}`; {meta['cpu_s']:.0f} CPU s in all, 1 thread, torch "
        f"{meta['torch']}, on 2 CPU cores shared with seven other jobs (times indicative).",
    ]
    return "\n".join(lines) + "\n"


def plots(data, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted(data["reference"], key=int)
    ncol = min(5, len(seeds))
    nrow = -(-len(seeds) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol + 1, 3.2 * nrow + 0.4),
                             sharex=True, sharey=True, squeeze=False)  # fmt: skip
    colors = {"reverse KL": "C0", "forward KL": "C1", "JS": "C2", "DPH-RL": "C3"}
    for ax, seed in zip(axes.flat, seeds):
        ref = data["reference"][seed]
        runs = [r for r in data["runs"] if str(r["seed"]) == seed]
        none = next(r["extra"] for r in runs if r["method"] == "no penalty")
        for lab, c in colors.items():
            pts = sorted([(ref["pass@1"], ref["pass@256"]), (none["pass@1"], none["pass@256"])]
                         + [(r["extra"]["pass@1"], r["extra"]["pass@256"]) for r in runs
                            if r["method"].startswith(lab + " beta=")])  # fmt: skip
            ax.plot(*zip(*pts), "o-", ms=3, lw=1, color=c, label=lab)
        for r in runs:
            if r["method"].startswith("PID"):
                lab = r["method"][4:]
                ax.plot(r["extra"]["pass@1"], r["extra"]["pass@256"], "*", ms=10,
                        color=colors[lab], mec="k", mew=0.5)  # fmt: skip
        ax.plot(ref["pass@1"], ref["pass@256"], "ks", ms=6, label="reference")
        ax.plot(none["pass@1"], none["pass@256"], "kx", ms=8, label="no penalty")
        level = ref["pass@1"] + 0.5 * (none["pass@1"] - ref["pass@1"])
        ax.axvline(level, color="k", lw=0.6, ls=":")
        ax.set_title(f"seed {seed}", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("pass@1")
    for ax in axes[:, 0]:
        ax.set_ylabel("pass@256")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("rlvr-diversity: pass@256 against pass@1 along each penalty's beta sweep "
                 "(stars: PID to KL 0.5; dotted: the primary matched level f = 0.5)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(RESULTS / "rlvr_diversity_frontier.png", dpi=80)
    plt.close(fig)

    keys = ("reward", "pass@1", "pass@256", "distinct@256", "kl")
    fig, axes = plt.subplots(1, len(keys), figsize=(18, 3.6))
    show = ["no penalty", "PID reverse KL", "PID forward KL", "PID JS", "reverse KL beta=0.3",
            "forward KL beta=0.3", "JS beta=3", "DPH-RL beta=1"]  # fmt: skip
    for i, arm in enumerate(a for a in show if a in rows):
        cs = [r["extra"]["curves"] for r in data["runs"] if r["method"] == arm]
        x = cs[0]["step"]
        for ax, k in zip(axes, keys):
            t = torch.tensor([c[k] for c in cs], dtype=torch.float64)
            ls = "--" if "beta" in arm else "-"
            line = ax.plot(x, t.mean(0), ls, lw=1.2, color=f"C{i}", label=arm)[0]
            ax.fill_between(x, t.min(0).values, t.max(0).values, alpha=0.12,
                            color=line.get_color())  # fmt: skip
    for ax, k in zip(axes, keys):
        ax.set_title(k if k != "kl" else "KL(pi || pi_ref)")
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"rlvr-diversity: mean and min-max over {len(seeds)} seeds")
    fig.tight_layout()
    fig.savefig(RESULTS / "rlvr_diversity_curves.png", dpi=80)
    plt.close(fig)


def analyze(data):
    rows = summarize(data)
    ver = verdict(data)
    text = MD.read_text()
    head, _, rest = text.partition("\n## Results\n")
    reading = rest.partition("\n## Reading")[1:]  # the hand-written section is kept
    tail = "\n" + "".join(reading).lstrip("\n") if reading[0] else ""
    MD.write_text(head.rstrip("\n") + "\n\n" + report(data, rows, ver) + tail)
    plots(data, rows)
    print(report(data, rows, ver))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--analyze", action="store_true", help="only analyze the saved JSON")
    args = ap.parse_args()
    cfg = rd.QUICK if args.quick else rd.FULL
    if args.analyze:
        data = json.loads(JSON.read_text())
    else:
        data = train(range(args.seeds), cfg, JSON)
    analyze(data)


if __name__ == "__main__":
    main()

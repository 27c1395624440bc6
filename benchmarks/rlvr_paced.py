"""The rlvr-paced experiment: PACED weights and APO's adaptive KL against uniform weights.

Runs every arm of :mod:`torchsteer.bench.suites.rlvr_paced` on seeds 0..N-1 (arms interleaved
within each seed, one thread) and writes ``benchmarks/results/rlvr_paced.json``,
``rlvr_paced.md`` (the table and the per-seed paired differences: each PACED arm against
``uniform``, APO against the reverse-KL arm with the same coefficient) and ``rlvr_paced.png``
(batch reward against samples drawn, exact pass@1 and KL against steps).

Run: ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/rlvr_paced.py --seeds 10``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from torchsteer.bench.suites import rlvr_paced as rp

RESULTS = Path(__file__).parent / "results"
METRICS = ("reward_avg", "pass@1", "pass@256", "distinct@256", "kl")


def train(seeds, cfg):
    torch.set_num_threads(1)
    runs, t0 = [], time.process_time()
    for seed in seeds:
        for arm in rp.arms(cfg):
            r = rp.train_arm(arm, seed, cfg)
            runs.append({"method": r.method, "seed": seed, "steps": r.steps,
                         "metric": r.metric, "loss": r.loss, "extra": r.extra})  # fmt: skip
    return {"runs": runs, "cpu_s": time.process_time() - t0, "torch": torch.__version__,
            "samples_per_step": cfg.task.prompts * cfg.task.group}  # fmt: skip


def _ms(xs):
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def report(data, quick):
    runs = data["runs"]
    arms = list(dict.fromkeys(r["method"] for r in runs))
    n = len({r["seed"] for r in runs})
    by = {a: sorted((r for r in runs if r["method"] == a), key=lambda r: r["seed"]) for a in arms}
    lines = [
        f"# rlvr-paced ({n} seeds, {len(by[arms[0]][0]['extra']['reward_curve'])} steps, "
        f"{data['samples_per_step']} samples per step)",
        "",
        "reward: the batch reward averaged over training (= reward per sample drawn, every arm "
        "draws the same samples per step); pass@1, pass@256, distinct@256 (expected distinct "
        "correct answers in 256 samples), KL(pi || pi_ref): exact, at the end. Mean ± std over "
        "seeds.",
        "",
        "| arm | reward | pass@1 | pass@256 | distinct@256 | KL |",
        "|---|---|---|---|---|---|",
    ]
    for a in arms:
        lines.append(f"| {a} | " + " | ".join(_ms([r["extra"][m] for r in by[a]]) for m in METRICS)
                     + " |")  # fmt: skip
    lines += ["", "Paired per seed (arm minus its baseline; seeds where the arm is higher):", ""]
    lines += ["| arm | baseline | reward diff | seeds up | pass@1 diff | seeds up |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    kl_arm = next(a for a in arms if a.startswith("reverse KL"))
    for a in arms:
        base = "uniform" if a.startswith("PACED") else kl_arm if a.startswith("APO") else None
        if base is None:
            continue
        cells = []
        for m in ("reward_avg", "pass@1"):
            d = [x["extra"][m] - y["extra"][m] for x, y in zip(by[a], by[base])]
            cells += [f"{statistics.mean(d):+.4f} (min {min(d):+.4f}, max {max(d):+.4f})",
                      f"{sum(x > 0 for x in d)}/{n}"]  # fmt: skip
        lines.append(f"| {a} | {base} | " + " | ".join(cells) + " |")
    apo = [r["extra"]["apo_mean_weight"] for r in runs if "apo_mean_weight" in r["extra"]]
    if apo:
        lines += ["", f"APO's mean DADS weight over the KL terms: {_ms(apo)}."]
    lines += [
        "",
        "![rlvr-paced](rlvr_paced.png)",
        "",
        f"Command: `OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/rlvr_paced.py --seeds "
        f"{n}{' --quick' if quick else ''}`; {data['cpu_s']:.0f} CPU s, 1 thread, torch "
        f"{data['torch']}, on 2 CPU cores shared with seven other jobs (times indicative).",
    ]
    return "\n".join(lines) + "\n"


def plot(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = data["runs"]
    arms = list(dict.fromkeys(r["method"] for r in runs))
    fig, ax = plt.subplots(1, 3, figsize=(15, 3.8))
    for i, a in enumerate(arms):
        rs = [r for r in runs if r["method"] == a]
        t = torch.tensor([r["extra"]["reward_curve"] for r in rs], dtype=torch.float64)
        k = 10  # moving average over 10 steps
        t = torch.nn.functional.avg_pool1d(t[:, None], k, 1)[:, 0]
        x = [(j + k) * data["samples_per_step"] for j in range(t.shape[1])]
        ax[0].plot(x, t.mean(0), color=f"C{i}", label=a)
        ax[0].fill_between(x, t.min(0).values, t.max(0).values, color=f"C{i}", alpha=0.1)
        steps = rs[0]["steps"]
        for axis, key in ((ax[1], "metric"), (ax[2], "loss")):
            v = torch.tensor([r[key] for r in rs], dtype=torch.float64)
            axis.plot(steps, v.mean(0), color=f"C{i}", label=a)
            axis.fill_between(steps, v.min(0).values, v.max(0).values, color=f"C{i}", alpha=0.1)
    ax[0].set(title="batch reward (10-step moving average)", xlabel="samples drawn")
    ax[1].set(title="pass@1 (exact)", xlabel="step")
    ax[2].set(title="KL(pi || pi_ref)", xlabel="step")
    ax[0].legend(fontsize=7)
    fig.suptitle(f"rlvr-paced: mean and min-max over {len({r['seed'] for r in runs})} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    data = train(range(args.seeds), rp.QUICK if args.quick else rp.FULL)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rlvr_paced.json").write_text(json.dumps(data))
    text = report(data, args.quick)
    (args.out / "rlvr_paced.md").write_text(text)
    plot(data, args.out / "rlvr_paced.png")
    print(text)


if __name__ == "__main__":
    main()

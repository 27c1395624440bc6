"""Sven against the Adam grid on the paper's toy regression: validation MSE against CPU time.

The task of the ``regression`` suite (:mod:`torchsteer.bench.suites.regression`): f(x) =
exp(-10 x^2) sin(2 x), x ~ U[-1, 1], 10k train / 10k validation points, standardized; MLP
1-16-16-16-1 with GELU; B = 128; 200 epochs (15,800 steps); seeds 0-2. Every arm is trained by
:func:`torchsteer.bench.training.train` (CPU time of the optimizer steps only, evaluation
excluded), evaluated every ``--eval-every`` steps (default 10, so that the time to 1e-4 is
resolved to a few hundredths of a second), 1 thread.

Arms: Adam with lr in {1e-3, 3e-3, 1e-2}, and Sven at lr 0.1, rank 64 in the configurations
of :data:`SVEN_ARMS` (the spec's defaults, then with the safeguards and options this
benchmark was written to choose between). Goals (issue 3): Sven reaches a validation MSE of
1e-4 in less CPU time than the best Adam, and its final MSE is at most the best Adam's, on
every seed. "Best Adam" is taken two ways, both reported: the Adam arm with the lowest final
MSE on that seed, and the fastest Adam arm to 1e-4 (the stricter bar for the time goal).

Writes ``benchmarks/results/regression.{json,md}`` and ``regression_{epochs,cpu}.png``.
Single-run CPU times on a shared machine vary by up to 2x, so after the main runs every arm
that reached 1e-4 is retrained ``--ttt-repeats`` times (default 5) up to the step where it
did (training is deterministic: the same step every time), arms interleaved, and the goals
compare medians. ``--retime-only`` redoes just that on the saved JSON.

``--ablation`` runs one safeguard at a time on the spec's Sven instead (trust region alone,
damping alone) and writes ``regression_ablation.*``.

Usage: ``python benchmarks/regression.py [--seeds 0 1 2] [--epochs 200] [--ablation]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch

from torchsteer.bench import data
from torchsteer.bench.suites.regression import SAFEGUARDS, squared_error
from torchsteer.bench.training import Method, mlp, torch_method, train
from torchsteer.optim.sven import Sven

torch.set_num_threads(1)
RESULTS = Path(__file__).parent / "results"
TARGET = 1e-4
B = 128
ADAM_LRS = (1e-3, 3e-3, 1e-2)
SAFE = SAFEGUARDS  # the suite's: max_step_norm 1, rtol 1e-5, float64 Gram
SVEN_ARMS = {
    "Sven spec (kappa=2, rtol=1e-3)": {},
    "Sven kappa=2 +cap +f64 rtol=1e-5": dict(SAFE),
    "Sven kappa=1 +cap +f64 rtol=1e-5": dict(SAFE, kappa=1.0),
    "Sven kappa=1 +cap +f64 rtol=1e-5 momentum=0.5": dict(SAFE, kappa=1.0, momentum=0.5),
}
# One safeguard at a time on the spec's Sven (``--ablation``: written to regression_ablation.*)
ABLATION_ARMS = {
    "Sven kappa=2 +cap (rtol=1e-3)": dict(max_step_norm=1.0),
    "Sven kappa=2 damping=1e-4 (rtol=1e-3)": dict(damping=1e-4),
    "Sven kappa=2 damping=1e-3 (rtol=1e-3)": dict(damping=1e-3),
}


def _sven_step(optimizer, model, loss_fn, x, y) -> float:
    return float(optimizer.step(batch=(x, y)))


def arms() -> dict[str, Method]:
    out = {
        f"Adam lr={lr:g}": torch_method(f"Adam lr={lr:g}", torch.optim.Adam, lr=lr)
        for lr in ADAM_LRS
    }
    for name, kw in {**SVEN_ARMS, **ABLATION_ARMS}.items():

        def make(model, kw=kw):
            return Sven(
                model.parameters(), lr=0.1, rank=64, model=model, loss_fn=squared_error, **kw
            )

        out[name] = Method(name=name, make=make, step=_sven_step)
    return out


def _thin(run: dict, dense_until: int = 1000, every: int = 10) -> dict:
    """Keep every point up to ``dense_until`` steps, then every ``every``-th (for the JSON)."""
    keep = [
        i
        for i, s in enumerate(run["steps"])
        if s <= dense_until or i % every == 0 or i == len(run["steps"]) - 1
    ]
    for key in ("steps", "cpu_time", "loss", "metric"):
        run[key] = [run[key][i] for i in keep]
    return run


def summarize(runs: list[dict], seeds: list[int], key: str = "time_to_target") -> dict:
    """Goals per seed; ``key`` names the time to 1e-4 used (one run, or the repeats' median)."""
    by = {(r["method"], r["seed"]): r for r in runs}
    methods = list(dict.fromkeys(r["method"] for r in runs))
    adams = [m for m in methods if m.startswith("Adam")]
    svens = [m for m in methods if m.startswith("Sven")]
    out = {}
    if not adams:
        return out
    for seed in seeds:
        final = {m: by[m, seed]["final"] for m in methods}
        ttt = {m: by[m, seed].get(key) for m in methods}
        best_final = min(adams, key=lambda m: final[m])
        reached = [m for m in adams if ttt[m] is not None]
        fastest = min(reached, key=lambda m: ttt[m]) if reached else None
        row = {"best_final_adam": best_final, "fastest_adam": fastest, "sven": {}}
        for m in svens:
            t = ttt[m]

            def faster(other, t=t, ttt=ttt):
                return t is not None and (ttt[other] is None or t < ttt[other])

            row["sven"][m] = {
                "final_le_best_adam": final[m] <= final[best_final],
                "faster_than_best_final_adam": faster(best_final),
                "faster_than_fastest_adam": t is not None and (fastest is None or faster(fastest)),
            }
        out[str(seed)] = row
    return out


def repeat_time_to_target(payload: dict, repeats: int, data_, eval_every: int) -> None:
    """Re-time every arm that reached 1e-4, up to the step where it did, ``repeats`` times.

    Training is deterministic (same seed, same batches), so each repeat reaches the target at
    the same step; only the CPU time varies. Arms run interleaved within each repeat; the
    median goes to ``run["ttt_median"]`` and the list to ``run["ttt_repeats"]``.
    """
    x, y, val_mse = data_
    all_arms = arms()
    todo = [r for r in payload["runs"] if r["steps_to_target"] is not None]
    for r in todo:
        r["ttt_repeats"] = [r["time_to_target"]]
    for _ in range(repeats):
        for r in todo:
            again = train(
                all_arms[r["method"]],
                mlp([1, 16, 16, 16, 1], seed=r["seed"]),
                squared_error,
                x,
                y,
                suite="regression",
                seed=r["seed"],
                steps=r["steps_to_target"],
                batch_size=B,
                eval_every=eval_every,
                metric_fn=val_mse,
                target=TARGET,
                higher_is_better=False,
                measure_memory=False,
            )
            r["ttt_repeats"].append(again.time_to_target)
    for r in payload["runs"]:
        times = r.get("ttt_repeats")
        r["ttt_median"] = (
            statistics.median(times) if times and None not in times else r["time_to_target"]
        )


def _fmt(v, spec=".2e"):
    return (
        "never"
        if v is None
        else ("nan" if isinstance(v, float) and math.isnan(v) else format(v, spec))
    )


def write_markdown(payload: dict, path: Path) -> None:
    runs, seeds = payload["runs"], payload["seeds"]
    by = {(r["method"], r["seed"]): r for r in runs}
    methods = list(dict.fromkeys(r["method"] for r in runs))
    lines = [
        "# Sven on the paper's toy regression (validation MSE, CPU time)",
        "",
        f"`{payload['command']}`; {payload['epochs']} epochs of B = {B} ({payload['steps']} "
        f"steps), eval every {payload['eval_every']} steps, 1 thread, CPU time "
        "(`time.process_time`) of the optimizer steps only. **The machine was shared** with "
        f"other jobs (2 cores; load average {payload['load_start']:.1f} at the start, "
        f"{payload['load_end']:.1f} at the end), so absolute times are inflated and noisy; arms "
        "ran one after another in one process, seed by seed.",
        "",
        "Sven is at lr = 0.1, rank = 64 in every arm (the issue's setting). Options: `+cap` = "
        "`max_step_norm=1.0` (trust region on the step norm), `+f64 rtol=1e-5` = "
        "`rtol=1e-5, gram_dtype=torch.float64` (the float32 Gram floor is 7e-4 S_max, so a "
        "smaller rtol needs the float64 Gram), `kappa=1` = residual |f - y| (the Gauss-Newton "
        "form; the spec's default kappa = 2 uses the squared error itself), `momentum` = "
        "heavy ball on the direction.",
        "",
        "| arm | seed | final val MSE | min val MSE | time to 1e-4 (CPU s) | median of "
        f"{payload.get('ttt_repeats', 0) + 1} | steps to 1e-4 | ms / step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        for s in seeds:
            r = by[m, s]
            lines.append(
                f"| {m} | {s} | {_fmt(r['final'])} | {_fmt(r['min'])} | "
                f"{_fmt(r['time_to_target'], '.3f')} | {_fmt(r.get('ttt_median'), '.3f')} | "
                f"{_fmt(r['steps_to_target'], 'd')} | "
                f"{1e3 * r['step_time']:.2f} |"
            )
    if not payload["goals"]:
        lines += ["", "No Adam arm in this run: compare with `regression.md`.", ""]
        path.write_text("\n".join(lines))
        return
    lines += [
        "",
        "## Goals per seed",
        "",
        "Times to 1e-4 compared by the median over the main run and "
        f"{payload.get('ttt_repeats', 0)} re-timed repeats (each arm retrained from the same "
        "seed up to the step where it reached 1e-4, arms interleaved); the single-run times "
        "of one process on a shared machine vary by up to 2x.",
        "",
    ]
    lines.append(
        "| Sven arm | seed | final <= best-final Adam | 1e-4 before best-final Adam "
        "| 1e-4 before fastest Adam |"
    )
    lines.append("|---|---:|:---:|:---:|:---:|")
    yes = {True: "yes", False: "**no**"}
    for m in [m for m in methods if m.startswith("Sven")]:
        for s in seeds:
            g = payload["goals"][str(s)]["sven"][m]
            lines.append(
                f"| {m} | {s} | {yes[g['final_le_best_adam']]} | "
                f"{yes[g['faster_than_best_final_adam']]} | {yes[g['faster_than_fastest_adam']]} |"
            )
    lines.append("")
    for s in seeds:
        g = payload["goals"][str(s)]
        lines.append(
            f"Seed {s}: best-final Adam = {g['best_final_adam']}, fastest Adam to 1e-4 = "
            f"{g['fastest_adam']}."
        )
    lines += [
        "",
        "Plots: `regression_epochs.png` (validation MSE against epochs), "
        "`regression_cpu.png` (against CPU seconds).",
        "",
    ]
    path.write_text("\n".join(lines))


def plot(payload: dict, stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, seeds = payload["runs"], payload["seeds"]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    steps_per_epoch = payload["steps"] / payload["epochs"]
    for axis, xlabel, fname in (
        ("epochs", "epoch", "epochs"),
        ("cpu_time", "CPU seconds (optimizer steps)", "cpu"),
    ):
        fig, axes = plt.subplots(1, len(seeds), figsize=(5.5 * len(seeds), 4.2), squeeze=False)
        for ax, seed in zip(axes[0], seeds):
            for m in methods:
                r = next(r for r in runs if r["method"] == m and r["seed"] == seed)
                xs = (
                    [s / steps_per_epoch for s in r["steps"]] if axis == "epochs" else r["cpu_time"]
                )
                style = "-" if m.startswith("Sven") else "--"
                ax.plot(xs, r["metric"], style, label=m, lw=1.2)
            ax.axhline(TARGET, color="gray", lw=0.8, ls=":")
            ax.set(xscale="log", yscale="log", xlabel=xlabel, title=f"seed {seed}")
            ax.set_ylabel("validation MSE")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{stem}_{fname}.png", dpi=110)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--arms", nargs="*", default=None, help="subset of arm names")
    parser.add_argument("--ablation", action="store_true", help="the single-safeguard arms")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--ttt-repeats", type=int, default=5, help="re-timings of the time to 1e-4 (median)"
    )
    parser.add_argument(
        "--retime-only",
        action="store_true",
        help="load the existing JSON and only redo the re-timing of the time to 1e-4",
    )
    args = parser.parse_args()
    if args.out is None:
        args.out = str(RESULTS / ("regression_ablation" if args.ablation else "regression"))
    x, y, xv, yv = data.regression_1d(10_000, 10_000, seed=0)
    steps = args.epochs * -(-x.shape[0] // B)

    def val_mse(model):
        return squared_error(model(xv), yv).mean().item()

    if args.retime_only:
        out = Path(args.out)
        payload = json.loads(out.with_suffix(".json").read_text())
        payload["command"] += f" (re-timed: --retime-only --ttt-repeats {args.ttt_repeats})"
        _finish(payload, args, (x, y, val_mse), out)
        return
    all_arms = arms()
    default = (
        list(ABLATION_ARMS) if args.ablation else [a for a in all_arms if a not in ABLATION_ARMS]
    )
    chosen = args.arms or default

    payload = {
        "command": f"python benchmarks/regression.py --seeds {' '.join(map(str, args.seeds))} "
        f"--epochs {args.epochs} --eval-every {args.eval_every}"
        + (" --ablation" if args.ablation else ""),
        "seeds": args.seeds,
        "epochs": args.epochs,
        "steps": steps,
        "eval_every": args.eval_every,
        "load_start": os.getloadavg()[0],
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "runs": [],
    }
    started = time.time()
    for seed in args.seeds:
        for name in chosen:
            run = train(
                all_arms[name],
                mlp([1, 16, 16, 16, 1], seed=seed),
                squared_error,
                x,
                y,
                suite="regression",
                seed=seed,
                steps=steps,
                batch_size=B,
                eval_every=args.eval_every,
                metric_fn=val_mse,
                target=TARGET,
                higher_is_better=False,
                measure_memory=False,
            ).to_dict()
            hit = next((s for s, m in zip(run["steps"], run["metric"]) if m <= TARGET), None)
            run.update(
                final=run["metric"][-1],
                min=min(run["metric"]),
                steps_to_target=hit,
            )
            payload["runs"].append(_thin(run))
            print(
                f"seed {seed} {name:48s} final {run['final']:.2e} to 1e-4 "
                f"{_fmt(run['time_to_target'], '.3f')} s ({hit} steps), "
                f"{1e3 * run['step_time']:.2f} ms/step",
                flush=True,
            )
    payload["load_end"] = os.getloadavg()[0]
    payload["wall_s"] = time.time() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _finish(payload, args, (x, y, val_mse), out)


def _finish(payload, args, data_, out: Path) -> None:
    repeat_time_to_target(payload, args.ttt_repeats, data_, args.eval_every)
    payload["ttt_repeats"] = args.ttt_repeats
    payload["goals"] = summarize(payload["runs"], payload["seeds"], key="ttt_median")
    payload["goals_single_run"] = summarize(payload["runs"], payload["seeds"])
    out.with_suffix(".json").write_text(json.dumps(payload))
    write_markdown(payload, out.with_suffix(".md"))
    plot(payload, out)


if __name__ == "__main__":
    main()

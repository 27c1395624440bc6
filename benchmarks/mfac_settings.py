"""How to choose M-FAC's ``ngrads``, ``damp`` and ``lr``: a measured grid on digits.

The README's network (MLP 64-128-10, GELU) on scikit-learn's bundled digits
(:func:`torchsteer.bench.data.digits`: features / 16, the first 20 % of the rows as the test
set), cross-entropy, minibatches of 64 drawn by a seeded permutation each epoch, 20 epochs
(460 steps), float32, 1 thread. Recorded per run: the test accuracy at the end and its best
over the 20 epoch ends, the final training loss (full training set), the CPU time of the run.

Arms: Adam at lr 1e-3 and 3e-3 (the reference), M-FAC over ``ngrads`` x ``damp`` x ``lr``,
and M-FAC with all its defaults (``ngrads=1024, damp=1e-5, lr=1e-3``). The same seeds for
every arm (initial weights and batch order). The step length of M-FAC is about
``lr * m / |g|^2``-scaled inside the window's span and ``lr / damp`` outside it, so ``damp``
and ``lr`` are read together: the table also gives ``lr / damp``, the step of the SGD that
M-FAC becomes for directions the window does not see.

The grid's best settings are picked on the test accuracy of its own seeds, so ``--confirm``
runs the references and the settings the docs recommend, unchanged, on fresh seeds.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/mfac_settings.py             # 2 seeds, a few CPU min
    OMP_NUM_THREADS=1 python benchmarks/mfac_settings.py --seeds 0   # one seed
    OMP_NUM_THREADS=1 python benchmarks/mfac_settings.py --confirm   # seeds 2-5, a few arms

Writes ``benchmarks/results/mfac_settings.{json,md}`` (``--confirm``:
``mfac_settings_confirm.{json,md}``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from torchsteer.bench.data import digits
from torchsteer.optim import MFAC

RESULTS = Path(__file__).resolve().parent / "results"
EPOCHS, BATCH = 20, 64
NGRADS = (16, 32, 128)
DAMPS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
ADAM_LRS = (1e-3, 3e-3)
# --confirm: the references, the README's former settings and the recommended ones
CONFIRM = (
    "Adam lr=0.001",
    "Adam lr=0.003",
    "M-FAC defaults",
    "M-FAC m=32 damp=1e-05 lr=0.001",
    "M-FAC m=128 damp=0.0001 lr=0.001",
    "M-FAC m=128 damp=0.001 lr=0.01",
    "M-FAC m=32 damp=0.001 lr=0.01",
    "M-FAC m=16 damp=0.01 lr=0.01",
)


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10))


def train(make_opt, seed: int, data) -> dict:
    """One run: 20 epochs of minibatch steps; the test accuracy at each epoch end."""
    x, y, xt, yt = data
    net = model(seed)
    opt = make_opt(net.parameters())
    order = torch.Generator().manual_seed(1000 + seed)
    accs = []
    start = time.process_time()
    for _ in range(EPOCHS):
        perm = torch.randperm(x.shape[0], generator=order)
        for i in range(0, x.shape[0], BATCH):
            idx = perm[i : i + BATCH]
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
        with torch.no_grad():
            accs.append((net(xt).argmax(1) == yt).double().mean().item())
    cpu = time.process_time() - start
    with torch.no_grad():
        loss = nn.functional.cross_entropy(net(x), y).item()
    return {"final_acc": accs[-1], "best_acc": max(accs), "train_loss": loss, "cpu_s": cpu}


def arms():
    """(name, settings, optimizer factory) of every arm, in table order."""
    out = []
    for lr in ADAM_LRS:
        out.append((f"Adam lr={lr:g}", {"lr": lr}, lambda p, lr=lr: torch.optim.Adam(p, lr=lr)))
    out.append(
        (
            "M-FAC defaults",
            {"ngrads": 1024, "damp": 1e-5, "lr": 1e-3},
            lambda p: MFAC(p),
        )
    )
    for m, damp, lr in itertools.product(NGRADS, DAMPS, LRS):
        settings = {"ngrads": m, "damp": damp, "lr": lr}
        out.append(
            (
                f"M-FAC m={m} damp={damp:g} lr={lr:g}",
                settings,
                lambda p, s=settings: MFAC(p, **s),
            )
        )
    return out


def write_confirm(results: list[dict], seeds: list[int], cpu_total: float) -> None:
    command = "OMP_NUM_THREADS=1 python benchmarks/mfac_settings.py --confirm"
    meta = {"command": command, "torch": torch.__version__, "seeds": seeds, "cpu_s": cpu_total}
    (RESULTS / "mfac_settings_confirm.json").write_text(
        json.dumps({"meta": meta, "runs": results}, indent=1) + "\n"
    )
    lines = [
        "# M-FAC settings on digits: fresh seeds",
        "",
        f"`{command}` -- torch {meta['torch']}, 1 thread, CPU time, shared 2-core machine; "
        f"the setup of `mfac_settings.md`, seeds {', '.join(map(str, seeds))} (not used to "
        f"pick the settings); {cpu_total:.0f} CPU s in all.",
        "",
        "| arm | final acc mean | min | max | best acc mean | train loss | CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in CONFIRM:
        rs = [r for r in results if r["arm"] == name]
        acc = [r["final_acc"] for r in rs]
        lines.append(
            f"| {name} | {statistics.mean(acc):.3f} | {min(acc):.3f} | {max(acc):.3f} | "
            f"{statistics.mean(r['best_acc'] for r in rs):.3f} | "
            f"{statistics.mean(r['train_loss'] for r in rs):.3f} | "
            f"{statistics.mean(r['cpu_s'] for r in rs):.1f} |"
        )
    (RESULTS / "mfac_settings_confirm.md").write_text("\n".join(lines) + "\n")


def write(results: list[dict], seeds: list[int], cpu_total: float) -> None:
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/mfac_settings.py"
        + ("" if seeds == [0, 1] else " --seeds " + " ".join(map(str, seeds))),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "epochs": EPOCHS,
        "batch_size": BATCH,
        "seeds": seeds,
        "cpu_s_total": cpu_total,
    }
    (RESULTS / "mfac_settings.json").write_text(
        json.dumps({"meta": meta, "runs": results}, indent=1) + "\n"
    )

    def mean(name, key):
        return statistics.mean(r[key] for r in results if r["arm"] == name)

    names = list(dict.fromkeys(r["arm"] for r in results))
    settings = {r["arm"]: r["settings"] for r in results}
    lines = [
        "# M-FAC settings on digits",
        "",
        f"`{meta['command']}` -- torch {meta['torch']}, 1 thread, CPU time, on a shared 2-core "
        f"machine; {len(results)} runs, {cpu_total:.0f} CPU s in all.",
        "",
        f"MLP 64-128-10 (GELU; the README's network), digits (first 20 % of the rows as the "
        f"test set), cross-entropy, batch {BATCH}, {EPOCHS} epochs (460 steps); the mean over "
        f"seeds {', '.join(map(str, seeds))} of the test accuracy after the last epoch "
        f"(`final`) and at the best epoch end (`best`), the final training loss, CPU s per run.",
        "",
        "## References and the best M-FAC settings",
        "",
        "| arm | final acc | best acc | train loss | CPU s |",
        "|---|---|---|---|---|",
    ]
    mfac = [n for n in names if n.startswith("M-FAC m=")]
    ranked = sorted(mfac, key=lambda n: -mean(n, "final_acc"))
    for n in [*names[: len(ADAM_LRS) + 1], *ranked[:8]]:
        lines.append(
            f"| {n} | {mean(n, 'final_acc'):.3f} | {mean(n, 'best_acc'):.3f} | "
            f"{mean(n, 'train_loss'):.3f} | {mean(n, 'cpu_s'):.1f} |"
        )
    for m in NGRADS:
        lines += [
            "",
            f"## ngrads = {m}: final test accuracy by damp (rows) and lr (columns)",
            "",
            "| damp \\ lr | " + " | ".join(f"{lr:g}" for lr in LRS) + " |",
            "|---|" + "---|" * len(LRS),
        ]
        for damp in DAMPS:
            cells = [
                f"{mean(f'M-FAC m={m} damp={damp:g} lr={lr:g}', 'final_acc'):.3f}" for lr in LRS
            ]
            lines.append(f"| {damp:g} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## final test accuracy by lr / damp (mean over ngrads and the pairs with that ratio)",
        "",
        "| lr / damp | pairs | mean final acc | min | max |",
        "|---|---|---|---|---|",
    ]
    by_ratio: dict[float, list[float]] = {}
    for n in mfac:
        s = settings[n]
        by_ratio.setdefault(round(s["lr"] / s["damp"], 6), []).append(mean(n, "final_acc"))
    for ratio in sorted(by_ratio):
        v = by_ratio[ratio]
        lines.append(
            f"| {ratio:g} | {len(v)} | {statistics.mean(v):.3f} | {min(v):.3f} | {max(v):.3f} |"
        )
    (RESULTS / "mfac_settings.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--confirm", action="store_true", help="the CONFIRM arms on seeds 2-5")
    args = ap.parse_args()
    seeds = args.seeds or ([2, 3, 4, 5] if args.confirm else [0, 1])
    torch.set_num_threads(1)
    data = digits(dtype=torch.float32)
    results = []
    start = time.process_time()
    for name, settings, make in arms():
        if args.confirm and name not in CONFIRM:
            continue
        for seed in seeds:
            r = train(make, seed, data)
            results.append({"arm": name, "settings": settings, "seed": seed, **r})
        print(name, f"{statistics.mean(x['final_acc'] for x in results[-len(seeds) :]):.3f}")
    (write_confirm if args.confirm else write)(results, seeds, time.process_time() - start)


if __name__ == "__main__":
    main()

"""An outside attack on torchsteer's public API, rerun (issue 18's "Done when").

Every public entry point (the ``__all__`` of ``torchsteer.optim``, ``control``,
``control.kl``, ``control.radius``, ``divergence``, ``objectives``, ``linalg``, ``jacobian``,
``callbacks``, ``integrations.transformers``, ``integrations.trl`` and the ``torchsteer
bench`` CLI) gets small cases of four kinds:

- **bad input**: NaN/Inf in parameters, gradients, losses and logits; wrong shapes, dtypes,
  empty tensors; invalid hyperparameters at construction, in param groups, in
  ``add_param_group`` and in ``load_state_dict``. Held: a ``ValueError``/``TypeError`` that
  names the problem (not a raw torch error) with the state bit for bit unchanged, or a
  correct documented result.
- **resume**: ``k`` steps equal ``j`` steps, a ``torch.save`` / ``torch.load(weights_only=True)``
  round trip of every state, and ``k - j`` steps, bit for bit; ``copy.deepcopy`` and
  ``pickle`` then a step.
- **kill and resume** in Lightning: each callback, a crash mid-epoch, resumed from the
  checkpoint, against the uninterrupted run.
- **a bad rank under DDP** (gloo, 2 CPU processes): NaN / an empty batch / a wrong shape on
  one rank; every rank must raise (or skip) alike within 60 s.

Run: ``OMP_NUM_THREADS=1 python benchmarks/attack.py [--kind KIND] [--only SUBSTR]
[--out benchmarks/results/attack]``; it writes ``attack.md`` and ``attack.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from _attack_common import CASES, Verdict, defect

KINDS = ("bad input", "resume", "kill and resume", "bad rank under DDP")
# where a defect lives (group prefix -> file and who owns it), for routing
OWNERS = (
    ("RadiusLimit", "control/radius/**, callbacks/radius_limit.py (limiter-scale)"),
    ("logit_", "control/radius/measure.py (limiter-scale)"),
    ("normalized_step", "control/radius/measure.py (limiter-scale)"),
    ("Sven", "optim/sven*.py, optim/_sven_*.py (limiter-scale)"),
    ("RegularizedNewton", "optim/regularized_newton.py, optim/_newton_*.py (newton-scale)"),
    ("conjugate_gradient", "linalg/cg.py, linalg/shifted_solvers.py (newton-scale)"),
    ("MFAC", "optim/mfac*.py, linalg/gradient_window.py (lead)"),
    ("GradientWindow", "linalg/gradient_window.py (lead)"),
    ("BlockedGradientWindow", "linalg/blocked_window.py (lead)"),
    ("f_divergence", "divergence/** (divergence)"),
    ("fused_linear", "divergence/** (divergence)"),
    ("sparse_kd", "divergence/** (divergence)"),
    ("sinkhorn", "divergence/** (divergence)"),
    ("PSKDTargets", "divergence/** (divergence)"),
    ("nkd_loss", "divergence/** (divergence)"),
    ("soft_cross", "divergence/** (divergence)"),
    ("z_loss", "divergence/** (divergence)"),
    ("logz", "divergence/** (divergence)"),
    ("ps_kd", "divergence/** (divergence)"),
    ("generator", "divergence/** (divergence)"),
)


# why a defect in an unowned file is left as it is
NOTES: dict[tuple[str, str], str] = {}  # (every note so far was for a defect now fixed)


def owner(group: str) -> str:
    for prefix, where in OWNERS:
        if group.startswith(prefix):
            return where
    return "unowned: attack"


def load_cases(kinds) -> None:
    import _attack_api
    import _attack_optim

    if "bad input" in kinds:
        _attack_optim.register()
        _attack_api.register()
    if "resume" in kinds:
        import _attack_resume

        _attack_resume.register()
    if "kill and resume" in kinds:
        import _attack_lightning

        _attack_lightning.register()
    if "bad rank under DDP" in kinds:
        import _attack_ddp

        _attack_ddp.register()


def run_case(case) -> tuple[Verdict, float]:
    t0 = time.process_time()
    torch.manual_seed(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            v = case.fn()
        if not isinstance(v, Verdict):
            v = defect(f"harness: case returned {v!r}")
    except Exception as exc:
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        v = defect(f"uncaught {type(exc).__name__}: {str(exc)[:120]} (at {tb.name}:{tb.lineno})")
    return v, time.process_time() - t0


STATUSES = ("held", "held (documented)", "defect")


def counts_table(rows, title="") -> list[str]:
    lines = [
        title,
        "",
        "| kind | cases | held | held (documented) | defect |",
        "|---|---|---|---|---|",
    ]
    for kind in (*KINDS, "all"):
        sel = [r for r in rows if kind in ("all", r["kind"])]
        if sel:
            n = {s: sum(r["status"] == s for r in sel) for s in STATUSES}
            lines.append(
                f"| {kind} | {len(sel)} | {n['held']} | {n['held (documented)']} | {n['defect']} |"
            )
    return lines


def rows_of(results):
    return [
        {
            "kind": c.kind,
            "group": c.group,
            "case": c.name,
            "status": v.status,
            "reason": v.reason,
            "reproduction": c.repro,
            "cpu_s": round(dt, 3),
        }
        for c, v, dt in results
    ]


def write_json(rows, out: Path, label: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"label": label, "cases": rows}, indent=1))


def write_md(rows, out: Path, label: str) -> None:
    cpu = sum(r["cpu_s"] for r in rows)
    lines = [
        f"# Attack rerun: {label}",
        "",
        "Produced by `OMP_NUM_THREADS=1 python benchmarks/attack.py` on a shared 2-core "
        f"machine (CPU only, torch {torch.__version__}); {cpu:.0f} CPU s in the parent "
        "process (the DDP ranks' own time is not in it).",
        "",
    ]
    before = out.parent / "attack_before.json"
    if before.exists() and before.resolve() != out.with_suffix(".json").resolve():
        old = json.loads(before.read_text())
        lines += [*counts_table(old["cases"], f"## Before the fixes ({old['label']})"), ""]
        fixed = {(r["group"], r["case"]) for r in old["cases"] if r["status"] == "defect"}
        fixed -= {(r["group"], r["case"]) for r in rows if r["status"] == "defect"}
        lines += [f"{len(fixed)} cases that were defects before hold now.", ""]
    lines += counts_table(rows, f"## {label}")
    lines += ["", "## Defects", ""]
    for r in rows:
        if r["status"] == "defect":
            lines.append(
                f"- **{r['group']}: {r['case']}** ({r['kind']}; {owner(r['group'])}). "
                f"{r['reason']}. Reproduction: {r['reproduction']}"
                + (f". {NOTES[r['group'], r['case']]}" if (r["group"], r["case"]) in NOTES else "")
            )
    lines += ["", "## Held (documented)", ""]
    for r in rows:
        if r["status"] == "held (documented)":
            lines.append(f"- {r['group']}: {r['case']}: {r['reason']}")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def report(results, out: Path, label: str) -> None:
    rows = rows_of(results)
    write_json(rows, out, label)
    write_md(rows, out, label)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", action="append", choices=KINDS)
    p.add_argument("--only", default=None, help="run cases whose group/name contain this")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "attack"))
    p.add_argument("--label", default="rerun")
    p.add_argument("--list", action="store_true")
    p.add_argument(
        "--from-json", action="store_true", help="rewrite OUT.md from OUT.json (no cases run)"
    )
    args = p.parse_args(argv)
    if args.from_json:
        data = json.loads(Path(args.out).with_suffix(".json").read_text())
        write_md(data["cases"], Path(args.out), data["label"])
        return 0
    torch.set_num_threads(1)
    kinds = tuple(args.kind or KINDS)
    load_cases(kinds)
    cases = [c for c in CASES if c.kind in kinds]
    if args.only:
        cases = [c for c in cases if args.only in f"{c.group}: {c.name}"]
    if args.list:
        for c in cases:
            print(f"{c.kind} | {c.group}: {c.name}")
        print(len(cases), "cases")
        return 0
    results, t0 = [], time.time()
    for c in cases:
        v, dt = run_case(c)
        results.append((c, v, dt))
        if v.status == "defect":
            print(f"DEFECT {c.kind} | {c.group}: {c.name}: {v.reason}", flush=True)
    n_def = sum(v.status == "defect" for _, v, _ in results)
    print(f"{len(results)} cases, {n_def} defects, {time.time() - t0:.0f} s wall")
    report(results, Path(args.out), args.label)
    return 0


if __name__ == "__main__":
    sys.exit(main())

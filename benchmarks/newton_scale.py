"""RegularizedNewton (Gauss-Newton, CG) on GPT-2 small (124M), B x T = 8 x 128, CPU, beside AdamW.

One process, the arms interleaved (AdamW step, RegularizedNewton step, AdamW step, ...), each
on its own copy of the same randomly initialized model (:class:`torchsteer.bench.gpt.GPT`,
``GPTConfig.gpt2_small()``; random token ids, seeded, nothing downloaded)::

    python benchmarks/newton_scale.py --tag multishift                 # solver="multishift"
    python benchmarks/newton_scale.py --tag cg --solver cg             # the warm-started CG
    python benchmarks/newton_scale.py --layers 2 --width 64 --vocab 512 --tag small  # reduced
    python benchmarks/newton_scale.py --report                         # results/newton_scale.md

Time: ``time.process_time`` per step (CPU seconds of the process, all its threads), the
median of the steps after the first of each arm (the first pays page faults and lazy
initialization); the ratio is RegularizedNewton's median over AdamW's, interleaved in the
same process. The machine is a 2-core box shared with other jobs (23 GB): read ratios to
about 10 %.

Memory: ``ru_maxrss`` of the process (both arms: AdamW's model copy, gradients and state are
in it, about 2 GB at 124M) and the peak resident set sampled every 50 ms during the
RegularizedNewton steps alone (``/proc/self/statm``).

Per try (the diagnosis of rejections): ``lambda`` and ``gamma``, ``|delta|``, the decrease the
quadratic model predicts, ``-(g^T delta + delta^T H delta / 2)``, the actual decrease
``f(x) - f(x + delta)`` and the accept threshold ``|grad f(x + delta)|^2 / (8 lambda)``. The
model's curvature term comes from the CG iterate's Galerkin condition (no extra product):
``delta^T (H + lambda I) delta = -g^T delta``, so the predicted decrease is
``-g^T delta / 2 + lambda |delta|^2 / 2``. Recorded by wrapping the optimizer's trial
evaluation and solver (benchmark instrumentation; the optimizer is not changed).

Attention runs on SDPA's math kernel (the CPU flash kernel has no double backward).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import torchsteer.optim.regularized_newton as rn_module
from torchsteer.bench.gpt import GPT, GPTConfig, count_parameters
from torchsteer.optim import RegularizedNewton
from torchsteer.optim._newton_solvers import CGSolver

try:
    from torchsteer.optim._newton_multishift import MultiShiftSolver
except ImportError:  # run against an older checkout (PYTHONPATH=/work/main/src), solver="cg"
    MultiShiftSolver = None

RESULTS = Path(__file__).parent / "results"
GB = 2**30


class RSSSampler:
    """Peak of ``/proc/self/statm``'s resident set while :attr:`on` (sampled every 50 ms)."""

    def __init__(self) -> None:
        self.on, self.peak, self._stop = False, 0, False
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop:
            if self.on:
                self.peak = max(self.peak, self.rss())
            time.sleep(0.05)

    def close(self) -> None:
        self._stop = True


class TryLog:
    """The per-try numbers of the accept test, from wrapped solver and trial calls."""

    def __init__(self) -> None:
        self.tries: list[dict] = []
        self._solve: dict = {}

    def install(self) -> None:
        log = self

        def wrap_solve(cls):
            original = cls.solve

            def solve(self, lam, *rest):
                c0 = time.process_time()
                sol = original(self, lam, *rest)
                log._solve = dict(lam_c=lam, g=self.g, cpu=time.process_time() - c0, sol=sol)
                if not sol.ok:
                    log.tries.append(dict(lam_c=lam, ok=False, reason=sol.reason))
                return sol

            cls.solve = solve

        for cls in (MultiShiftSolver, CGSolver):
            if cls is not None:
                wrap_solve(cls)
        original_trial = rn_module.evaluate_trial

        def evaluate_trial(start, curvature, x_new, x0, delta):
            c0 = time.process_time()
            out = original_trial(start, curvature, x_new, x0, delta)
            _, f_t, gn2, d_norm, _, _ = out
            s = log._solve
            c, lam_c = 1.0 / start.inv, s["lam_c"]
            gd = float(s["g"].double() @ delta.double())  # g^T delta in units of c
            lam = lam_c * c
            log.tries.append(
                dict(
                    lam=lam,
                    gamma=start.grad_norm / lam,
                    delta_norm=d_norm,
                    cg_iterations=s["sol"].cg_iterations,
                    solve_cpu_s=s["cpu"],
                    trial_cpu_s=time.process_time() - c0,
                    first_order=-gd * c,
                    predicted=c * (-0.5 * gd + 0.5 * lam_c * d_norm**2),
                    actual=start.loss - f_t,
                    threshold=c * gn2 / (8 * lam_c),
                    grad_norm=start.grad_norm,
                    new_grad_norm=c * gn2**0.5,
                    loss=start.loss,
                    new_loss=f_t,
                )
            )
            return out

        rn_module.evaluate_trial = evaluate_trial

    def take(self) -> list[dict]:
        out, self.tries = self.tries, []
        return out


def build(args):
    torch.manual_seed(0)
    if args.full:
        cfg = GPTConfig.gpt2_small(context=args.context)
    else:
        cfg = GPTConfig(args.vocab, args.context, args.layers, args.heads, args.width, True)
    model = GPT(cfg)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.context + 1), generator=gen)
    return model, cfg, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def lm_loss(model, x, y):
    logits = model(x)
    b, t, v = logits.shape
    return F.cross_entropy(logits.reshape(b * t, v), y.reshape(b * t)), logits


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    model, _, x, y = build(args)
    P = count_parameters(model)
    sampler, log = RSSSampler(), TryLog()
    log.install()
    arms = {}
    if args.adamw_steps:
        base = copy.deepcopy(model)
        adamw = torch.optim.AdamW(base.parameters(), lr=args.lr)

        def adamw_step():
            adamw.zero_grad(set_to_none=True)
            loss, _ = lm_loss(base, x, y)
            loss.backward()
            adamw.step()
            return float(loss.detach()), {}

        arms["adamw"] = (adamw_step, args.adamw_steps)
    params = list(model.parameters())
    opt = RegularizedNewton(
        params,
        curvature="gauss_newton",
        solver=args.solver,
        cg_maxiter=args.cg_iters,
        cg_tol=args.cg_tol,
        gamma0=args.gamma0,
        max_tries=args.max_tries,
        output_hessian=args.output_hessian,
    )

    def closure():
        return lm_loss(model, x, y)

    def rn_step():
        sampler.on = True
        try:
            loss = opt.step(closure)
        finally:
            sampler.on = False
        st = opt.state[params[0]]
        rec = st["record"]
        keep = ("tries", "accepted", "cg_iterations", "gamma", "loss", "new_loss", "reasons")
        extra = {k: rec[k] for k in keep if k in rec}
        extra["curvature_products"] = st["curvature_products"]
        extra["try_log"] = log.take()
        return float(loss), extra

    arms["newton"] = (rn_step, args.steps)
    times: dict[str, list[float]] = {k: [] for k in arms}
    records: dict[str, list] = {k: [] for k in arms}
    error = None
    with sdpa_kernel([SDPBackend.MATH]):
        for i in range(max(n for _, n in arms.values())):
            for name, (fn, n) in arms.items():
                if i >= n:
                    continue
                c0 = time.process_time()
                try:
                    loss, extra = fn()
                except (RuntimeError, ValueError, MemoryError) as err:
                    error = f"{name}: {type(err).__name__}: {err}"
                    break
                times[name].append(time.process_time() - c0)
                records[name].append({"step_loss": loss, "cpu_s": times[name][-1], **extra})
                print(f"{name} step {i + 1}: {times[name][-1]:.1f} CPU s, loss {loss:.4f}")
                if name == "newton":
                    for t in extra["try_log"]:
                        print("   try", {k: v for k, v in t.items() if k != "g"})
                out_partial(args, P, times, records, sampler, error)
            if error:
                break
    sampler.close()
    return summary(args, P, times, records, sampler, error)


def median_after_first(ts: list[float]) -> float | None:
    if not ts:
        return None
    return statistics.median(ts[1:] if len(ts) > 1 else ts)


def summary(args, P, times, records, sampler, error) -> dict:
    med = {k: median_after_first(v) for k, v in times.items()}
    ratio = med["newton"] / med["adamw"] if med.get("adamw") and med.get("newton") else None
    return dict(
        tag=args.tag,
        P=P,
        full=args.full,
        settings=dict(
            solver=args.solver,
            cg_iters=args.cg_iters,
            cg_tol=args.cg_tol,
            gamma0=args.gamma0,
            max_tries=args.max_tries,
            output_hessian=args.output_hessian,
            lr_adamw=args.lr,
            batch=args.batch,
            context=args.context,
            threads=args.threads,
        ),
        cpu_s_per_step=med,
        ratio=ratio,
        times=times,
        records=records,
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        newton_peak_rss=sampler.peak,
        error=error,
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        torch=torch.__version__,
    )


def out_path(args) -> Path:
    return args.out or RESULTS / "newton_scale" / f"{args.tag or args.solver}.json"


def out_partial(args, P, times, records, sampler, error) -> None:
    path = out_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary(args, P, times, records, sampler, error), indent=1) + "\n")


def report() -> None:
    rows = []
    for path in sorted((RESULTS / "newton_scale").glob("*.json")):
        rows.append(json.loads(path.read_text()))
    lines = [
        "| tag | P | solver | gamma0 | max_tries | RN steps | RN CPU s/step | AdamW CPU s/step "
        "| ratio | products/step | accepted | peak RSS GB (process) | RN peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, recs = r["settings"], r["records"].get("newton", [])
        totals = [q["curvature_products"] for q in recs]
        prods = [b - a for a, b in zip([0, *totals[:-1]], totals)]
        acc = "".join("y" if q["accepted"] else "n" for q in recs)
        med = r["cpu_s_per_step"]
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.1f}x"
        lines.append(
            f"| {r['tag']} | {r['P'] / 1e6:.2f}M | {s['solver']} | {s['gamma0']} "
            f"| {s['max_tries']} | {len(recs)} | {fmt(med.get('newton'))} "
            f"| {fmt(med.get('adamw'))} | {ratio} "
            f"| {','.join(map(str, prods))} | {acc} | {r['peak_rss'] / GB:.2f} "
            f"| {r['newton_peak_rss'] / GB:.2f} |"
        )
    print("\n".join(lines))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--tag", default="")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="RegularizedNewton steps")
    ap.add_argument("--adamw-steps", type=int, default=4, help="0: no AdamW arm")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4, help="AdamW")
    ap.add_argument("--solver", default="multishift", choices=("multishift", "cg", "lanczos"))
    ap.add_argument("--cg-iters", type=int, default=10)
    ap.add_argument("--cg-tol", type=float, default=1e-8, help="small: all cg_iters run")
    ap.add_argument("--gamma0", type=float, default=0.1)
    ap.add_argument("--max-tries", type=int, default=2)
    ap.add_argument("--output-hessian", default=None, choices=(None, "cross_entropy"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.report:
        report()
        return
    args.full = (args.layers, args.width, args.heads, args.vocab) == (12, 768, 12, 50257)
    result = run(args)
    out_partial_final = out_path(args)
    out_partial_final.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"wrote {out_partial_final}: newton {result['cpu_s_per_step']} CPU s/step, ratio "
        f"{result['ratio']}, peak {result['peak_rss'] / GB:.2f} GB",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()

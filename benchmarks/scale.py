"""Every part on a GPT-2-small-shaped decoder (124M parameters), B x T = 8 x 128 tokens, CPU.

One arm per process (``ru_maxrss`` is then that arm's own high-water mark), each writing
``benchmarks/results/scale/<arm>[-<tag>].json``; ``--report`` assembles
``benchmarks/results/scale.md`` and ``scale.json``::

    python benchmarks/scale.py --arm adamw            # 20 steps at full size
    python benchmarks/scale.py --arm sven --steps 3
    python benchmarks/scale.py --arm newton --steps 3
    python benchmarks/scale.py --arm mfac --layers 2 --width 64 --vocab 512   # reduced check
    python benchmarks/scale.py --interleave adamw,limiter --steps 6   # one process, ABAB
    python benchmarks/scale.py --report

``--interleave A,B`` builds one model and each arm's optimizer on it, then runs the arms'
steps in turn (A B B A A B ...: the order alternates every round), each timed by
``time.process_time``; every arm writes ``<arm>-interleaved.json`` and its ratio is over
AdamW's steps of the same process (the machine's load drift cancels). The arms step the same
parameters one after the other (their optimizers' states are separate), so the losses are
not a training curve; the memory is that of all the arms together.

The model is :class:`torchsteer.bench.gpt.GPT` (``GPTConfig.gpt2_small()``: 12 layers, width
768, 12 heads, vocabulary 50,257, tied head, context 128: P = 123.75M), random init, random
token ids (seeded; nothing downloaded). Next-token cross-entropy; the per-sequence loss
(mean over the 128 positions) is what DRO reweights and what Sven fits (B = 8 residuals).

Per step: ``time.process_time`` (CPU seconds of the process, both threads) and wall time; the
figure reported is the median over the steps after the first (the first pays page faults and
lazy initialization). Ratios are CPU s per step over AdamW's, from separate processes run
one after the other on a machine shared with other jobs (2 cores, 23 GB): they are not
interleaved, so they carry the load drift of the machine; read them to about 10 %.

Attention runs on SDPA's math kernel in every arm (``--sdpa math``, the default): the CPU
flash kernel that ``F.scaled_dot_product_attention`` picks otherwise has no forward-mode AD
(the limiter's and Sven's JVPs) and no double backward (RegularizedNewton's Gauss-Newton
products), so the baseline runs the same kernel as the arms.

Memory: ``ru_maxrss`` of the process at the end (peak resident set, the model included), and
the resident set after the model is built (``baseline``), beside each part's docstring
formula evaluated at this P (float32, 4 bytes a number); activations are not in the formulas.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from torchsteer.bench.gpt import GPT, GPTConfig, count_parameters

RESULTS = Path(__file__).parent / "results"
ARMS = ("adamw", "mfac", "sven", "newton", "limiter", "dro")
MIN_STEPS = {"adamw": 20, "mfac": 20, "limiter": 20, "dro": 20, "sven": 3, "newton": 3}
GOALS = {"mfac": 3.0, "limiter": 1.6, "sven": 40.0, "newton": 25.0}
GB = 2**30


def rss_bytes() -> int:
    """The current resident set (``/proc/self/statm``), bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """``ru_maxrss`` of this process (kilobytes on Linux), bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def per_sequence(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over positions: (B, T, V), (B, T) -> (B,)."""
    b, t, v = logits.shape
    ce = F.cross_entropy(logits.reshape(b * t, v), targets.reshape(b * t), reduction="none")
    return ce.reshape(b, t).mean(1)


def formulas(arm: str, P: int, args) -> dict[str, float]:
    """Each part's docstring memory formula at P (bytes of float32 state beyond the model's
    parameters P; activations excluded)."""
    n = 4  # float32
    base = {"parameters": P * n, "gradients": P * n}
    if arm == "adamw":
        return {**base, "AdamW exp_avg + exp_avg_sq (2P)": 2 * P * n}
    if arm == "dro":
        return {**base, "AdamW state (2P)": 2 * P * n, "DROWeighting (B weights)": args.batch * n}
    if arm == "limiter":
        return {
            **base,
            "Adam state (2P)": 2 * P * n,
            "limiter snapshot + update (2P)": 2 * P * n,
            "limiter copy of Adam's state (2P)": 2 * P * n,
        }
    if arm == "mfac":
        item = 2 if args.window_dtype == "bfloat16" else 4
        return {
            **base,
            f"window m d ({args.window_dtype}, m = {args.ngrads})": args.ngrads * P * item,
            "Gram + inverse (2 m^2, float64)": 2 * args.ngrads**2 * 8,
        }
    if arm == "newton":
        return {
            **base,
            "graph of one evaluation": float("nan"),
            "CG vectors (x, r, p, Hp, g: 5P)": 5 * P * n,
        }
    if arm == "sven":
        from torchsteer.optim.sven_memory import sven_memory

        est = sven_memory(
            args.batch, P, n, args.rank, args.oversample, args.power_iters, args.fraction
        )
        return {**base, **{f"Sven {k}": v for k, v in est.items()}}
    raise ValueError(arm)


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


def _plain(value):
    return value.item() if isinstance(value, torch.Tensor) else value


def make_step(arm: str, model, x, y, args):
    """A function doing one optimizer step, returning (mean loss, extra record)."""
    params = list(model.parameters())
    if arm in ("adamw", "dro"):
        opt = torch.optim.AdamW(params, lr=args.lr)
        weighting = None
        if arm == "dro":
            from torchsteer.control.dro import DROWeighting

            weighting = DROWeighting(temperature=args.temperature)

        def step():
            opt.zero_grad(set_to_none=True)
            losses = per_sequence(model(x), y)
            loss = weighting(losses) if weighting is not None else losses.mean()
            loss.backward()
            opt.step()
            return float(losses.mean()), {}

        return step
    if arm == "limiter":
        from torchsteer.control.radius import RadiusLimiter

        opt = torch.optim.Adam(params, lr=args.lr)
        limiter = RadiusLimiter(model, r_max=1.0, method=args.limiter_method)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = per_sequence(model(x), y).mean()
            loss.backward()
            limiter.step(opt, x)
            sig = limiter.signals
            return float(loss), {"r": float(sig["r"]), "limited": bool(sig["limited"])}

        return step
    if arm == "mfac":
        from torchsteer.optim import MFAC

        kw = {"memory_budget": int(args.budget_gb * GB)}
        if args.window_dtype != "float32":
            kw["window_dtype"] = getattr(torch, args.window_dtype)
        if args.block_size:
            kw["block_size"] = args.block_size
        opt = MFAC(params, lr=args.lr, ngrads=args.ngrads, **kw)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = per_sequence(model(x), y).mean()
            loss.backward()
            opt.step()
            return float(loss), {}

        return step
    if arm == "sven":
        from torchsteer.optim import Sven

        opt = Sven(
            params,
            lr=args.lr,
            rank=args.rank,
            oversample=args.oversample,
            power_iters=args.power_iters,
            svd="randomized",
            memory_budget=int(args.budget_gb * GB),
            model=model,
            loss_fn=per_sequence,
        )

        def step():
            loss = opt.step(batch=(x, y))
            st = opt.state[params[0]]
            extra = {"jacobian_path": opt.jacobian_path}
            extra["path_fraction"] = float(st.get("path_fraction", float("nan")))
            extra["kept_rank"] = float(st["kept_rank"])
            return float(loss), extra

        return step
    if arm == "newton":
        from torchsteer.optim import RegularizedNewton

        opt = RegularizedNewton(
            params,
            curvature="gauss_newton",
            solver="cg",
            cg_maxiter=args.cg_iters,
            cg_tol=args.cg_tol,
            gamma0=args.gamma0,
            max_tries=args.max_tries,
        )

        def closure():
            logits = model(x)
            b, t, v = logits.shape
            loss = F.cross_entropy(logits.reshape(b * t, v), y.reshape(b * t))
            return loss, logits

        def step():
            loss = opt.step(closure)
            rec = opt.state[params[0]]["record"]
            keep = ("tries", "accepted", "cg_iterations", "loss", "new_loss")
            return float(loss), {k: _plain(rec[k]) for k in keep if k in rec}

        return step
    raise ValueError(arm)


def with_math_attention(step):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def wrapped():
        with sdpa_kernel([SDPBackend.MATH]):
            return step()

    return wrapped


def run_interleaved(args) -> list[dict]:
    """Every arm of ``args.interleave`` on one model, their steps in turn (see the module)."""
    torch.set_num_threads(args.threads)
    model, cfg, x, y = build(args)
    P = count_parameters(model)
    baseline = rss_bytes()
    names = args.interleave
    steps = {}
    for arm in names:
        step = make_step(arm, model, x, y, _arm_args(args, arm))
        steps[arm] = with_math_attention(step) if args.sdpa == "math" else step
    rec = {arm: ([], [], [], []) for arm in names}  # cpu, wall, losses, extras
    for i in range(args.steps):
        for arm in names if i % 2 == 0 else names[::-1]:
            c0, w0 = time.process_time(), time.perf_counter()
            loss, extra = steps[arm]()
            cpu, wall, losses, extras = rec[arm]
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
            losses.append(loss)
            extras.append(extra)
            print(f"{arm} step {len(cpu)}: {cpu[-1]:.2f} CPU s, loss {loss:.4f} {extra}")
    out = []
    for arm in names:
        a = _arm_args(args, arm)
        a.tag = args.tag
        res = summary(a, cfg, P, *rec[arm], baseline, None)
        res["interleaved_with"] = list(names)
        out.append(res)
    return out


def _arm_args(args, arm: str):
    a = argparse.Namespace(**vars(args))
    a.arm = arm
    if a.lr is None:
        a.lr = {"sven": 0.1, "mfac": 1e-4}.get(arm, 3e-4)
    return a


def run_arm(args) -> dict:
    torch.set_num_threads(args.threads)
    model, cfg, x, y = build(args)
    P = count_parameters(model)
    baseline = rss_bytes()
    step = make_step(args.arm, model, x, y, args)
    if args.sdpa == "math":  # forward AD and double backward (the CPU flash kernel has neither)
        step = with_math_attention(step)
    cpu, wall, losses, extras = [], [], [], []
    error = None
    for _ in range(args.steps):
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            loss, extra = step()
        except (RuntimeError, ValueError, MemoryError, NotImplementedError) as err:
            error = f"{type(err).__name__}: {err}"
            break
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        losses.append(loss)
        extras.append(extra)
        print(f"{args.arm} step {len(cpu)}: {cpu[-1]:.1f} CPU s, loss {loss:.4f} {extra}")
        if args.partial:  # the result so far after every step (a run cut short still counts)
            args.partial.write_text(
                json.dumps(
                    summary(args, cfg, P, cpu, wall, losses, extras, baseline, error), indent=1
                )
                + "\n"
            )
    return summary(args, cfg, P, cpu, wall, losses, extras, baseline, error)


def summary(args, cfg, P, cpu, wall, losses, extras, baseline, error) -> dict:
    timed = cpu[1:] if len(cpu) > 1 else cpu
    return {
        "arm": args.arm,
        "tag": args.tag,
        "config": {
            "vocab": cfg.vocab_size,
            "context": cfg.context,
            "layers": cfg.n_layer,
            "width": cfg.width,
            "heads": cfg.n_head,
            "batch": args.batch,
            "threads": args.threads,
            "sdpa": args.sdpa,
            **{k: getattr(args, k) for k in arm_options(args.arm)},
        },
        "parameters": P,
        "steps": len(cpu),
        "cpu_s_per_step": statistics.median(timed) if timed else None,
        "wall_s_per_step": statistics.median(wall[1:] if len(wall) > 1 else wall) if wall else None,
        "cpu_s": cpu,
        "losses": losses,
        "records": extras,
        "baseline_rss": baseline,
        "peak_rss": peak_rss_bytes(),
        "formula": formulas(args.arm, P, args),
        "error": error,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
    }


def arm_options(arm: str) -> tuple[str, ...]:
    return {
        "adamw": ("lr",),
        "dro": ("lr", "temperature"),
        "limiter": ("lr", "limiter_method"),
        "mfac": ("lr", "ngrads", "window_dtype", "block_size", "budget_gb"),
        "sven": ("lr", "rank", "oversample", "power_iters", "budget_gb", "fraction"),
        "newton": ("cg_iters", "cg_tol", "gamma0", "max_tries"),
    }[arm]


def gb(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x / GB:.2f}"


def report() -> None:
    runs = [json.loads(p.read_text()) for p in sorted((RESULTS / "scale").glob("*.json"))]
    full = [r for r in runs if r["config"]["layers"] == 12 and r["config"]["width"] == 768]
    ref = {r["tag"]: r for r in full if r["arm"] == "adamw"}
    lines = [
        "# Scale: every part on GPT-2 small (124M), B x T = 8 x 128, CPU",
        "",
        "`python benchmarks/scale.py --arm ARM` (one process per arm, run one after the other),",
        "then `--report`. 2-core machine shared with other jobs (23 GB): CPU s are",
        "`time.process_time` of the process (both threads), median of the steps after the",
        "first; ratios are over AdamW's run in its own process, not interleaved (about 10 %).",
        "Peak = `ru_maxrss` of the process (model and activations included); the formula is",
        "the part's docstring formula at this P, state only (float32), no activations.",
        "",
        "| arm | tag | P | steps | CPU s/step | / AdamW | goal | peak RSS GB | after build GB "
        "| formula GB | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(full, key=lambda r: (ARMS.index(r["arm"]), r["tag"])):
        # an interleaved arm is over the AdamW steps of its own process
        adam = ref.get(r["tag"]) or ref.get("") or next(iter(ref.values()), None)
        ratio = None
        if adam and r["cpu_s_per_step"] and adam["cpu_s_per_step"]:
            ratio = r["cpu_s_per_step"] / adam["cpu_s_per_step"]
        total = sum(v for v in r["formula"].values() if not math.isnan(v))
        goal = GOALS.get(r["arm"])
        ok = "" if goal is None or ratio is None else (" (met)" if ratio <= goal else " (missed)")
        notes = []
        if r["steps"] < MIN_STEPS[r["arm"]]:
            notes.append(f"only {r['steps']} of {MIN_STEPS[r['arm']]} steps")
        if r["error"]:
            notes.append(r["error"][:160])
        recs = r["records"][-1] if r["records"] else {}
        if recs:
            notes.append(", ".join(f"{k}={v}" for k, v in recs.items()))
        opts = {k: v for k, v in r["config"].items() if k in arm_options(r["arm"])}
        notes.append(", ".join(f"{k}={v}" for k, v in opts.items()))
        cps = r["cpu_s_per_step"]
        lines.append(
            f"| {r['arm']} | {r['tag'] or '-'} | {r['parameters'] / 1e6:.2f}M | {r['steps']} "
            f"| {'-' if cps is None else f'{cps:.1f}'} "
            f"| {'-' if ratio is None else f'{ratio:.2f}x'} "
            f"| {'-' if goal is None else f'<= {goal}x{ok}'} | {gb(r['peak_rss'])} "
            f"| {gb(r['baseline_rss'])} | {gb(total)} | {'; '.join(notes)} |"
        )
    lines += ["", "## Formulas (GB at this P)", ""]
    for r in full:
        parts = "; ".join(f"{k}: {gb(v)}" for k, v in r["formula"].items())
        lines.append(f"- **{r['arm']}{'/' + r['tag'] if r['tag'] else ''}**: {parts}")
    notes_file = RESULTS / "scale_notes.md"
    if notes_file.exists():
        lines += ["", notes_file.read_text().strip()]
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "scale.json").write_text(json.dumps(full, indent=1) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arm", choices=ARMS)
    ap.add_argument(
        "--interleave",
        default=None,
        help="comma-separated arms run in turn in one process (e.g. adamw,limiter)",
    )
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--tag", default="", help="suffix of the result file (variants of an arm)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="default: 20 (Sven, Newton: 3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--ngrads", type=int, default=32)
    ap.add_argument("--window-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--block-size", type=int, default=0)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--oversample", type=int, default=0)
    ap.add_argument("--power-iters", type=int, default=0)
    ap.add_argument("--fraction", type=float, default=1.0, help="Sven param_fraction (formula)")
    ap.add_argument("--budget-gb", type=float, default=9.0, help="Sven / MFAC memory_budget")
    ap.add_argument("--cg-iters", type=int, default=10)
    ap.add_argument("--cg-tol", type=float, default=1e-8, help="small: all cg_iters run")
    ap.add_argument("--gamma0", type=float, default=0.1)
    ap.add_argument("--max-tries", type=int, default=3)
    ap.add_argument(
        "--limiter-method",
        default="jvp",
        choices=("jvp", "fd1"),
        help="RadiusLimiter measurement (jvp: exact; fd1: one-sided difference)",
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--sdpa",
        default="math",
        choices=("math", "default"),
        help="attention kernel (math: every arm; the CPU flash kernel has no forward AD)",
    )
    args = ap.parse_args(argv)
    if args.report:
        report()
        return
    args.full = (args.layers, args.width, args.heads, args.vocab) == (12, 768, 12, 50257)
    if args.interleave:
        arms = args.interleave.split(",")
        if any(a not in ARMS for a in arms) or len(set(arms)) != len(arms):
            ap.error(f"--interleave: distinct arms of {ARMS}, got {args.interleave!r}")
        args.interleave = arms
        args.steps = args.steps or 6
        args.tag = "interleaved" + (f"-{args.tag}" if args.tag else "")
        for res in run_interleaved(args):
            out = RESULTS / "scale" / f"{res['arm']}-{res['tag']}.json"
            if not args.full:
                out = out.with_name(out.stem + "-reduced.json")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=1) + "\n")
            print(f"wrote {out}: {res['cpu_s_per_step']} CPU s/step", file=sys.stderr)
        print(f"peak {peak_rss_bytes() / GB:.2f} GB", file=sys.stderr)
        return
    if args.arm is None:
        ap.error("--arm, --interleave or --report")
    args.steps = args.steps or MIN_STEPS[args.arm]
    if args.lr is None:
        args.lr = {"sven": 0.1, "mfac": 1e-4}.get(args.arm, 3e-4)
    out = args.out or RESULTS / "scale" / f"{args.arm}{'-' + args.tag if args.tag else ''}.json"
    if not args.full and args.out is None:
        out = out.with_name(out.stem + "-reduced.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    args.partial = out
    result = run_arm(args)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"wrote {out}: {result['steps']} steps, {result['cpu_s_per_step']} CPU s/step, "
        f"peak {result['peak_rss'] / GB:.2f} GB",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()

"""Where the radius limiter's step goes on GPT-2 small (124M), B x T = 8 x 128, CPU.

Times (``time.process_time``) every phase of ``limiter.step(opt, x)`` after the training
forward/backward, by wrapping the limiter's pieces: the gradient check, the theta_old
snapshot, the optimizer-state snapshot, Adam's own step, the update and its norm, the
measurement (the JVP over the 8 x 128 x 50,257 logits and their spread), the rescaling and
the device-side state decision, then lists the top operators of one step from
``torch.profiler``. ``--steps 3`` (the first is not counted). Writes
``benchmarks/results/limiter_profile.md`` (or ``--out``)::

    python benchmarks/limiter_profile.py --steps 3
"""

from __future__ import annotations

import argparse
import functools
import resource
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import build, per_sequence

from torchsteer.control.radius import _buffers, _masked, limiter

RESULTS = Path(__file__).parent / "results"
TIMES: dict[str, list[float]] = defaultdict(list)


def timed(owner, name: str, label: str) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[label].append(time.process_time() - t0)

    setattr(owner, name, wrapper)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--out", type=Path, default=RESULTS / "limiter_profile.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ns = argparse.Namespace(
        full=(args.layers, args.width, args.vocab) == (12, 768, 50257),
        vocab=args.vocab,
        context=128,
        layers=args.layers,
        heads=12,
        width=args.width,
        batch=8,
    )
    model, _, x, y = build(ns)
    timed(limiter, "gradients_finite", "gradient check")
    timed(_buffers.FlatBuffers, "snapshot", "theta_old snapshot (P)")
    timed(_masked.StateSnapshot, "take", "optimizer-state snapshot (2P)")
    timed(_buffers.FlatBuffers, "take_update", "update p and |p| (P)")
    timed(limiter, "worst_spread", "measurement: JVP + spread")
    timed(_buffers.FlatBuffers, "apply_masked", "rescale (device decision)")
    timed(_buffers.FlatBuffers, "apply_scaled", "rescale (host decision)")
    timed(_masked.StateSnapshot, "restore_where", "state where(ok, new, old) (2P)")
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    timed(opt, "step", "Adam step")
    lim = limiter.RadiusLimiter(model, r_max=1.0)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    steps, rows = [], []
    with sdpa_kernel([SDPBackend.MATH]):
        for i in range(args.steps):
            TIMES.clear() if i == 1 else None
            t0 = time.process_time()
            opt.zero_grad(set_to_none=True)
            loss = per_sequence(model(x), y).mean()
            t1 = time.process_time()
            loss.backward()
            t2 = time.process_time()
            if i == args.steps - 1:
                with torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU]
                ) as prof:
                    lim.step(opt, x)
                rows = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
            else:
                lim.step(opt, x)
            t3 = time.process_time()
            if i > 0:
                TIMES["training forward"].append(t1 - t0)
                TIMES["training backward"].append(t2 - t1)
                steps.append(t3 - t0)
            print(f"step {i + 1}: {t3 - t0:.2f} CPU s, reused {lim.reused}", flush=True)
    step = statistics.median(steps)
    lines = [
        "# Where the limiter's step goes (GPT-2 small, B x T = 8 x 128)",
        "",
        f"`python benchmarks/limiter_profile.py --steps {args.steps}` ({args.threads} threads,"
        " 2-core machine shared with other jobs, 23 GB; CPU s per phase, median over the steps"
        " after the first; the last step runs under torch.profiler, which adds overhead).",
        "",
        f"Limiter step (forward + backward + `limiter.step`): {step:.2f} CPU s, "
        f"reuse path taken: {lim.reused} of {args.steps} steps; peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB (one model, Adam).",
        "",
        "| phase | CPU s | share of the step |",
        "|---|---:|---:|",
    ]
    for label, ts in TIMES.items():
        med = statistics.median(ts)
        lines.append(f"| {label} | {med:.3f} | {100 * med / step:.1f} % |")
    lines += [
        "",
        "Top operators of the last `limiter.step` (torch.profiler, self CPU):",
        "",
        "```",
        rows,
        "```",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""f_divergence eager and under a user's ``torch.compile``, against the bandwidth bound.

The bound is the traffic the issue names (read both logits, write the gradient once), timed
as what moves exactly those bytes: ``torch.add(z_s, z_t, out=g)`` on the same tensors. Arms
(forward + backward, float32 logits (N, V)): ``f_divergence(kind)`` eager, and the same call
wrapped in ``torch.compile`` (default mode; the row check's one host read is a graph break).
CPU time (``time.process_time``), 1 thread, arms interleaved, median of the repeats; the
first compiled call (the compilation) is timed apart. Each compiled arm's value and gradient
are compared with eager's, and both gradients with the float64 call's (max abs difference
over the max abs gradient). Two more arms for forward and reverse KL: the generic chunk
(``gen.terms`` on two log-softmaxes, what both took before ``_kl_chunks``), and the floor
of any exact eager form, one exp per entry of each logits tensor (``torch.exp(z, out=g)``
twice: p and q both need every exp).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/divergence_compile.py [--n 1024] [--v 32000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved

from torchsteer.divergence import f_divergence
from torchsteer.divergence.f_divergence import _FDivergence
from torchsteer.divergence.generators import KL, ReverseKL

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = {"forward KL": ("kl", {}), "reverse KL": ("reverse_kl", {}), "JS": ("js", {})}


class _GenericKL(KL):  # the generic chunk (the dispatch takes exact types only)
    pass


class _GenericReverseKL(ReverseKL):
    pass


GENERIC = {"forward KL": _GenericKL(), "reverse KL": _GenericReverseKL()}


def generic_call(s, t, gen):
    """f_divergence(s, t) with ``gen`` through the generic chunk (default chunk, batchmean)."""
    n, v = s.shape
    rows = torch.arange(n)
    return _FDivergence.apply(s, t, gen, 1.0, rows, max(1, (1 << 17) // v), "batchmean", n, True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(args.n, args.v, generator=g) * 3
    zt = torch.randn(args.n, args.v, generator=g) * 3
    out = torch.empty_like(zs)

    def run(fn):
        s = zs.detach().requires_grad_()
        loss = fn(s, zt)
        loss.backward()
        return loss.detach(), s.grad

    arms = {"bound: read 2 logits, write 1": lambda: torch.add(zs, zt, out=out)}

    def two_exps():
        torch.exp(zs, out=out)
        torch.exp(zt, out=out)

    arms["floor: one exp per entry of each"] = two_exps
    compile_s, accuracy = {}, {}
    for name, (kind, kw) in KINDS.items():

        def eager(s, t, kind=kind, kw=kw):
            return f_divergence(s, t, kind, **kw)

        compiled = torch.compile(eager)
        t0 = time.process_time()
        v_c, g_c = run(compiled)
        compile_s[name] = time.process_time() - t0
        v_e, g_e = run(eager)
        s64 = zs.double().requires_grad_()
        v_64 = f_divergence(s64, zt.double(), kind, **kw)
        v_64.backward()
        g_64 = s64.grad
        accuracy[name] = {
            "value": float((v_c - v_e).abs() / v_e.abs()),
            "gradient": float((g_c - g_e).abs().max() / g_e.abs().max()),
            "eager_gradient_vs_f64": float((g_e.double() - g_64).abs().max() / g_64.abs().max()),
            "compiled_gradient_vs_f64": float((g_c.double() - g_64).abs().max() / g_64.abs().max()),
        }
        del s64, v_64, g_64
        arms[f"eager {name}"] = lambda fn=eager: run(fn)
        arms[f"compiled {name}"] = lambda fn=compiled: run(fn)
        if name in GENERIC:
            arms[f"generic {name}"] = lambda gen=GENERIC[name]: run(
                lambda s, t: generic_call(s, t, gen)
            )
    times = interleaved(arms, args.repeats, time.process_time)
    bound = times["bound: read 2 logits, write 1"]
    gbps = 3 * zs.numel() * zs.element_size() / bound / 1e9
    floor = times["floor: one exp per entry of each"]
    rows = []
    for name in KINDS:
        e, c = times[f"eager {name}"], times[f"compiled {name}"]
        generic = times.get(f"generic {name}")
        rows.append(
            {
                "kind": name,
                "generic_s": generic,
                "eager_over_generic": None if generic is None else e / generic,
                "eager_s": e,
                "compiled_s": c,
                "eager_over_bound": e / bound,
                "compiled_over_bound": c / bound,
                "compiled_over_eager": c / e,
                "compile_s": compile_s[name],
                **{f"rel_diff_{k}": v for k, v in accuracy[name].items()},
            }
        )
    record = {
        "n": args.n,
        "v": args.v,
        "repeats": args.repeats,
        "bound_s": bound,
        "exp_floor_s": floor,
        "bandwidth_gbps": gbps,
        "rows": rows,
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "divergence_compile.json").write_text(json.dumps(record, indent=2))
    lines = [
        f"# f_divergence eager and under torch.compile: ({args.n}, {args.v}) float32, CPU, "
        "1 thread",
        "",
        f"Bound (read both logits, write the gradient once: `torch.add(zs, zt, out=g)`): "
        f"{bound:.4f} CPU s, {gbps:.1f} GB/s. Floor of an exact eager form (one exp per "
        f"entry of each logits tensor): {floor:.4f} CPU s = {floor / bound:.1f}x the bound.",
        "",
        "| kind | eager CPU s | generic chunk CPU s | eager / generic | compiled CPU s "
        "| eager / bound | compiled / bound "
        "| compiled / eager | compilation CPU s | value rel. diff | gradient rel. diff "
        "| eager gradient vs float64 | compiled gradient vs float64 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gen_s = "-" if r["generic_s"] is None else f"{r['generic_s']:.3f}"
        gen_r = "-" if r["generic_s"] is None else f"{r['eager_over_generic']:.2f}"
        lines.append(
            f"| {r['kind']} | {r['eager_s']:.3f} | {gen_s} | {gen_r} | {r['compiled_s']:.3f} | "
            f"{r['eager_over_bound']:.1f} | {r['compiled_over_bound']:.1f} | "
            f"{r['compiled_over_eager']:.2f} | {r['compile_s']:.1f} | "
            f"{r['rel_diff_value']:.1e} | {r['rel_diff_gradient']:.1e} | "
            f"{r['rel_diff_eager_gradient_vs_f64']:.1e} | "
            f"{r['rel_diff_compiled_gradient_vs_f64']:.1e} |"
        )
    lines += [
        "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/divergence_compile.py --n {args.n} "
        f"--v {args.v} --repeats {args.repeats}`; torch {torch.__version__}, CPU time, arms "
        "interleaved, median; a 2-core machine shared with other jobs (times indicative). "
        "Nothing here was measured on a GPU.",
    ]
    (RESULTS / "divergence_compile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

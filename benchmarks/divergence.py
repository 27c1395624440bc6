"""Forward + backward CPU time and peak extra memory of f_divergence against F.kl_div.

Arms: forward KL, reverse KL and generalized JSD (beta 0.5) with
``torchsteer.divergence.f_divergence``, the same with ``F.kl_div`` on log-softmaxes (the
usual hand-written form), and TRL's ``generalized_jsd_loss`` written from its definition
(TRL is not installed here). CPU time (``time.process_time``), 1 thread, arms interleaved,
median of the repeats. Peak extra memory: a fresh subprocess per arm, the peak RSS during one
forward + backward (Linux VmHWM, reset after the logits were made) minus the RSS then (in
units of one logits tensor).

Fused-linear arms: the same forward KL from hidden states (N, H) and heads (V, H), H = 256,
``fused_linear_divergence`` against ``f_divergence`` on materialized logits (memory in the
same unit, one (N, V) float32 logits tensor). Stress table: value relative error against a
float64 reference for each arm on a padded vocabulary (-inf logits), logit spread 40, bf16
inputs and beta at/near 0 and 1 (NaN/inf marked as such).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/divergence.py [--n 1024] [--v 32000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved

from torchsteer.divergence import f_divergence, fused_linear_divergence

RESULTS = Path(__file__).resolve().parent / "results"


def trl_gjsd(s, t, beta=0.5):
    s, t = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    b = torch.tensor(beta, dtype=s.dtype)
    m = torch.logsumexp(torch.stack([s + torch.log(1 - b), t + torch.log(b)]), 0)
    kl = F.kl_div
    jsd = b * kl(m, t, reduction="none", log_target=True) + (1 - b) * kl(
        m, s, reduction="none", log_target=True
    )
    return jsd.sum() / jsd.size(0)


ARMS = {
    "ours forward KL": lambda s, t: f_divergence(s, t, "kl"),
    "F.kl_div forward KL": lambda s, t: F.kl_div(
        torch.log_softmax(s, -1), torch.log_softmax(t, -1), reduction="batchmean", log_target=True
    ),
    "ours reverse KL": lambda s, t: f_divergence(s, t, "reverse_kl"),
    "F.kl_div reverse KL": lambda s, t: F.kl_div(
        torch.log_softmax(t, -1), torch.log_softmax(s, -1), reduction="batchmean", log_target=True
    ),
    "ours generalized JSD": lambda s, t: f_divergence(s, t, "generalized_js", beta=0.5),
    "TRL-formula generalized JSD": trl_gjsd,
}


def distillm_skew_kl(s, t, lam=0.1):
    """DistiLLM's released skew forward KL (losses.py), written from its definition."""
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    mixed = torch.log(lam * p + (1 - lam) * q)
    prod = torch.masked_fill(p * mixed, torch.isinf(s), 0)
    return -prod.sum(-1).mean()


H = 256
FUSED = {
    "ours fused-linear forward KL": lambda h, w, ht, wt: fused_linear_divergence(h, w, ht, wt),
    "unfused (logits, then ours) forward KL": lambda h, w, ht, wt: f_divergence(
        h @ w.T, (ht @ wt.T).detach()
    ),
}


def make_fused(n, v):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, H, generator=g).requires_grad_(True)
    w = torch.randn(v, H, generator=g).div_(H**0.5).mul_(3).requires_grad_(True)
    return h, w, torch.randn(n, H, generator=g), torch.randn(v, H, generator=g).div_(H**0.5)


def make(n, v):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, v, generator=g).mul_(3).requires_grad_(True)  # no temporaries
    return s, torch.randn(n, v, generator=g).mul_(3)


def step(name, s, t):
    s.grad = None
    ARMS[name](s, t).backward()


def step_fused(name, h, w, ht, wt):
    h.grad = w.grad = None
    FUSED[name](h, w, ht, wt).backward()


def memory_child(name, n, v):
    torch.set_num_threads(1)
    x = make_fused(n, v) if name in FUSED else make(n, v)
    before = rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    (step_fused if name in FUSED else step)(name, *x)
    print((rss_kb("VmHWM") - before) * 1024 / (n * v * 4))


def rss_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _fmt(e):
    return e if isinstance(e, str) else f"{e:.1e}"


def _cases():
    g = torch.Generator().manual_seed(1)

    def r(spread):
        return spread * torch.randn(64, 1000, generator=g, dtype=torch.float64)

    s, t = r(3), r(3)
    pad_s, pad_t = s.clone(), t.clone()
    pad_s[:, -100:] = pad_t[:, -100:] = -math.inf
    bs, bt = s.bfloat16().double(), t.bfloat16().double()  # the reference sees the rounded inputs
    return {
        "padded -inf": (pad_s, pad_t, pad_s.float(), pad_t.float()),
        "spread 40": (r(40), r(40)),
        "bf16": (bs, bt, s.bfloat16(), t.bfloat16()),
    }


def stress_table():
    """Value relative error of each arm against ours in float64 on adversarial inputs."""
    cases = {}
    for name, c in _cases().items():
        cases[name] = c if len(c) == 4 else (c[0], c[1], c[0].float(), c[1].float())
    arms = {
        "ours forward KL": (lambda s, t: f_divergence(s, t, "kl"), ("kl", {})),
        "F.kl_div forward KL": (ARMS["F.kl_div forward KL"], ("kl", {})),
        "ours generalized JSD 0.5": (ARMS["ours generalized JSD"], ("generalized_js", {})),
        "TRL-formula generalized JSD 0.5": (trl_gjsd, ("generalized_js", {})),
        "ours skew KL 0.1": (
            lambda s, t: f_divergence(s, t, "skew_kl", lam=0.1, reduction="mean"),
            ("skew_kl", {"lam": 0.1}),
        ),
        "DistiLLM skew KL 0.1 (+ teacher entropy)": (distillm_skew_kl, None),
    }
    out = {}
    for arm, (fn, ref) in arms.items():
        row = {}
        for name, (s64, t64, s, t) in cases.items():
            if ref is None:  # DistiLLM's loss is the cross-entropy: KL + H(p)
                p = torch.softmax(t64, -1)
                ent = -torch.where(p > 0, p * torch.log_softmax(t64, -1), 0).sum(-1).mean()
                want = f_divergence(s64, t64, "skew_kl", lam=0.1, reduction="mean") + ent
            else:
                beta = {"beta": 0.5} if ref[0] == "generalized_js" else {}
                want = f_divergence(s64, t64, ref[0], **ref[1], **beta)
            got = float(fn(s, t))
            err = abs(got - float(want)) / abs(float(want))
            row[name] = err if math.isfinite(got) else str(got)
        out[arm] = row
    return out


def beta_endpoints():
    """Normalized generalized JSD near and at beta = 0, 1 against KL(p||q), KL(q||p), and
    TRL's (un-normalized) value at the same betas, both relative to the KL they limit to."""
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(64, 1000, generator=g), torch.randn(64, 1000, generator=g)
    kl, rkl = float(f_divergence(s, t, "kl")), float(f_divergence(s, t, "reverse_kl"))
    rows = {"ours normalized gen. JSD / limit KL": {}, "TRL-formula gen. JSD / limit KL": {}}
    for beta in (0.0, 1e-3, 1 - 1e-3, 1.0):
        lim = kl if beta < 0.5 else rkl
        ours = f_divergence(s, t, "generalized_js", beta=beta, normalized=True)
        trl = trl_gjsd(s, t, beta) if 0 < beta < 1 else (kl if beta == 0 else rkl)
        rows["ours normalized gen. JSD / limit KL"][f"beta {beta:g}"] = f"{float(ours) / lim:.4f}"
        rows["TRL-formula gen. JSD / limit KL"][f"beta {beta:g}"] = f"{float(trl) / lim:.4f}"
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        return memory_child(a.child, a.n, a.v)
    torch.set_num_threads(1)
    s, t = make(a.n, a.v)
    import time

    times = interleaved(
        {k: (lambda k=k: step(k, s, t)) for k in ARMS}, a.repeats, time.process_time
    )
    xf = make_fused(a.n, a.v)
    times.update(
        interleaved(
            {k: (lambda k=k: step_fused(k, *xf)) for k in FUSED}, a.repeats, time.process_time
        )
    )
    mem = {}
    for k in list(ARMS) + list(FUSED):
        cmd = [sys.executable, __file__, "--n", str(a.n), "--v", str(a.v), "--child", k]
        mem[k] = float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    ratios = {
        "forward KL time / F.kl_div": times["ours forward KL"] / times["F.kl_div forward KL"],
        "reverse KL time / F.kl_div": times["ours reverse KL"] / times["F.kl_div reverse KL"],
        "generalized JSD time / TRL formula": times["ours generalized JSD"]
        / times["TRL-formula generalized JSD"],
        "fused-linear time / unfused": times["ours fused-linear forward KL"]
        / times["unfused (logits, then ours) forward KL"],
    }
    stress, ends = stress_table(), beta_endpoints()
    out = {
        "shape": [a.n, a.v],
        "dtype": "float32",
        "repeats": a.repeats,
        "machine": platform.processor() or platform.machine(),
        "cpu_seconds": times,
        "peak_extra_memory_in_logits": mem,
        "ratios": ratios,
        "stress_value_relative_error": stress,
        "generalized_jsd_over_limit_kl": ends,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "divergence.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        f"# f_divergence vs F.kl_div / TRL formula: ({a.n}, {a.v}) float32, CPU, 1 thread",
        "",
        "| arm | CPU s (fwd+bwd, median) | peak extra memory (x one logits tensor) |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {times[k]:.3f} | {mem[k]:.2f} |" for k in list(ARMS) + list(FUSED)]
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    cases = list(next(iter(stress.values())))
    lines += ["", "Stress cases, value relative error against float64 (64 x 1000 logits):", ""]
    lines += ["| arm | " + " | ".join(cases) + " |", "|---|" + "---|" * len(cases)]
    lines += [
        f"| {k} | " + " | ".join(_fmt(e) for e in r.values()) + " |" for k, r in stress.items()
    ]
    cases = list(next(iter(ends.values())))
    lines += [
        "",
        "Generalized JSD near and at the beta ends / the KL it limits to (1 is right):",
        "",
    ]
    lines += ["| arm | " + " | ".join(cases) + " |", "|---|" + "---|" * len(cases)]
    lines += [f"| {k} | " + " | ".join(r.values()) + " |" for k, r in ends.items()]
    (RESULTS / "divergence.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Forward + backward CPU time and peak extra memory of f_divergence against F.kl_div.

Arms: forward KL, reverse KL and generalized JSD (beta 0.5) with
``torchsteer.divergence.f_divergence``, the same with ``F.kl_div`` on log-softmaxes (the
usual hand-written form), and TRL's ``generalized_jsd_loss`` written from its definition
(TRL is not installed here). CPU time (``time.process_time``), 1 thread, arms interleaved,
median of the repeats. Peak extra memory: a fresh subprocess per arm, the peak RSS during one
forward + backward (Linux VmHWM, reset after the logits were made) minus the RSS then (in
units of one logits tensor).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/divergence.py [--n 1024] [--v 32000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved

from torchsteer.divergence import f_divergence

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


def make(n, v):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, v, generator=g).mul_(3).requires_grad_(True)  # no temporaries
    return s, torch.randn(n, v, generator=g).mul_(3)


def step(name, s, t):
    s.grad = None
    ARMS[name](s, t).backward()


def memory_child(name, n, v):
    torch.set_num_threads(1)
    s, t = make(n, v)
    before = rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    step(name, s, t)
    print((rss_kb("VmHWM") - before) * 1024 / (n * v * 4))


def rss_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


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
    mem = {}
    for k in ARMS:
        cmd = [sys.executable, __file__, "--n", str(a.n), "--v", str(a.v), "--child", k]
        mem[k] = float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    ratios = {
        "forward KL time / F.kl_div": times["ours forward KL"] / times["F.kl_div forward KL"],
        "reverse KL time / F.kl_div": times["ours reverse KL"] / times["F.kl_div reverse KL"],
        "generalized JSD time / TRL formula": times["ours generalized JSD"]
        / times["TRL-formula generalized JSD"],
    }
    out = {
        "shape": [a.n, a.v],
        "dtype": "float32",
        "repeats": a.repeats,
        "machine": platform.processor() or platform.machine(),
        "cpu_seconds": times,
        "peak_extra_memory_in_logits": mem,
        "ratios": ratios,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "divergence.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        f"# f_divergence vs F.kl_div / TRL formula: ({a.n}, {a.v}) float32, CPU, 1 thread",
        "",
        "| arm | CPU s (fwd+bwd, median) | peak extra memory (x one logits tensor) |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {times[k]:.3f} | {mem[k]:.2f} |" for k in ARMS]
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    (RESULTS / "divergence.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

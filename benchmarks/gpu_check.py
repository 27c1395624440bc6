"""The device checks of issue 17 in one short script: host syncs and CUDA-graph capture.

1. **Syncs.** Each part's steady-state step (the 4th; small models on the device) runs under
   ``torch.cuda.set_sync_debug_mode("error")``: a step that makes the host wait raises, and the
   record keeps the library frame that did. On the CPU (a dry run of the script) the same step
   is counted with ``tests/_sync.py``'s counter instead.
2. **Capture.** M-FAC (``capturable=True, nonfinite="skip"``) and Sven's dense functional step
   (``nonfinite="skip"``) are captured in a CUDA graph after warm-up steps on a side stream,
   replayed on fresh gradients / batches copied into the captured tensors, and compared with an
   eager twin fed the same data (max abs parameter difference after the replays). CUDA only.

Usage (on a lent GPU, then copy ``DIR`` to ``benchmarks/results/cuda/``)::

    python benchmarks/gpu_check.py --device cuda --out DIR
    python benchmarks/gpu_check.py --device cpu --out /tmp/x     # dry run, counts only
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests._sync import SyncCounter  # noqa: E402

from torchsteer.control import DROWeighting, RadiusLimiter  # noqa: E402
from torchsteer.control.kl import AdaptiveKLController  # noqa: E402
from torchsteer.optim import MFAC, Sven  # noqa: E402

ce = torch.nn.functional.cross_entropy


def mlp(dev):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return net.to(dev)


def data(dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 8, generator=g).to(dev), torch.randint(0, 3, (32,), generator=g).to(dev)


def functional_sven(m):
    """Sven's dense functional step (``model=``/``loss_fn=``) with ``nonfinite="skip"``."""
    loss_fn = lambda o, t: ce(o, t, reduction="none")  # noqa: E731
    return Sven(
        m.parameters(), lr=0.1, rank=8, jacobian="dense", nonfinite="skip", model=m, loss_fn=loss_fn
    )


def parts(dev):
    """name -> one step, each of the parts issue 17 asks to be sync-free (their sync-free
    settings)."""
    X, Y = data(dev)
    out = {}
    for name, extra in (("", {}), (" blocked", {"block_size": 64})):
        m = mlp(dev)
        opt = MFAC(m.parameters(), lr=1e-3, ngrads=8, nonfinite="skip", capturable=True, **extra)

        def mfac_step(m=m, opt=opt):
            opt.zero_grad()
            ce(m(X), Y).backward()
            opt.step()

        out[f"MFAC{name} (capturable, skip)"] = mfac_step
    sven = functional_sven(mlp(dev))
    out["Sven dense (functional, skip)"] = lambda: sven.step(batch=(X, Y))
    m3 = mlp(dev)
    sven_c = Sven(m3.parameters(), lr=0.1, rank=8, jacobian="dense", nonfinite="skip")
    out["Sven dense (closure, skip)"] = lambda: sven_c.step(lambda: ce(m3(X), Y, reduction="none"))
    m4 = mlp(dev)
    sgd = torch.optim.SGD(m4.parameters(), lr=0.1, momentum=0.9)
    lim = RadiusLimiter(m4, r_max=1.0, nonfinite="skip")

    def limited():
        sgd.zero_grad()
        ce(m4(X), Y).backward()
        lim.step(sgd, X)

    out["SGD(momentum) + RadiusLimiter.step (skip)"] = limited
    dro = DROWeighting(temperature=1.0, mode="streaming", nonfinite="skip")
    losses = torch.rand(32, device=dev)
    out["DROWeighting.weights (streaming, skip)"] = lambda: dro.weights(losses)
    kl_ctl = AdaptiveKLController()
    kl_ctl.nonfinite = "skip"
    kl = torch.tensor(0.3, device=dev)
    out["AdaptiveKL.update (tensor kl, skip)"] = lambda: kl_ctl.update(kl=kl, n_steps=32)
    return out


def _where(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "torchsteer" in f.filename]
    f = frames[-1] if frames else None
    return f"{Path(f.filename).name}:{f.lineno} {f.line}" if f else ""


def check_syncs(dev) -> dict:
    res = {}
    for name, step in parts(dev).items():
        try:
            for _ in range(3):
                step()
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    step()
                    torch.cuda.set_sync_debug_mode(0)
                    res[name] = {"syncs": 0}
                except RuntimeError as exc:
                    torch.cuda.set_sync_debug_mode(0)
                    res[name] = {"syncs": ">= 1", "first": str(exc)[:200], "at": _where(exc)}
            else:
                with SyncCounter() as c:
                    step()
                res[name] = {"syncs": c.total, "counted on": "cpu (SyncCounter)"}
        except Exception as exc:  # a part that fails here is a finding, not a crash
            torch.cuda.set_sync_debug_mode(0) if dev.startswith("cuda") else None
            res[name] = {"error": f"{type(exc).__name__}: {exc}"[:300], "at": _where(exc)}
        print(name, res[name], flush=True)
    return res


def _capture(step, warmup: int = 3):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def capture_mfac(dev, replays: int = 20) -> dict:
    d, gen = 4096, torch.Generator().manual_seed(1)
    grads = [torch.randn(d, generator=gen).to(dev) for _ in range(replays + 4)]
    twins = []
    for _ in range(2):
        p = torch.nn.Parameter(torch.zeros(d, device=dev))
        twins.append((p, MFAC([p], lr=1e-2, ngrads=8, nonfinite="skip", capturable=True)))
    (p_e, opt_e), (p_g, opt_g) = twins
    static = torch.zeros(d, device=dev)
    p_g.grad = static
    feed = iter(grads)
    static.copy_(next(feed))
    graph = _capture(opt_g.step)  # 3 warm-up steps and the captured one: 4 on grads[0]
    for _ in range(4):
        p_e.grad = grads[0].clone()
        opt_e.step()
    for g in list(feed)[:replays]:
        static.copy_(g)
        graph.replay()
        p_e.grad = g.clone()
        opt_e.step()
    torch.cuda.synchronize()
    return {"replays": replays, "max_abs_diff": float((p_g - p_e).abs().max())}


def capture_sven(dev, replays: int = 10) -> dict:
    batches = [data(dev, seed) for seed in range(replays + 1)]
    m_e, m_g = mlp(dev), mlp(dev)
    opt_e, opt_g = functional_sven(m_e), functional_sven(m_g)
    sx, sy = (t.clone() for t in batches[0])
    graph = _capture(lambda: opt_g.step(batch=(sx, sy)))
    for _ in range(4):
        opt_e.step(batch=batches[0])
    for x, y in batches[1:]:
        sx.copy_(x)
        sy.copy_(y)
        graph.replay()
        opt_e.step(batch=(x, y))
    torch.cuda.synchronize()
    diff = max(float((a - b).abs().max()) for a, b in zip(m_g.parameters(), m_e.parameters()))
    return {"replays": replays, "max_abs_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("/tmp/gpu_check"))
    args = ap.parse_args()
    dev = args.device
    if dev == "cpu":
        torch.set_num_threads(1)
    res = {"device": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"}
    res["torch"] = torch.__version__
    res["syncs"] = check_syncs(dev)
    res["capture"] = {}
    for name, fn in (
        ("MFAC (capturable, skip)", capture_mfac),
        ("Sven dense functional", capture_sven),
    ):
        if not dev.startswith("cuda"):
            res["capture"][name] = {"skipped": "CUDA graphs need a CUDA device"}
            continue
        try:
            res["capture"][name] = fn(dev)
        except Exception as exc:
            res["capture"][name] = {
                "error": f"{type(exc).__name__}: {exc}"[:300],
                "at": _where(exc),
            }
        print(name, res["capture"][name], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = dev.split(":")[0]
    (args.out / f"gpu_check_{tag}.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"# Issue 17 device checks on {res['device']} (torch {res['torch']})", ""]
    lines += ["| steady-state step | host syncs | where |", "|---|---|---|"]
    for name, r in res["syncs"].items():
        lines.append(f"| {name} | {r.get('syncs', r.get('error'))} | {r.get('at', '')} |")
    lines += ["", "| CUDA-graph capture | result |", "|---|---|"]
    for name, r in res["capture"].items():
        lines.append(f"| {name} | {json.dumps(r)} |")
    lines += ["", f"Command: `python benchmarks/gpu_check.py --device {dev} --out DIR`."]
    (args.out / f"gpu_check_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

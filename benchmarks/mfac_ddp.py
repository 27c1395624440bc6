"""M-FAC with the window sharded across DDP ranks: window memory per rank and step time, R = 1, 2.

Two gloo processes on this machine (``torch.multiprocessing``, localhost). Rank 0 also runs
the one-process arm: an ``MFAC(..., shard=False)`` over the same parameter, so that both arms
live in the same processes and are timed interleaved, round by round:

* ``R=1``: rank 0 steps the whole window (no collectives) while rank 1 waits at a barrier;
* ``R=2``: both ranks step the sharded window (each ``m x d/2``): ``G g`` partial products
  all-reduced (``m`` float64), each rank's slice of the update all-gathered (``d`` float32).

Each arm's window is filled with random rows (``GradientWindow.rebuild``: Gram and inverse from
the rows) before timing; every step then takes a fresh gradient (the same on both ranks, as
DDP makes it). Times are medians over rounds of ``--steps`` steps: ``time.process_time`` (the
CPU seconds of the rank) and wall clock (``time.perf_counter``, barrier to barrier, the time a
training step would take). One thread per rank. The collectives alone (one all-reduce of
``m`` float64 and one all-gather of ``d / R`` float32 per rank) are timed the same way.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/mfac_ddp.py            # d = 1e6, m = 256
    OMP_WAIT_POLICY=PASSIVE python benchmarks/mfac_ddp.py --quick    # d = 1e5, m = 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from torchsteer import distributed
from torchsteer.optim.mfac import MFAC

RESULTS = Path(__file__).resolve().parent / "results"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _filled(param: torch.nn.Parameter, m: int, shard: bool, seed: int) -> MFAC:
    """An MFAC whose window is full of random rows (Gram and inverse rebuilt from them)."""
    opt = MFAC([param], lr=1e-3, ngrads=m, damp=1e-5, shard=shard)
    param.grad = torch.zeros_like(param)
    param.grad[0] = 1.0
    opt.step()  # creates the window
    window = opt._window
    gen = torch.Generator().manual_seed(seed + distributed.rank())
    for start in range(0, m, 16):
        rows = window.grads[start : start + 16]
        rows.copy_(torch.randn(rows.shape, generator=gen)).div_(param.numel() ** 0.5)
    window.rebuild(block_size=max(16, 2**16 // m))
    return opt


def _timed(fn, steps: int) -> tuple[float, float]:
    """(process seconds, wall seconds) per call, barrier to barrier."""
    distributed.broadcast(torch.zeros(1))  # a barrier through the package's collectives
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(steps):
        fn()
    distributed.broadcast(torch.zeros(1))
    return (time.process_time() - cpu) / steps, (time.perf_counter() - wall) / steps


def _rank(rank: int, world: int, port: int, d: int, m: int, rounds: int, steps: int, out: str):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                             world_size=world)  # fmt: skip
    torch.manual_seed(0)
    grads = [torch.randn(d) / d**0.5 for _ in range(4)]  # the same on every rank
    sharded_param = torch.nn.Parameter(torch.zeros(d))
    sharded = _filled(sharded_param, m, shard=True, seed=1)
    whole = whole_param = None
    if rank == 0:
        whole_param = torch.nn.Parameter(torch.zeros(d))
        whole = _filled(whole_param, m, shard=False, seed=1)
    count = [0]

    def step(opt, param):
        param.grad = grads[count[0] % len(grads)]
        count[0] += 1
        opt.step()

    def noop():
        pass

    piece = torch.randn(-(-d // world))
    small = torch.randn(m, dtype=torch.float64)
    record = {"R=1": [], "R=2": [], "all_reduce_m": [], "all_gather_d": []}
    for _ in range(rounds):  # arms interleaved, round by round
        one = (lambda: step(whole, whole_param)) if rank == 0 else noop
        record["R=1"].append(_timed(one, steps))
        record["R=2"].append(_timed(lambda: step(sharded, sharded_param), steps))
        record["all_reduce_m"].append(_timed(lambda: distributed.all_reduce_sum(small), steps))
        record["all_gather_d"].append(_timed(lambda: distributed.all_gather(piece), steps))
    first = sharded_param
    result = {
        "rank": rank,
        "window_numel": sharded.state[first]["window_grads"].numel(),
        "window_bytes": sharded.state[first]["window_grads"].numel() * 4,
        "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "times": {
            k: {
                "cpu_s": statistics.median(c for c, _ in v),
                "wall_s": statistics.median(w for _, w in v),
                "rounds": [[c, w] for c, w in v],
            }
            for k, v in record.items()
        },
    }
    if whole is not None:
        result["whole_window_bytes"] = whole.state[whole_param]["window_grads"].numel() * 4
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(result, f)
    tdist.destroy_process_group()


def run(d: int, m: int, rounds: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        args = (2, _free_port(), d, m, rounds, steps, out)
        mp.spawn(_rank, args=args, nprocs=2)
        ranks = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(2)]
    return {"d": d, "m": m, "rounds": rounds, "steps_per_round": steps, "ranks": ranks}


def report(res: dict) -> str:
    d, m = res["d"], res["m"]
    r0, r1 = res["ranks"]
    t0, t1 = r0["times"], r1["times"]
    gb = 1e9
    cpu_ratio = max(t0["R=2"]["cpu_s"], t1["R=2"]["cpu_s"]) / t0["R=1"]["cpu_s"]
    lines = [
        f"# M-FAC, window sharded across DDP ranks (d = {d:.0e}, m = {m}, float32 window)",
        "",
        "Command: `OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/mfac_ddp.py"
        + ("" if d == 10**6 else " --quick")
        + "`",
        "",
        "| R | window per rank | step wall (median) | step CPU rank 0 | step CPU rank 1 |",
        "|---|---|---|---|---|",
        f"| 1 | {r0['whole_window_bytes'] / gb:.3f} GB | {t0['R=1']['wall_s'] * 1e3:.0f} ms "
        f"| {t0['R=1']['cpu_s'] * 1e3:.0f} ms | {t1['R=1']['cpu_s'] * 1e3:.0f} ms (waits) |",
        f"| 2 | {r0['window_bytes'] / gb:.3f} GB + {r1['window_bytes'] / gb:.3f} GB "
        f"| {t0['R=2']['wall_s'] * 1e3:.0f} ms | {t0['R=2']['cpu_s'] * 1e3:.0f} ms "
        f"| {t1['R=2']['cpu_s'] * 1e3:.0f} ms |",
        "",
        f"Collectives alone, per step at R = 2 (wall, median): all-reduce of m = {m} float64 "
        f"{t0['all_reduce_m']['wall_s'] * 1e3:.2f} ms; all-gather of d / 2 float32 per rank "
        f"{t0['all_gather_d']['wall_s'] * 1e3:.1f} ms.",
        f"Peak RSS: rank 0 {r0['maxrss_bytes'] / gb:.2f} GB (holds both arms), "
        f"rank 1 {r1['maxrss_bytes'] / gb:.2f} GB (the sharded arm only; the interpreter and "
        "torch take about 0.35 GB, the rebuild's float64 temporaries a little more).",
        "",
        f"CPU per rank and step at R = 2 is {cpu_ratio:.2f} of the one-process step (the "
        "two passes over the window "
        "split between the ranks; what is left is the all-gather and the replicated "
        "O(m^2) algebra). Wall clock per step at R = 2 is "
        f"{t0['R=2']['wall_s'] / t0['R=1']['wall_s']:.2f} of R = 1.",
        "",
        f"Medians over {res['rounds']} interleaved rounds of {res['steps_per_round']} steps, "
        "one thread per rank, gloo over localhost. This machine has 2 cores shared with "
        f"other jobs (1-minute load average {res['machine']['load_avg'][0]:.1f} at the end of "
        "this run), so the two ranks do not get a "
        "core each all the time: the R = 2 wall time is an upper bound of what two "
        "dedicated devices would see, and the CPU times are the work each rank does. The "
        "point of sharding is the memory column (exactly m d / R per rank); the step's two "
        "passes over the window halve per rank as well, and the added cost is the "
        "all-gather of the update (d numbers per step) plus one all-reduce of m numbers.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d = 1e5, m = 64")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    d, m = (10**5, 64) if args.quick else (10**6, 256)
    res = run(d, m, args.rounds, args.steps)
    res["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                      "torch": torch.__version__, "load_avg": os.getloadavg()}  # fmt: skip
    name = "mfac_ddp_quick" if args.quick else "mfac_ddp"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=1))
    (RESULTS / f"{name}.md").write_text(report(res))
    print(report(res))


if __name__ == "__main__":
    main()

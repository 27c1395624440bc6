"""Run a function on R CPU processes with the gloo backend and collect what each returns.

``run_ranks(fn, world_size=2, *args)`` spawns ``world_size`` processes
(``torch.multiprocessing``), initializes a gloo process group on a free localhost port,
calls ``fn(rank, world_size, *args)`` in each, and returns the list of results in rank order
(results travel through a temporary file per rank, via ``torch.save``). ``fn`` must be a
module-level function (it is pickled). An exception on any rank fails the call with that
rank's traceback.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_ranks"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, outdir, fn, args):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(1)
    # a bounded timeout: ranks that disagree on a collective fail the test instead of hanging
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        result = fn(rank, world_size, *args)
        _save({"ok": True, "result": result}, outdir, rank)
    except Exception:
        _save({"ok": False, "error": traceback.format_exc()}, outdir, rank)
        raise
    finally:
        dist.destroy_process_group()


def _save(record, outdir, rank) -> None:
    """Write a rank's record whole or not at all (a file that exists is complete)."""
    path = os.path.join(outdir, f"{rank}.pt")
    torch.save(record, path + ".tmp")
    os.replace(path + ".tmp", path)


def _records(outdir, world_size):
    paths = [os.path.join(outdir, f"{r}.pt") for r in range(world_size)]
    return [torch.load(p, weights_only=False) if os.path.exists(p) else None for p in paths]


def run_ranks(fn, world_size: int = 2, *args):
    """``[fn(0, R, *args), ..., fn(R-1, R, *args)]`` computed on R gloo processes."""
    with tempfile.TemporaryDirectory() as outdir:
        try:
            mp.spawn(_worker, args=(world_size, free_port(), outdir, fn, args), nprocs=world_size)
        except Exception as exc:  # report the rank's own traceback
            records = _records(outdir, world_size)
            # gloo can abort a process in its teardown (destroy_process_group: "terminate
            # called without an active exception", SIGABRT) on a loaded machine, after every
            # rank returned and wrote its whole record: the function ran; its results stand
            teardown = getattr(exc, "signal_name", None) == "SIGABRT"
            if teardown and all(rec is not None and rec["ok"] for rec in records):
                return [rec["result"] for rec in records]
            msgs = [
                f"rank {r}:\n{rec['error']}"
                for r, rec in enumerate(records)
                if rec is not None and not rec["ok"]
            ]
            raise AssertionError("\n".join(msgs) or str(exc)) from exc
        return [rec["result"] for rec in _records(outdir, world_size)]

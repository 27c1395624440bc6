"""Host synchronizations of each Sven step, by path (issue 17), counted on CPU.

``tests/_sync.py`` counts the Python-level calls that would make the host wait for a GPU
during each of 7 consecutive steps (functional path, MLP 8-16-3, B = 32, rank 8), for the
dense exact path with ``nonfinite="skip"`` / ``"raise"``, with momentum, ``kappa = 1``, the
randomized dense path, ``param_fraction = 0.5`` and the matrix-free path. Calls made in
torch's C++ code are not seen (``torch.linalg.eigh`` checks its error code on a GPU).
Usage: ``python benchmarks/sven_sync_paths.py``; writes
``benchmarks/results/sven_sync_paths.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests._sync import SyncCounter  # noqa: E402

from torchsteer.optim import Sven  # noqa: E402

ARMS = {
    "dense exact, skip": dict(jacobian="dense", nonfinite="skip"),
    "dense exact, raise": dict(jacobian="dense"),
    "dense exact, skip, momentum 0.5": dict(jacobian="dense", nonfinite="skip", momentum=0.5),
    "dense exact, skip, kappa 1": dict(jacobian="dense", nonfinite="skip", kappa=1.0),
    "dense randomized, skip": dict(jacobian="dense", svd="randomized", nonfinite="skip"),
    "dense exact, skip, param_fraction 0.5": dict(
        jacobian="dense", nonfinite="skip", param_fraction=0.5
    ),
    "matrix-free, skip": dict(jacobian="matrix_free", nonfinite="skip"),
}


def ce(o, t):
    return F.cross_entropy(o, t, reduction="none")


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    lines = [
        "# Sven: host synchronizations per step, by path (counted on CPU)",
        "",
        "`python benchmarks/sven_sync_paths.py`: steps 1-7 of the functional path, MLP",
        "8-16-3, B = 32, rank 8 (tests/_sync.py; nothing here was measured on a GPU).",
        "",
        "| path | syncs at steps 1..7 |",
        "|---|---|",
    ]
    for name, kwargs in ARMS.items():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        opt = Sven(model.parameters(), lr=0.1, rank=8, model=model, loss_fn=ce, **kwargs)
        per = []
        for _ in range(7):
            with SyncCounter() as c:
                opt.step(batch=(x, y))
            per.append(c.total)
        lines.append(f"| {name} | {' '.join(map(str, per))} |")
    text = "\n".join(lines) + "\n"
    (Path(__file__).parent / "results" / "sven_sync_paths.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

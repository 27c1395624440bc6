"""Before/after probe of the radius limiter's result on a small GPT (the reuse path).

Five limited Adam steps of ``RadiusLimiter(model, r_max=0.5)`` on a 2-layer GPT (vocabulary
97, width 32, tied head, B x T = 4 x 16, math attention); saves the parameters and the
signals. Run it with two source trees and compare the files::

    PYTHONPATH=/path/to/old/src python benchmarks/limiter_probe.py before.pt [float64]
    PYTHONPATH=src python benchmarks/limiter_probe.py after.pt [float64]
    python benchmarks/limiter_probe.py --compare before.pt after.pt

Same thread count for both runs (float32 products are bitwise only then).
"""

import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from torchsteer.bench.gpt import GPT, GPTConfig
from torchsteer.control.radius import RadiusLimiter


def run(path: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, context=16, n_layer=2, n_head=2, width=32, tie_weights=True)
    m = GPT(cfg).to(dtype)
    tok = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(1))
    x, y = tok[:, :-1].contiguous(), tok[:, 1:].contiguous()
    opt = torch.optim.Adam(m.parameters(), lr=3e-2)
    lim = RadiusLimiter(m, r_max=0.5)
    rs = []
    with sdpa_kernel([SDPBackend.MATH]):
        for _ in range(5):
            opt.zero_grad()
            F.cross_entropy(m(x).reshape(-1, 97), y.reshape(-1)).backward()
            lim.step(opt, x)
            rs.append(dict(lim.signals))
    print("reused", lim.reused, [r["r"] for r in rs], [r["limited"] for r in rs])
    torch.save({"params": [p.detach().clone() for p in m.parameters()], "rs": rs}, path)


def compare(a_path: str, b_path: str) -> None:
    a, b = torch.load(a_path), torch.load(b_path)
    bit = all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    diff = max((x - y).abs().max().item() for x, y in zip(a["params"], b["params"]))
    rel = max(abs(p["r"] - q["r"]) / p["r"] for p, q in zip(a["rs"], b["rs"]))
    print(f"parameters bitwise: {bit}, max |diff| {diff:.3g}, max relative r diff {rel:.3g}")


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        run(sys.argv[1], getattr(torch, sys.argv[2]) if len(sys.argv) > 2 else torch.float32)

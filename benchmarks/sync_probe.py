"""Before/after probe of the sync-free parts (issue 17): the same seeded steps on two
checkouts, the results compared bit for bit.

Usage: ``PYTHONPATH=<checkout>/src python benchmarks/sync_probe.py OUT.pt`` on each checkout,
then ``python benchmarks/sync_probe.py --compare A.pt B.pt`` (prints, per case, ``bitwise``
or the largest relative difference). Small CPU models, one thread.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

torch.set_num_threads(1)
F = nn.functional


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def _data(seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 8, generator=g).to(dtype), torch.randint(0, 3, (32,), generator=g)


def _flat(model):
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def limiter_cases():
    from torchsteer.control import RadiusLimiter

    out = {}
    x, y = _data()
    adam = lambda p: torch.optim.Adam(p, lr=0.05)  # noqa: E731
    for name, make, nonfinite, mode, bad in (
        ("limiter adam raise limit", adam, "raise", "limit", None),
        ("limiter sgd skip limit nan@3",
         lambda p: torch.optim.SGD(p, lr=2.0, momentum=0.9), "skip", "limit", 3),
        ("limiter adam skip rho_set", adam, "skip", "rho_set", None),
        ("limiter sgd raise monitor",
         lambda p: torch.optim.SGD(p, lr=1.0), "raise", "monitor", None),
    ):  # fmt: skip
        model = _mlp()
        opt = make(model.parameters())
        lim = RadiusLimiter(model, r_max=0.05, nonfinite=nonfinite, mode=mode)
        rs = []
        for i in range(8):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if i == bad:
                model[2].weight.grad[0, 0] = float("nan")
            lim.step(opt, x)
            rs.append(lim.last["r"])
        out[name] = torch.cat([_flat(model), torch.tensor(rs, dtype=torch.float32)])
    # two optimizers in one step, the per-tensor path
    model = _mlp()
    a = torch.optim.SGD(model[0].parameters(), lr=3.0)
    b = torch.optim.Adam(model[2].parameters(), lr=0.1)
    lim = RadiusLimiter(model, r_max=0.05)
    for _ in range(5):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        lim.before_step(a, x)
        a.step()
        lim.before_step(b, x)
        b.step()
        lim.after_step(x)
    out["limiter two optimizers"] = _flat(model)
    return out


def newton_cases():
    from torchsteer.optim import RegularizedNewton

    out = {}
    x, y = _data(dtype=torch.float64)
    for name, kw in (
        ("newton hessian cg", dict(curvature="hessian", solver="cg", cg_maxiter=10)),
        ("newton hessian cg sqrt", dict(curvature="hessian", regularization="sqrt", gamma0=30.0)),
        ("newton gauss_newton", dict(curvature="gauss_newton")),
        ("newton dense cholesky", dict(curvature="dense")),
    ):
        model = _mlp(dtype=torch.float64)
        opt = RegularizedNewton(model.parameters(), **kw)
        gn = kw["curvature"] == "gauss_newton"

        def closure(model=model, gn=gn):
            z = model(x)
            return (F.cross_entropy(z, y), z) if gn else F.cross_entropy(z, y)

        for _ in range(5):
            opt.step(closure)
        out[name] = _flat(model)
    from torchsteer.linalg import conjugate_gradient

    g = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    A = q @ torch.diag(torch.logspace(0, 3, 30, dtype=torch.float64)) @ q.T
    b = torch.randn(30, generator=g, dtype=torch.float64)
    out["cg"] = conjugate_gradient(lambda v: A @ v, b, tol=1e-10).x
    return out


def control_cases():
    from torchsteer.control import DROWeighting
    from torchsteer.control.kl import AdaptiveKLController, PIDKLController

    out = {}
    g = torch.Generator().manual_seed(3)
    batches = [torch.rand(32, generator=g) * 4 for _ in range(6)]
    for mode in ("batch", "streaming"):
        dro = DROWeighting(temperature=0.3, mode=mode, momentum=0.2)
        out[f"dro {mode}"] = torch.cat([dro.weights(b) for b in batches])
    for name, ctl in (
        ("adaptive kl (tensor)", AdaptiveKLController(target=0.2, horizon=100)),
        ("pid kl (tensor)", PIDKLController(target=0.2, kd=0.3, entropy_floor=1.0)),
    ):
        coefs = []
        for i in range(12):
            kl = torch.tensor(0.05 * i, dtype=torch.float64)
            coefs.append(float(ctl.update(kl=kl, entropy=torch.tensor(1.5 - 0.1 * i), n_steps=64)))
        out[name] = torch.tensor(coefs, dtype=torch.float64)
    return out


def main() -> None:
    if sys.argv[1] == "--compare":
        a, b = torch.load(sys.argv[2]), torch.load(sys.argv[3])
        for k in a:
            x, y = a[k].double(), b[k].double()
            same = a[k].shape == b[k].shape and bool(
                ((a[k] == b[k]) | (a[k].isnan() & b[k].isnan())).all()
            )
            rel = ((x - y).abs().max() / x.abs().max().clamp(min=1e-300)).item()
            print(f"| {k} | {'bitwise' if same else f'max rel diff {rel:.1e}'} |")
        return
    import torchsteer

    print("torchsteer from", torchsteer.__file__)
    torch.save({**limiter_cases(), **newton_cases(), **control_cases()}, sys.argv[1])


if __name__ == "__main__":
    main()

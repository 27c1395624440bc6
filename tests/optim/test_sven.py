"""Sven against float64 oracles: linear least squares, numpy SVD, Polyak step, reductions."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from torchsteer.optim.sven import Sven

from .._autograd import NaNGrad
from .._lightning import trainer as quiet_trainer

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def linear_problem(B, P, seed=0):
    X = torch.randn(B, P, generator=gen(seed), dtype=F64)
    y = torch.randn(B, generator=gen(seed + 1), dtype=F64)
    theta = torch.randn(P, generator=gen(seed + 2), dtype=F64).requires_grad_(True)
    return X, y, theta


def sq_closure(X, y, theta, scale=1.0):
    return lambda: scale * (X @ theta - y) ** 2


def mlp(seed=0, dtype=F64, widths=(3, 6, 2)):
    torch.manual_seed(seed)
    layers = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def per_sample(out, y):
    return ((out - y) ** 2).sum(dim=1)


def batch(B, seed=0, dtype=F64, d_in=3, d_out=2):
    x = torch.randn(B, d_in, generator=gen(seed + 10), dtype=F64).to(dtype)
    y = torch.randn(B, d_out, generator=gen(seed + 11), dtype=F64).to(dtype)
    return x, y


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def residual_jacobian(model, x, y, kappa):
    """Oracle: R = l^(kappa/2) and M = dR/dtheta by jacrev in float64 (B, P)."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def R(q):
        return per_sample(functional_call(model, q, (x,)), y) ** (kappa / 2)

    jac = jacrev(R)(params)
    M = torch.cat([jac[n].reshape(x.shape[0], -1) for n in names], dim=1)
    return R(params).detach(), M


def truncated_step(M, R, rank, rtol):
    """Oracle: sum over kept triplets of numpy's SVD of V_i u_i^T R / s_i."""
    U, s, Vt = np.linalg.svd(M.numpy(), full_matrices=False)
    keep = [i for i in range(min(rank, len(s))) if s[i] > rtol * s[0] and s[i] > 0]
    d = sum(Vt[i] * (U[:, i] @ R.numpy()) / s[i] for i in keep)
    return torch.as_tensor(d), s, keep


PATHS = [
    dict(jacobian="dense", svd="exact"),
    dict(jacobian="matrix_free", svd="exact"),
    dict(jacobian="dense", svd="randomized", oversample=20),
]


# ---------------------------------------------------------------- linear least squares
@pytest.mark.parametrize("path", PATHS)
def test_underdetermined_kappa1_interpolates_with_the_minimum_norm_step(path):
    X, y, theta = linear_problem(6, 15)
    t0 = theta.detach().clone()
    opt = Sven([theta], lr=1.0, rank=6, rtol=0.0, kappa=1.0, **path)
    opt.step(sq_closure(X, y, theta))
    r = (X @ t0 - y).numpy()
    Xn = X.numpy()
    min_norm = -Xn.T @ np.linalg.solve(Xn @ Xn.T, r)
    np.testing.assert_allclose((theta.detach() - t0).numpy(), min_norm, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose((X @ theta.detach() - y).numpy(), 0.0, atol=1e-10)


@pytest.mark.parametrize("path", PATHS[:2])
def test_overdetermined_kappa1_lands_on_the_least_squares_optimum(path):
    X, y, theta = linear_problem(20, 5)
    opt = Sven([theta], lr=1.0, rank=5, rtol=0.0, kappa=1.0, **path)
    opt.step(sq_closure(X, y, theta))
    lstsq = np.linalg.lstsq(X.numpy(), y.numpy(), rcond=None)[0]
    np.testing.assert_allclose(theta.detach().numpy(), lstsq, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kappa", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("lr", [0.3, 1.0])
def test_residuals_contract_by_one_minus_lr_over_kappa(kappa, lr):
    X, y, theta = linear_problem(5, 12, seed=3)
    y = y + 3.0  # residuals away from 0: kappa = 3 scales rows by 3 e^2
    e0 = (X @ theta - y).detach()
    opt = Sven([theta], lr=lr, rank=5, rtol=0.0, kappa=kappa, jacobian="dense")
    opt.step(sq_closure(X, y, theta))
    e1 = (X @ theta - y).detach()
    torch.testing.assert_close(e1, (1 - lr / kappa) * e0, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------- nonlinear oracles
@pytest.mark.parametrize("kappa", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("c", [1e-3, 7.0])
def test_loss_scale_leaves_the_step_unchanged(kappa, c):
    x, y = batch(8)
    steps = []
    for scale in (1.0, c):
        model = mlp()
        t0 = flat(model)
        opt = Sven(model.parameters(), lr=0.5, rank=5, rtol=1e-2, kappa=kappa, svd="exact")
        opt.step(lambda m=model, s=scale: s * per_sample(m(x), y))
        steps.append(flat(model) - t0)
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kappa", [1.0, 2.0])
@pytest.mark.parametrize("rank,rtol,cut", [(3, 0.0, True), (8, 0.05, True), (20, 1e-3, False)])
def test_truncated_step_and_records_match_numpy_svd(kappa, rank, rtol, cut):
    x, y = batch(10, seed=1)
    model = mlp(seed=1)
    R, M = residual_jacobian(model, x, y, kappa)
    d, s, keep = truncated_step(M, R, rank, rtol)
    assert 0 < len(keep) and (len(keep) < 10) == cut  # the cut is active or not, as meant
    t0 = flat(model)
    opt = Sven(model.parameters(), lr=0.7, rank=rank, rtol=rtol, kappa=kappa, svd="exact")
    opt.step(lambda: per_sample(model(x), y))
    torch.testing.assert_close(flat(model) - t0, -0.7 * d, rtol=1e-8, atol=1e-11)
    st = opt.state[next(model.parameters())]
    assert st["kept_rank"].item() == len(keep)
    assert st["sigma_max"].item() == pytest.approx(s[0], rel=1e-10)
    assert st["sigma_min"].item() == pytest.approx(s[keep[-1]], rel=1e-8)
    lin = np.linalg.norm(R.numpy() - M.numpy() @ d.numpy()) / np.linalg.norm(R.numpy())
    assert st["linearized_reduction"].item() == pytest.approx(1 - lin, rel=1e-8, abs=1e-10)


def test_single_sample_is_the_polyak_step():
    x, y = batch(1, seed=2)
    for kappa in (1.0, 2.0):
        model = mlp(seed=2)
        loss = per_sample(model(x), y).sum()
        g = torch.autograd.grad(loss, list(model.parameters()))
        g = torch.cat([t.reshape(-1) for t in g])
        t0 = flat(model)
        opt = Sven(model.parameters(), lr=0.3, rank=1, rtol=0.0, kappa=kappa)
        opt.step(lambda m=model: per_sample(m(x), y))
        polyak = -0.3 * (2 / kappa) * loss.detach() * g / g.dot(g)
        torch.testing.assert_close(flat(model) - t0, polyak, rtol=1e-10, atol=1e-13)


def spectrum_with_gap(B, P, k, seed):
    U = torch.linalg.qr(torch.randn(B, B, generator=gen(seed), dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(P, B, generator=gen(seed + 1), dtype=F64)).Q
    s = torch.cat([torch.linspace(10, 4, k, dtype=F64), 0.2 * torch.rand(B - k, generator=gen(2))])
    return (U * s) @ V.T


@pytest.mark.parametrize(
    "path",
    [
        dict(jacobian="matrix_free", svd="randomized"),
        dict(jacobian="dense", svd="randomized"),
        dict(jacobian="matrix_free", svd="exact"),
    ],
)
def test_randomized_and_matrix_free_recover_the_exact_truncated_step_with_a_gap(path):
    k = 8
    X = spectrum_with_gap(40, 120, k, seed=4)
    y = torch.randn(40, generator=gen(5), dtype=F64)
    steps = []
    for kw in (dict(jacobian="dense", svd="exact"), path):
        theta = torch.zeros(120, dtype=F64, requires_grad=True)
        opt = Sven([theta], lr=1.0, rank=k, rtol=0.0, kappa=1.0, seed=0, **kw)
        opt.step(sq_closure(X, y, theta))
        steps.append(theta.detach().clone())
    d, _, _ = truncated_step(X * torch.sign(-y).unsqueeze(1), y.abs(), k, 0.0)
    torch.testing.assert_close(steps[0], -d, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("jac", ["dense", "matrix_free"])
def test_functional_path_equals_graph_path(jac):
    x, y = batch(9, seed=6)
    results = []
    for functional in (False, True):
        model = mlp(seed=6)
        kw = dict(model=model, loss_fn=per_sample) if functional else {}
        opt = Sven(model.parameters(), lr=0.5, rank=6, jacobian=jac, svd="exact", **kw)
        for n in (9, 4, 9):  # a short batch in between: the reused Jacobian buffer's rows
            if functional:
                opt.step(batch=(x[:n], y[:n]))
            else:
                opt.step(lambda m=model, n=n: per_sample(m(x[:n]), y[:n]))
        results.append(flat(model))
    torch.testing.assert_close(results[1], results[0], rtol=1e-9, atol=1e-12)


class Scale(nn.Module):
    """A parameterized module expanded weights do not know: the functional path uses vmap."""

    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, n, dtype=F64))

    def forward(self, t):
        return t * self.w


@pytest.mark.parametrize("kind", ["linear", "layernorm", "custom"])
@pytest.mark.parametrize("unreduced", [False, True])
def test_functional_jacobian_rows_are_per_sample_gradients(kind, unreduced):
    """Outer products (Linear only), expanded weights (LayerNorm), vmap (a custom module)."""
    from torchsteer.jacobian.per_sample import linear_per_sample_jacobian, per_sample_jacobian

    x, y = batch(5, seed=16)
    model = mlp(seed=16)
    if kind == "custom":
        model = nn.Sequential(*model, Scale(2))
    elif kind == "layernorm":
        model = nn.Sequential(*model, nn.LayerNorm(2, dtype=F64))
        with torch.no_grad():
            model[-1].weight.uniform_(0.5, 1.5, generator=gen(3))
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    named = dict(model.named_parameters())
    P = sum(p.numel() for p in named.values())
    out = torch.full((5, P), float("nan"), dtype=F64)  # a reused buffer: every entry rewritten
    used = linear_per_sample_jacobian(model, per_sample, x, y, named) is not None
    assert used == (kind == "linear")

    def loss_fn(o, t):  # (B, 2) entries are summed per sample
        return (o - t) ** 2 if unreduced else per_sample(o, t)

    with torch.no_grad():
        losses, M = per_sample_jacobian(model, loss_fn, x, y, named, out=out, return_values=True)
    _, oracle = residual_jacobian(model, x, y, 2.0)
    assert M is out  # every path writes the buffer
    torch.testing.assert_close(M, oracle, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(losses, per_sample(model(x), y).detach(), rtol=1e-13, atol=0)
    for p in model.parameters():  # .grad untouched, no grad_sample left behind
        assert torch.equal(p.grad, torch.full_like(p, 3.0)) and not hasattr(p, "grad_sample")


def test_microbatch_averages_losses_over_groups():
    x, y = batch(12, seed=7)
    a, b = mlp(seed=7), mlp(seed=7)
    opt_a = Sven(a.parameters(), lr=0.5, rank=4, microbatch_size=4, kappa=1.0)
    opt_b = Sven(b.parameters(), lr=0.5, rank=4, kappa=1.0)
    opt_a.step(lambda: per_sample(a(x), y))
    opt_b.step(lambda: per_sample(b(x), y).reshape(3, 4).mean(1))
    torch.testing.assert_close(flat(a), flat(b), rtol=1e-10, atol=1e-12)


def test_param_fraction_steps_only_a_random_subset_with_the_subset_solution():
    x, y = batch(6, seed=8)
    model = mlp(seed=8)
    R, M = residual_jacobian(model, x, y, 2.0)
    P = M.shape[1]
    cols = torch.randperm(P, generator=gen(11))[: int(np.ceil(0.4 * P))].sort().values
    d, _, _ = truncated_step(M[:, cols], R, 6, 1e-3)
    t0 = flat(model)
    opt = Sven(model.parameters(), lr=0.5, rank=6, param_fraction=0.4, seed=11, svd="exact")
    opt.step(lambda: per_sample(model(x), y))
    expected = t0.clone()
    expected[cols] -= 0.5 * d
    torch.testing.assert_close(flat(model), expected, rtol=1e-9, atol=1e-12)


def test_param_groups_share_one_solve_with_their_own_lr():
    x, y = batch(7, seed=9)
    a, b = mlp(seed=9), mlp(seed=9)
    t0 = flat(a)
    groups = [{"params": list(a[0].parameters()), "lr": 0.2}, {"params": list(a[2].parameters())}]
    Sven(groups, lr=0.9, rank=5).step(lambda: per_sample(a(x), y))
    Sven(b.parameters(), lr=1.0, rank=5).step(lambda: per_sample(b(x), y))
    d = t0 - flat(b)
    n0 = sum(p.numel() for p in a[0].parameters())
    lrs = torch.cat(
        [torch.full((n0,), 0.2, dtype=F64), torch.full((d.numel() - n0,), 0.9, dtype=F64)]
    )
    torch.testing.assert_close(flat(a), t0 - lrs * d, rtol=1e-10, atol=1e-12)


def test_momentum_is_heavy_ball_on_the_direction():
    x, y = batch(7, seed=12)
    model = mlp(seed=12)
    opt = Sven(model.parameters(), lr=0.3, rank=5, momentum=0.5)
    buf = None
    for _ in range(3):
        before = flat(model)
        probe = copy.deepcopy(model)  # the plain direction at the current point
        Sven(probe.parameters(), lr=1.0, rank=5).step(lambda p=probe: per_sample(p(x), y))
        d = before - flat(probe)
        buf = d if buf is None else 0.5 * buf + d
        opt.step(lambda: per_sample(model(x), y))
        torch.testing.assert_close(flat(model), before - 0.3 * buf, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- safeguards: damping, trust region
def damped_step(M, R, rank, rtol, mu):
    """Oracle: numpy SVD, sum over kept triplets of V_i s_i / (s_i^2 + mu s_0^2) u_i^T R."""
    U, s, Vt = np.linalg.svd(M.numpy(), full_matrices=False)
    keep = [i for i in range(min(rank, len(s))) if s[i] > rtol * s[0] and s[i] > 0]
    lam = mu * s[0] ** 2
    d = sum(Vt[i] * (U[:, i] @ R.numpy()) * s[i] / (s[i] ** 2 + lam) for i in keep)
    return torch.as_tensor(d), keep


DAMPED_PATHS = [
    dict(jacobian="dense", svd="exact"),
    dict(jacobian="matrix_free", svd="exact"),
    dict(jacobian="dense", svd="randomized", oversample=20, power_iters=3),
]


@pytest.mark.parametrize("path", DAMPED_PATHS)
@pytest.mark.parametrize("kappa", [1.0, 2.0])
@pytest.mark.parametrize("rank,rtol", [(10, 0.0), (4, 1e-3)])
def test_damping_filters_the_kept_triplets_like_levenberg_marquardt(path, kappa, rank, rtol):
    x, y = batch(10, seed=21)
    model = mlp(seed=21)
    R, M = residual_jacobian(model, x, y, kappa)
    mu = 1e-2
    d, keep = damped_step(M, R, rank, rtol, mu)
    if rank == 10 and rtol == 0.0:  # full rank: the closed form M^T (M M^T + lam I)^-1 R
        lam = mu * torch.linalg.matrix_norm(M, ord=2) ** 2
        lm = M.T @ torch.linalg.solve(M @ M.T + lam * torch.eye(10, dtype=F64), R)
        torch.testing.assert_close(d, lm, rtol=1e-9, atol=1e-12)
    t0 = flat(model)
    opt = Sven(model.parameters(), lr=0.6, rank=rank, rtol=rtol, kappa=kappa, damping=mu, **path)
    opt.step(lambda: per_sample(model(x), y))
    tol = dict(rtol=1e-8, atol=1e-11) if path["svd"] == "exact" else dict(rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(flat(model) - t0, -0.6 * d, **tol)
    st = opt.state[next(model.parameters())]
    assert st["kept_rank"].item() == len(keep)
    lin = np.linalg.norm(R.numpy() - M.numpy() @ d.numpy()) / np.linalg.norm(R.numpy())
    assert st["linearized_reduction"].item() == pytest.approx(1 - lin, rel=1e-6, abs=1e-9)


def test_damping_on_the_tall_gram_is_ridge_regression():
    X, y, theta = linear_problem(20, 5, seed=22)  # B > P: the P x P Gram path
    t0 = theta.detach().clone()
    mu = 0.05
    opt = Sven([theta], lr=1.0, rank=5, rtol=0.0, kappa=1.0, damping=mu, svd="exact")
    opt.step(sq_closure(X, y, theta))
    r = X @ t0 - y
    M = X * torch.sign(r).unsqueeze(1)  # R = |r|, dR/dtheta = sign(r) x
    lam = mu * torch.linalg.matrix_norm(M, ord=2) ** 2
    ridge = torch.linalg.solve(M.T @ M + lam * torch.eye(5, dtype=F64), M.T @ r.abs())
    torch.testing.assert_close(theta.detach(), t0 - ridge, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("c", [1e-3, 7.0])
def test_damping_keeps_the_loss_scale_invariance(c):
    x, y = batch(8)
    steps = []
    for scale in (1.0, c):
        model = mlp()
        t0 = flat(model)
        opt = Sven(model.parameters(), lr=0.5, rank=6, rtol=1e-3, damping=1e-3, svd="exact")
        opt.step(lambda m=model, s=scale: s * per_sample(m(x), y))
        steps.append(flat(model) - t0)
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cap", [1e-3, 1e3])
def test_max_step_norm_scales_the_step_onto_the_trust_region(cap):
    x, y = batch(7, seed=23)
    a, b = mlp(seed=23), mlp(seed=23)
    t0 = flat(a)
    groups = [{"params": list(a[0].parameters()), "lr": 0.2}, {"params": list(a[2].parameters())}]
    Sven(groups, lr=0.9, rank=5, max_step_norm=cap).step(lambda: per_sample(a(x), y))
    Sven(b.parameters(), lr=1.0, rank=5).step(lambda: per_sample(b(x), y))
    d = t0 - flat(b)  # the spec's direction
    n0 = sum(p.numel() for p in a[0].parameters())
    lrs = torch.cat(
        [torch.full((n0,), 0.2, dtype=F64), torch.full((d.numel() - n0,), 0.9, dtype=F64)]
    )
    full = lrs * d
    assert (full.norm() > cap) == (cap < 1)  # the cap is active in one case only
    expected = full * min(1.0, cap / full.norm().item())
    torch.testing.assert_close(t0 - flat(a), expected, rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------- state and errors
def run_steps(model, opt, x, y, n):
    for _ in range(n):
        opt.step(lambda: per_sample(model(x), y))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("jac", ["dense", "matrix_free"])
def test_resume_continues_bit_for_bit(dtype, jac):
    x, y = batch(10, seed=13, dtype=dtype)
    kw = dict(
        lr=0.3,
        rank=4,
        svd="randomized",
        oversample=2,
        power_iters=1,
        jacobian=jac,
        param_fraction=0.6,
        microbatch_size=2,
        momentum=0.5,
        seed=5,
    )
    model = mlp(seed=13, dtype=dtype)
    groups = [{"params": list(model[0].parameters()), "lr": 0.1}, {"params": model[2].parameters()}]
    opt = Sven(groups, **kw)
    run_steps(model, opt, x, y, 3)
    saved = copy.deepcopy(opt.state_dict())
    clone = copy.deepcopy(model)
    groups2 = [
        {"params": list(clone[0].parameters()), "lr": 0.7},
        {"params": clone[2].parameters()},
    ]
    opt2 = Sven(groups2, **{**kw, "seed": 99})
    opt2.load_state_dict(saved)
    run_steps(model, opt, x, y, 3)
    run_steps(clone, opt2, x, y, 3)
    torch.testing.assert_close(flat(clone), flat(model), rtol=0, atol=0)
    st, st2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for i in st:
        for key in st[i]:
            torch.testing.assert_close(st2[i][key], st[i][key], rtol=0, atol=0)


def test_float32_parameters_with_a_float64_gram_match_the_float64_oracle():
    x, y = batch(10, seed=17)
    model = mlp(seed=17, dtype=torch.float32)
    ref = copy.deepcopy(model).double()
    R, M = residual_jacobian(ref, x, y, 2.0)
    d, _, _ = truncated_step(M, R, 10, 1e-3)
    t0 = flat(model)
    opt = Sven(model.parameters(), lr=1.0, rank=10, gram_dtype=F64)
    opt.step(lambda: per_sample(model(x.float()), y.float()))
    torch.testing.assert_close((flat(model) - t0).double(), -d, rtol=1e-3, atol=1e-4)


def test_bf16_parameters_use_fp32_algebra_and_keep_fp32_state():
    x, y = batch(8, seed=14)
    ref, low = mlp(seed=14), mlp(seed=14).to(torch.bfloat16)
    with torch.no_grad():
        for pr, pl in zip(ref.parameters(), low.parameters()):
            pr.copy_(pl.double())
    opt_r = Sven(ref.parameters(), lr=0.05, rank=4, momentum=0.5)
    opt_l = Sven(low.parameters(), lr=0.05, rank=4, momentum=0.5)
    opt_r.step(lambda: per_sample(ref(x), y))
    opt_l.step(lambda: per_sample(low(x.bfloat16()), y.bfloat16()))
    buf = opt_l.state[next(low.parameters())]["momentum_buffer"]
    assert buf.dtype == torch.float32
    torch.testing.assert_close(flat(low).double(), flat(ref), rtol=0.05, atol=0.02)
    opt_l2 = Sven(copy.deepcopy(low).parameters(), lr=0.05, rank=4, momentum=0.5)
    opt_l2.load_state_dict(copy.deepcopy(opt_l.state_dict()))
    buf2 = opt_l2.state[opt_l2.param_groups[0]["params"][0]]["momentum_buffer"]
    assert buf2.dtype == torch.float32
    torch.testing.assert_close(buf2, buf, rtol=0, atol=0)


@pytest.mark.parametrize("where", ["loss", "jacobian"])
@pytest.mark.parametrize(
    "jac,svd", [("dense", "exact"), ("dense", "randomized"), ("matrix_free", "randomized")]
)
@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_nonfinite_leaves_parameters_and_state_untouched(where, jac, svd, mode):
    x, y = batch(6, seed=15)
    model = mlp(seed=15)
    opt = Sven(
        model.parameters(),
        lr=0.5,
        rank=4,
        jacobian=jac,
        svd=svd,
        nonfinite=mode,
        momentum=0.5,
        seed=1,
    )
    run_steps(model, opt, x, y, 2)
    before, saved = flat(model), copy.deepcopy(opt.state_dict())

    def bad():
        losses = per_sample(model(x), y)
        if where == "loss":
            return losses * torch.tensor([1.0, float("nan"), 1, 1, 1, 1], dtype=F64)
        return per_sample(NaNGrad.apply(model(x)), y)

    if mode == "raise":
        with pytest.raises(ValueError, match="NaN or Inf"):
            opt.step(bad)
    else:
        opt.step(bad)
    assert torch.equal(flat(model), before)
    now = opt.state_dict()["state"]
    for i in saved["state"]:
        for key, value in saved["state"][i].items():
            expected = value + (1 if key == "skipped_steps" and mode == "skip" else 0)
            torch.testing.assert_close(now[i][key], expected, rtol=0, atol=0)
    # and the next good step is the one the run would have taken without the bad batch
    clone = copy.deepcopy(model)
    opt2 = Sven(clone.parameters(), lr=0.5, rank=4, jacobian=jac, svd=svd, momentum=0.5)
    opt2.load_state_dict(saved)
    run_steps(model, opt, x, y, 1)
    run_steps(clone, opt2, x, y, 1)
    assert torch.equal(flat(model), flat(clone))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"lr": -0.1}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"rtol": 1.0}, "rtol"),
        ({"rtol": -1e-3}, "rtol"),
        ({"kappa": 0.0}, "kappa"),
        ({"svd": "full"}, "svd"),
        ({"jacobian": "sparse"}, "jacobian"),
        ({"oversample": -1}, "oversample"),
        ({"power_iters": -1}, "power_iters"),
        ({"param_fraction": 0.0}, "param_fraction"),
        ({"param_fraction": 1.5}, "param_fraction"),
        ({"microbatch_size": 0}, "microbatch_size"),
        ({"momentum": 1.0}, "momentum"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"memory_budget": 0}, "memory_budget"),
        ({"gram_dtype": torch.int64}, "gram_dtype"),
        ({"damping": -1e-3}, "damping"),
        ({"damping": float("nan")}, "damping"),
        ({"max_step_norm": 0.0}, "max_step_norm"),
        ({"max_step_norm": float("inf")}, "max_step_norm"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        Sven(mlp().parameters(), **kwargs)


def test_bad_closures_raise_clear_errors_and_change_nothing():
    x, y = batch(4)
    model = mlp()
    opt = Sven(model.parameters())
    before = flat(model)
    with pytest.raises(ValueError, match=r"per-sample loss vector of shape \(B,\).*scalar"):
        opt.step(lambda: per_sample(model(x), y).mean())
    with pytest.raises(ValueError, match="Invalid closure"):
        opt.step()
    with pytest.raises(ValueError, match="autograd graph"):
        opt.step(lambda: per_sample(model(x), y).detach())
    with pytest.raises(ValueError, match="kappa"):
        Sven(model.parameters(), kappa=1.0).step(lambda: -per_sample(model(x), y))
    with pytest.raises(ValueError, match="model= and loss_fn="):
        opt.step(batch=(x, y))
    assert torch.equal(flat(model), before) and not opt.state


def test_auto_goes_matrix_free_over_the_memory_budget(monkeypatch):
    import torchsteer.optim.sven as sven_module

    def forbidden(*args, **kwargs):
        raise AssertionError("the dense Jacobian was formed")

    monkeypatch.setattr(sven_module, "graph_jacobian", forbidden)
    x, y = batch(12)
    model = mlp()
    # B x P x 8 = 12 x 38 x 8 bytes dense; the sketch (l = 1) 8 (2 P + 2 P) fits: matrix-free,
    # bit for bit the step of jacobian="matrix_free" (sven_memory.py; test_sven_memory.py)
    kw = dict(rank=1, oversample=0, seed=4)
    opt = Sven(model.parameters(), memory_budget=12 * 38 * 8 - 1, **kw)
    ref_model = mlp()
    ref = Sven(ref_model.parameters(), jacobian="matrix_free", **kw)
    opt.step(lambda: per_sample(model(x), y))
    ref.step(lambda: per_sample(ref_model(x), y))
    assert torch.equal(flat(model), flat(ref_model)) and not torch.equal(flat(model), flat(mlp()))
    assert opt.jacobian_path == "matrix_free"


# ---------------------------------------------------------------- Lightning
def test_lightning_manual_optimization_fit_matches_a_plain_loop():
    lightning = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.linspace(-1, 1, 64).unsqueeze(1)
    y = torch.sin(3 * x)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)

    def make_net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))

    class Fit(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = make_net()
            self.losses = []

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            opt = self.optimizers()

            def closure():
                opt.zero_grad()
                return ((self.net(xb) - yb) ** 2).squeeze(1)

            self.losses.append(float(opt.step(closure)))

        def configure_optimizers(self):
            return Sven(self.parameters(), lr=0.5, rank=8, seed=0)

    module = Fit()
    with torch.no_grad():
        start = float(((module.net(x) - y) ** 2).mean())
    trainer = quiet_trainer(
        max_steps=40,
    )
    trainer.fit(module, loader)
    with torch.no_grad():
        end = float(((module.net(x) - y) ** 2).mean())
    assert end < 0.5 * start

    net = make_net()
    opt = Sven(net.parameters(), lr=0.5, rank=8, seed=0)
    losses = []
    while len(losses) < 40:
        for xb, yb in loader:
            losses.append(float(opt.step(lambda xb=xb, yb=yb: ((net(xb) - yb) ** 2).squeeze(1))))
            if len(losses) == 40:
                break
    assert losses == pytest.approx(module.losses, rel=1e-6)
    torch.testing.assert_close(flat(net), flat(module.net), rtol=1e-5, atol=1e-6)


def test_empty_batch_raises_a_clear_error_and_changes_nothing():
    # issue 18 #11: it used to end in "range() arg 3 must not be zero" (closure path) or a
    # reshape error (model= path)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()

    def per_sample(out, t):
        return torch.nn.functional.cross_entropy(out, t, reduction="none")

    x, y = torch.zeros(0, 3, dtype=F64), torch.zeros(0, dtype=torch.long)
    before = [p.detach().clone() for p in model.parameters()]
    functional = Sven(model.parameters(), model=model, loss_fn=per_sample)
    with pytest.raises(ValueError, match="Invalid batch: empty"):
        functional.step(batch=(x, y))
    closure = Sven(model.parameters())
    with pytest.raises(ValueError, match="Invalid per-sample losses: empty"):
        closure.step(lambda: per_sample(model(x), y))
    for opt in (functional, closure):
        assert not opt.state  # no step was counted
    for a, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(a, b)

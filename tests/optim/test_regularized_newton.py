"""RegularizedNewton against closed forms, dense float64 matrices, SciPy and reductions."""

import copy
import io
import itertools
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from torchsteer.jacobian import flatten, unflatten
from torchsteer.optim._newton_solvers import (
    EmpiricalFisherCurvature,
    GaussNewtonCurvature,
    HessianCurvature,
)
from torchsteer.optim.regularized_newton import RegularizedNewton

from .._lightning import trainer as quiet_trainer

DT = torch.float64


def flat(params):
    return flatten([p.detach() for p in params]).clone()


def one_step(opt, params, closure):
    """Take one step; return the step delta and the record."""
    x0 = flat(params)
    opt.step(closure)
    return flat(params) - x0, opt.state[params[0]]["record"]


def reg_newton(C, g, lam):
    return -torch.linalg.solve(C + lam * torch.eye(len(g), dtype=C.dtype), g)


# -- a quadratic, split over two parameter tensors --------------------------------------------


def quadratic(eigs=(0.5, 1.0, 2.0, 3.0, 5.0), seed=0):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=DT))
    A = Q @ torch.diag(torch.tensor(eigs, dtype=DT)) @ Q.T
    b = torch.randn(5, generator=gen, dtype=DT)
    params = [torch.randn(3, generator=gen, dtype=DT), torch.randn(2, generator=gen, dtype=DT)]
    params = [p.requires_grad_() for p in params]

    def closure():
        x = torch.cat(params)
        return 0.5 * x @ A @ x - b @ x

    return A, b, params, closure


SOLVES = [
    dict(curvature="hessian", solver="cg", cg_tol=1e-13),
    dict(curvature="hessian", solver="cholesky"),
    dict(curvature="dense"),
    dict(curvature="dense", solver="cg", cg_tol=1e-13),
    dict(curvature="hessian", solver="lanczos", cg_tol=1e-13),
    dict(curvature="hessian", solver="multishift", cg_tol=1e-13),
]


@pytest.mark.parametrize("kw", SOLVES)
def test_quadratic_step_is_closed_form(kw):
    A, b, params, closure = quadratic()
    g = A @ flat(params) - b
    opt = RegularizedNewton(params, gamma0=0.3, **kw)
    delta, rec = one_step(opt, params, closure)
    assert rec["accepted"]
    assert rec["lambda"] == pytest.approx(g.norm().item() / rec["gamma"], rel=1e-14)
    torch.testing.assert_close(delta, reg_newton(A, g, rec["lambda"]), rtol=1e-10, atol=1e-12)
    assert delta.norm() <= rec["gamma"] * (1 + 1e-12)  # |delta| <= gamma when H >= 0
    assert opt.state[params[0]]["gamma"] == 2 * rec["gamma"]


@pytest.mark.parametrize("kw", SOLVES[:3])
def test_step_tends_to_newton_as_gamma_grows(kw):
    errors = []
    for gamma0 in (1.0, 1e2, 1e4, 1e8):
        A, b, params, closure = quadratic()
        g = A @ flat(params) - b
        delta, rec = one_step(RegularizedNewton(params, gamma0=gamma0, **kw), params, closure)
        assert rec["accepted"] and rec["gamma"] == gamma0
        errors.append((delta + torch.linalg.solve(A, g)).norm().item())
    assert all(e2 < e1 for e1, e2 in itertools.pairwise(errors))
    assert errors[-1] < 1e-7 * torch.linalg.solve(A, g).norm().item()


@pytest.mark.parametrize("solver", ["cholesky", "cg", "lanczos", "multishift"])
def test_sqrt_rule_lambda_and_doubling_search_on_M(solver):
    """Two rejected tries (on CG: solved again on the graph taken at x) then an accept."""
    A, b, params, closure = quadratic()
    g = A @ flat(params) - b
    gn = g.norm().item()
    calls = [0]

    def bad_first_trials():  # the first two trial points look worse than they are
        calls[0] += 1
        return closure() + (1e3 if calls[0] in (2, 3) else 0.0)

    opt = RegularizedNewton(params, regularization="sqrt", gamma0=0.5, solver=solver, cg_tol=1e-13)
    delta, rec = one_step(opt, params, bad_first_trials)
    M0 = gn / 0.5**2
    assert rec["tries"] == 3 and rec["reasons"] == ["decrease", "decrease"]
    assert rec["M"] == 4 * M0
    assert rec["lambda"] == pytest.approx(math.sqrt(4 * M0 * gn), rel=1e-14)
    torch.testing.assert_close(delta, reg_newton(A, g, rec["lambda"]), rtol=1e-10, atol=1e-12)
    assert opt.state[params[0]]["M"] == 2 * M0  # halved after the accepted try


# -- H = 0: normalized gradient descent ------------------------------------------------------


@pytest.mark.filterwarnings("ignore:RegularizedNewton:RuntimeWarning")
def test_zero_curvature_is_normalized_gradient_descent():
    """Gauss-Newton with a loss linear in the outputs has H = 0: delta = -gamma g / |g|."""
    a = torch.linspace(-1.0, 2.0, 6, dtype=DT)

    def objective(theta):
        return torch.log(torch.cosh(theta - a)) + 0.05 * theta**2  # the outputs; loss = sum

    for solver in ("cholesky", "cg"):
        theta = torch.zeros(6, dtype=DT, requires_grad=True)
        opt = RegularizedNewton([theta], curvature="gauss_newton", solver=solver, gamma0=0.7)

        def closure(theta=theta):
            out = objective(theta)
            return out.sum(), out

        x, gamma = torch.zeros(6, dtype=DT), 0.7  # the hand-written reference
        for step in range(15):
            xr = x.clone().requires_grad_()
            fx = objective(xr).sum()
            (gx,) = torch.autograd.grad(fx, xr)
            for _ in range(40):
                xt = (x - gamma * gx / gx.norm()).requires_grad_()
                ft = objective(xt).sum()
                (gt,) = torch.autograd.grad(ft, xt)
                if fx - ft >= gt.norm() ** 2 / (8 * gx.norm() / gamma):
                    x, gamma = xt.detach(), 2 * gamma
                    break
                gamma /= 2
            opt.step(closure)
            if "below resolution" in opt.state[theta]["record"]["reasons"]:
                # the floating-point floor: the optimizer stops the search, the reference
                # halves on until rounding lets a try pass; both are done by then
                assert step >= 8 and (fx - ft).abs() < 1e-13
                break
            torch.testing.assert_close(theta.detach(), x, rtol=1e-13, atol=1e-14)
            assert opt.state[theta]["gamma"] == gamma


# -- each curvature against the dense float64 matrix -----------------------------------------


def small_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x = torch.randn(6, 3, dtype=DT)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    return model, x, y


def dense_oracles(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    theta0 = flat(params)

    def out_fn(theta):
        return functional_call(model, dict(zip(names, unflatten(theta, params))), (x,))

    H = hessian(lambda t: F.cross_entropy(out_fn(t), y))(theta0)
    J = jacrev(lambda t: out_fn(t).reshape(-1))(theta0)
    out0 = out_fn(theta0).detach()
    H_out = hessian(lambda o: F.cross_entropy(o.reshape(out0.shape), y))(out0.reshape(-1))
    G = jacrev(lambda t: F.cross_entropy(out_fn(t), y, reduction="none"))(theta0)
    g = torch.func.grad(lambda t: F.cross_entropy(out_fn(t), y))(theta0)
    return {"hessian": H, "gauss_newton": J.T @ H_out @ J, "empirical_fisher": G.T @ G / 6}, g


def closures(model, x, y):
    return {
        "hessian": lambda: F.cross_entropy(model(x), y),
        "dense": lambda: F.cross_entropy(model(x), y),
        "gauss_newton": lambda: (F.cross_entropy(out := model(x), y), out),
        "empirical_fisher": lambda: F.cross_entropy(model(x), y, reduction="none"),
    }


def test_curvature_products_match_dense_matrices():
    model, x, y = small_problem()
    params = list(model.parameters())
    C, _ = dense_oracles(model, x, y)
    v = torch.randn(C["hessian"].shape[0], generator=torch.Generator().manual_seed(1), dtype=DT)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        out = model(x)
        curvs = {
            "hessian": HessianCurvature(grads, params, DT),
            "gauss_newton": GaussNewtonCurvature(F.cross_entropy(out, y), out, params, DT),
            "empirical_fisher": EmpiricalFisherCurvature(
                F.cross_entropy(model(x), y, reduction="none"), params, DT
            ),
        }
    for name, curv in curvs.items():
        torch.testing.assert_close(curv.matvec(v), C[name] @ v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(curv.dense(), C[name], rtol=1e-10, atol=1e-12)


STEP_MODES = [
    ("hessian", "cg"),
    ("hessian", "cholesky"),
    ("dense", "auto"),
    ("gauss_newton", "cg"),
    ("gauss_newton", "lanczos"),
    ("gauss_newton", "multishift"),
    ("gauss_newton", "cholesky"),
    ("empirical_fisher", "woodbury"),
    ("empirical_fisher", "cg"),
    ("empirical_fisher", "cholesky"),
]


@pytest.mark.parametrize("curvature,solver", STEP_MODES)
def test_step_solves_with_each_curvature(curvature, solver):
    model, x, y = small_problem(seed=2)
    params = list(model.parameters())
    C, g = dense_oracles(model, x, y)
    C = C["hessian" if curvature == "dense" else curvature]
    opt = RegularizedNewton(params, curvature=curvature, solver=solver, gamma0=2.0, cg_tol=1e-13)
    delta, rec = one_step(opt, params, closures(model, x, y)[curvature])
    assert rec["accepted"]
    assert rec["lambda"] == pytest.approx(g.norm().item() / rec["gamma"], rel=1e-12)
    torch.testing.assert_close(delta, reg_newton(C, g, rec["lambda"]), rtol=1e-8, atol=1e-10)


# -- logistic regression against SciPy's trust-exact -----------------------------------------


def logistic_problem(n=2000, d=100, mu=1e-4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=DT)
    w_true = torch.randn(d, generator=gen, dtype=DT)
    y = torch.where(torch.rand(n, generator=gen, dtype=DT) < torch.sigmoid(X @ w_true), 1.0, -1.0)

    def f(w):
        return F.softplus(-y * (X @ w)).mean() + 0.5 * mu * w.dot(w)

    return X, y, mu, f


def scipy_optimum(X, y, mu, f):
    from scipy.optimize import minimize

    Xn, yn, n, d = X.numpy(), y.numpy(), *X.shape

    def fun(w):
        t = torch.tensor(w, requires_grad=True)
        val = f(t)
        (grad,) = torch.autograd.grad(val, t)
        return val.item(), grad.numpy()

    def hess(w):
        s = 1 / (1 + np.exp(-yn * (Xn @ w)))
        return (Xn.T * (s * (1 - s))) @ Xn / n + mu * np.eye(d)

    res = minimize(
        fun,
        np.zeros(d),
        jac=True,
        hess=hess,
        method="trust-exact",
        options={"gtol": 1e-12, "maxiter": 200},
    )
    assert np.linalg.norm(res.jac) < 1e-9
    return res.fun, res.nit


@pytest.mark.parametrize("curvature", ["hessian", pytest.param("dense", marks=pytest.mark.slow)])
def test_logistic_regression_reaches_target_in_a_dozen_steps(curvature):
    X, y, mu, f = logistic_problem()
    f_star, _ = scipy_optimum(X, y, mu, f)
    w = torch.zeros(X.shape[1], dtype=DT, requires_grad=True)
    opt = RegularizedNewton([w], curvature=curvature)
    for _ in range(12):
        opt.step(lambda: f(w))
        gap = f(w).item() - f_star
        if gap <= 1e-8:
            break
    assert gap <= 1e-8, gap
    assert gap >= -1e-13  # never below the optimum


# -- rejections, failed solves, non-finite values --------------------------------------------


@pytest.mark.parametrize("solver", ["cholesky", "cg", "lanczos", "multishift"])
def test_all_tries_rejected_leaves_parameters_intact(solver):
    _, _, params, closure = quadratic()
    calls = [0]

    def worse_everywhere():
        calls[0] += 1
        return closure() + (0.0 if calls[0] == 1 else 1e6)

    opt = RegularizedNewton(params, solver=solver, max_tries=5)
    before = [p.detach().clone() for p in params]
    versions = [p._version for p in params]
    with pytest.warns(RuntimeWarning, match="every try was rejected"):
        opt.step(worse_everywhere)
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert [p._version for p in params] == versions  # never written
    state = opt.state[params[0]]
    assert state["record"]["accepted"] is False and state["record"]["tries"] == 5
    assert state["gamma"] == 1.0 and state["failed_steps"] == 1 and calls[0] == 6


@pytest.mark.parametrize(
    "solver,reason",
    [
        ("cholesky", "cholesky"),
        ("cg", "breakdown"),
        ("lanczos", "breakdown"),
        ("multishift", "breakdown"),
    ],
)
def test_indefinite_solve_is_a_rejection(solver, reason):
    """f = x^T diag(-1, 2) x / 2 + sum x^4 / 4 at (0.3, 0.02): H = diag(-0.73, 2.0012).

    With gamma0 = 64, lambda is far below 0.73: Cholesky fails / CG meets negative curvature,
    and gamma halves until the solve succeeds.
    """
    x = torch.tensor([0.3, 0.02], dtype=DT, requires_grad=True)
    D = torch.diag(torch.tensor([-1.0, 2.0], dtype=DT))

    def closure():
        return 0.5 * x @ D @ x + 0.25 * (x**4).sum()

    x0 = x.detach().clone()
    H, g = D + torch.diag(3 * x0**2), D @ x0 + x0**3
    opt = RegularizedNewton([x], solver=solver, gamma0=64.0, cg_tol=1e-13)
    delta, rec = one_step(opt, [x], closure)
    assert rec["accepted"] and rec["reasons"][0] == reason and rec["tries"] > 1
    assert rec["lambda"] > 0.5
    torch.testing.assert_close(delta, reg_newton(H, g, rec["lambda"]), rtol=1e-9, atol=1e-12)
    assert closure().item() < 0.5 * x0 @ D @ x0 + 0.25 * (x0**4).sum()


def test_nonfinite_trial_point_is_a_rejection():
    _, _, params, closure = quadratic()
    start = flat(params)

    def overflowing():
        x = torch.cat(params)
        far = (x.detach() - start).norm() > 0.2
        return closure() + (float("inf") if far else 0.0)

    delta, rec = one_step(RegularizedNewton(params, solver="cholesky"), params, overflowing)
    assert rec["accepted"] and "nonfinite trial" in rec["reasons"]
    assert 0 < delta.norm() <= 0.2 and all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_loss_raises_or_skips(bad):
    _, _, params, closure = quadratic()
    before = flat(params)
    opt = RegularizedNewton(params)
    with pytest.raises(ValueError, match="NaN or Inf"):
        opt.step(lambda: closure() * bad)
    assert torch.equal(flat(params), before) and len(opt.state) == 0
    opt = RegularizedNewton(params, nonfinite="skip")
    opt.step(lambda: closure() * bad)
    assert torch.equal(flat(params), before)
    assert opt.state[params[0]]["skipped_steps"] == 1
    assert opt.state[params[0]]["record"]["skipped"] is True


# -- argument checking -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(curvature="fisher"), "curvature"),
        (dict(regularization="cubic"), "regularization"),
        (dict(gamma0=0.0), "gamma0"),
        (dict(gamma0=float("inf")), "gamma0"),
        (dict(growth="triple"), "growth"),
        (dict(max_tries=0), "max_tries"),
        (dict(max_tries=2.5), "max_tries"),
        (dict(solver="lu"), "solver"),
        (dict(solver="woodbury"), "solver"),
        (dict(cg_tol=0.0), "cg_tol"),
        (dict(cg_tol=1.5), "cg_tol"),
        (dict(cg_tol="eisenstat"), "cg_tol"),
        (dict(cg_tol=True), "cg_tol"),
        (dict(cg_maxiter=0), "cg_maxiter"),
        (dict(nonfinite="ignore"), "nonfinite"),
    ],
)
def test_invalid_arguments_raise(kw, name):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        RegularizedNewton([torch.zeros(2, requires_grad=True)], **kw)


def test_param_groups_with_different_hyperparameters_raise():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"Invalid param group.*gamma0"):
        RegularizedNewton([{"params": [a]}, {"params": [b], "gamma0": 2.0}])


@pytest.mark.parametrize(
    "curvature,kind",
    [
        ("hessian", "per_sample"),
        ("hessian", "tuple"),
        ("dense", "per_sample"),
        ("gauss_newton", "scalar"),
        ("gauss_newton", "per_sample"),
        ("empirical_fisher", "scalar"),
        ("empirical_fisher", "tuple"),
    ],
)
def test_wrong_closure_kind_says_what_is_expected(curvature, kind):
    model, x, y = small_problem()
    per_sample = lambda: F.cross_entropy(model(x), y, reduction="none")  # noqa: E731
    given = {
        "scalar": lambda: per_sample().mean(),
        "per_sample": per_sample,
        "tuple": lambda: (per_sample().mean(), model(x)),
    }[kind]
    expected = {
        "hessian": "the scalar loss",
        "dense": "the scalar loss",
        "gauss_newton": r"a tuple \(loss, outputs\)",
        "empirical_fisher": r"the per-sample losses, a tensor of shape \(B,\)",
    }[curvature]
    before = flat(list(model.parameters()))
    opt = RegularizedNewton(model.parameters(), curvature=curvature)
    with pytest.raises(ValueError, match=f"curvature='{curvature}': expected {expected}"):
        opt.step(given)
    assert torch.equal(flat(list(model.parameters())), before)


def test_closure_that_calls_backward_gets_told():
    model, x, y = small_problem()
    opt = RegularizedNewton(model.parameters())

    def lbfgs_style():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="without calling backward"):
        opt.step(lbfgs_style)
    with pytest.raises(ValueError, match="does not require grad"):
        opt.step(lambda: F.cross_entropy(model(x), y).detach())
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step(None)


# -- resume ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(curvature="hessian"),
        dict(curvature="gauss_newton", regularization="sqrt"),
        dict(curvature="empirical_fisher", solver="woodbury", gamma0=0.1),
        dict(curvature="hessian", solver="lanczos", cg_tol="eisenstat_walker"),
        dict(curvature="gauss_newton", solver="multishift", gamma0=16.0, cg_maxiter=3),
    ],
)
def test_state_dict_resume_is_bit_for_bit(kw):
    model, x, y = small_problem(seed=3)
    closure_of = lambda m: closures(m, x, y)[kw["curvature"]]  # noqa: E731
    opt = RegularizedNewton(model.parameters(), **kw)
    for _ in range(3):
        opt.step(closure_of(model))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    twin = copy.deepcopy(model)
    twin_opt = RegularizedNewton(twin.parameters(), **kw)
    buf.seek(0)
    twin_opt.load_state_dict(torch.load(buf))
    for _ in range(4):
        opt.step(closure_of(model))
        twin_opt.step(closure_of(twin))
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)
    s, t = opt.state_dict()["state"][0], twin_opt.state_dict()["state"][0]
    assert s["record"] == t["record"] and s["gamma"] == t["gamma"] and s["M"] == t["M"]
    assert torch.equal(s["step"], t["step"]) and s["step"].item() == 7


# -- Lightning, manual optimization ----------------------------------------------------------


def test_lightning_manual_optimization_matches_plain_loop():
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x = torch.randn(64, 4, dtype=DT)
    y = torch.sin(x.sum(1, keepdim=True))
    net0 = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = copy.deepcopy(net0)
            self.losses = []

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            opt = self.optimizers()
            loss = opt.step(closure=lambda: F.mse_loss(self.net(xb), yb))
            self.losses.append(loss.item())

        def configure_optimizers(self):
            return RegularizedNewton(self.parameters(), curvature="hessian")

    module = Module()
    trainer = quiet_trainer(
        max_steps=6,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's hints about workers and batch counts
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=64))

    net = copy.deepcopy(net0)
    opt = RegularizedNewton(net.parameters(), curvature="hessian")
    losses = [opt.step(lambda: F.mse_loss(net(x), y)).item() for _ in range(6)]
    assert module.losses == losses
    for p, q in zip(module.net.parameters(), net.parameters()):
        assert torch.equal(p, q)
    assert losses[-1] < 0.5 * losses[0]


def test_at_the_floating_point_floor_the_search_stops_early():
    """At the minimizer (|g| ~ rounding) no try can show a decrease: stop, do not halve 40x."""
    A, b, params, closure = quadratic()
    with torch.no_grad():
        for p, v in zip(params, unflatten(torch.linalg.solve(A, b), params)):
            p.copy_(v)
    before = flat(params)
    opt = RegularizedNewton(params, solver="cholesky", gamma0=1e-3)
    with pytest.warns(RuntimeWarning, match="below resolution"):
        opt.step(closure)
    rec = opt.state[params[0]]["record"]
    assert rec["tries"] < 5 and rec["reasons"][-1] == "below resolution"
    assert torch.equal(flat(params), before)


# -- one closure call per try: the accepted trial point's evaluation is the next step's -------


def counting(closure):
    calls = [0]

    def counted():
        calls[0] += 1
        return closure()

    return counted, calls


@pytest.mark.parametrize("curvature,solver", STEP_MODES)
def test_reuse_gives_identical_iterates_with_one_call_per_try(curvature, solver):
    """The same closure object on every step: 1 + (tries) calls instead of (steps) + (tries),
    and the same iterates, bit for bit, as fresh evaluations (float64)."""
    runs = {}
    for reuse in (True, False):
        model, x, y = small_problem(seed=2)
        params = list(model.parameters())
        opt = RegularizedNewton(
            params, curvature=curvature, solver=solver, gamma0=8.0, reuse_trial=reuse
        )
        closure, calls = counting(closures(model, x, y)[curvature])
        recs, xs = [], []
        for _ in range(6):
            opt.step(closure)
            recs.append(dict(opt.state[params[0]]["record"]))
            xs.append(flat(params))
        runs[reuse] = recs, xs, calls[0], opt.state[params[0]]
    (recs, xs, calls, state), (recs0, xs0, calls0, state0) = runs[True], runs[False]
    assert any(r["tries"] > 1 for r in recs) and all(r["accepted"] for r in recs)
    assert state["tries"] == sum(r["tries"] for r in recs)
    # a try evaluates the closure unless its solve failed (indefinite: CG breakdown, Cholesky)
    evaluated = sum(1 + r["reasons"].count("decrease") for r in recs)
    assert calls == 1 + evaluated == state["closure_evals"]
    assert calls0 == 6 + evaluated == state0["closure_evals"]
    assert [r["reused"] for r in recs] == [False] + [True] * 5
    assert not any(r["reused"] for r in recs0)
    for a, b in zip(recs, recs0):
        assert {**a, "reused": None} == {**b, "reused": None}
    assert all(torch.equal(a, b) for a, b in zip(xs, xs0))


@pytest.mark.parametrize(
    "curvature,solver",
    [
        ("hessian", "cg"),
        ("dense", "auto"),
        ("gauss_newton", "cholesky"),
        ("empirical_fisher", "woodbury"),
    ],
)
def test_reused_graph_is_the_curvature_at_the_new_point(curvature, solver):
    """Step 2 on the reused graph equals -(C(x1) + lambda I)^{-1} g(x1), C from torch.func."""
    model, x, y = small_problem(seed=4)
    params = list(model.parameters())
    opt = RegularizedNewton(
        params, curvature=curvature, solver=solver, gamma0=2.0, cg_tol=1e-13, reuse_trial=True
    )
    closure = closures(model, x, y)[curvature]
    opt.step(closure)
    assert opt.state[params[0]]["record"]["accepted"]
    C, g = dense_oracles(model, x, y)  # at x1
    C = C["hessian" if curvature == "dense" else curvature]
    delta, rec = one_step(opt, params, closure)
    assert rec["reused"] and rec["accepted"]
    assert rec["grad_norm"] == pytest.approx(g.norm().item(), rel=1e-12)
    torch.testing.assert_close(delta, reg_newton(C, g, rec["lambda"]), rtol=1e-8, atol=1e-10)


def test_reuse_only_for_the_same_closure_and_untouched_parameters():
    A, b, params, closure = quadratic()
    counted, calls = counting(closure)
    opt = RegularizedNewton(params, solver="cholesky", gamma0=0.3, reuse_trial=True)
    opt.step(counted)
    assert calls[0] == 2  # x and one accepted try
    opt.step(counted)
    assert calls[0] == 3 and opt.state[params[0]]["record"]["reused"]
    with torch.no_grad():  # the user writes the parameters: the cached point is stale
        params[0].add_(0.01)
    g = A @ flat(params) - b
    delta, rec = one_step(opt, params, counted)
    assert calls[0] == 5 and not rec["reused"]  # a fresh evaluation at the new point
    torch.testing.assert_close(delta, reg_newton(A, g, rec["lambda"]), rtol=1e-10, atol=1e-12)
    other, other_calls = counting(closure)  # another closure object: evaluated afresh
    opt.step(other)
    assert other_calls[0] == 2 and not opt.state[params[0]]["record"]["reused"]
    opt.step(other)  # the same object again: its trial graph is kept from now on...
    assert other_calls[0] == 4 and not opt.state[params[0]]["record"]["reused"]
    opt.step(other)  # ...and reused
    assert other_calls[0] == 5 and opt.state[params[0]]["record"]["reused"]


def test_new_closure_each_step_keeps_no_graph_after_the_first():
    """A closure object per step (minibatches, Lightning): no trial graph is built to no use."""
    _, _, params, closure = quadratic()
    opt = RegularizedNewton(params, solver="cholesky", gamma0=0.3, reuse_trial=True)
    opt.step(lambda: closure())
    assert opt._cache is not None  # the first step cannot know
    opt.step(lambda: closure())
    assert opt._cache is None and not opt.state[params[0]]["record"]["reused"]


def _quadratic_curvature():
    """The quadratic test problem with its exact-Hessian products (counted) and gradient."""
    A, b, params, closure = quadratic()
    with torch.enable_grad():
        grads = torch.autograd.grad(closure(), params, create_graph=True)
    return A, b, params, HessianCurvature(grads, params, DT), A @ flat(params) - b


def test_cg_warm_start_costs_no_product():
    """Re-solving with another lambda from the last solution: r0 from the kept H x."""
    from torchsteer.optim._newton_solvers import CGSolver

    A, _, _, curv, g = _quadratic_curvature()
    solver = CGSolver(curv, g, tol=1e-13, maxiter=None)
    first = solver.solve(0.5)
    assert first.ok and curv.products == first.cg_iterations
    second = solver.solve(2.0, first.delta)  # warm
    assert second.ok and curv.products == first.cg_iterations + second.cg_iterations
    torch.testing.assert_close(second.delta, reg_newton(A, g, 2.0), rtol=1e-10, atol=1e-12)
    third = solver.solve(1.0, second.delta.clone())  # any other vector: one product for r0
    assert curv.products == first.cg_iterations + second.cg_iterations + third.cg_iterations + 1
    torch.testing.assert_close(third.delta, reg_newton(A, g, 1.0), rtol=1e-10, atol=1e-12)


def test_reuse_trial_is_off_by_default_and_validated():
    with pytest.raises(ValueError, match="Invalid reuse_trial"):
        RegularizedNewton([torch.zeros(2, requires_grad=True)], reuse_trial=1)
    _, _, params, closure = quadratic()
    opt = RegularizedNewton(params)
    assert opt.reuse_trial is False
    opt.step(closure)
    assert opt._cache is None and opt._last_closure is None


def test_default_reevaluates_a_closure_whose_batch_changed():
    """One closure object reading a batch that changes between steps (a common loop): by
    default every step evaluates it afresh, so step 2 is the closed-form step on batch 2."""
    n, d = 5, 3
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(n, d, generator=gen, dtype=DT)
    A = M.T @ M + torch.eye(d, dtype=DT)
    batch = {"b": torch.randn(d, generator=gen, dtype=DT)}
    x = torch.zeros(d, dtype=DT, requires_grad=True)

    def closure():
        return 0.5 * x @ A @ x - batch["b"] @ x

    opt = RegularizedNewton([x], solver="cholesky", gamma0=0.3)
    opt.step(closure)
    batch["b"] = torch.randn(d, generator=gen, dtype=DT)  # the next minibatch
    g = A @ x.detach() - batch["b"]
    delta, rec = one_step(opt, [x], closure)
    assert not rec["reused"]
    assert rec["grad_norm"] == pytest.approx(g.norm().item(), rel=1e-12)
    torch.testing.assert_close(delta, reg_newton(A, g, rec["lambda"]), rtol=1e-10, atol=1e-12)


# -- growth="margin" against a hand-written reference of the search ---------------------------


def reference_search(f, x, gamma, growth, steps):
    """Algorithm 1 with dense float64 solves; growth="margin" doubles only with a factor 2."""
    out = []
    for _ in range(steps):
        g = torch.func.grad(f)(x)
        H = hessian(f)(x)
        for _ in range(40):
            lam = g.norm() / gamma
            d = reg_newton(H, g, lam)
            ft, gt = f(x + d), torch.func.grad(f)(x + d)
            if f(x) - ft >= gt.dot(gt) / (8 * lam):
                margin = bool(f(x) - ft >= 2 * gt.dot(gt) / (8 * lam))
                x = x + d
                gamma = 2 * gamma if growth == "double" or margin else gamma
                break
            gamma = gamma / 2
        out.append((x, gamma))
    return out


@pytest.mark.parametrize(
    "growth,kw",
    [
        ("double", dict(curvature="dense")),
        ("margin", dict(curvature="dense")),
        ("double", dict(solver="cg", cg_tol=1e-13)),
        ("double", dict(solver="lanczos", cg_tol=1e-13)),
        ("double", dict(solver="multishift", cg_tol=1e-13)),
    ],
)
def test_growth_rules_follow_the_reference(growth, kw):
    """Algorithm 1 as the authors' grad_norm_smooth runs it (exact solves); CG and Lanczos
    with a tight tolerance take the same tries and iterates."""
    *_, f = logistic_problem(n=60, d=6, seed=3)
    x0 = torch.zeros(6, dtype=DT)
    ref = reference_search(f, x0, 64.0, growth, steps=5)
    w = x0.clone().requires_grad_()
    opt = RegularizedNewton([w], gamma0=64.0, growth=growth, **kw)
    recs = []
    for x_ref, gamma_ref in ref:
        opt.step(lambda: f(w))
        recs.append(opt.state[w]["record"])
        torch.testing.assert_close(w.detach(), x_ref, rtol=1e-10, atol=1e-12)
        assert opt.state[w]["gamma"] == gamma_ref
    assert any(r["tries"] > 1 for r in recs)  # the search is exercised
    if growth == "margin":  # some accepted step kept gamma
        assert any(not r["margin"] for r in recs)


def test_deepcopy_and_pickle_drop_the_kept_graph_and_continue_identically():
    """A copy has the state and the policies, not the kept graph; a twin resumed from the
    state dict (fresh evaluations) follows the original (reusing) bit for bit."""
    model, x, y = small_problem(seed=5)
    params = list(model.parameters())
    opt = RegularizedNewton(params, gamma0=4.0, nonfinite="skip", reuse_trial=True)
    closure = closures(model, x, y)["hessian"]
    for _ in range(2):
        opt.step(closure)
    assert opt._cache is not None
    clone = copy.deepcopy(opt)  # the kept graph's non-leaf tensors could not be deep-copied
    assert clone._cache is None and clone._last_closure is None
    assert clone.nonfinite == "skip" and clone.reuse_trial is True
    assert clone.state_dict()["state"][0]["gamma"] == opt.state[params[0]]["gamma"]
    torch.save(opt, io.BytesIO())  # nor could the lambda closure be pickled
    twin = copy.deepcopy(model)
    twin_opt = RegularizedNewton(twin.parameters(), gamma0=4.0)
    twin_opt.load_state_dict(opt.state_dict())
    twin_closure = closures(twin, x, y)["hessian"]
    for _ in range(3):
        opt.step(closure)
        twin_opt.step(twin_closure)
        assert opt.state[params[0]]["record"]["reused"]
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


# -- the Lanczos solver: one Krylov basis for every lambda of a step --------------------------


def spd_operator(eigs, seed=0):
    """A dense SPD matrix with the given spectrum, as a HessianCurvature of a quadratic."""
    n = len(eigs)
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    A = Q @ torch.diag(torch.as_tensor(eigs, dtype=DT)) @ Q.T
    A = 0.5 * (A + A.T)
    x = torch.randn(n, generator=gen, dtype=DT, requires_grad=True)
    b = torch.randn(n, generator=gen, dtype=DT)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(0.5 * x @ A @ x - b @ x, [x], create_graph=True)
    return A, grad.detach(), HessianCurvature([grad], [x], DT)


def test_lanczos_solves_match_the_dense_solve_and_cg():
    """Increasing lambdas (the retries of a step) from one kept basis, against float64 dense."""
    from torchsteer.linalg.lanczos import LanczosSolver
    from torchsteer.optim._newton_solvers import CGSolver

    eigs = torch.logspace(-3, 1, 60, dtype=DT)
    A, g, curv = spd_operator(eigs)
    solver = LanczosSolver(curv, g, tol=1e-11, maxiter=None)
    for lam in (1e-3, 4e-3, 0.1):
        before = curv.products
        sol = solver.solve(lam)
        assert sol.ok and curv.products - before == sol.cg_iterations
        exact = reg_newton(A, g, lam)
        residual = (g + (A + lam * torch.eye(60, dtype=DT)) @ sol.delta).norm()
        assert residual <= 1e-11 * g.norm() * (1 + 1e-6)
        torch.testing.assert_close(sol.delta, exact, rtol=1e-7, atol=1e-9)
        _, _, curv_cg = spd_operator(eigs)
        cg = CGSolver(curv_cg, g, tol=1e-11, maxiter=None).solve(lam)
        torch.testing.assert_close(sol.delta, cg.delta, rtol=1e-7, atol=1e-9)


def test_lanczos_retry_reuses_the_basis():
    """A complete basis (k = P) solves every later lambda exactly at no product; on a larger
    system the retry costs only the products it reports, and its residual is the true one."""
    from torchsteer.linalg.lanczos import LanczosSolver

    A, _, _, curv, g = _quadratic_curvature()
    solver = LanczosSolver(curv, g, tol=1e-15, maxiter=None)
    first = solver.solve(0.5)
    assert first.ok and curv.products == 5  # the whole space: P = 5 products
    for lam in (1.0, 2.0, 8.0):
        again = solver.solve(lam)
        assert again.ok and again.cg_iterations == 0 and curv.products == 5
        torch.testing.assert_close(again.delta, reg_newton(A, g, lam), rtol=1e-10, atol=1e-12)

    A, g, curv = spd_operator(torch.logspace(-2, 1, 80, dtype=DT), seed=1)
    solver = LanczosSolver(curv, g, tol=1e-4, maxiter=None)
    first = solver.solve(0.01)
    second = solver.solve(0.02)  # a retry: lambda doubled
    assert curv.products == first.cg_iterations + second.cg_iterations
    assert second.cg_iterations < first.cg_iterations  # a fresh solve would redo all of them
    for sol, lam in ((first, 0.01), (second, 0.02)):
        residual = (g + (A + lam * torch.eye(80, dtype=DT)) @ sol.delta).norm()
        assert residual <= 1e-4 * g.norm() * (1 + 1e-8)


def test_lanczos_basis_stays_orthonormal_on_an_ill_conditioned_system():
    """Full reorthogonalization: Q^T Q = I and the residual estimate is the true residual, where
    plain CG (its iterates equal Lanczos' in exact arithmetic) needs more products."""
    from torchsteer.linalg.lanczos import LanczosSolver
    from torchsteer.optim._newton_solvers import CGSolver

    eigs = torch.cat([torch.logspace(-4, 0, 150, dtype=DT), torch.tensor([1e2, 3e2], dtype=DT)])
    A, g, curv = spd_operator(eigs, seed=2)
    lam = 1e-5
    solver = LanczosSolver(curv, g, tol=1e-9, maxiter=None)
    sol = solver.solve(lam)
    Q = solver._Q[: solver.k]
    torch.testing.assert_close(Q @ Q.T, torch.eye(solver.k, dtype=DT), rtol=0, atol=1e-12)
    residual = (g + (A + lam * torch.eye(len(eigs), dtype=DT)) @ sol.delta).norm()
    assert sol.ok and residual <= 1e-9 * g.norm() * (1 + 1e-6)
    _, _, curv_cg = spd_operator(eigs, seed=2)
    cg = CGSolver(curv_cg, g, tol=1e-9, maxiter=None).solve(lam)
    assert cg.ok and sol.cg_iterations < cg.cg_iterations
    torch.testing.assert_close(sol.delta, cg.delta, rtol=1e-5, atol=1e-7)


def test_lanczos_steps_follow_cg_on_logistic_regression():
    """The same iterates as CG (equal in exact arithmetic), and the target in a dozen steps."""
    X, y, mu, f = logistic_problem(n=500, d=40)
    f_star, _ = scipy_optimum(X, y, mu, f)
    ws = [torch.zeros(40, dtype=DT, requires_grad=True) for _ in range(2)]
    opts = [RegularizedNewton([w], solver=s, cg_tol=1e-10) for w, s in zip(ws, ("cg", "lanczos"))]
    for _ in range(12):
        for w, opt in zip(ws, opts):
            opt.step(lambda w=w: f(w))
        torch.testing.assert_close(ws[1], ws[0], rtol=1e-8, atol=1e-10)
        s0, s1 = (o.state[w]["record"] for o, w in zip(opts, ws))
        assert (s0["tries"], s0["gamma"]) == (s1["tries"], s1["gamma"])
        if f(ws[1]).item() - f_star <= 1e-8:
            break
    assert f(ws[1]).item() - f_star <= 1e-8


# -- the Eisenstat-Walker forcing term --------------------------------------------------------


def test_eisenstat_walker_forcing_follows_their_choice_2():
    """Each step's CG tolerance from the last accepted step's |g| and tolerance (hand-written
    formula), and CG stops at that tolerance: the residual of the solve is below it."""
    from torchsteer.optim._newton_solvers import eisenstat_walker_tolerance

    assert eisenstat_walker_tolerance(0.04, None) == pytest.approx(0.2)  # sqrt|g|, first step
    assert eisenstat_walker_tolerance(1.0, None) == 0.5
    assert eisenstat_walker_tolerance(0.1, (1.0, 0.1)) == pytest.approx(0.009)  # 0.9 (0.1)^2
    assert eisenstat_walker_tolerance(0.1, (1.0, 0.4)) == pytest.approx(0.144)  # 0.9 * 0.4^2
    assert eisenstat_walker_tolerance(0.9, (1.0, 0.1)) == 0.5  # capped

    X, y, mu, f = logistic_problem(n=400, d=30)
    H_of = lambda w: torch.func.hessian(f)(w.detach())  # noqa: E731
    f_star, _ = scipy_optimum(X, y, mu, f)
    w = torch.zeros(30, dtype=DT, requires_grad=True)
    opt = RegularizedNewton([w], cg_tol="eisenstat_walker")
    last = None
    for _ in range(15):
        x0 = w.detach().clone()
        (g,) = torch.autograd.grad(f(w), w)
        gn = g.norm().item()
        if last is None:
            eta = min(0.5, math.sqrt(gn))
        else:
            eta = 0.9 * (gn / last[0]) ** 2
            if 0.9 * last[1] ** 2 > 0.1:
                eta = max(eta, 0.9 * last[1] ** 2)
            eta = min(eta, 0.5)
        opt.step(lambda: f(w))
        rec, state = opt.state[w]["record"], opt.state[w]
        assert rec["accepted"]
        assert state["forcing"][0] == pytest.approx(gn, rel=1e-12)
        assert state["forcing"][1] == pytest.approx(eta, rel=1e-9)
        delta = w.detach() - x0
        A = H_of(x0) + rec["lambda"] * torch.eye(30, dtype=DT)
        assert (g + A @ delta).norm() <= eta * gn * (1 + 1e-9)
        last = state["forcing"]
        if f(w).item() - f_star <= 1e-8:
            break
    assert f(w).item() - f_star <= 1e-8


def test_lanczos_at_maxiter_is_cg_iterate_and_linear_f_is_one_product():
    """A basis capped at maxiter gives CG's iterate of that many steps ("maxiter", a descent
    direction); for a linear f (H = 0) the first vector spans an invariant space: -g / lambda."""
    from torchsteer.linalg.lanczos import LanczosSolver
    from torchsteer.optim._newton_solvers import CGSolver

    eigs = torch.linspace(0.5, 4.0, 40, dtype=DT)
    _, g, curv = spd_operator(eigs, seed=3)
    sol = LanczosSolver(curv, g, tol=1e-12, maxiter=3).solve(0.1)
    _, _, curv_cg = spd_operator(eigs, seed=3)
    cg = CGSolver(curv_cg, g, tol=1e-12, maxiter=3).solve(0.1)
    assert sol.ok and sol.reason == "maxiter" and sol.cg_iterations == 3 and curv.products == 3
    torch.testing.assert_close(sol.delta, cg.delta, rtol=1e-10, atol=1e-12)
    assert float(g @ sol.delta) < 0

    w = torch.randn(7, dtype=DT, requires_grad=True)
    c = torch.randn(7, dtype=DT)
    with torch.enable_grad():
        grads = torch.autograd.grad(c @ w, [w], create_graph=True)
    linear = HessianCurvature(grads, [w], DT)
    solver = LanczosSolver(linear, c, tol=0.5, maxiter=None)
    for lam in (0.3, 0.6):
        sol = solver.solve(lam)
        assert sol.ok and sol.reason == ""
        torch.testing.assert_close(sol.delta, -c / lam, rtol=1e-14, atol=0)
    assert linear.products == 1

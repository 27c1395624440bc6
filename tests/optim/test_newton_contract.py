"""RegularizedNewton on the optimizer contract (issue 15 move 4, issue 18 #19 / #8, issue 19):
``lr`` and the schedulers, ``maximize``, hyperparameters in ``defaults``, validation, atomic
``load_state_dict``, copies. Oracles: the closed-form regularized Newton step on a quadratic,
and runs that must agree bit for bit."""

import copy
import io
import pickle

import pytest
import torch
from torch.optim import lr_scheduler as S

from torchsteer.jacobian import flatten
from torchsteer.optim.regularized_newton import RegularizedNewton

DT = torch.float64


def quadratic(seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=DT))
    A = Q @ torch.diag(torch.tensor([0.5, 1.0, 2.0, 3.0, 5.0], dtype=DT)) @ Q.T
    b = torch.randn(5, generator=g, dtype=DT)
    w = torch.randn(5, generator=g, dtype=DT).requires_grad_()
    return A, b, w, lambda: 0.5 * w @ A @ w - b @ w


def flat(params):
    return flatten([p.detach() for p in params]).clone()


SCHEDULERS = {
    "StepLR": lambda o: S.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: S.MultiStepLR(o, milestones=[1, 3], gamma=0.3),
    "ExponentialLR": lambda o: S.ExponentialLR(o, gamma=0.7),
    "LambdaLR": lambda o: S.LambdaLR(o, lambda k: 1 / (k + 1)),
    "MultiplicativeLR": lambda o: S.MultiplicativeLR(o, lambda k: 0.8),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=4),
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=2),
    "LinearLR": lambda o: S.LinearLR(o, start_factor=0.25, total_iters=3),
    "ConstantLR": lambda o: S.ConstantLR(o, factor=0.5, total_iters=2),
    "PolynomialLR": lambda o: S.PolynomialLR(o, total_iters=5, power=2.0),
    "CyclicLR": lambda o: S.CyclicLR(o, 0.1, 1.0, step_size_up=2, cycle_momentum=False),
    "OneCycleLR": lambda o: S.OneCycleLR(o, 1.0, total_steps=10, cycle_momentum=False),
    "SequentialLR": lambda o: S.SequentialLR(
        o, [S.ConstantLR(o, 0.5, 2), S.ExponentialLR(o, 0.9)], milestones=[2]
    ),
    "ChainedScheduler": lambda o: S.ChainedScheduler(
        [S.ConstantLR(o, 0.5, 2), S.ExponentialLR(o, 0.9)]
    ),
    "ReduceLROnPlateau": lambda o: S.ReduceLROnPlateau(o, factor=0.5, patience=0),
}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_drives_lr_and_the_step_is_lr_times_the_closed_form(name):
    """Each step moves ``x`` by ``lr * -(A + lambda I)^{-1} g`` with the ``lambda`` of the
    accepted try and the ``lr`` the scheduler set."""
    A, b, w, closure = quadratic()
    opt = RegularizedNewton([w], solver="cholesky", gamma0=0.3)
    sched = SCHEDULERS[name](opt)
    lrs = set()
    for _ in range(5):
        x0, lr = flat([w]), float(opt.param_groups[0]["lr"])
        g = A @ x0 - b
        loss = opt.step(closure)
        rec = opt.state[w]["record"]
        assert rec["accepted"]
        full = -torch.linalg.solve(A + rec["lambda"] * torch.eye(5, dtype=DT), g)
        torch.testing.assert_close(flat([w]) - x0, lr * full, rtol=1e-10, atol=1e-13)
        lrs.add(lr)
        sched.step(loss) if name == "ReduceLROnPlateau" else sched.step()
    assert len(lrs) > 1 or name == "ReduceLROnPlateau"


def test_lr_one_is_the_default_bit_for_bit_and_a_tensor_lr_is_accepted():
    runs = []
    for kw in ({}, {"lr": 1.0}, {"lr": torch.tensor(1.0)}):
        *_, w, closure = quadratic()
        opt = RegularizedNewton([w], gamma0=0.3, **kw)
        for _ in range(4):
            opt.step(closure)
        runs.append(flat([w]))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    for bad in (-1.0, float("nan"), float("inf"), torch.ones(2)):
        with pytest.raises(ValueError, match="Invalid lr"):
            RegularizedNewton([quadratic()[2]], lr=bad)


def test_maximize_follows_the_minimization_of_minus_f():
    *_, w, closure = quadratic()
    *_, v, closure2 = quadratic()
    mini = RegularizedNewton([w], gamma0=0.3)
    maxi = RegularizedNewton([v], gamma0=0.3, maximize=True)
    for _ in range(4):
        loss = mini.step(closure)
        value = maxi.step(lambda: -closure2())
        assert torch.equal(value, -loss)  # step returns f, the closure's value
        assert torch.equal(v, w)
        rec, rec2 = mini.state[w]["record"], maxi.state[v]["record"]
        assert rec2["loss"] == -rec["loss"] and rec2["new_loss"] == -rec["new_loss"]


def test_foreach_and_differentiable_accepted_where_meaningful_else_clear_errors():
    w = quadratic()[2]
    for kw in ({"foreach": None}, {"foreach": False}, {"differentiable": False}):
        assert RegularizedNewton([w], **kw).defaults[next(iter(kw))] == next(iter(kw.values()))
    with pytest.raises(ValueError, match=r"Invalid foreach: True; .*no per-parameter loop"):
        RegularizedNewton([w], foreach=True)
    with pytest.raises(ValueError, match=r"Invalid differentiable: True; .*cannot be differen"):
        RegularizedNewton([w], differentiable=True)


def test_every_hyperparameter_is_in_defaults_and_the_state_dict():
    kw = dict(
        curvature="gauss_newton", regularization="sqrt", gamma0=0.5, growth="margin",
        max_tries=7, solver="lanczos", cg_tol=1e-3, cg_maxiter=9, cg_check_every=3, lr=0.5,
        maximize=True,
        nonfinite="skip", reuse_trial=True, foreach=False, differentiable=False,
    )  # fmt: skip
    opt = RegularizedNewton([quadratic()[2]], **kw)
    group = opt.state_dict()["param_groups"][0]
    assert {k: opt.defaults[k] for k in kw} == kw and {k: group[k] for k in kw} == kw


def test_repr_shows_the_hyperparameters():
    opt = RegularizedNewton([quadratic()[2]], curvature="dense", gamma0=0.5, nonfinite="skip")
    assert repr(opt) == (
        "RegularizedNewton(curvature='dense', regularization='gns', gamma0=0.5, "
        "growth='double', max_tries=40, solver='auto', cg_tol=None, cg_maxiter=None, "
        "cg_check_every=None, lr=1.0, "
        "maximize=False, nonfinite='skip', reuse_trial=False; 1 param group(s), 1 tensors, "
        "5 parameters)"
    )


def test_groups_are_validated_in_add_param_group_and_at_step():
    *_, w, closure = quadratic()
    opt = RegularizedNewton([w], gamma0=0.3)
    with pytest.raises(ValueError, match="Invalid param group: lr is global"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=DT, requires_grad=True)], "lr": 0.1})
    assert len(opt.param_groups) == 1
    opt.step(closure)
    before, state = flat([w]), copy.deepcopy(opt.state_dict())
    opt.param_groups[0]["lr"] = float("nan")  # set directly, as a broken scheduler would
    with pytest.raises(ValueError, match="Invalid lr: nan"):
        opt.step(closure)
    assert torch.equal(flat([w]), before) and opt.state[w]["step"] == state["state"][0]["step"]


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (lambda sd: sd["state"][0].update(gamma=float("nan")), "Invalid state_dict gamma"),
        (lambda sd: sd["state"][0].update(step=torch.tensor(-1.0)), "Invalid state_dict step"),
        (lambda sd: sd["state"][0].update(tries=-3), "Invalid state_dict tries"),
        (lambda sd: sd["param_groups"][0].update(max_tries=0), "Invalid max_tries"),
        (lambda sd: sd["param_groups"][0].update(curvature="fisher"), "Invalid curvature"),
        (lambda sd: sd["param_groups"][0].update(params=[0, 1]), "2 parameters"),
    ],
)
def test_a_rejected_load_state_dict_changes_nothing(corrupt, match):
    *_, w, closure = quadratic()
    opt = RegularizedNewton([w], gamma0=0.3, regularization="gns")
    *_, v, closure2 = quadratic()
    twin = RegularizedNewton([v], gamma0=0.3)
    for _ in range(2):
        opt.step(closure)
        twin.step(closure2)
    bad = copy.deepcopy(opt.state_dict())
    corrupt(bad)
    with pytest.raises(ValueError, match=match):
        twin.load_state_dict(bad)
    for _ in range(3):  # the twin goes on exactly as before
        opt.step(closure)
        twin.step(closure2)
        assert torch.equal(v, w)
    assert twin.state[v]["gamma"] == opt.state[w]["gamma"]


def test_an_older_state_dict_loads_with_the_defaults_of_newer_keys_and_resumes():
    *_, w, closure = quadratic()
    opt = RegularizedNewton([w], gamma0=0.3)
    opt.step(closure)
    old = copy.deepcopy(opt.state_dict())
    for key in ("lr", "maximize", "nonfinite", "reuse_trial", "foreach", "differentiable"):
        del old["param_groups"][0][key]
    old["state"][0]["step"] = 1.0  # a non-tensor step, as torch's test_load_nontensor_step
    *_, v, closure2 = quadratic()
    v.data.copy_(w.detach())
    twin = RegularizedNewton([v], gamma0=0.3, nonfinite="skip")
    twin.load_state_dict(old)
    assert twin.param_groups[0]["lr"] == 1.0 and twin.param_groups[0]["nonfinite"] == "skip"
    for _ in range(3):
        opt.step(closure)
        twin.step(closure2)
        assert torch.equal(v, w)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_keep_every_setting_and_step_like_the_original(how):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    model = model.double()
    x = torch.randn(16, 3, dtype=DT)
    y = torch.sin(x.sum(1, keepdim=True))
    kw = dict(gamma0=0.7, growth="margin", lr=0.5, solver="lanczos", cg_tol=1e-6,
              nonfinite="skip", max_tries=12)  # fmt: skip
    opt = RegularizedNewton(model.parameters(), **kw)
    loss_of = lambda m: lambda: torch.nn.functional.mse_loss(m(x), y)  # noqa: E731
    for _ in range(2):
        opt.step(loss_of(model))
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    elif how == "pickle":
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    else:
        buf = io.BytesIO()
        torch.save((model, opt), buf)
        buf.seek(0)
        model2, opt2 = torch.load(buf, weights_only=False)
    assert opt2.param_groups[0] | {"params": None} == opt.param_groups[0] | {"params": None}
    assert opt2.defaults == opt.defaults
    for _ in range(3):
        opt.step(loss_of(model))
        opt2.step(loss_of(model2))
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))

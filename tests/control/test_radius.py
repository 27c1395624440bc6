"""Softmax step radius: the theory's zeros, JVP oracles, and the limiter's guarantees."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from tests.jacobian import models
from torchsteer.control.radius import (
    RadiusLimiter,
    logit_derivative,
    logit_spread,
    normalized_step,
)


def _flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def _random_direction(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(p.shape, generator=g, dtype=p.dtype)
        for k, p in model.named_parameters()
        if p.requires_grad
    }


# --- the theory ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "z1,z2,a1,a2", [(0.3, -1.2, 2.0, -0.5), (2.0, 2.0, 0.1, 3.0), (-4, 1, 7, 7.5)]
)
def test_binary_zero_of_partition_function(z1, z2, a1, a2):
    """F(t) = e^{z1 + a1 t} + e^{z2 + a2 t} vanishes at t0 = (delta + i pi) / (a2 - a1)."""
    delta, da = z1 - z2, a2 - a1
    t0 = complex(delta, math.pi) / da
    f = np.exp(z1 + a1 * t0) + np.exp(z2 + a2 * t0)
    assert abs(f) < 1e-12 * (math.exp(z1 + a1 * t0.real) + math.exp(z2 + a2 * t0.real))
    assert abs(t0) == pytest.approx(math.sqrt(delta**2 + math.pi**2) / abs(da), rel=1e-14)
    # the radius along the line is at least the multiclass bound pi / Delta_a
    assert abs(t0) >= math.pi / abs(da)


def test_binary_radius_from_the_module_jvp():
    """A linear model whose bias moves by (a1, a2): the module's spread gives |a1 - a2|."""
    model = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    a = torch.tensor([0.7, -1.9], dtype=torch.float64)
    d = {"weight": torch.zeros(2, 3, dtype=torch.float64), "bias": a}
    spread = logit_spread(model, x, d)
    torch.testing.assert_close(spread, torch.full((4,), 2.6, dtype=torch.float64))
    z = model(x).detach()
    delta = z[:, 0] - z[:, 1]
    t0 = torch.complex(delta, torch.full_like(delta, math.pi)) / (a[1] - a[0])
    f = torch.exp(z[:, 0] + a[0] * t0) + torch.exp(z[:, 1] + a[1] * t0)
    assert f.abs().max() < 1e-10
    torch.testing.assert_close(t0.abs(), torch.sqrt(delta**2 + math.pi**2) / spread)


@pytest.mark.parametrize("seed", range(6))
def test_integer_slopes_no_root_inside_pi_over_spread(seed):
    """With integer slopes, F is a polynomial in u = e^t; no zero lies closer than pi / Delta_a.

    The slopes are produced by the module: a linear model's JVP along a bias direction.
    """
    g = np.random.default_rng(seed)
    c = int(g.integers(3, 7))
    model = nn.Linear(2, c).double()
    slopes = torch.as_tensor(g.integers(-3, 4, size=c), dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    d = {"weight": torch.zeros(c, 2, dtype=torch.float64), "bias": slopes}
    a = logit_derivative(model, x, d)
    torch.testing.assert_close(a, slopes.expand(5, c))
    spread = logit_spread(model, x, d)
    z = model(x).detach().numpy()
    lo = int(slopes.min())
    for i in range(5):
        coeffs = np.zeros(int(slopes.max()) - lo + 1)
        for k in range(c):  # F(u) u^{-lo} = sum_k e^{z_k} u^{a_k - lo}
            coeffs[int(slopes[k]) - lo] += math.exp(z[i, k])
        roots = np.roots(coeffs[::-1])
        if spread[i] == 0 or len(roots) == 0:
            continue
        # nearest zero t = log u over all branches: |t|^2 = ln|u|^2 + arg(u)^2
        t = np.sqrt(np.log(np.abs(roots)) ** 2 + np.angle(roots) ** 2)
        assert t.min() >= math.pi / float(spread[i]) * (1 - 1e-9)


# --- the JVP ------------------------------------------------------------------------------


def test_linear_model_jvp_is_exact():
    model = nn.Linear(5, 4).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    d = _random_direction(model)
    a = logit_derivative(model, x, d)
    torch.testing.assert_close(a, x @ d["weight"].T + d["bias"], rtol=0, atol=1e-14)
    flat = torch.cat([d["weight"].reshape(-1), d["bias"]])
    torch.testing.assert_close(logit_derivative(model, x, flat), a, rtol=0, atol=0)


@pytest.mark.parametrize("name", models.NAMES)
def test_jvp_matches_central_difference_float64(name):
    model, x, _ = models.make(name)
    d = _random_direction(model, seed=1)
    params = {k: p.detach() for k, p in model.named_parameters()}
    h = 1e-6

    def f(sign):
        return functional_call(model, {k: params[k] + sign * h * d[k] for k in params}, (x,))

    fd = (f(1) - f(-1)) / (2 * h)
    torch.testing.assert_close(logit_derivative(model, x, d), fd, rtol=1e-6, atol=1e-7)
    # the module's own finite-difference mode agrees too
    torch.testing.assert_close(logit_derivative(model, x, d, method="fd"), fd, rtol=1e-5, atol=1e-6)


def test_logits_fn_and_frozen_parameters():
    """logits_fn(model, batch) picks the logits; a frozen layer is not part of the direction."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    model[0].weight.requires_grad_(False)
    x = torch.randn(5, 3, dtype=torch.float64)
    d = _random_direction(model)
    assert set(d) == {"0.bias", "2.weight", "2.bias"}
    a = logit_derivative(model, {"x": x}, d, logits_fn=lambda m, b: 2.0 * m(b["x"]))
    torch.testing.assert_close(a, 2.0 * logit_derivative(model, x, d))
    # the oracle: torch.func.jvp over the trainable parameters only
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    _, ref = torch.func.jvp(lambda p: functional_call(model, p, (x,)), (params,), (d,))
    torch.testing.assert_close(logit_derivative(model, x, d), ref, rtol=1e-12, atol=1e-12)


def test_temperature_divides_r():
    model, x, _ = models.make("mlp")
    d = _random_direction(model)
    r1, rho1 = normalized_step(model, x, d)
    r2, rho2 = normalized_step(model, x, d, temperature=2.0)
    torch.testing.assert_close(r2, r1 / 2)
    torch.testing.assert_close(rho2, 2 * rho1)


# --- r and rho_a --------------------------------------------------------------------------


@pytest.mark.parametrize("name", models.NAMES)
def test_r_scales_with_length_and_ignores_sign(name):
    model, x, _ = models.make(name)
    p = _flat_params(model).new_tensor(
        np.random.default_rng(2).normal(size=_flat_params(model).numel())
    )
    p = 0.3 * p
    r, rho = normalized_step(model, x, p)
    r_unit, rho_unit = normalized_step(model, x, p / p.norm())
    torch.testing.assert_close(r, r_unit * p.norm(), rtol=1e-12, atol=0)
    torch.testing.assert_close(rho, rho_unit, rtol=1e-12, atol=0)
    torch.testing.assert_close(normalized_step(model, x, -p)[0], r, rtol=0, atol=0)
    # definitions: r = max Delta(p) / pi, rho_a = pi / max Delta(p / |p|) = |p| / r
    spread = logit_spread(model, x, p / p.norm())
    torch.testing.assert_close(rho_unit, math.pi / spread.max(), rtol=1e-12, atol=0)
    torch.testing.assert_close(rho * r, p.norm(), rtol=1e-12, atol=0)


def test_batchnorm_running_stats_unchanged_and_modes_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    model.train()
    model[2].eval()  # a submodule in its own mode must keep it
    x = torch.randn(16, 4)
    before = {k: b.clone() for k, b in model.named_buffers()}
    d = _random_direction(model)
    a1 = logit_derivative(model, x, d)
    a2 = logit_derivative(model, x, d)
    for k, b in model.named_buffers():
        assert torch.equal(b, before[k]), k
    torch.testing.assert_close(a1, a2, rtol=0, atol=0)  # eval mode: no dropout noise
    assert model.training and model[1].training and not model[2].training
    # eval mode uses the running statistics: the oracle is the eval-mode functional JVP
    ref_model = copy.deepcopy(model).eval()
    params = {k: p.detach() for k, p in ref_model.named_parameters()}
    _, ref = torch.func.jvp(lambda p: functional_call(ref_model, p, (x,)), (params,), (d,))
    torch.testing.assert_close(a1, ref, rtol=1e-5, atol=1e-6)


# --- the limiter --------------------------------------------------------------------------


def _problem(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (32,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))
    return model.to(dtype), x, y


def _grad(model, x, y):
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()


def _pair(opt_cls, **hyper):
    model, x, y = _problem()
    twin = copy.deepcopy(model)
    return (
        model,
        opt_cls(model.parameters(), **hyper),
        twin,
        opt_cls(twin.parameters(), **hyper),
        x,
        y,
    )


def _base_update(model, opt, hyper):
    """The base optimizer's update from the current point, gradients and state (on a twin)."""
    twin = copy.deepcopy(model)
    for a, b in zip(twin.parameters(), model.parameters()):
        a.grad = None if b.grad is None else b.grad.clone()
    twin_opt = type(opt)(twin.parameters(), **hyper)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    twin_opt.step()
    return twin, _flat_params(twin) - _flat_params(model)


@pytest.mark.parametrize("lr", [3.0, 30.0])
def test_limited_step_has_length_min_of_p_and_rho_along_p(lr):
    hyper = {"lr": lr, "momentum": 0.9}
    model, x, y = _problem()
    opt = torch.optim.SGD(model.parameters(), **hyper)
    limiter = RadiusLimiter(model, r_max=1.0)
    for _ in range(3):
        old = _flat_params(model)
        _grad(model, x, y)
        twin, p = _base_update(model, opt, hyper)
        limiter.step(opt, x)
        r_ref, rho_ref = _reference_r(twin, old, p, x)  # independent torch.func.jvp
        step = _flat_params(model) - old
        s = min(1.0, 1.0 / r_ref)
        assert step.norm() == pytest.approx(min(p.norm().item(), rho_ref), rel=1e-9)
        torch.testing.assert_close(step, s * p, rtol=1e-9, atol=1e-12)
        assert limiter.signals["r"] == pytest.approx(r_ref, rel=1e-9)
        assert limiter.signals["scale"] == pytest.approx(s, rel=1e-9)
    assert limiter.limited >= 1


def _state_at(model, flat):
    """model.state_dict() with the parameters replaced by the flat vector ``flat``."""
    state = copy.deepcopy(model.state_dict())
    i = 0
    for k, p in model.named_parameters():
        state[k] = flat[i : i + p.numel()].view_as(p).clone()
        i += p.numel()
    return state


def _reference_r(model, point, p, x):
    """r and rho_a by torch.func.jvp at ``point`` (a slow, separate implementation)."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [q.shape for _, q in model.named_parameters()]
    sizes = [math.prod(s) for s in shapes]
    prim = {k: t.view(s) for k, t, s in zip(names, point.split(sizes), shapes)}
    tang = {k: t.view(s) for k, t, s in zip(names, p.split(sizes), shapes)}
    model = copy.deepcopy(model).eval()
    _, a = torch.func.jvp(lambda q: functional_call(model, q, (x,)), (prim,), (tang,))
    worst = max(float(row.max() - row.min()) for row in a)
    r = worst / math.pi
    return r, p.norm().item() / r


@pytest.mark.parametrize(
    "opt_cls,hyper",
    [
        (torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9}),
        (torch.optim.Adam, {"lr": 1e-4}),
        (torch.optim.AdamW, {"lr": 1e-4, "weight_decay": 0.1}),
    ],
)
def test_bit_identical_when_r_below_r_max(opt_cls, hyper):
    model, opt, twin, twin_opt, x, y = _pair(opt_cls, **hyper)
    limiter = RadiusLimiter(model, r_max=1.0)
    for _ in range(5):
        _grad(model, x, y)
        limiter.step(opt, x)
        _grad(twin, x, y)
        twin_opt.step()
        assert limiter.signals["r"] < 1.0
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert limiter.limited == 0 and limiter.signals["scale"] == 1.0


def test_monitor_mode_only_measures():
    model, opt, twin, twin_opt, x, y = _pair(torch.optim.SGD, lr=50.0)
    limiter = RadiusLimiter(model, r_max=1.0, mode="monitor")
    for _ in range(3):
        old = _flat_params(model)
        _grad(model, x, y)
        limiter.step(opt, x)
        _grad(twin, x, y)
        twin_opt.step()
        r_ref, _ = _reference_r(model, old, _flat_params(model) - old, x)
        assert limiter.signals["r"] == pytest.approx(r_ref, rel=1e-9)
    assert limiter.signals["r"] > 1.0 and limiter.limited == 0
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_param_groups_frozen_and_foreign_parameters():
    """Two groups with different lrs, a frozen layer, and a parameter outside the model."""
    model, x, y = _problem()
    model[0].weight.requires_grad_(False)
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = torch.optim.SGD(
        [
            {"params": [model[0].bias, model[1].weight, model[1].bias], "lr": 5.0},
            {"params": [model[3].weight, model[3].bias, extra], "lr": 50.0},
        ]
    )
    frozen = model[0].weight.detach().clone()
    limiter = RadiusLimiter(model)
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    old = {k: p.detach().clone() for k, p in model.named_parameters()}
    old_extra = extra.detach().clone()
    _grad(model, x, y)
    extra.grad = torch.ones_like(extra)
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    lr = {k: 5.0 if k.startswith(("0.", "1.")) else 50.0 for k in names}
    p = {k: -lr[k] * trainable[k].grad for k in names}
    limiter.step(opt, x)
    assert torch.equal(model[0].weight, frozen)
    params = {k: old[k] for k in names}
    ev = copy.deepcopy(model).eval()
    _, a = torch.func.jvp(lambda q: functional_call(ev, q, (x,)), (params,), (p,))
    s = min(1.0, math.pi / float((a.amax(1) - a.amin(1)).max()))
    assert s < 1.0
    for k in names:
        torch.testing.assert_close(trainable[k] - old[k], s * p[k], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        extra.detach() - old_extra, s * -50.0 * torch.ones(3, dtype=torch.float64)
    )


def test_neg_grad_variant_scales_the_learning_rate():
    """The released code's variant: r along -lr g, Adam stepped with lr * min(1, 1 / r)."""
    model, opt, twin, twin_opt, x, y = _pair(torch.optim.Adam, lr=2.0)
    limiter = RadiusLimiter(model, direction="neg_grad")
    for _ in range(3):
        _grad(model, x, y)
        _grad(twin, x, y)
        g = torch.cat([q.grad.reshape(-1) for q in twin.parameters()])
        r_ref, _ = _reference_r(twin, _flat_params(twin), -2.0 * g, x)
        limiter.step(opt, x)
        s = min(1.0, 1.0 / r_ref)
        twin_opt.param_groups[0]["lr"] = 2.0 * s
        twin_opt.step()
        twin_opt.param_groups[0]["lr"] = 2.0
        assert opt.param_groups[0]["lr"] == 2.0
        assert limiter.signals["r"] == pytest.approx(r_ref, rel=1e-9)
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert limiter.limited >= 1


def test_rho_set_mode_steps_to_the_target_radius():
    model, opt, twin, _, x, y = _pair(torch.optim.SGD, lr=1e-3)
    limiter = RadiusLimiter(model, r_max=0.5, mode="rho_set")
    old = _flat_params(model)
    _grad(model, x, y)
    limiter.step(opt, x)
    step = _flat_params(model) - old
    r_after, _ = _reference_r(twin, old, step, x)
    assert r_after == pytest.approx(0.5, rel=1e-9)
    assert limiter.signals["scale"] > 1.0  # a tiny lr is scaled up


def test_batchnorm_training_step_keeps_statistics_of_the_training_forward():
    """The limiter's measurement adds no BatchNorm update: only the training forward does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    twin = copy.deepcopy(model)
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    opt, twin_opt = (
        torch.optim.SGD(model.parameters(), lr=1e-3),
        torch.optim.SGD(twin.parameters(), lr=1e-3),
    )
    limiter = RadiusLimiter(model)
    for _ in range(3):
        _grad(model, x, y)
        limiter.step(opt, x)
        _grad(twin, x, y)
        twin_opt.step()
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), k
    assert model.training


def test_nonfinite_update_restores_parameters():
    model, x, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _flat_params(model)
    _grad(model, x, y)
    model[0].weight.grad[0, 0] = float("nan")
    limiter = RadiusLimiter(model)
    with pytest.raises(ValueError, match="NaN or Inf"):
        limiter.step(opt, x)
    assert torch.equal(_flat_params(model), before)
    skipper = RadiusLimiter(model, nonfinite="skip")
    skipper.step(opt, x)
    assert torch.equal(_flat_params(model), before) and skipper.skipped == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"r_max": 0.0},
        {"r_max": float("nan")},
        {"mode": "clip"},
        {"direction": "g"},
        {"method": "fft"},
        {"temperature": -1.0},
        {"fd_eps": 0.0},
        {"nonfinite": "ignore"},
    ],
)
def test_invalid_hyperparameters(kwargs):
    model, _, _ = _problem()
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        RadiusLimiter(model, **kwargs)


def test_state_dict_round_trip_and_missing_keys():
    model, opt, _, _, x, y = _pair(torch.optim.SGD, lr=30.0)
    limiter = RadiusLimiter(model)
    for _ in range(3):
        _grad(model, x, y)
        limiter.step(opt, x)
    state = limiter.state_dict()
    fresh = RadiusLimiter(model)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert fresh.signals["fraction_limited"] == limiter.limited / 3
    fresh.load_state_dict({})
    assert fresh.steps == 0 and fresh.signals == {}


def test_fd_mode_error_is_small_float32():
    model, x, y = _problem(dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    exact, approx = (
        RadiusLimiter(model, mode="monitor"),
        RadiusLimiter(model, mode="monitor", method="fd"),
    )
    _grad(model, x, y)
    state = copy.deepcopy((model.state_dict(), opt.state_dict()))
    exact.step(opt, x)
    model.load_state_dict(state[0])
    opt.load_state_dict(state[1])
    approx.step(opt, x)
    assert approx.signals["r"] == pytest.approx(exact.signals["r"], rel=1e-3)

"""Softmax step radius: the theory's zeros, JVP oracles, and the limiter's guarantees."""

import copy
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from tests.jacobian import models
from torchsteer.bench.suites import lr_spike
from torchsteer.control.radius import (
    RadiusLimiter,
    logit_derivative,
    logit_spread,
    normalized_step,
)
from torchsteer.control.radius._fold import folded_module
from torchsteer.control.radius._linear_reuse import LinearRecorder
from torchsteer.control.radius._tangent import ActivationRecorder
from torchsteer.control.radius.measure import _spread


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


@pytest.mark.parametrize("direction", ["update", "neg_grad"])
def test_cancel_drops_a_pending_snapshot_and_restores_the_lr(direction):
    """before_step without a step, then cancel: nothing pending, the learning rate as it was,
    and the next step is measured from its own snapshot (r against the float64 reference)."""
    model, x, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=30.0)
    limiter = RadiusLimiter(model, direction=direction)
    _grad(model, x, y)
    limiter.before_step(opt, x)
    assert limiter.pending and (direction == "update" or opt.param_groups[0]["lr"] < 30.0)
    with torch.no_grad():  # the parameters move without the limiter (no optimizer step)
        for p in model.parameters():
            p.add_(0.01)
    limiter.cancel()
    assert not limiter.pending and opt.param_groups[0]["lr"] == 30.0
    _grad(model, x, y)
    old = _flat_params(model)
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    r_ref, _ = _reference_r(copy.deepcopy(model), old, -30.0 * g, x)
    limiter.step(opt, x)
    assert limiter.signals["r"] == pytest.approx(r_ref, rel=1e-9)
    assert limiter.steps == 1


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
        {"reuse_forward": 1},
        {"channels_last": "yes"},
        {"fold": None},
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


# --- the tangent-only JVP from the training forward's activations ---------------------------


def _func_jvp(model, x, point, d):
    """The oracle: torch.func.jvp in eval mode at ``point`` along ``d`` (zeros elsewhere)."""
    ev = copy.deepcopy(model).eval()
    prim = {k: point[k] for k, _ in ev.named_parameters()}
    tang = {k: d.get(k, torch.zeros_like(v)) for k, v in prim.items()}
    return torch.func.jvp(lambda q: functional_call(ev, q, (x,)), (prim,), (tang,))[1]


def _chain_models():
    torch.manual_seed(0)
    mlp_ln = lr_spike.make_model("MLP+LN", 0)
    chain = nn.Sequential(
        nn.Linear(6, 8),
        nn.LayerNorm(8, bias=False),
        nn.GELU(approximate="tanh"),
        nn.Linear(8, 8, bias=False),
        nn.Dropout(0.0),
        nn.LayerNorm(8, elementwise_affine=False),
        nn.Sigmoid(),
        nn.Linear(8, 8),
        nn.ReLU(),
        nn.Identity(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 5),
    )
    seq = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.GELU(), nn.Flatten(), nn.Linear(32, 4))
    g = torch.Generator().manual_seed(1)
    return [
        (mlp_ln.double(), torch.rand(40, 64, generator=g, dtype=torch.float64)),
        (chain.double(), torch.randn(40, 6, generator=g, dtype=torch.float64)),
        (seq.double(), torch.randn(40, 4, 3, generator=g, dtype=torch.float64)),  # N-d Linear
    ]


@pytest.mark.parametrize("case", range(3))
def test_tangent_from_recorded_forward_matches_func_jvp(case):
    model, x = _chain_models()[case]
    rec = ActivationRecorder(model)
    model(x).sum().backward()  # a training forward (and backward) at theta
    assert rec.valid and rec.usable(x)
    point = {k: p.detach().clone() for k, p in model.named_parameters()}
    prefix = {m: (n + "." if n else "") for n, m in model.named_modules()}
    d = _random_direction(model, seed=3)
    with torch.no_grad():
        a = rec.tangent(x, point, d, prefix)
    torch.testing.assert_close(a, _func_jvp(model, x, point, d), rtol=1e-12, atol=1e-12)
    # a direction over some parameters only (the others have tangent 0)
    part = {k: v for i, (k, v) in enumerate(d.items()) if i % 3 != 1}
    with torch.no_grad():
        a = rec.tangent(x, point, part, prefix)
    torch.testing.assert_close(a, _func_jvp(model, x, point, part), rtol=1e-12, atol=1e-12)
    # the logits layer without its weight's tangent, and with its bias's alone
    last_w = [k for k in d if k.endswith("weight")][-1]
    last_b = last_w[: -len("weight")] + "bias"
    for sub in ({k: v for k, v in d.items() if k != last_w}, {last_b: d[last_b]}):
        with torch.no_grad():
            a = rec.tangent(x, point, sub, prefix)
        torch.testing.assert_close(a, _func_jvp(model, x, point, sub), rtol=1e-12, atol=1e-12)
    # LayerNorm from its own statistics when the forward's saved ones are not at hand
    assert any(r[5] is not None for r in rec.records)  # every case has a LayerNorm
    rec.records = [(*r[:5], None) for r in rec.records]
    with torch.no_grad():
        a = rec.tangent(x, point, part, prefix)
    torch.testing.assert_close(a, _func_jvp(model, x, point, part), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("opt_cls,lr", [(torch.optim.SGD, 30.0), (torch.optim.Adam, 0.5)])
def test_limiter_reusing_the_forward_equals_the_general_jvp(opt_cls, lr):
    """Same r and the same parameters as the general path; every step took the reuse path."""
    model, x = _chain_models()[0]
    y = torch.randint(0, 10, (40,), generator=torch.Generator().manual_seed(0))
    twin = copy.deepcopy(model)
    opts = [opt_cls(m.parameters(), lr=lr) for m in (model, twin)]
    fast, slow = RadiusLimiter(model), RadiusLimiter(twin, reuse_forward=False)
    for _ in range(4):
        for m, opt, lim in ((model, opts[0], fast), (twin, opts[1], slow)):
            _grad(m, x, y)
            lim.step(opt, x)
        assert fast.signals["r"] == pytest.approx(slow.signals["r"], rel=1e-12)
        assert fast.signals["scale"] == pytest.approx(slow.signals["scale"], rel=1e-12)
        torch.testing.assert_close(_flat_params(model), _flat_params(twin), rtol=1e-12, atol=1e-13)
    assert fast.reused == 4 and slow.reused == 0 and fast.limited >= 1


@pytest.mark.parametrize("nonfinite_at", [None, 4])  # (Adam keeps a NaN: the last step)
def test_flat_buffers_equal_the_per_tensor_path(monkeypatch, nonfinite_at):
    """theta_old and p in two flat buffers (the default when every parameter is named, of one
    type and contiguous) give the per-tensor path's r, |p| and parameters bit for bit, reuse
    their buffers, and restore theta_old on a non-finite step."""
    from torchsteer.control.radius import _buffers as _radius_buffers

    model, x = _chain_models()[1]
    y = torch.randint(0, 5, (40,), generator=torch.Generator().manual_seed(0))
    twin = copy.deepcopy(model)
    opts = [torch.optim.Adam(m.parameters(), lr=0.3) for m in (model, twin)]
    flat = RadiusLimiter(model, r_max=0.5, nonfinite="skip")
    per_tensor = RadiusLimiter(twin, r_max=0.5, nonfinite="skip")
    views = None
    for step in range(5):
        for m, opt, lim in ((model, opts[0], flat), (twin, opts[1], per_tensor)):
            with monkeypatch.context() as mp:
                if lim is per_tensor:
                    never = staticmethod(lambda names, params: False)
                    mp.setattr(_radius_buffers.FlatBuffers, "applies", never)
                _grad(m, x, y)
                if step == nonfinite_at:
                    next(m.parameters()).grad[0, 0] = float("nan")
                before = _flat_params(m)
                lim.step(opt, x)
            if step == nonfinite_at:
                assert lim.last["skipped"] == 1.0 and torch.equal(_flat_params(m), before)
        assert per_tensor._flat is None and flat._flat is not None
        assert views is None or all(a is b for a, b in zip(flat._buffers, views))
        views = list(flat._buffers)
        if step != nonfinite_at:
            assert flat.signals["r"] == per_tensor.signals["r"]
            assert flat.signals["tau"] == pytest.approx(per_tensor.signals["tau"], rel=1e-14)
        assert torch.equal(_flat_params(model), _flat_params(twin))
    assert flat.limited >= 1 and flat.limited == per_tensor.limited


def _one_step(model, x, y, lr=20.0, step_inputs=None, between=None):
    """One SGD step under the limiter; returns (limiter, r of the oracle at theta_old)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    lim = RadiusLimiter(model, mode="monitor")
    _grad(model, x, y)
    if between is not None:
        between(model)
    old = _flat_params(model)
    lim.step(opt, x if step_inputs is None else step_inputs)
    r_ref, _ = _reference_r(model, old, _flat_params(model) - old, x)
    return lim, r_ref


def _bump(model):
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)  # changed after the forward: the record is stale


def _eval_forward(model):
    with torch.no_grad():
        model(torch.randn(3, 6, dtype=torch.float64))


@pytest.mark.parametrize(
    "case", ["other batch object", "parameter changed", "no-grad forward after", "dropout"]
)
def test_reuse_falls_back_when_the_record_is_not_the_measured_forward(case):
    model, x, y = _problem()
    if case == "dropout":
        model = nn.Sequential(model[0], nn.Dropout(0.5), *list(model)[1:])
    kwargs = {
        "other batch object": {"step_inputs": x.clone()},
        "parameter changed": {"between": _bump},
        "no-grad forward after": {"between": _eval_forward},
        "dropout": {},
    }[case]
    lim, r_ref = _one_step(model, x, y, **kwargs)
    assert lim.reused == 0
    assert lim.signals["r"] == pytest.approx(r_ref, rel=1e-9)


@pytest.mark.parametrize("name", ["cnn_bn", "transformer", "functional"])
def test_reuse_falls_back_for_unsupported_models(name):
    """BatchNorm in train mode, operations between modules, functional activations: no
    tangent-only chain pass (the Linear primals are reused where they match)."""
    g = torch.Generator().manual_seed(0)
    if name == "cnn_bn":
        model = lr_spike.make_model("CNN+BN", 0).double()
        x = torch.rand(12, 64, generator=g, dtype=torch.float64)
    elif name == "transformer":
        model = lr_spike.make_model("Transformer", 0).double()
        x = torch.rand(12, 64, generator=g, dtype=torch.float64)
    else:

        class Functional(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Linear(64, 16), nn.Linear(16, 10)

            def forward(self, x):
                return self.b(torch.tanh(self.a(x)))

        torch.manual_seed(0)
        model = Functional().double()
        x = torch.rand(12, 64, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (12,), generator=g)
    lim, r_ref = _one_step(model, x, y, lr=5.0)
    assert lim.signals["r"] == pytest.approx(r_ref, rel=1e-8)
    # the tangent-only chain pass never applies; the general JVP takes the Linear primals
    # from the forward (LinearRecorder): not under train-mode BatchNorm, whose eval-mode
    # measurement sees other inputs (the per-call check), but for the other two
    assert not isinstance(lim._recorder, ActivationRecorder)
    assert isinstance(lim._recorder, LinearRecorder)
    # the chain recorder's hooks are gone after one try; the Linear recorder's remain
    hooked = {m for m in model.modules() if m._forward_hooks}
    assert hooked == {m for m in model.modules() if type(m) is nn.Linear} | {model}
    assert lim.reused == 0  # (the first step tried the chain pass)
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    _grad(model, x, y)
    old = _flat_params(model)
    lim.step(opt, x)
    r_ref, _ = _reference_r(model, old, _flat_params(model) - old, x)
    assert lim.signals["r"] == pytest.approx(r_ref, rel=1e-8)
    assert lim.reused == (0 if name == "cnn_bn" else 1)


def test_recorder_root_output_is_the_latest_forward_output():
    """``ActivationRecorder.root_output``: the very logits tensor of the model's latest
    forward (what ``"fd1"`` reuses as z(theta)), ``None`` once cleared."""
    model, x, _ = _problem()
    rec = ActivationRecorder(model)
    assert rec.root_output is None
    first = model(x)
    assert rec.root_output is first
    second = model(x + 1.0)
    assert rec.root_output is second and not torch.equal(first, second)
    rec.clear()
    assert rec.root_output is None
    rec.remove()


def test_record_survives_deepcopy_and_a_failed_forward():
    model, x, y = _problem()
    lim = RadiusLimiter(model)
    with pytest.raises(RuntimeError):
        model(torch.randn(3, 5, dtype=torch.float64))  # wrong width: the forward raises
    _grad(model, x, y)
    twin = copy.deepcopy(model)  # a copy starts without a record; the original keeps its own
    assert lim._recorder.usable(x)
    lim.step(torch.optim.SGD(model.parameters(), lr=1.0), x)
    assert lim.reused == 1
    assert torch.equal(_flat_params(twin), _flat_params(twin))


# --- eval-mode BatchNorm folded into the layer before it ----------------------------------


def _fold_models():
    g = torch.Generator().manual_seed(4)
    cnn = lr_spike.make_model("CNN+BN", 0).double()
    convs = nn.Sequential(
        nn.Conv1d(2, 4, 3, bias=False),
        nn.BatchNorm1d(4, affine=False),
        nn.ReLU(),
        nn.Conv1d(4, 3, 3, padding=1, stride=2),
        nn.BatchNorm1d(3),
        nn.Flatten(),
        nn.Linear(9, 5),
        nn.BatchNorm1d(5),
    ).double()
    for m in (cnn, convs):
        with torch.no_grad():  # non-trivial running statistics and affine parameters
            for bn in m.modules():
                if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                    bn.running_mean.uniform_(-0.5, 0.5, generator=g)
                    bn.running_var.uniform_(0.5, 2.0, generator=g)
                    if bn.affine:
                        bn.weight.uniform_(0.5, 1.5, generator=g)
                        bn.bias.uniform_(-0.5, 0.5, generator=g)
    return [
        (cnn, torch.rand(9, 64, generator=g, dtype=torch.float64), 2),
        (convs, torch.randn(9, 2, 8, generator=g, dtype=torch.float64), 3),
    ]


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_limiter_layout_and_fold_options_keep_r_and_are_honoured(monkeypatch, channels_last, fold):
    """``RadiusLimiter(channels_last=, fold=)`` reach the measurement: each on or off gives the
    r of the dense torch.func.jvp oracle (to rounding), and the folded forward runs iff
    ``fold``, the channels-last conversion of the 4-d weights iff ``channels_last``."""
    from torchsteer.control.radius import _fold, measure

    calls = {"folded": 0, "channels_last": 0}
    folded_forward, to_channels_last = _fold._Folded.forward, measure._channels_last

    def counted_forward(self, x):
        calls["folded"] += 1
        return folded_forward(self, x)

    def counted_channels_last(tensors):
        calls["channels_last"] += 1
        return to_channels_last(tensors)

    monkeypatch.setattr(_fold._Folded, "forward", counted_forward)
    monkeypatch.setattr(measure, "_channels_last", counted_channels_last)
    model, x, _ = _fold_models()[0]  # the lr-spike CNN: Conv2d-BatchNorm pairs, on the CPU
    y = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(2))
    lim = RadiusLimiter(model, mode="monitor", channels_last=channels_last, fold=fold)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    old = {k: p.detach().clone() for k, p in model.named_parameters()}
    _grad(model, x, y)
    lim.step(opt, x)
    d = {k: p.detach() - old[k] for k, p in model.named_parameters()}
    spread = _spread(_func_jvp(model, x, old, d))
    assert lim.signals["r"] == pytest.approx(float(spread.max()) / math.pi, rel=1e-10)
    assert calls["folded"] == int(fold)
    assert calls["channels_last"] == 2 * int(channels_last)  # theta and v, once each


@pytest.mark.parametrize("case", range(2))
def test_folded_batchnorm_jvp_matches_func_jvp(case):
    model, x, n_pairs = _fold_models()[case]
    model.train()  # the measurement switches to eval mode itself
    folded = folded_module(model)
    assert folded is not None and len(folded.pairs) == n_pairs
    d = _random_direction(model, seed=5)
    point = {k: p.detach() for k, p in model.named_parameters()}
    before = {k: b.clone() for k, b in model.named_buffers()}
    a = logit_derivative(model, x, d)
    torch.testing.assert_close(a, _func_jvp(model, x, point, d), rtol=1e-12, atol=1e-12)
    for k, b in model.named_buffers():
        assert torch.equal(b, before[k]), k
    assert model.training


def test_folding_is_retraced_when_a_submodule_is_replaced():
    model, x, _ = _fold_models()[1]
    d = _random_direction(model, seed=6)
    logit_derivative(model, x, d)
    torch.manual_seed(1)
    model[6] = nn.Linear(9, 5).double()  # a new layer before the last BatchNorm
    d = _random_direction(model, seed=6)
    point = {k: p.detach() for k, p in model.named_parameters()}
    torch.testing.assert_close(
        logit_derivative(model, x, d), _func_jvp(model, x, point, d), rtol=1e-12, atol=1e-12
    )


def test_batchnorm_in_train_mode_is_not_folded():
    """eval_mode=False: the JVP goes through the batch statistics, as torch.func.jvp does."""
    model, x, _ = _fold_models()[0]
    model.train()
    d = _random_direction(model, seed=7)
    point = {k: p.detach() for k, p in model.named_parameters()}
    a = logit_derivative(model, x, d, eval_mode=False)
    tr = copy.deepcopy(model).train()
    for bn in (tr.bn1, tr.bn2):  # batch statistics without updating running ones
        bn.track_running_stats, bn.running_mean, bn.running_var = False, None, None
    _, ref = torch.func.jvp(lambda q: functional_call(tr, q, (x,)), (point,), (d,))
    torch.testing.assert_close(a, ref, rtol=1e-10, atol=1e-12)


class _SharedConv(nn.Module):
    """One convolution called twice (once before a BatchNorm), and a Linear on 3-d inputs
    before a BatchNorm1d over dimension 1: neither pair may be folded."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)
        self.lin, self.bn1d = nn.Linear(8, 6), nn.BatchNorm1d(2)
        self.head = nn.Linear(2 * 6, 3)

    def forward(self, x):  # x: (B, 2, 8, 8)
        h = self.bn(self.conv(x)) + self.conv(x)
        h = self.bn1d(self.lin(h.mean(2)))  # (B, 2, 6): BatchNorm1d over the 2 channels
        return self.head(h.flatten(1))


def test_shared_layers_and_3d_linear_are_not_folded_wrongly():
    torch.manual_seed(0)
    model = _SharedConv().double()
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for bn in (model.bn, model.bn1d):
            bn.running_mean.uniform_(-0.5, 0.5, generator=g)
            bn.running_var.uniform_(0.5, 2.0, generator=g)
    x = torch.randn(5, 2, 8, 8, generator=g, dtype=torch.float64)
    folded = folded_module(model)
    assert folded is None or "conv" not in folded.pairs
    d = _random_direction(model, seed=9)
    point = {k: p.detach() for k, p in model.named_parameters()}
    torch.testing.assert_close(
        logit_derivative(model, x, d), _func_jvp(model, x, point, d), rtol=1e-12, atol=1e-12
    )


# --- the one-sided difference from the training forward's logits ------------------------------


def test_one_sided_difference_float64_matches_func_jvp():
    model, x = _chain_models()[0]
    d = _random_direction(model, seed=10)
    point = {k: p.detach() for k, p in model.named_parameters()}
    a = logit_derivative(model, x, d, method="fd1")
    torch.testing.assert_close(a, _func_jvp(model, x, point, d), rtol=1e-5, atol=1e-6)


def test_fd1_limiter_reuses_the_training_logits_and_is_close_to_exact():
    """One forward per step (the training forward's logits at theta_old); r within 1e-2."""
    model, x, y = _problem(dtype=torch.float32)
    twin = copy.deepcopy(model)
    opts = [torch.optim.Adam(m.parameters(), lr=0.5) for m in (model, twin)]
    approx, exact = RadiusLimiter(model, method="fd1"), RadiusLimiter(twin)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    for _ in range(3):
        for m, opt, lim in ((model, opts[0], approx), (twin, opts[1], exact)):
            _grad(m, x, y)
            lim.step(opt, x)
        assert approx.signals["r"] == pytest.approx(exact.signals["r"], rel=1e-2)
        torch.testing.assert_close(_flat_params(model), _flat_params(twin), rtol=1e-2, atol=1e-4)
    assert approx.reused == 3 and approx.limited >= 1
    assert len(calls) == 3 + 3  # the training forwards and one measurement forward each


def test_reuse_falls_back_under_autocast():
    """bfloat16 activations from an autocast forward: the general (float32) JVP measures."""
    model, x, y = _problem(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=20.0)
    lim = RadiusLimiter(model, mode="monitor")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    old = _flat_params(model)
    lim.step(opt, x)
    r_ref, _ = _reference_r(model, old, _flat_params(model) - old, x)
    assert lim.reused == 0
    assert lim.signals["r"] == pytest.approx(r_ref, rel=1e-4)


# --- per-step savings: reused snapshot buffers, cached names, fused spread ------------------


def test_spread_matches_a_row_loop_and_propagates_nan():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(5, 3, 7, generator=g, dtype=torch.float64)
    rows = a.reshape(-1, 7)
    expected = torch.tensor([max(r.tolist()) - min(r.tolist()) for r in rows], dtype=a.dtype)
    assert torch.equal(_spread(a), expected)
    a[1, 2, 4] = float("nan")
    s = _spread(a)
    assert math.isnan(s[5]) and torch.equal(s[:5], expected[:5])
    # a column-major (N, C) view, as the recorder returns the logits' tangent
    cm = torch.randn(7, 11, generator=g, dtype=torch.float64).t()
    assert cm.stride(0) == 1
    expected = torch.tensor([max(r) - min(r) for r in cm.tolist()], dtype=cm.dtype)
    assert torch.equal(_spread(cm), expected)
    cm[4, 3] = float("nan")
    s = _spread(cm)
    assert math.isnan(s[4]) and torch.equal(s[:4], expected[:4])


def test_snapshot_buffers_reused_and_rebuilt_when_the_parameter_set_changes():
    """Every step exact against torch.func.jvp (float64) and theta = old + s p, while the
    snapshot buffers are reused between steps and follow a change of the optimized set."""
    model, x, y = _problem()
    lim = RadiusLimiter(model, r_max=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    buffers = None
    for step in range(5):
        if step == 3:  # freeze the first layer: a new optimizer over the rest
            for p in model[0].parameters():
                p.requires_grad_(False)
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=5.0)
        _grad(model, x, y)
        old = _flat_params(model)
        frozen = [p.detach().clone() for p in model[0].parameters()]
        trainable = [p for p in model.parameters() if p.requires_grad]
        p_full = torch.cat([-5.0 * p.grad.reshape(-1) for p in trainable])  # SGD's update
        r_ref, _ = _reference_r(_trainable_only(copy.deepcopy(model)), old, p_full, x)
        lim.step(opt, x)
        if step not in (0, 3):
            assert all(a is b for a, b in zip(lim._buffers, buffers))
        buffers = list(lim._buffers)
        assert len(buffers) == len(trainable)
        assert lim.signals["r"] == pytest.approx(r_ref, rel=1e-9)
        s = min(1.0, 0.05 / r_ref)
        torch.testing.assert_close(_flat_params(model), old + s * p_full, rtol=1e-9, atol=1e-12)
        for p, q in zip(model[0].parameters(), frozen):
            if not p.requires_grad:
                assert torch.equal(p, q)
    assert lim.reused == 5 and lim.limited >= 1


def _trainable_only(model):
    """``model`` whose frozen parameters are buffers: ``_reference_r`` then moves the rest."""
    for m in model.modules():
        for k, p in list(m._parameters.items()):
            if p is not None and not p.requires_grad:
                del m._parameters[k]
                m.register_buffer(k, p.detach())
    return model


def test_reuse_falls_back_when_a_parameter_object_is_replaced():
    """The record holds the old parameter object: a replaced one means the general path."""
    model, x, y = _problem()
    lim = RadiusLimiter(model, mode="monitor")
    _grad(model, x, y)
    w = model[0].weight
    model[0].weight = nn.Parameter(w.detach().clone())
    model[0].weight.grad = w.grad.clone()
    old = _flat_params(model)
    lim.step(torch.optim.SGD(model.parameters(), lr=20.0), x)
    r_ref, _ = _reference_r(model, old, _flat_params(model) - old, x)
    assert lim.reused == 0
    assert lim.signals["r"] == pytest.approx(r_ref, rel=1e-9)


def test_tangent_buffers_kept_between_calls_do_not_leak_into_results():
    """Tangents from the kept buffers: each equals torch.func.jvp (float64), a returned
    tangent is not overwritten by the next call, and a new batch size reallocates them."""
    model, x, y = _problem()
    model = nn.Sequential(*model[:3], nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    rec = ActivationRecorder(model)
    prefix = {m: (n + "." if n else "") for n, m in model.named_modules()}
    theta = {k: p.detach() for k, p in model.named_parameters()}
    results = []
    for batch, seed in ((x, 1), (x, 2), (x[:20], 3)):
        _grad(model, batch, y[: len(batch)])
        v = _random_direction(model, seed)
        a = rec.tangent(batch, theta, v, prefix)
        ev = copy.deepcopy(model).eval()
        f = functools.partial(lambda m, b, q: functional_call(m, q, (b,)), ev, batch)
        _, ref = torch.func.jvp(f, (theta,), (v,))
        torch.testing.assert_close(a, ref, rtol=1e-12, atol=1e-12)
        results.append((a, ref))
    for a, ref in results:  # still the values each call returned
        torch.testing.assert_close(a, ref, rtol=1e-12, atol=1e-12)
    assert len(rec._buffers) >= 3
    # a deep copy of the model carries a copy of the recorder: its own buffers, same care
    twin = copy.deepcopy(model)
    (rec2,) = {h.__self__ for h in twin._forward_hooks.values()}
    assert rec2 is not rec and not rec2._buffers
    xs = x[:20]  # the batch size of the buffers copied from the last call above
    _grad(twin, xs, y[:20])
    prefix2 = {m: (n + "." if n else "") for n, m in twin.named_modules()}
    first = [rec2.tangent(xs, theta, _random_direction(twin, s), prefix2) for s in (4, 5)]
    ev = copy.deepcopy(twin).eval()
    f = functools.partial(lambda m, b, q: functional_call(m, q, (b,)), ev, xs)
    _, ref = torch.func.jvp(f, (theta,), (_random_direction(twin, 4),))
    torch.testing.assert_close(first[0], ref, rtol=1e-12, atol=1e-12)


class _ConvBnRelu(nn.Module):
    """conv-BN-ReLU blocks whose ReLU is F.relu, nn.ReLU, in place, or shares the BN output."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2, self.r2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.c3, self.b3 = nn.Conv2d(4, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.c4, self.b4 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 5 * 5, 4)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))  # fused
        h = self.r2(self.b2(self.c2(h)))  # fused (module)
        g = self.b3(self.c3(h))
        h = F.relu(g) + 0.5 * g  # the BN output has two users: not fused
        h = F.relu(self.b4(self.c4(h)), inplace=True)  # in place: not fused
        return self.head(h.flatten(1))


def test_relu_applied_inside_the_folded_convolution_keeps_the_exact_jvp():
    torch.manual_seed(0)
    model = _ConvBnRelu().double()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # running statistics away from (0, 1)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
    x = torch.randn(6, 2, 5, 5, generator=g, dtype=torch.float64)
    folded = folded_module(model)
    assert folded is not None and set(folded.relus) == {"b1", "b2"}
    d = _random_direction(model, seed=7)
    point = {k: p.detach() for k, p in model.named_parameters()}
    a = logit_derivative(model, x, d)
    torch.testing.assert_close(a, _func_jvp(model, x, point, d), rtol=1e-12, atol=1e-12)


def test_lbfgs_closure_forwards_are_not_reused():
    """LBFGS re-runs the forward at inner points: the recorded forward is not the one at the
    step's start, so the reuse path must fall back; r equals the general JVP's."""
    rs = {}
    for reuse in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        x = torch.randn(10, 4, dtype=torch.float64)
        y = torch.randint(0, 3, (10,))
        opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=5)
        limiter = RadiusLimiter(model, mode="monitor", reuse_forward=reuse)

        def closure(opt=opt, model=model, x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        closure()  # a forward at the start point (e.g. for logging), then the step
        limiter.step(opt, x, closure)
        rs[reuse] = (limiter.last["r"], limiter.reused)
    assert rs[True][1] == 0
    assert rs[True][0] == pytest.approx(rs[False][0], rel=1e-12)

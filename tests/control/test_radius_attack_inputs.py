"""Bad input to the radius limiter and its measurement (issue 18, the attack rerun): a named
``ValueError`` and, for :meth:`RadiusLimiter.step`, the parameters, the optimizer's state and
the limiter's counters bitwise as before; a limiter survives ``copy.deepcopy`` / ``pickle``
and steps as the original does.

Oracles: the state before the call (bitwise), and for pickling the original limiter stepped
side by side with the copy on a deep copy of model and optimizer (bitwise equal parameters).
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from torchsteer.control import RadiusLimiter, logit_derivative, logit_spread, normalized_step


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def _x(n=8, width=4):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(1))


def _direction(model):
    return {n: torch.ones_like(p) for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("name", "value"),
    [("r_max", True), ("eval_mode", "yes"), ("temperature", "x"), ("temperature", True),
     ("fd_eps", "x"), ("reuse_forward", 1), ("mode", 3)],
)  # fmt: skip
def test_constructor_refuses_by_name(name, value):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        RadiusLimiter(_model(), **{name: value})


def test_valid_settings_still_accepted():
    lim = RadiusLimiter(_model(), r_max=1, temperature=2, fd_eps=1e-3, eval_mode=False)
    assert lim.r_max == 1.0 and lim.temperature == 2.0
    lim.remove_hooks()


def test_logit_derivative_inputs_of_wrong_width():
    with pytest.raises(ValueError, match=r"Invalid inputs.*shape"):
        logit_derivative(_model(), _x(width=5), _direction(_model()))


def test_logit_derivative_direction_missing_a_parameter():
    model = _model()
    d = dict(list(_direction(model).items())[:2])
    with pytest.raises(ValueError, match=r"Invalid direction.*2\.weight"):
        logit_derivative(model, _x(), d)
    # a subset with the point it moves from is the documented partial measurement
    params = {k: p for k, p in model.named_parameters() if k in d}
    full = {k: (v if k in d else torch.zeros_like(v)) for k, v in _direction(model).items()}
    torch.testing.assert_close(
        logit_derivative(model, _x(), d, params=params), logit_derivative(model, _x(), full)
    )


def test_logit_derivative_direction_of_wrong_shape():
    model = _model()
    with pytest.raises(ValueError, match=r"Invalid direction shape.*0\.weight.*\(2, 2\)"):
        logit_derivative(model, _x(), {**_direction(model), "0.weight": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="not trainable parameters"):
        logit_derivative(model, _x(), {**_direction(model), "nope": torch.ones(2)})


def test_empty_inputs_refused():
    model = _model()
    with pytest.raises(ValueError, match="Invalid inputs: an empty batch"):
        logit_spread(model, _x()[:0], _direction(model))


@pytest.mark.parametrize("t", [0.0, -1.0, math.nan, "x"])
def test_normalized_step_temperature(t):
    model = _model()
    with pytest.raises(ValueError, match="Invalid temperature"):
        normalized_step(model, _x(), _direction(model), temperature=t)


def _setup(nonfinite="raise"):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    lim = RadiusLimiter(model, r_max=0.5, nonfinite=nonfinite)
    x, y = _x(), torch.zeros(8, dtype=torch.long)

    def grad():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()

    grad()
    lim.step(opt, x)  # the optimizer's state exists
    grad()
    return model, opt, lim, x, grad


def _frozen(model, opt, lim):
    return (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy(opt.state_dict()),
        copy.deepcopy(lim.state_dict()),
    )


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b) or (
            bool((a.isnan() == b.isnan()).all()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        )
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        (lambda x: _x(width=5), r"Invalid inputs.*shape"),
        (lambda x: x[:0], "Invalid inputs: an empty batch"),
        (lambda x: x.clone().fill_(math.nan), "NaN or Inf"),
    ],
    ids=["wrong width", "empty", "nan"],
)
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_step_on_bad_inputs_changes_nothing(inputs, match, nonfinite):
    model, opt, lim, x, _ = _setup(nonfinite)
    bad = inputs(x)
    before = _frozen(model, opt, lim)
    if nonfinite == "skip" and "NaN" in match:  # skipped: counted, nothing else changes
        lim.step(opt, bad)
        assert lim.skipped == 1 and lim.steps == before[2]["steps"] + 1
        assert _equal(before[:2], _frozen(model, opt, lim)[:2])
        return
    with pytest.raises(ValueError, match=match):
        lim.step(opt, bad)
    assert _equal(before, _frozen(model, opt, lim)) and not lim.pending


def test_a_raised_nan_gradient_step_is_not_counted():
    model, opt, lim, x, _ = _setup("raise")
    steps, skipped = lim.steps, lim.skipped
    model[2].weight.grad[0, 0] = math.nan
    with pytest.raises(ValueError, match="Invalid gradient"):
        lim.step(opt, x)
    assert (lim.steps, lim.skipped) == (steps, skipped)


def test_neg_grad_nan_gradient_raises_uncounted():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lim = RadiusLimiter(model, direction="neg_grad")
    F.cross_entropy(model(_x()), torch.zeros(8, dtype=torch.long)).backward()
    model[0].bias.grad[0] = math.nan
    with pytest.raises(ValueError, match="Invalid gradient"):
        lim.step(opt, _x())
    assert lim.steps == 0 and lim.skipped == 0


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@pytest.mark.parametrize("direction", ["update", "neg_grad"])
def test_a_copied_limiter_steps_as_the_original(how, direction):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.3)
    lim = RadiusLimiter(model, r_max=0.05, direction=direction)
    x, y = _x(), torch.zeros(8, dtype=torch.long)

    def step(m, o, limiter):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        limiter.step(o, x)

    for _ in range(3):
        step(model, opt, lim)
    if how == "pickle":
        model2, opt2, lim2 = pickle.loads(pickle.dumps((model, opt, lim)))
    else:
        model2, opt2, lim2 = copy.deepcopy((model, opt, lim))
    assert lim2.model is model2 and lim2.state_dict() == lim.state_dict()
    for _ in range(4):
        step(model, opt, lim)
        step(model2, opt2, lim2)
        for p, q in zip(model.parameters(), model2.parameters(), strict=True):
            assert torch.equal(p, q)
    assert lim.limited == lim2.limited >= 1 and lim2.steps == lim.steps == 7

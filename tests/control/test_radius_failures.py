"""RadiusLimiter under failure: NaN gradients, exceptions mid-step, dropped limiters, several
optimizers in one step, models that return more than the logits (issue 18 #2, #3, #13, #21;
issue 19). Every oracle is a run without the fault or the float64 torch.func reference."""

import copy
import gc

import pytest
import torch
from torch import nn

from tests.control.test_radius import _flat_params, _grad, _problem, _reference_r
from torchsteer.control.radius import RadiusLimiter, logit_derivative


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(32, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (32,), generator=g),
        )
        for _ in range(n)
    ]


def _adam_run(batches, bad=None, nonfinite="skip"):
    """Adam under the limiter over ``batches``; at index ``bad`` a NaN enters the gradient."""
    model, _, _ = _problem()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    limiter = RadiusLimiter(model, r_max=0.1, nonfinite=nonfinite)
    skipped = []
    for i, (x, y) in enumerate(batches):
        _grad(model, x, y)
        if i == bad:
            model[3].weight.grad[1, 2] = float("nan")
            if nonfinite == "raise":
                before = copy.deepcopy(opt.state_dict())
                params = _flat_params(model)
                with pytest.raises(ValueError, match="Invalid gradient: NaN or Inf"):
                    limiter.step(opt, x)
                _assert_same_state(opt.state_dict(), before)
                assert torch.equal(_flat_params(model), params)
                continue
        limiter.step(opt, x)
        skipped.append(limiter.last["skipped"])
    return model, opt, limiter, skipped


def _assert_same_state(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for name, t in a["state"][k].items():
            assert torch.equal(t, b["state"][k][name]), (k, name)


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_a_nan_gradient_never_reaches_adams_state(nonfinite):
    # issue 18 #2: the check came after optimizer.step(), so Adam's moments were NaN and
    # every later step was skipped; now the gradients are checked before the base step
    batches = _batches(50)
    model, opt, limiter, skipped = _adam_run(batches, bad=4, nonfinite=nonfinite)
    clean_model, clean_opt, clean, _ = _adam_run(batches[:4] + batches[5:])
    if nonfinite == "skip":
        assert skipped[4] == 1.0 and skipped[5:] == [0.0] * 45  # the 45 steps after it run
    # a refused step ("raise") is not counted (issue 18): the counters are as before it
    assert limiter.skipped == (nonfinite == "skip") and clean.skipped == 0
    assert limiter.steps == clean.steps + (nonfinite == "skip")
    _assert_same_state(opt.state_dict(), clean_opt.state_dict())  # bit for bit
    assert torch.equal(_flat_params(model), _flat_params(clean_model))
    assert limiter.limited == clean.limited >= 1


def test_nan_gradient_skip_undoes_the_optimizers_step():
    """The skip is decided on the device (issue 17): the optimizer steps, and its parameters
    and state are put back bit for bit; on its first step (the state created) by the host."""
    model, x, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append(1))
    limiter = RadiusLimiter(model, nonfinite="skip")
    _grad(model, x, y)
    model[0].bias.grad[0] = float("inf")
    before = _flat_params(model)
    assert limiter.step(opt, x) is None
    assert calls == [1] and opt.state_dict()["state"] == {} and not limiter.pending
    assert torch.equal(_flat_params(model), before) and limiter.skipped == 1
    _grad(model, x, y)
    limiter.step(opt, x)  # the state exists now: the next skip is masked on the device
    state, before = copy.deepcopy(opt.state_dict()), _flat_params(model)
    _grad(model, x, y)
    model[3].weight.grad[0, 0] = float("nan")
    limiter.step(opt, x)
    _assert_same_state(opt.state_dict(), state)
    assert torch.equal(_flat_params(model), before) and limiter.skipped == 2


def test_finite_huge_gradients_are_not_called_nonfinite():
    """max |g| decides, so float32 gradients whose squares overflow are still finite."""
    model, x, y = _problem(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=1e-31)
    limiter = RadiusLimiter(model, nonfinite="raise", r_max=0.5)
    _grad(model, x, y)
    for p in model.parameters():
        p.grad.mul_(1e30)  # |g|_2^2 overflows float32; every entry is finite
    old = _flat_params(model).double()
    limiter.step(opt, x)
    assert limiter.skipped == 0 and limiter.last["r"] > 0
    p = _flat_params(model).double() - old  # the applied step
    r_ref, _ = _reference_r(copy.deepcopy(model).double(), old, p, x.double())
    assert r_ref == pytest.approx(min(limiter.last["r"], 0.5), rel=1e-4)


class _Boom(torch.optim.SGD):
    """SGD that moves the parameters and then fails."""

    def step(self, closure=None):
        super().step(closure)
        raise RuntimeError("boom")


@pytest.mark.parametrize("where", ["optimizer", "measurement"])
def test_a_failure_mid_step_restores_theta_old(where):
    # issue 18 #3: an exception between the base step and the correction left the
    # unlimited step applied (r = 17.6 against r_max 0.5)
    model, x, y = _problem()
    cls = _Boom if where == "optimizer" else torch.optim.SGD
    opt = cls(model.parameters(), lr=30.0)
    limiter = RadiusLimiter(model, r_max=0.5)
    _grad(model, x, y)
    before = _flat_params(model)
    bad_inputs = torch.randn(32, 5, dtype=torch.float64)  # wrong feature count
    with pytest.raises(RuntimeError if where == "optimizer" else ValueError):  # (issue 18)
        limiter.step(opt, x if where == "optimizer" else bad_inputs)
    assert torch.equal(_flat_params(model), before) and not limiter.pending
    assert limiter.steps == 0
    # the next step runs as usual, from its own snapshot (r against the float64 reference)
    opt = torch.optim.SGD(model.parameters(), lr=30.0)
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    r_ref, _ = _reference_r(model, before, -30.0 * g, x)
    limiter.step(opt, x)
    assert limiter.last["r"] == pytest.approx(r_ref, rel=1e-9) and limiter.limited == 1


def test_abort_after_a_manual_step_restores_theta_old_and_the_lr():
    for direction in ("update", "neg_grad"):
        model, x, y = _problem()
        opt = torch.optim.SGD(model.parameters(), lr=30.0)
        limiter = RadiusLimiter(model, r_max=0.5, direction=direction)
        _grad(model, x, y)
        before = _flat_params(model)
        limiter.before_step(opt, x)
        opt.step()
        limiter.abort()
        assert not limiter.pending and opt.param_groups[0]["lr"] == 30.0
        if direction == "update":
            assert torch.equal(_flat_params(model), before)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_dropped_limiters_leave_no_hooks():
    # issue 18 #13: 100 limiters without remove_hooks() left 500 forward hooks
    model, x, y = _problem()
    assert _hook_count(model) == 0
    for _ in range(100):
        limiter = RadiusLimiter(model)
        _grad(model, x, y)
        limiter.step(torch.optim.SGD(model.parameters(), lr=1e-3), x)
    del limiter
    gc.collect()
    assert _hook_count(model) == 0
    live = RadiusLimiter(model)  # a live limiter keeps its hooks and reuses the forward
    assert _hook_count(model) == 2 + 4  # the root's pre- and post-hook, one per leaf
    _grad(model, x, y)
    before = _flat_params(model)
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    live.step(torch.optim.SGD(model.parameters(), lr=20.0), x)
    r_ref, _ = _reference_r(model, before, -20.0 * g, x)
    assert live.reused == 1 and live.last["r"] == pytest.approx(r_ref, rel=1e-9)


def _split_optimizers(model, lr):
    first = [*model[0].parameters(), *model[1].parameters()]
    return torch.optim.SGD(first, lr=lr), torch.optim.SGD(model[3].parameters(), lr=lr)


def test_two_optimizers_in_one_step_limit_the_combined_update():
    # issue 18 #21: the second optimizer's update was never measured
    model, _, _ = _problem()
    lr, r_max = 20.0, 0.3
    opt1, opt2 = _split_optimizers(model, lr)
    limiter = RadiusLimiter(model, r_max=r_max)
    for x, y in _batches(4):
        _grad(model, x, y)
        old = _flat_params(model)
        p = -lr * torch.cat([q.grad.reshape(-1) for q in model.parameters()])
        r_ref, _ = _reference_r(model, old, p, x)
        limiter.before_step(opt1, x)
        opt1.step()
        limiter.before_step(opt2, x)
        assert limiter.pending_for(opt1) and limiter.pending_for(opt2)
        opt2.step()
        limiter.after_step(x)
        assert limiter.last["r"] == pytest.approx(r_ref, rel=1e-9)
        assert limiter.last["tau"] == pytest.approx(p.norm().item(), rel=1e-12)
        s = min(1.0, r_max / r_ref)
        torch.testing.assert_close(_flat_params(model), old + s * p, rtol=1e-10, atol=1e-12)
    assert limiter.limited == 4 and limiter.steps == 4


def test_two_optimizers_neg_grad_raises_and_restores_the_lr():
    model, x, y = _problem()
    opt1, opt2 = _split_optimizers(model, 20.0)
    limiter = RadiusLimiter(model, r_max=0.3, direction="neg_grad")
    _grad(model, x, y)
    limiter.before_step(opt1, x)
    assert opt1.param_groups[0]["lr"] < 20.0
    with pytest.raises(ValueError, match="Invalid optimizer: direction='neg_grad'"):
        limiter.before_step(opt2, x)
    assert not limiter.pending and opt1.param_groups[0]["lr"] == 20.0


def test_optimizers_sharing_a_parameter_raise():
    model, x, y = _problem()
    opt1 = torch.optim.SGD(model.parameters(), lr=1.0)
    opt2 = torch.optim.SGD(model[3].parameters(), lr=1.0)
    limiter = RadiusLimiter(model)
    _grad(model, x, y)
    before = _flat_params(model)
    limiter.before_step(opt1, x)
    opt1.step()
    with pytest.raises(ValueError, match="shares parameters"):
        limiter.before_step(opt2, x)
    assert torch.equal(_flat_params(model), before) and not limiter.pending


class _WithAux(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        z = self.net(x)
        return z, z.pow(2).mean()


def test_a_model_returning_a_tuple_names_logits_fn():
    # issue 19: the error was an internal "_unpack_dual()" one
    net, x, y = _problem()
    model = _WithAux(net)
    opt = torch.optim.SGD(model.parameters(), lr=20.0)
    limiter = RadiusLimiter(model, r_max=0.5)
    model.zero_grad()
    nn.functional.cross_entropy(model(x)[0], y).backward()
    before = _flat_params(model)
    with pytest.raises(ValueError, match=r"Invalid logits: the model returned a tuple.*logits_fn"):
        limiter.step(opt, x)
    assert torch.equal(_flat_params(model), before)  # and the step was undone
    point = {"net.0.bias": model.net[0].bias}  # a subset of the parameters moves (issue 18)
    for method in ("jvp", "fd"):
        with pytest.raises(ValueError, match="logits_fn"):
            logit_derivative(model, x, {"net.0.bias": torch.ones(16)}, params=point, method=method)
    with pytest.raises(ValueError, match="Invalid logits: logits_fn returned a tuple"):
        logit_derivative(
            model, x, {"net.0.bias": torch.ones(16)}, params=point, logits_fn=lambda m, b: m(b)
        )
    fixed = RadiusLimiter(model, r_max=0.5, logits_fn=lambda m, b: m(b)[0])
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    fixed.step(opt, x)
    r_ref, _ = _reference_r(net, before, -20.0 * g, x)
    assert fixed.last["r"] == pytest.approx(r_ref, rel=1e-9)

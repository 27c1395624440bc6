"""RadiusLimiter without host synchronization (issue 17): a steady-state step syncs 0 times
with ``nonfinite="skip"`` (beyond the base optimizer's own), once with ``"raise"``; the
masked decisions match the host-decided run bit for bit, and the device part compiles."""

import copy

import pytest
import torch
from torch import nn

from tests._sync import SyncCounter
from torchsteer.control.radius import RadiusLimiter
from torchsteer.control.radius._buffers import FlatBuffers
from torchsteer.control.radius._masked import device_scale


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g)


def _grad(model, x, y):
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def _run(nonfinite, make_opt, steps=5, bad=None, lr_jump=None, r_max=0.05):
    """Steps of ``make_opt`` under the limiter; the host syncs counted on the last one."""
    model = _model()
    opt = make_opt(model.parameters())
    limiter = RadiusLimiter(model, r_max=r_max, nonfinite=nonfinite)
    x, y = _data()
    counts = []
    for i in range(steps):
        _grad(model, x, y)
        if i == bad:
            model[2].weight.grad[1, 1] = float("nan")
        with SyncCounter() as c:
            limiter.step(opt, x)
        counts.append(c.total)
    return model, opt, limiter, counts


def _sgd(params):
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


@pytest.mark.parametrize("bad", [None, 3])
def test_a_steady_state_step_with_skip_never_syncs(bad):
    _, _, limiter, counts = _run("skip", _sgd, bad=bad)
    assert counts[1:] == [0] * 4  # the first step creates SGD's state: one read
    assert counts[0] == 1
    assert limiter.skipped == (bad is not None) and limiter.limited >= 1


def test_raise_syncs_once_per_step():
    _, _, _, counts = _run("raise", _sgd)
    assert counts == [1] * 5


def test_under_adam_only_adams_own_syncs_remain():
    """torch.optim.Adam (not capturable) reads its step counter once per parameter."""
    model = _model()
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = _data()
    for _ in range(2):
        _grad(model, x, y)
        adam.step()
    with SyncCounter() as own:
        adam.step()
    _, _, _, counts = _run("skip", lambda p: torch.optim.Adam(p, lr=0.01), bad=3)
    assert counts[1:] == [own.total] * 4 and own.total == 4


@pytest.mark.parametrize("make_opt", [_sgd, lambda p: torch.optim.Adam(p, lr=0.05)])
@pytest.mark.parametrize("bad", [None, 2])
def test_device_decisions_equal_the_host_decisions_bit_for_bit(make_opt, bad):
    """ "skip" (decided on the device) against "raise" (read on the host) on the same
    steps, limited ones included; the NaN step skipped by one, refused by the other."""
    a_model, a_opt, a, _ = _run("skip", make_opt, steps=6, bad=bad)
    b_model = _model()
    b_opt = make_opt(b_model.parameters())
    b = RadiusLimiter(b_model, r_max=0.05, nonfinite="raise")
    x, y = _data()
    for i in range(6):
        _grad(b_model, x, y)
        if i == bad:
            b_model[2].weight.grad[1, 1] = float("nan")
            with pytest.raises(ValueError, match="Invalid gradient"):
                b.step(b_opt, x)
            continue
        b.step(b_opt, x)
    for p, q in zip(a_model.parameters(), b_model.parameters()):
        assert torch.equal(p, q)
    sa, sb = a_opt.state_dict()["state"], b_opt.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name in sa[k]:
            assert torch.equal(torch.as_tensor(sa[k][name]), torch.as_tensor(sb[k][name]))
    assert a.limited == b.limited >= 1
    assert a.skipped == (bad is not None)


def test_the_record_is_read_once_when_read():
    model, opt, limiter, _ = _run("skip", _sgd, steps=3)
    x, y = _data()
    _grad(model, x, y)
    with SyncCounter() as c:
        limiter.before_step(opt, x)
        opt.step()
        rec = limiter.after_step(x)
        assert c.total == 0
        first = dict(rec)
        assert c.total == 1
        assert limiter.last == first and limiter.limited == round(first["fraction_limited"] * 4)
        assert c.total == 1


def test_the_masked_update_compiles_fullgraph():
    """The device part of a limited step (the scale and the masked write) under
    ``torch.compile(fullgraph=True)``: the same parameters as eager, bit for bit."""
    torch._dynamo.reset()
    outs = []
    for compiled in (False, True):
        model = _model()
        params = list(model.parameters())
        names = [n for n, _ in model.named_parameters()]
        bufs = FlatBuffers(names, params)
        bufs.snapshot()
        with torch.no_grad():
            for p in params:
                p.add_(0.1)
        bufs.take_update()

        def body(r, bufs=bufs):
            s = device_scale("limit", 0.5, r)
            ok = r.isfinite()
            bufs.apply_masked(s, ok, ok & (s == 1.0))

        fn = torch.compile(body, fullgraph=True) if compiled else body
        fn(torch.tensor(2.0, dtype=torch.float64))
        outs.append(torch.cat([p.detach().reshape(-1) for p in params]))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-7)


class _Boom(torch.optim.Adam):
    """Adam that updates its moments and the parameters, then fails."""

    def step(self, closure=None):
        super().step(closure)
        raise RuntimeError("boom")


@pytest.mark.parametrize("where", ["optimizer", "measurement"])
def test_a_failure_mid_step_restores_the_optimizers_state_too(where):
    """Issue 18 #3: after an exception between the base step and the correction, theta_old
    and Adam's moments and step are those before the step, bit for bit."""
    model = _model()
    opt = _Boom(model.parameters(), lr=0.05) if where == "optimizer" else None
    opt = opt or torch.optim.Adam(model.parameters(), lr=0.05)
    limiter = RadiusLimiter(model, r_max=0.05)
    x, y = _data()
    _grad(model, x, y)
    torch.optim.Adam.step(opt)  # one plain step: the state exists
    state = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    _grad(model, x, y)
    with pytest.raises(RuntimeError if where == "optimizer" else ValueError):  # (issue 18)
        limiter.step(opt, x if where == "optimizer" else torch.randn(16, 5))
    after = opt.state_dict()
    for k in state["state"]:
        for name, t in state["state"][k].items():
            assert torch.equal(after["state"][k][name], t), (k, name)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert not limiter.pending and limiter.steps == 0

"""RadiusLimit in a Lightning fit: equal to the hand-written limiter loop, and resumable."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchsteer.callbacks.radius_limit import RadiusLimit
from torchsteer.control.radius import RadiusLimiter

from .._lightning import trainer as quiet_trainer

LR = 20.0


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    return x, y


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 3)).double()


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = _net()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)


def _loader():
    x, y = _data()
    return DataLoader(
        TensorDataset(x, y), batch_size=24, shuffle=False
    )  # one batch: resumes cleanly


def _trainer(tmp_path, steps, callback):
    return quiet_trainer(
        max_steps=steps,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )


def _hand_loop(steps):
    """The oracle: the same batches through RadiusLimiter.step in a plain loop."""
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    limiter = RadiusLimiter(net)
    batches = list(_loader())
    for i in range(steps):
        x, y = batches[i % len(batches)]
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        limiter.step(opt, x)
    return net, limiter


def test_fit_equals_hand_written_loop(tmp_path):
    module = Module()
    callback = RadiusLimit(r_max=1.0)
    _trainer(tmp_path, 4, callback).fit(module, _loader())
    net, limiter = _hand_loop(4)
    assert callback.limiter.steps == 4
    assert callback.limiter.limited == limiter.limited >= 1
    for a, b in zip(module.net.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert callback.limiter.signals["r"] == pytest.approx(limiter.signals["r"], rel=1e-9)
    # training_step's self(x) is the measured forward: only the tangent was computed
    assert callback.limiter.reused == limiter.reused == 4


def test_custom_logits_fn_takes_the_general_path(tmp_path):
    module = Module()
    callback = RadiusLimit(logits_fn=lambda m, batch: m(batch[0]))
    _trainer(tmp_path, 4, callback).fit(module, _loader())
    net, _ = _hand_loop(4)
    assert callback.limiter.reused == 0
    for a, b in zip(module.net.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_monitor_mode_leaves_the_steps_alone(tmp_path):
    module, plain = Module(), Module()
    callback = RadiusLimit(mode="monitor")
    _trainer(tmp_path, 3, callback).fit(module, _loader())
    trainer = quiet_trainer(
        max_steps=3,
        default_root_dir=tmp_path,
    )
    trainer.fit(plain, _loader())
    for a, b in zip(module.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    assert callback.limiter.signals["r"] > 1.0 and callback.limiter.limited == 0


def test_resume_from_checkpoint_restores_the_limiter(tmp_path):
    first = RadiusLimit()
    module = Module()
    trainer = _trainer(tmp_path, 2, first)
    trainer.fit(module, _loader())
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = copy.deepcopy(first.limiter.state_dict())
    assert saved["steps"] == 2

    resumed = RadiusLimit()
    module2 = Module()
    _trainer(tmp_path, 4, resumed).fit(module2, _loader(), ckpt_path=ckpt)
    net, limiter = _hand_loop(4)
    assert resumed.limiter.steps == 4
    assert resumed.limiter.limited == limiter.limited
    for a, b in zip(module2.net.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_logs_signals(tmp_path):
    logged = {}

    class Spy(Module):
        def log(self, name, value, *args, **kwargs):
            logged.setdefault(name, []).append(value)

    _trainer(tmp_path, 4, RadiusLimit(log_every_n_steps=2)).fit(Spy(), _loader())
    assert set(logged) == {"radius/r", "radius/rho_a", "radius/scale", "radius/fraction_limited"}
    assert len(logged["radius/r"]) == 2  # steps 1 and 3
    assert all(0 < s <= 1 for s in logged["radius/scale"])


@pytest.mark.parametrize("kwargs", [{"r_max": -1.0}, {"mode": "x"}, {"log_every_n_steps": 0}])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError, match=f"Invalid {next(iter(kwargs))}"):
        RadiusLimit(**kwargs)


def test_repeated_fits_leave_no_stale_hooks(tmp_path):
    """Each setup builds a limiter with forward hooks; teardown removes them."""
    module, callback = Module(), RadiusLimit()
    for _ in range(2):
        _trainer(tmp_path, 2, callback).fit(module, _loader())
    hooked = [m for m in module.modules() if m._forward_hooks]
    assert hooked == []


class LBFGSModule(Module):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=4)


def test_lbfgs_step_is_measured_from_before_its_first_closure(tmp_path):
    """LBFGS calls the closure several times inside one step, and Lightning runs
    on_before_optimizer_step after each: theta_old is taken at the first call only, so the
    fit measures and limits the whole step, as RadiusLimiter.step(opt, x, closure) does."""
    steps, r_max = 3, 0.05
    module = LBFGSModule()
    callback = RadiusLimit(r_max=r_max)
    _trainer(tmp_path, steps, callback).fit(module, _loader())

    net = _net()
    opt = torch.optim.LBFGS(net.parameters(), lr=0.5, max_iter=4)
    limiter = RadiusLimiter(net, r_max=r_max)
    (x, y), rs = next(iter(_loader())), []
    for _ in range(steps):

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            return loss

        limiter.step(opt, x, closure)
        rs.append(limiter.last["r"])
    assert limiter.limited == steps and callback.limiter.limited == steps
    assert callback.limiter.last["r"] == pytest.approx(rs[-1], rel=1e-9)
    for p, q in zip(module.net.parameters(), net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


class _WithValidation(Module):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


def test_counters_survive_validate_and_a_second_fit(tmp_path):
    # issue 18 #9: setup() of validate() or of a second fit built a fresh limiter from the
    # last checkpointed state, so the counters restarted at 0
    module = _WithValidation()
    callback = RadiusLimit(r_max=0.05)
    _trainer(tmp_path, 3, callback).fit(module, _loader())
    steps, limited = callback.limiter.steps, callback.limiter.limited
    assert steps == 3 and limited > 0
    quiet_trainer(default_root_dir=tmp_path, callbacks=[callback]).validate(module, _loader())
    assert (callback.limiter.steps, callback.limiter.limited) == (steps, limited)
    _trainer(tmp_path, 2, callback).fit(module, _loader())
    assert callback.limiter.steps == steps + 2
    assert callback.limiter.limited >= limited

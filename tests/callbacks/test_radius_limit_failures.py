"""RadiusLimit under failure and in less common setups: a crash before on_train_batch_end with
OnExceptionCheckpoint, two optimizers under manual optimization, two instances on one Trainer,
gradient clipping, a NaN gradient (issue 18 #2, #3, #21, #22, #24). Oracles: the hand-written
limiter loop, or float64 torch.func.jvp."""

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from torch import nn
from torch.func import functional_call

from torchsteer.callbacks.radius_limit import RadiusLimit
from torchsteer.control.radius import RadiusLimiter

from .._lightning import trainer as quiet_trainer
from .test_radius_limit import LR, Module, _loader, _net


def _hand_loop(steps, r_max, opt_fn=None, clip=None):
    """The oracle: RadiusLimiter.step over the same (single) batch in a plain loop."""
    net = _net()
    opt = (opt_fn or (lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.9)))(net.parameters())
    limiter = RadiusLimiter(net, r_max=r_max)
    x, y = next(iter(_loader()))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        limiter.step(opt, x)
    return net, opt, limiter


def _assert_params(module, net, tol=1e-12):
    for a, b in zip(module.net.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


class _CrashAt(pl.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise RuntimeError("crash after the optimizer step")


def test_a_crash_before_batch_end_checkpoints_no_unlimited_step(tmp_path):
    # issue 18 #3: OnExceptionCheckpoint stored the unlimited step (r = 51 against r_max 0.3)
    module, callback = Module(), RadiusLimit(r_max=0.05)
    saver = OnExceptionCheckpoint(dirpath=tmp_path, filename="crash")
    callbacks = [_CrashAt(2), callback, saver]  # the crash runs before RadiusLimit's hook
    trainer = quiet_trainer(
        max_steps=4, default_root_dir=tmp_path, callbacks=callbacks, enable_checkpointing=True
    )
    with pytest.raises(RuntimeError, match="crash after the optimizer step"):
        trainer.fit(module, _loader())
    net, _, limiter = _hand_loop(1, r_max=0.05)  # the one step that was limited
    assert limiter.limited == 1
    _assert_params(module, net)
    ckpt = torch.load(tmp_path / "crash.ckpt", weights_only=True)
    saved = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items()}
    for k, v in net.state_dict().items():
        torch.testing.assert_close(saved[k], v, rtol=1e-12, atol=1e-12)
    assert ckpt["callbacks"][callback.state_key]["steps"] == 1
    assert not callback.limiter.pending


class _TwoOptimizers(Module):
    """Manual optimization: the first Linear and the LayerNorm on one SGD, the head on another."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt1, opt2 = self.optimizers()
        opt1.zero_grad()
        opt2.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        opt1.step()
        opt2.step()

    def configure_optimizers(self):
        first = [*self.net[0].parameters(), *self.net[1].parameters()]
        return [torch.optim.SGD(first, lr=LR), torch.optim.SGD(self.net[3].parameters(), lr=LR)]


def _func_r(net, x, d):
    """r of the direction d at the net's parameters by torch.func.jvp (eval mode, float64)."""
    params = {k: p.detach() for k, p in net.named_parameters()}
    _, a = torch.func.jvp(lambda q: functional_call(net.eval(), q, (x,)), (params,), (d,))
    net.train()
    return (a.amax(-1) - a.amin(-1)).max().item() / math.pi


def test_two_optimizers_under_manual_optimization_are_both_limited(tmp_path):
    # issue 18 #21: the second optimizer's update was never measured (applied r 1.9-3.0
    # against r_max 0.05)
    r_max, steps = 0.05, 3
    module, callback = _TwoOptimizers(), RadiusLimit(r_max=r_max)
    trainer = quiet_trainer(max_epochs=steps, default_root_dir=tmp_path, callbacks=[callback])
    trainer.fit(module, _loader())
    net = _net()  # the oracle: theta += min(1, r_max / r) p, p = -lr g on all parameters
    x, y = next(iter(_loader()))
    for _ in range(steps):
        net.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        d = {k: -LR * p.grad for k, p in net.named_parameters()}
        r = _func_r(net, x, d)
        with torch.no_grad():
            for k, p in net.named_parameters():
                p.add_(min(1.0, r_max / r) * d[k])
    assert callback.limiter.steps == steps and callback.limiter.limited == steps
    assert callback.limiter.last["r"] == pytest.approx(r, rel=1e-9)
    _assert_params(module, net, tol=1e-10)


def test_two_instances_on_one_trainer_have_their_own_state(tmp_path):
    # issue 18 #22: without a configuration state_key the Trainer refused two RadiusLimits;
    # a monitor after the limiter measures the applied step: r = r_max when limited
    r_max = 0.05
    limit, monitor = RadiusLimit(r_max=r_max), RadiusLimit(mode="monitor", log_prefix="applied/")
    assert RadiusLimit().state_key == "RadiusLimit"  # the default: older checkpoints' key
    assert len({limit.state_key, monitor.state_key, "RadiusLimit"}) == 3
    module = Module()
    trainer = quiet_trainer(max_steps=3, default_root_dir=tmp_path, callbacks=[limit, monitor])
    trainer.fit(module, _loader())
    assert limit.limiter.limited == 3 and monitor.limiter.limited == 0
    assert monitor.limiter.last["r"] == pytest.approx(r_max, rel=1e-9)
    ckpt_path = tmp_path / "two.ckpt"
    trainer.save_checkpoint(ckpt_path)
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["callbacks"][limit.state_key]["limited"] == 3
    assert ckpt["callbacks"][monitor.state_key]["limited"] == 0

    again = [RadiusLimit(r_max=r_max), RadiusLimit(mode="monitor", log_prefix="applied/")]
    module2 = Module()
    resumed = quiet_trainer(max_steps=5, default_root_dir=tmp_path, callbacks=again)
    resumed.fit(module2, _loader(), ckpt_path=ckpt_path)
    assert [cb.limiter.steps for cb in again] == [5, 5]
    assert [cb.limiter.limited for cb in again] == [5, 0]
    net, _, _ = _hand_loop(5, r_max=r_max)
    _assert_params(module2, net)


def test_neg_grad_with_gradient_clipping_raises(tmp_path):
    # issue 18 #24: Lightning clips after on_before_optimizer_step, so the step was limited
    # twice (6-8x too small)
    module = Module()
    before = [p.detach().clone() for p in module.parameters()]
    callback = RadiusLimit(r_max=0.05, direction="neg_grad")
    trainer = quiet_trainer(
        max_steps=2, default_root_dir=tmp_path, callbacks=[callback], gradient_clip_val=0.5
    )
    with pytest.raises(ValueError, match=r"'neg_grad' with Trainer\(gradient_clip_val=0.5\)"):
        trainer.fit(module, _loader())
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), before))


def test_update_direction_measures_after_clipping(tmp_path):
    """direction='update' measures the actual update, after Lightning's clipping: equal to
    clip_grad_norm_ then RadiusLimiter.step in a plain loop."""
    module, callback = Module(), RadiusLimit(r_max=0.05)
    trainer = quiet_trainer(
        max_steps=3, default_root_dir=tmp_path, callbacks=[callback], gradient_clip_val=0.5
    )
    trainer.fit(module, _loader())
    net, _, limiter = _hand_loop(3, r_max=0.05, clip=0.5)
    assert callback.limiter.limited == limiter.limited == 3
    assert callback.limiter.last["r"] == pytest.approx(limiter.last["r"], rel=1e-9)
    _assert_params(module, net)


class _NanAt(Module):
    def __init__(self, step):
        super().__init__()
        self.bad_step = step

    def on_after_backward(self):
        if self.trainer.global_step == self.bad_step:
            self.net[3].weight.grad[0, 1] = float("nan")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.3)


def test_a_nan_gradient_is_skipped_before_adam_sees_it(tmp_path):
    # issue 18 #2 in Lightning: the gradients are checked in on_before_optimizer_step, before
    # the base step, and set to None, so Adam's step leaves the parameters and state alone
    module, callback = _NanAt(1), RadiusLimit(r_max=0.05, nonfinite="skip")
    trainer = quiet_trainer(max_steps=5, default_root_dir=tmp_path, callbacks=[callback])
    trainer.fit(module, _loader())
    net, opt, limiter = _hand_loop(4, 0.05, opt_fn=lambda ps: torch.optim.Adam(ps, lr=0.3))
    assert callback.limiter.skipped == 1 and callback.limiter.steps == 5
    assert callback.limiter.limited == limiter.limited >= 1
    _assert_params(module, net)
    ours = trainer.optimizers[0].state_dict()["state"]
    for k, state in opt.state_dict()["state"].items():
        for name, t in state.items():
            torch.testing.assert_close(ours[k][name], t, rtol=1e-12, atol=1e-12)


class _InfAt(Module):
    def on_after_backward(self):
        if self.trainer.global_step == 1:
            self.net[3].weight.grad[0, 1] = float("inf")  # a loss-scale overflow


def test_a_grad_scaler_skips_inf_steps_itself(tmp_path):
    """Under fp16 AMP's GradScaler an Inf gradient is an overflow the scaler skips (and then
    lowers the scale): the limiter does not raise on it, and the run equals the hand-written
    loop without that step (the model is float64, so scaling by 2^16 is exact)."""
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu")
    module, callback = _InfAt(), RadiusLimit(r_max=0.05)
    trainer = quiet_trainer(
        max_steps=4,
        default_root_dir=tmp_path,
        callbacks=[callback],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    trainer.fit(module, _loader())
    assert scaler.get_scale() == 2.0**15  # the overflow step was the scaler's to skip
    net, _, limiter = _hand_loop(3, r_max=0.05)
    assert callback.limiter.limited == limiter.limited == 3 and callback.limiter.skipped == 0
    _assert_params(module, net)

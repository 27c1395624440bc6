"""DROReweighting in short Lightning fits, against a hand-written loop, and resumed."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from torchsteer.callbacks.dro_reweighting import DROReweighting
from torchsteer.control.dro import DROWeighting

from .._lightning import trainer

BATCH, N = 8, 32  # 4 steps per epoch


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    return x, y


def _weighting():
    return DROWeighting(
        temperature=1.0,
        mode="streaming",
        momentum=0.3,
        class_level=True,
        num_classes=3,
        class_step=0.2,
        class_momentum=0.5,  # running class losses: state the checkpoint must carry
    )


def _schedule(step: int) -> float:
    return 2.0 / (1.0 + 0.5 * step)


class _Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = torch.nn.Linear(5, 3).double()
        self.dro = _weighting()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.dro(F.cross_entropy(self.net(x), y, reduction="none"), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        return DataLoader(TensorDataset(*_data()), batch_size=BATCH, shuffle=False)


def _trainer(max_steps, callback, **kw):
    return trainer(max_steps=max_steps, callbacks=[callback], **kw)


def _reference(steps):
    """The same training as a plain loop: schedule, weighting, SGD."""
    torch.manual_seed(1)
    net = torch.nn.Linear(5, 3).double()
    dro = _weighting()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x, y = _data()
    for step in range(steps):
        i = (step % (N // BATCH)) * BATCH
        xb, yb = x[i : i + BATCH], y[i : i + BATCH]
        dro.temperature = _schedule(step)
        loss = dro(F.cross_entropy(net(xb), yb, reduction="none"), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net, dro


def test_fit_matches_plain_loop_and_logs_signals():
    model = _Module()
    callback = DROReweighting(model.dro, temperature_schedule=_schedule)
    trainer = _trainer(6, callback)
    trainer.fit(model)
    net, dro = _reference(6)
    torch.testing.assert_close(model.net.weight, net.weight)
    torch.testing.assert_close(model.dro.log_normalizer, dro.log_normalizer)
    torch.testing.assert_close(model.dro.log_class_weights, dro.log_class_weights)
    metrics = trainer.callback_metrics
    assert float(metrics["dro/temperature"]) == pytest.approx(_schedule(5))
    for name, value in dro.signals().items():
        assert float(metrics[f"dro/{name}"]) == pytest.approx(value, rel=1e-5)


def test_resume_from_checkpoint_restores_weighting_state(tmp_path):
    # stop at an epoch end (a checkpoint taken by max_steps at the last batch of an epoch
    # makes Lightning replay that epoch's data on resume)
    model = _Module()
    trainer = _trainer(-1, DROReweighting(model.dro, temperature_schedule=_schedule), max_epochs=1)
    trainer.fit(model)
    assert trainer.global_step == 4
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed = _Module()  # fresh weighting: its state must come from the checkpoint
    assert resumed.dro.step == 0 and resumed.dro.log_normalizer is None
    callback = DROReweighting(resumed.dro, temperature_schedule=_schedule)
    _trainer(-1, callback, max_epochs=2).fit(resumed, ckpt_path=ckpt)

    net, dro = _reference(8)
    assert resumed.dro.step == dro.step == 8
    torch.testing.assert_close(resumed.net.weight, net.weight)
    torch.testing.assert_close(resumed.dro.log_normalizer, dro.log_normalizer)
    torch.testing.assert_close(resumed.dro.log_class_weights, dro.log_class_weights)
    torch.testing.assert_close(resumed.dro.class_losses, dro.class_losses)


class _TwoWeightings(_Module):
    def __init__(self):
        super().__init__()
        self.dro2 = DROWeighting(temperature=0.5, mode="streaming", momentum=0.6)

    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = F.cross_entropy(self.net(x), y, reduction="none")
        return 0.5 * (self.dro(losses, y) + self.dro2(losses, y))


def test_two_callbacks_in_one_trainer_checkpoint_their_own_weighting(tmp_path):
    # without a state_key of their own the Trainer refuses two stateful callbacks of one type
    model = _TwoWeightings()
    callbacks = [DROReweighting(model.dro), DROReweighting(model.dro2, log_prefix="dro2/")]
    first = trainer(max_epochs=1, callbacks=callbacks)
    first.fit(model)
    ckpt = tmp_path / "two.ckpt"
    first.save_checkpoint(ckpt)
    stored = torch.load(ckpt, weights_only=True)["callbacks"]
    assert set(stored) == {"DROReweighting", "DROReweighting{'log_prefix': 'dro2/'}"}

    resumed = _TwoWeightings()
    fresh = [DROReweighting(resumed.dro), DROReweighting(resumed.dro2, log_prefix="dro2/")]
    trainer(max_epochs=1, callbacks=fresh).fit(resumed, ckpt_path=ckpt)  # nothing left to run
    for new, old in ((resumed.dro, model.dro), (resumed.dro2, model.dro2)):
        assert new.step == old.step == 4
        assert new.log_normalizer == old.log_normalizer
    assert resumed.dro.log_normalizer != resumed.dro2.log_normalizer


def test_invalid_arguments():
    with pytest.raises(ValueError, match="Invalid weighting"):
        DROReweighting(object())
    with pytest.raises(ValueError, match="Invalid temperature_schedule"):
        DROReweighting(DROWeighting(), temperature_schedule=3.0)


def test_bad_schedule_value_raises_and_keeps_temperature():
    model = _Module()
    callback = DROReweighting(model.dro, temperature_schedule=lambda step: 0.0)
    with pytest.raises(ValueError, match="Invalid temperature"):
        _trainer(2, callback).fit(model)
    assert model.dro.temperature == 1.0 and model.dro.step == 0

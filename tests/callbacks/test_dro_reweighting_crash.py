"""A crash between the DRO weighting's update (in ``training_step``) and the optimizer step
must not leave the half-done step in the checkpoint ``OnExceptionCheckpoint`` writes.

Found by the attack rerun (benchmarks/attack.py, kill and resume): the weighting moved at
step 5's forward, the crash came in ``on_before_optimizer_step``, the checkpoint held the
parameters of step 4 with the weighting of step 5, and the resumed run applied step 5's
update twice (parameters off by 2e-3, the streaming normalizer and step counter off).
The oracle is the uninterrupted run, bit for bit.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from tests._lightning import trainer
from torchsteer.callbacks.dro_reweighting import DROReweighting
from torchsteer.control.dro import DROWeighting

STEPS, CRASH = 6, 3


class _Module(pl.LightningModule):
    def __init__(self, weighting):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 3)
        self.dro = weighting

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.dro(F.cross_entropy(self.net(x), y, reduction="none"), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        # the same batch throughout: a mid-epoch resume restarts a plain loader's epoch
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
        return DataLoader(TensorDataset(x.repeat(4, 1), y.repeat(4)), batch_size=8)


class _Boom(RuntimeError):
    pass


class _CrashBeforeStep(pl.Callback):
    def on_before_optimizer_step(self, trainer, *args):
        if trainer.global_step == CRASH:
            raise _Boom


def _weighting(kind):
    if kind == "class_level":
        return DROWeighting(
            0.5, class_level=True, num_classes=3, class_step=0.2, class_momentum=0.5
        )
    return DROWeighting(0.5, mode="streaming")


@pytest.mark.parametrize("kind", ["streaming", "class_level"])
def test_a_crash_before_the_optimizer_step_checkpoints_the_weighting_of_the_parameters(
    tmp_path, kind
):
    ref_w = _weighting(kind)
    ref = _Module(ref_w)
    trainer(
        max_steps=STEPS,
        callbacks=[DROReweighting(ref_w)],
        default_root_dir=tmp_path / "a",
        enable_checkpointing=True,
    ).fit(ref)

    w = _weighting(kind)
    saver = OnExceptionCheckpoint(dirpath=tmp_path / "crash", filename="crash")
    with pytest.raises(_Boom):
        trainer(
            max_steps=STEPS,
            callbacks=[DROReweighting(w), saver, _CrashBeforeStep()],
            default_root_dir=tmp_path / "b",
            enable_checkpointing=True,
        ).fit(_Module(w))
    ckpt = tmp_path / "crash" / "crash.ckpt"
    stored = torch.load(ckpt, weights_only=True)
    assert stored["global_step"] == CRASH
    assert stored["callbacks"]["DROReweighting"]["weighting"]["step"] == CRASH  # not CRASH + 1

    w2 = _weighting(kind)
    resumed = _Module(w2)
    trainer(
        max_steps=STEPS,
        callbacks=[DROReweighting(w2)],
        default_root_dir=tmp_path / "c",
        enable_checkpointing=True,
    ).fit(resumed, ckpt_path=ckpt)
    for a, b in zip(ref.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    got, want = w2.state_dict(), ref_w.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key

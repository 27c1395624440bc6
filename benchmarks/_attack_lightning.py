"""Kill and resume in Lightning: each callback (and each optimizer under it), a crash
mid-epoch (an exception raised in a batch), resumed from the checkpoint the crash left
(``OnExceptionCheckpoint``) or from a periodic ``ModelCheckpoint``, against the
uninterrupted run, bit for bit. A control arm (plain Adam, no torchsteer callback) shows
what Lightning itself restores.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _attack_common import add, bitwise_equal, defect, documented, held, snapshot
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from torchsteer.callbacks import DROReweighting, KLControl, RadiusLimit
from torchsteer.control import DROWeighting, PIDKLController, SAFEController, kl_exact
from torchsteer.optim import MFAC, RegularizedNewton, Sven

KIND = "kill and resume"
for _name in ("lightning", "lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.ERROR)
N, BATCH, STEPS = 48, 8, 9  # 6 batches an epoch; the crash at step 4 is mid-epoch


class Boom(RuntimeError):
    pass


class Crash(pl.Callback):
    def __init__(self, at, where):
        self.at, self.where = at, where

    def on_train_batch_start(self, trainer, *args):
        if self.where == "batch_start" and trainer.global_step == self.at:
            raise Boom(f"killed at step {self.at}")

    def on_before_optimizer_step(self, trainer, *args):
        if self.where == "before_optimizer_step" and trainer.global_step == self.at:
            raise Boom(f"killed at step {self.at}")


class Module(pl.LightningModule):
    def __init__(self, opt="adam", dro=None, kl=False):
        super().__init__()
        torch.manual_seed(3)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
        )
        self.ref = torch.nn.Linear(4, 3).requires_grad_(False)
        self.opt_kind, self.dro, self.use_kl = opt, dro, kl
        self.kl_coef = 0.0
        self.automatic_optimization = opt in ("adam", "mfac")

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        if not self.automatic_optimization:
            opt = self.optimizers()

            def closure():
                out = F.cross_entropy(self.net(x), y, reduction="none")
                return out if self.opt_kind == "sven" else out.mean()

            loss = opt.step(closure)
            return {"loss": loss.detach()}
        loss = self.dro(losses, y) if self.dro is not None else losses.mean()
        if not self.use_kl:
            return loss
        kl = kl_exact(logits, self.ref(x)).mean()
        ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
        return {
            "loss": loss + self.kl_coef * kl,
            "kl": kl.detach(),
            "entropy": ent.detach(),
            "reward": -losses.mean().detach(),
        }

    def configure_optimizers(self):
        ps = self.net.parameters()
        if self.opt_kind == "mfac":
            return MFAC(ps, lr=1e-2, ngrads=4)
        if self.opt_kind == "sven":
            return Sven(ps, lr=0.1, rank=8)
        if self.opt_kind == "newton":
            return RegularizedNewton(ps)
        return torch.optim.Adam(ps, lr=0.05)

    def train_dataloader(self):
        # every batch of the epoch is the same 8 samples: Lightning restarts a plain
        # DataLoader's epoch from its first batch on a mid-epoch resume, so the data a step
        # sees must not depend on its position in the epoch for the runs to be comparable
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(BATCH, 4, generator=g), torch.randint(0, 3, (BATCH,), generator=g)
        reps = N // BATCH
        return DataLoader(
            TensorDataset(x.repeat(reps, 1), y.repeat(reps)), batch_size=BATCH, shuffle=False
        )


def _trainer(dirpath, callbacks, **kw):
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=True,
        default_root_dir=str(dirpath),
        max_steps=STEPS,
        callbacks=callbacks,
        **kw,
    )


def scenario(
    opt="adam",
    callbacks=lambda dro: [],
    dro=None,
    kl=False,
    where="batch_start",
    via="OnExceptionCheckpoint",
):
    """Uninterrupted vs killed at step 4 and resumed: (defect or None, detail)."""

    def build():
        weighting = dro() if dro is not None else None
        module = Module(opt, weighting, kl)
        return module, callbacks(weighting)

    def run():
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            ref, cbs = build()
            _trainer(tmp / "ref", list(cbs)).fit(ref)
            ref_cb = [snapshot(c.state_dict()) for c in cbs]
            mod, cbs = build()
            if via == "OnExceptionCheckpoint":
                savers = [OnExceptionCheckpoint(dirpath=str(tmp / "crash"), filename="crash")]
            else:
                savers = [
                    ModelCheckpoint(
                        dirpath=str(tmp / "periodic"),
                        every_n_train_steps=2,
                        save_top_k=-1,
                        filename="{step}",
                    )
                ]
            try:
                _trainer(tmp / "run", [*cbs, *savers, Crash(5, where)]).fit(mod)
                return defect("harness: the crash did not happen")
            except Boom:
                pass
            if via == "OnExceptionCheckpoint":
                ckpt = tmp / "crash" / "crash.ckpt"
            else:
                ckpt = sorted(
                    (tmp / "periodic").glob("*.ckpt"), key=lambda p: int(p.stem.split("=")[1])
                )[-1]
            if not ckpt.exists():
                return defect("no checkpoint was written at the crash")
            torch.load(ckpt, weights_only=True)  # the checkpoint loads without pickle
            mod2, cbs2 = build()
            _trainer(tmp / "resume", list(cbs2)).fit(mod2, ckpt_path=str(ckpt))
            same = bitwise_equal(snapshot(ref.net), snapshot(mod2.net))
            same_cb = bitwise_equal(ref_cb, [snapshot(c.state_dict()) for c in cbs2])
            if same and same_cb:
                return held(
                    f"killed at step 5 ({where}), resumed from {ckpt.name}: "
                    "parameters and callback state bit for bit"
                )
            diff = max(
                float((a - b).abs().max())
                for a, b in zip(ref.net.parameters(), mod2.net.parameters(), strict=True)
            )
            return defect(
                f"resumed run differs: parameters equal={same} (max |diff| {diff:.2e}),"
                f" callback state equal={same_cb}"
            )

    return run


def _dro():
    return DROWeighting(0.5, mode="streaming", class_level=False)


def _dro_class():
    return DROWeighting(0.5, class_level=True, num_classes=3, class_step=0.2, class_momentum=0.5)


def register() -> None:
    cases = {
        "control arm: Adam, no torchsteer callback": dict(),
        "RadiusLimit + Adam": dict(callbacks=lambda d: [RadiusLimit(r_max=0.05)]),
        "RadiusLimit(neg_grad) + Adam": dict(
            callbacks=lambda d: [RadiusLimit(r_max=0.05, direction="neg_grad")]
        ),
        "RadiusLimit + MFAC": dict(opt="mfac", callbacks=lambda d: [RadiusLimit(r_max=0.05)]),
        "KLControl(PID) + Adam": dict(
            kl=True, callbacks=lambda d: [KLControl(PIDKLController(target=0.05, delay=1))]
        ),
        "KLControl(SAFE) + Adam": dict(
            kl=True, callbacks=lambda d: [KLControl(SAFEController(window=3))]
        ),
        "DROReweighting(streaming) + Adam": dict(dro=_dro, callbacks=lambda d: [DROReweighting(d)]),
        "DROReweighting(class_level) + MFAC": dict(
            opt="mfac", dro=_dro_class, callbacks=lambda d: [DROReweighting(d)]
        ),
        "all three callbacks + MFAC": dict(
            opt="mfac",
            dro=_dro,
            kl=True,
            callbacks=lambda d: [
                RadiusLimit(r_max=0.05),
                KLControl(PIDKLController(target=0.05)),
                DROReweighting(d),
            ],
        ),
        "Sven (manual optimization)": dict(opt="sven"),
        "RegularizedNewton (manual optimization)": dict(opt="newton"),
        "RadiusLimit + Sven (manual optimization)": dict(
            opt="sven", callbacks=lambda d: [RadiusLimit(r_max=0.05)]
        ),
    }
    for name, kw in cases.items():
        add(
            KIND,
            name,
            "crash at batch start, OnExceptionCheckpoint",
            scenario(**kw),
            f"{name}: raise in on_train_batch_start at step 5, resume from "
            "OnExceptionCheckpoint, compare with the uninterrupted 9 steps",
        )
        if kw.get("opt") not in ("sven", "newton"):
            add(
                KIND,
                name,
                "crash before the optimizer step, OnExceptionCheckpoint",
                scenario(where="before_optimizer_step", **kw),
                f"{name}: raise in on_before_optimizer_step at step 5, resume",
            )
        add(
            KIND,
            name,
            "crash at batch start, periodic ModelCheckpoint",
            scenario(via="ModelCheckpoint", **kw),
            f"{name}: ModelCheckpoint(every_n_train_steps=2), crash at 5, resume from step 4",
        )
    _ = documented

"""KLControl in a Lightning fit: against a hand-written loop, with accumulation, resumed."""

from __future__ import annotations

import copy
import csv
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from torchsteer.callbacks.kl_control import KLControl
from torchsteer.control.kl import (
    AdaptiveKLController,
    KLStatistics,
    PIDKLController,
    SAFEController,
)

from .._lightning import trainer

V = 5
REWARD = torch.tensor([0.0, 0.2, 0.1, 1.0, 0.4], dtype=torch.float64)
REF = torch.log_softmax(torch.tensor([0.5, 0.2, 0.0, -1.0, 0.3], dtype=torch.float64), 0)
START = REF + torch.tensor([0.0, 0.5, -0.5, 1.0, 0.0], dtype=torch.float64)  # KL > 0 at once


def stats(logits, scale, coef, controller):
    """The step of the toy policy: exact expected reward, KL and entropy (no sampling)."""
    logp = torch.log_softmax(logits, 0)
    p = logp.exp()
    reward = (p * REWARD * scale).sum()
    kl = (p * (logp - REF)).sum()
    entropy = -(p * logp).sum()
    if isinstance(controller, SAFEController):
        loss = -reward + controller.penalty(kl)
    else:
        loss = -reward + coef * kl
    return loss, kl, entropy, reward


class Policy(pl.LightningModule):
    def __init__(self, controller, bad=None):
        super().__init__()
        self.logits = torch.nn.Parameter(START.clone())
        self.kl_controller = controller
        self.kl_coef = controller.coef
        self.bad = bad

    def training_step(self, batch, batch_idx):
        scale = 1.0 + 0.5 * batch[0].to(torch.float64)  # batches differ: accumulation matters
        loss, kl, ent, reward = stats(self.logits, scale, self.kl_coef, self.kl_controller)
        out = {"loss": loss, "kl": kl.detach(), "entropy": ent.detach(), "reward": reward.detach()}
        if self.bad == "nan" and self.global_step == 2:
            out["kl"] = torch.tensor(float("nan"))
        if self.bad == "missing" and self.global_step == 2:
            del out["reward"]
        return out

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=2.0)

    def train_dataloader(self):
        x = torch.arange(4, dtype=torch.float64)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=1)


def _trainer(tmp_path, max_steps, callbacks, accumulate=1, logger=False):
    return trainer(
        max_steps=max_steps,
        max_epochs=100,
        logger=logger,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        accumulate_grad_batches=accumulate,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )


def hand_loop(controller, steps, accumulate=1):
    """The same training written by hand: the oracle."""
    logits = START.clone().requires_grad_(True)
    opt = torch.optim.SGD([logits], lr=2.0)
    coef, coefs, i = controller.coef, [], 0
    for _ in range(steps):
        acc = {"kl": 0.0, "entropy": 0.0, "reward": 0.0}
        for _ in range(accumulate):
            scale = 1.0 + 0.5 * (i % 4)
            i += 1
            loss, kl, ent, reward = stats(logits, scale, coef, controller)
            (loss / accumulate).backward()
            for k, v in (("kl", kl), ("entropy", ent), ("reward", reward)):
                acc[k] += v.item() / accumulate
        opt.step()
        opt.zero_grad()
        coef = controller.update(**acc, n_steps=accumulate)
        coefs.append(coef)
    return logits.detach(), coefs


def _make(kind):
    if kind == "pid":
        return PIDKLController(target=0.05, kp=2.0, ki=0.5, kd=1.0, beta0=0.1, delay=3)
    return SAFEController(base_threshold=0.005, penalty_scale=50.0, threshold_bounds=(0.001, 1.0))


@pytest.mark.parametrize("kind", ["pid", "safe"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_fit_matches_hand_loop(tmp_path, kind, accumulate):
    steps = 6
    ref_ctl = _make(kind)
    logits, coefs = hand_loop(ref_ctl, steps, accumulate)
    ctl = _make(kind)
    cb = KLControl(ctl)
    module = Policy(ctl)
    logger = CSVLogger(tmp_path, name="kl")
    _trainer(tmp_path, steps, [cb], accumulate, logger=logger).fit(module)
    assert cb.updates == steps
    torch.testing.assert_close(module.logits.detach(), logits, rtol=1e-10, atol=1e-12)
    assert _close(ctl, ref_ctl)
    assert module.kl_coef == pytest.approx(coefs[-1], rel=1e-10, abs=1e-14)
    assert len(set(coefs)) > 2  # the coefficient really moved
    assert sum(c > 0 for c in coefs) >= steps // 2  # SAFE: the penalty is active
    # every signal logged, one row per optimizer step, the coefficient sequence as the oracle
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("kl_control/coef")]
    assert set(ctl.signals()) <= {k.split("/", 1)[1] for k in rows[0] if k.startswith("kl_")}
    logged = [float(r["kl_control/coef"]) for r in rows]
    assert logged == pytest.approx(coefs, rel=1e-6, abs=1e-9)


def statistics_loop(controller, steps, accumulate=1):
    """The hand-written loop with KLStatistics doing the reduction, as a loop without Lightning."""
    logits = START.clone().requires_grad_(True)
    opt = torch.optim.SGD([logits], lr=2.0)
    acc, i = KLStatistics(), 0
    for _ in range(steps):
        for _ in range(accumulate):
            scale = 1.0 + 0.5 * (i % 4)
            i += 1
            loss, kl, ent, reward = stats(logits, scale, controller.coef, controller)
            (loss / accumulate).backward()
            acc.add(kl=kl.detach(), entropy=ent.detach(), reward=reward.detach())
        opt.step()
        opt.zero_grad()
        step_stats, n_steps = acc.reduce()
        controller.update(**step_stats, n_steps=n_steps)
    return logits.detach()


@pytest.mark.parametrize("kind", ["pid", "safe"])
def test_fit_matches_a_loop_with_kl_statistics_exactly(tmp_path, kind):
    steps, accumulate = 5, 2
    loop_ctl = _make(kind)
    logits = statistics_loop(loop_ctl, steps, accumulate)
    ctl = _make(kind)
    module = Policy(ctl)
    _trainer(tmp_path, steps, [KLControl(ctl, log=False)], accumulate).fit(module)
    assert torch.equal(module.logits.detach(), logits)
    assert ctl.state_dict() == loop_ctl.state_dict()  # bitwise: the same reduction
    assert loop_ctl.signals()["kl"] > 0 and loop_ctl.signals() != _make(kind).signals()


def _close(a, b):
    sa, sb = a.signals(), b.signals()
    return all(math.isclose(sa[k], sb[k], rel_tol=1e-10, abs_tol=1e-14) for k in sa)


@pytest.mark.parametrize("kind", ["pid", "safe"])
def test_resume_from_checkpoint_keeps_controller_state(tmp_path, kind):
    ctl_full = _make(kind)
    full = Policy(ctl_full)
    _trainer(tmp_path / "full", 8, [KLControl(ctl_full)]).fit(full)

    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=4)
    ctl_a = _make(kind)
    _trainer(tmp_path / "a", 4, [KLControl(ctl_a), ckpt_cb]).fit(Policy(ctl_a))
    saved = copy.deepcopy(ctl_a.state_dict())
    ckpt = str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    assert any(v.get("controller") == saved for v in state.values() if isinstance(v, dict))

    ctl_b = _make(kind)  # fresh: its state must come from the checkpoint
    resumed = Policy(ctl_b)
    cb_b = KLControl(ctl_b)
    _trainer(tmp_path / "b", 8, [cb_b]).fit(resumed, ckpt_path=ckpt)
    assert cb_b.updates == 8
    assert _close(ctl_b, ctl_full)
    assert resumed.kl_coef == pytest.approx(full.kl_coef, rel=1e-10, abs=1e-14)
    torch.testing.assert_close(resumed.logits, full.logits, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("bad", "error"), [("nan", ValueError), ("missing", KeyError)])
def test_bad_statistics_raise_and_keep_state(tmp_path, bad, error):
    ctl = _make("safe")
    cb = KLControl(ctl)
    snapshots = []

    class Snap(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots.append(copy.deepcopy(ctl.state_dict()))

    with pytest.raises(error, match="kl" if bad == "nan" else "reward"):
        _trainer(tmp_path, 6, [cb, Snap()]).fit(Policy(ctl, bad=bad))
    assert cb.updates == 2
    assert ctl.state_dict() == snapshots[-1]  # the failing step changed nothing


class TwoPenalties(Policy):
    """Two KL penalties on one policy: the second controller's coefficient in kl2_coef."""

    def __init__(self, first, second):
        super().__init__(first)
        self.second = second
        self.kl2_coef = second.coef

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        out["loss"] = out["loss"] + self.kl2_coef * out["kl"]
        return out


def test_two_callbacks_in_one_trainer_keep_their_own_state(tmp_path):
    # without a state_key of its own a second KLControl makes the Trainer raise
    first, second = _make("pid"), PIDKLController(target=0.2, kp=1.0, ki=0.1, beta0=0.3)
    module = TwoPenalties(first, second)
    callbacks = [KLControl(first), KLControl(second, coef_attr="kl2_coef")]
    fit = _trainer(tmp_path, 4, callbacks)
    fit.fit(module)
    assert module.kl_coef == first.coef and module.kl2_coef == second.coef != first.coef
    ckpt = tmp_path / "two.ckpt"
    fit.save_checkpoint(ckpt)
    stored = torch.load(ckpt, weights_only=True)["callbacks"]
    assert stored["KLControl"]["controller"] == first.state_dict()
    assert stored["KLControl{'coef_attr': 'kl2_coef'}"]["controller"] == second.state_dict()
    logged = fit.callback_metrics
    assert float(logged["kl_control/coef"]) == pytest.approx(first.coef)
    assert float(logged["kl_control/kl2_coef/coef"]) == pytest.approx(second.coef)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="controller"):
        KLControl(object())
    with pytest.raises(ValueError, match="kl_key"):
        KLControl(PIDKLController(target=1.0), kl_key="")


class _FakeTrainer:
    global_step = 0


class _FakeModule:
    device = torch.device("cpu")

    def log(self, *args, **kwargs):
        pass


def _ddp_worker(rank, world_size):
    out = {}
    ctl = _make("pid")
    cb = KLControl(ctl)
    adaptive = AdaptiveKLController(beta0=0.1, target=0.5, horizon=20)
    cb2 = KLControl(adaptive, coef_attr="adaptive_coef")
    trainer, module = _FakeTrainer(), _FakeModule()
    cb.on_train_start(trainer, module)
    cb2.on_train_start(trainer, module)
    for step in range(1, 5):
        trainer.global_step = step
        stats = {
            "kl": 0.1 * step + rank,
            "entropy": 1.0 + rank,
            "reward": 0.5 * rank,
            "n_steps": 3 + rank,
        }
        cb.on_train_batch_end(trainer, module, stats, None, step)
        cb2.on_train_batch_end(trainer, module, stats, None, step)
    out["adaptive"] = module.adaptive_coef
    out["state"] = ctl.state_dict()
    out["coef"] = module.kl_coef
    before = copy.deepcopy(ctl.state_dict())
    trainer.global_step = 5
    bad = {"kl": float("nan") if rank == 1 else 0.2, "entropy": 1.0, "reward": 0.0}
    try:
        cb.on_train_batch_end(trainer, module, bad, None, 5)
        out["nan_raised"] = False
    except ValueError as e:
        out["nan_raised"] = "kl" in str(e) and ctl.state_dict() == before
    return out


@pytest.mark.distributed
@pytest.mark.slow  # two spawned processes importing Lightning: about a minute on 2 cores
def test_ddp_statistics_are_averaged_over_ranks():
    from tests.distributed.harness import run_ranks

    ranks = run_ranks(_ddp_worker, 2)
    single = _make("pid")
    adaptive = AdaptiveKLController(beta0=0.1, target=0.5, horizon=20)
    for step in range(1, 5):  # the mean over the 2 ranks; n_steps summed
        single.update(kl=0.1 * step + 0.5, entropy=1.5, reward=0.25, n_steps=7)
        adaptive.update(kl=0.1 * step + 0.5, n_steps=7)
    for r in range(2):
        assert _state_close(ranks[r]["state"], single.state_dict())
        assert ranks[r]["adaptive"] == pytest.approx(adaptive.coef, rel=1e-12)
        assert ranks[r]["coef"] == pytest.approx(single.coef, rel=1e-12)
        assert ranks[r]["nan_raised"]


def _state_close(a, b):
    for k in b:
        va, vb = a[k], b[k]
        if isinstance(vb, list):
            assert va == pytest.approx(vb, rel=1e-12)
        else:
            assert va == pytest.approx(vb, rel=1e-12)
    return True


@pytest.mark.parametrize(
    ("junk", "name"),
    [
        ({"controller": {"integral": float("nan")}}, "integral"),
        ({"controller": {"integral": 0.4}, "sums": {"kl": "x"}}, "sums"),
        ({"controller": {"integral": 0.4}, "batches": -1}, "batches"),
        ({"controller": {"integral": 0.4}, "sums": {"kl": 0.3}, "batches": 0}, "0 batches"),
        ({"controller": {"integral": 0.4}, "updates": 2.5}, "updates"),
        ({"controller": {"beta": 0.4}}, "unknown keys"),  # an adaptive controller's state
    ],
)
def test_load_state_dict_is_atomic(junk, name):
    ctl = _make("pid")
    cb = KLControl(ctl)
    for step in range(3):
        ctl.update(kl=0.1 * step)
    cb.statistics.add(kl=0.2, n_steps=3)
    cb.updates = 3
    before = copy.deepcopy(cb.state_dict())
    with pytest.raises(ValueError, match=name):
        cb.load_state_dict(junk)
    assert cb.state_dict() == before

"""KLControlCallback and DROReweightingCallback in a Trainer equal the objects by hand; resume."""

import pytest

pytest.importorskip("transformers")

import torch

from tests.integrations import _hf
from torchsteer.control import DROWeighting
from torchsteer.control.kl import AdaptiveKLController, PIDKLController, kl_exact
from torchsteer.integrations.transformers import (
    DROReweightingCallback,
    KLControlCallback,
    SteeringTrainer,
    per_sample_losses,
)

LR = 0.1


def pid():
    return PIDKLController(target=0.05, kp=2.0, ki=0.5, beta0=0.1)


def kl_terms(model, ref, batch):
    """Mean per-sample loss and the exact KL to the reference, per token then averaged."""
    losses, logits = per_sample_losses(model, batch)
    with torch.no_grad():
        ref_logits = ref(input_ids=batch["input_ids"]).logits
    return losses.mean(), kl_exact(logits, ref_logits).mean()


class KLTrainer(SteeringTrainer):
    """The recipe of docs/huggingface.md: loss + coef * KL, statistics recorded per batch."""

    def __init__(self, *args, kl_callback, ref_model, **kwargs):
        super().__init__(*args, callbacks=[kl_callback], **kwargs)
        self.kl_callback, self.ref_model = kl_callback, ref_model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, kl = kl_terms(model, self.ref_model, inputs)
        self.kl_callback.record(kl=kl, n_steps=len(inputs["input_ids"]))
        return loss + self.kl_callback.penalty(kl)


def kl_fit(tmp, model, ref, callback, steps=3, accumulate=1, resume=None, **kw):
    trainer = KLTrainer(
        model=model, args=_hf.args(tmp, max_steps=steps, gradient_accumulation_steps=accumulate,
                                   **kw),
        train_dataset=_hf.Sentences(24), kl_callback=callback, ref_model=ref,
        optimizers=(torch.optim.SGD(model.parameters(), lr=LR), None),
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def kl_by_hand(model, ref, controller, steps, accumulate=1):
    """Per optimizer step: the micro-batches' losses summed (the Trainer does not divide a
    custom compute_loss by the accumulation steps), one SGD step, then one update with the
    micro-batches' mean KL and their sample count."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    batches, coefs = iter(_hf.Sentences(24).batches()), []
    for _ in range(steps):
        opt.zero_grad()
        kls, beta = [], controller.coef
        for _ in range(accumulate):
            loss, kl = kl_terms(model, ref, next(batches))
            (loss + beta * kl).backward()
            kls.append(kl.item())
        opt.step()
        controller.update(kl=sum(kls) / len(kls), n_steps=_hf.B * accumulate)
        coefs.append(controller.coef)
    return coefs


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("make", [pid, lambda: AdaptiveKLController(0.2, 0.05, horizon=40)])
def test_kl_control_equals_the_controller_by_hand(tmp_path, make, accumulate):
    model, ref = _hf.tiny_gpt2(), _hf.tiny_gpt2(seed=3)
    twin = _hf.twin(model)
    cb = KLControlCallback(make())
    trainer = kl_fit(tmp_path, model, ref, cb, accumulate=accumulate)
    hand = make()
    coefs = kl_by_hand(twin, ref, hand, 3, accumulate)
    assert len(set(coefs)) == 3  # the coefficient moved at every step
    assert _hf.logged(trainer, "kl_control/coef") == pytest.approx(coefs, rel=1e-5)
    assert cb.controller.signals() == pytest.approx(hand.signals(), rel=1e-5)
    assert cb.updates == 3 and _hf.max_diff(model, twin) < 1e-6


def test_kl_record_rejects_bad_statistics_and_keeps_state():
    cb = KLControlCallback(PIDKLController(target=0.1, entropy_floor=0.5))
    cb.record(kl=0.2, entropy=1.0)
    before = cb.state_dict()
    with pytest.raises(ValueError, match="Invalid kl"):
        cb.record(kl=float("nan"), entropy=1.0)
    with pytest.raises(ValueError, match="Invalid entropy"):
        cb.record(kl=0.1)  # this controller needs the entropy
    assert cb.state_dict() == before
    with pytest.raises(ValueError, match="Invalid controller"):
        KLControlCallback(object())


def dro_weighting():
    return DROWeighting(temperature=0.5, mode="streaming", momentum=0.5)


def schedule(step):
    return 0.5 + 0.25 * step


def dro_fit(tmp, model, callback, steps=3, resume=None, **kw):
    trainer = SteeringTrainer(
        model=model, args=_hf.args(tmp, max_steps=steps, **kw), train_dataset=_hf.Sentences(24),
        callbacks=[callback], optimizers=(torch.optim.SGD(model.parameters(), lr=LR), None),
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_dro_equals_the_weighting_by_hand(tmp_path):
    model = _hf.tiny_gpt2()
    twin, plain = _hf.twin(model), _hf.twin(model)
    cb = DROReweightingCallback(dro_weighting(), temperature_schedule=schedule)
    trainer = dro_fit(tmp_path, model, cb)
    hand = dro_weighting()
    opt = torch.optim.SGD(twin.parameters(), lr=LR)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=LR)
    ess = []
    for step, batch in zip(range(3), _hf.Sentences(24).batches()):
        hand.temperature = schedule(step)
        opt.zero_grad()
        hand(per_sample_losses(twin, batch)[0]).backward()
        opt.step()
        ess.append(hand.signals()["ess_fraction"])
        opt_plain.zero_grad()
        per_sample_losses(plain, batch)[0].mean().backward()
        opt_plain.step()
    assert _hf.max_diff(model, twin) < 1e-6
    assert _hf.max_diff(model, plain) > 1e-5  # the weights changed the steps
    assert min(ess) < 0.999
    assert _hf.logged(trainer, "dro/ess_fraction") == pytest.approx(ess, rel=1e-5)
    assert cb.weighting.step == hand.step == 3
    assert cb.weighting.log_normalizer == pytest.approx(hand.log_normalizer, rel=1e-6)


def test_dro_arguments_are_checked():
    with pytest.raises(ValueError, match="Invalid weighting"):
        DROReweightingCallback(object())
    with pytest.raises(ValueError, match="Invalid temperature_schedule"):
        DROReweightingCallback(dro_weighting(), temperature_schedule=2.0)


@pytest.mark.parametrize("kind", ["kl", "dro"])
def test_resume_from_checkpoint_continues_the_controller(tmp_path, kind):
    """4 steps at once == 2 steps, a checkpoint, and 2 more from it with fresh objects."""
    ref = _hf.tiny_gpt2(seed=3)

    def run(out, model, steps=4, **kw):
        if kind == "kl":
            cb = KLControlCallback(pid())
            kl_fit(out, model, ref, cb, steps=steps, **kw)
            return cb, cb.controller.state_dict()
        cb = DROReweightingCallback(dro_weighting(), temperature_schedule=schedule)
        dro_fit(out, model, cb, steps=steps, **kw)
        return cb, cb.weighting.state_dict()

    full = _hf.tiny_gpt2()
    part = _hf.twin(full)
    _, want = run(tmp_path / "a", full)
    run(tmp_path / "b", part, save_strategy="steps", save_steps=2)
    resumed = _hf.tiny_gpt2(seed=1)
    cb, got = run(tmp_path / "b", resumed, resume=str(tmp_path / "b" / "checkpoint-2"))
    assert _hf.max_diff(resumed, full) < 1e-6
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.allclose(torch.as_tensor(got[key]), value, rtol=1e-6)
        elif isinstance(value, list | float):
            assert got[key] == pytest.approx(value, rel=1e-6)
        else:
            assert got[key] == value, key
    if kind == "kl":
        assert cb.updates == 4

"""torchsteer optimizers in a Trainer equal the same optimizer stepped by hand.

M-FAC through ``Trainer(optimizers=(opt, scheduler))``; Sven and RegularizedNewton through
SteeringTrainer's closure; the radius limiter measures a Sven step like any other.
"""

import pytest

pytest.importorskip("transformers")

import torch
from transformers import Trainer

from tests.integrations import _hf
from torchsteer.control import RadiusLimiter
from torchsteer.integrations.transformers import (
    RadiusLimitCallback,
    SteeringTrainer,
    model_logits,
    per_sample_losses,
)
from torchsteer.optim import MFAC, RegularizedNewton, Sven

STEPS = 3


def decay(step):
    return 1.0 / (1 + step)


def fit(cls, tmp, model, opt, sched=None, callbacks=None, **kw):
    trainer = cls(
        model=model, args=_hf.args(tmp, max_steps=STEPS, **kw), train_dataset=_hf.Sentences(12),
        optimizers=(opt, sched), callbacks=callbacks,
    )  # fmt: skip
    trainer.train()
    return trainer


def test_mfac_with_its_scheduler_equals_the_hand_loop(tmp_path):
    model = _hf.tiny_gpt2()
    twin = _hf.twin(model)
    opt = MFAC(model.parameters(), lr=0.05, ngrads=2, damp=1e-2)
    fit(Trainer, tmp_path, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, decay))
    hand = MFAC(twin.parameters(), lr=0.05, ngrads=2, damp=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(hand, decay)
    start = _hf.twin(twin)  # the initial parameters
    for _, batch in zip(range(STEPS), _hf.Sentences(12).batches()):
        hand.zero_grad()
        twin(**batch, num_items_in_batch=(batch["labels"] != -100).sum()).loss.backward()
        hand.step()
        sched.step()
    assert _hf.max_diff(model, twin) < 1e-6
    assert _hf.max_diff(model, start) > 1e-4  # it stepped
    assert opt.state_dict()["param_groups"][0]["lr"] == pytest.approx(0.05 * decay(STEPS))


def sven_by_hand(model, steps=STEPS, limiter=None):
    opt = Sven(model.parameters(), lr=0.1, rank=2, seed=0)
    for _, batch in zip(range(steps), _hf.Sentences(12).batches()):

        def closure(batch=batch):
            opt.zero_grad()
            return per_sample_losses(model, batch)[0]

        if limiter is None:
            opt.step(closure)
        else:
            limiter.step(opt, {"input_ids": batch["input_ids"]}, closure)
    return opt


def test_sven_through_the_closure_equals_the_hand_loop(tmp_path):
    model = _hf.tiny_gpt2()
    twin = _hf.twin(model)
    opt = Sven(model.parameters(), lr=0.1, rank=2, seed=0)
    trainer = fit(SteeringTrainer, tmp_path, model, opt)
    hand = sven_by_hand(twin)
    assert _hf.max_diff(model, twin) < 1e-6
    assert _hf.max_diff(model, _hf.tiny_gpt2()) > 1e-4  # it stepped
    first = next(iter(opt.state.values()))
    assert first["step"] == next(iter(hand.state.values()))["step"] == STEPS
    # the logged loss is the mean per-sample loss before each step
    start = _hf.tiny_gpt2()
    batch = next(iter(_hf.Sentences(12).batches()))
    with torch.no_grad():
        want = per_sample_losses(start, batch)[0].mean().item()
    assert _hf.logged(trainer, "loss")[0] == pytest.approx(want, rel=1e-5)


def test_the_radius_limiter_measures_the_sven_step(tmp_path):
    model = _hf.tiny_gpt2()
    twin = _hf.twin(model)
    cb = RadiusLimitCallback(r_max=0.05)
    fit(SteeringTrainer, tmp_path, model, Sven(model.parameters(), lr=0.1, rank=2, seed=0), None,
        [cb])  # fmt: skip
    limiter = RadiusLimiter(twin, r_max=0.05, logits_fn=model_logits)
    sven_by_hand(twin, limiter=limiter)
    assert limiter.limited >= 1 and cb.limiter.limited == limiter.limited
    assert cb.limiter.last["r"] == pytest.approx(limiter.last["r"], rel=1e-5)
    assert _hf.max_diff(model, twin) < 1e-6


@pytest.mark.parametrize("curvature", ["hessian", "empirical_fisher", "gauss_newton"])
def test_regularized_newton_through_the_closure_equals_the_hand_loop(tmp_path, curvature):
    model = _hf.tiny_gpt2(attn="eager")  # second derivatives through the attention
    twin = _hf.twin(model)
    kw = dict(curvature=curvature, gamma0=0.5, max_tries=4)
    opt = RegularizedNewton(model.parameters(), **kw)
    fit(SteeringTrainer, tmp_path, model, opt)
    hand = RegularizedNewton(twin.parameters(), **kw)
    for _, batch in zip(range(STEPS), _hf.Sentences(12).batches()):

        def closure(batch=batch):
            losses, logits = per_sample_losses(twin, batch)
            if curvature == "empirical_fisher":
                return losses
            return (losses.mean(), logits) if curvature == "gauss_newton" else losses.mean()

        hand.step(closure)
    assert _hf.max_diff(model, twin) < 1e-5
    assert _hf.max_diff(model, _hf.tiny_gpt2(attn="eager")) > 1e-4


def test_closure_optimizers_refuse_gradient_accumulation(tmp_path):
    model = _hf.tiny_gpt2()
    opt = Sven(model.parameters(), lr=0.1, rank=2)
    with pytest.raises(ValueError, match="Invalid gradient_accumulation_steps"):
        fit(SteeringTrainer, tmp_path, model, opt, gradient_accumulation_steps=2)
    assert opt.state == {} or all(s.get("step", 0) == 0 for s in opt.state.values())


def test_per_sample_losses_are_the_masked_token_means():
    """l_b = mean over t with y_{b,t+1} != -100 of CE(z_{bt}, y_{b,t+1}), by enumeration."""
    model = _hf.tiny_gpt2()
    ids = _hf.Sentences(3).ids
    labels = ids.clone()
    labels[0, 3:] = -100
    labels[1, 1] = -100
    losses, logits = per_sample_losses(model, {"input_ids": ids, "labels": labels})
    logp = logits.double().log_softmax(-1)
    for b in range(3):
        terms = [-logp[b, t, labels[b, t + 1]] for t in range(ids.shape[1] - 1)
                 if labels[b, t + 1] != -100]  # fmt: skip
        assert losses[b].item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    # the model's own loss on unmasked sequences is their mean
    full, _ = per_sample_losses(model, {"input_ids": ids, "labels": ids})
    assert full.mean().item() == pytest.approx(model(input_ids=ids, labels=ids).loss.item(), 1e-5)


def test_bad_inputs_are_named():
    model = _hf.tiny_gpt2()
    ids = _hf.Sentences(2).ids
    with pytest.raises(ValueError, match="Invalid inputs"):
        per_sample_losses(model, {"input_ids": ids})
    with pytest.raises(ValueError, match="Invalid logits / labels"):
        per_sample_losses(model, {"input_ids": ids, "labels": ids[:, :3]})
    with pytest.raises(ValueError, match="Invalid per_sample_loss"):
        SteeringTrainer(model=model, per_sample_loss=3)

"""RadiusLimitCallback in a Trainer equals RadiusLimiter written by hand; resume; errors."""

import pytest

pytest.importorskip("transformers")

import torch

from tests.integrations import _hf
from torchsteer.control import RadiusLimiter
from torchsteer.integrations.transformers import (
    RadiusLimitCallback,
    SteeringTrainer,
    model_logits,
)

R_MAX = 0.2


def hand_run(model, data, steps, r_max=R_MAX, lr=0.1):
    """The Trainer's steps by hand: its loss is the token sum over ``num_items_in_batch``
    (every label, unshifted), then SGD, then the limiter on the same inputs."""
    limiter = RadiusLimiter(model, r_max=r_max, logits_fn=model_logits)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    signals = []
    for _, batch in zip(range(steps), data.batches()):
        opt.zero_grad()
        n = (batch["labels"] != -100).sum()
        model(**batch, num_items_in_batch=n).loss.backward()
        limiter.step(opt, {"input_ids": batch["input_ids"]})
        signals.append(dict(limiter.last))
    return limiter, signals


def fit(tmp, model, callbacks, steps=3, resume=None, **kw):
    trainer = SteeringTrainer(
        model=model, args=_hf.args(tmp, max_steps=steps, **kw), train_dataset=_hf.Sentences(16),
        callbacks=callbacks, optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_trainer_steps_equal_the_hand_written_limiter(tmp_path):
    model = _hf.tiny_gpt2()
    ref, plain = _hf.twin(model), _hf.twin(model)
    cb = RadiusLimitCallback(r_max=R_MAX)
    trainer = fit(tmp_path, model, [cb])
    limiter, signals = hand_run(ref, _hf.Sentences(16), 3)
    hand_run(plain, _hf.Sentences(16), 3, r_max=1e9)
    assert limiter.limited >= 1 and cb.limiter.limited == limiter.limited
    assert _hf.max_diff(model, ref) < 1e-6
    assert _hf.max_diff(model, plain) > 1e-3  # the limiter changed the steps
    for key in ("r", "rho_a", "scale", "fraction_limited"):
        got = _hf.logged(trainer, "radius/" + key)
        assert got == pytest.approx([s[key] for s in signals], rel=1e-5)
    assert cb.state_dict()["steps"] == 3


def test_resume_restores_the_counters_and_continues_the_run(tmp_path):
    full = _hf.tiny_gpt2()
    start = _hf.twin(full)
    cb_full = RadiusLimitCallback(r_max=R_MAX)
    fit(tmp_path / "a", full, [cb_full], steps=4)
    fit(tmp_path / "b", start, [RadiusLimitCallback(r_max=R_MAX)], steps=4, save_steps=2,
        save_strategy="steps")  # fmt: skip
    resumed_model = _hf.tiny_gpt2(seed=1)  # other weights: the checkpoint's must be loaded
    cb = RadiusLimitCallback(r_max=R_MAX)
    fit(tmp_path / "b", resumed_model, [cb], steps=4, resume=str(tmp_path / "b" / "checkpoint-2"))
    assert cb.limiter.steps == 4 == cb_full.limiter.steps
    assert cb.limiter.limited == cb_full.limiter.limited
    assert cb.state_dict()["last"] == pytest.approx(cb_full.state_dict()["last"], rel=1e-5)
    assert _hf.max_diff(resumed_model, full) < 1e-6


def test_sdpa_attention_is_measured_in_the_math_backend():
    """The fused CPU attention has no forward-mode derivative; model_logits avoids it."""
    sdpa, eager = _hf.tiny_gpt2(attn="sdpa"), _hf.tiny_gpt2(attn="eager")
    ids = _hf.Sentences(4).ids
    d = {k: torch.randn_like(p) for k, p in sdpa.named_parameters()}
    from torchsteer.control.radius import logit_derivative

    a = logit_derivative(sdpa, {"input_ids": ids}, d, logits_fn=model_logits)
    b = logit_derivative(eager, {"input_ids": ids}, d, logits_fn=model_logits)
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(NotImplementedError):
        logit_derivative(sdpa, {"input_ids": ids}, d, logits_fn=lambda m, x: m(**x).logits)


@pytest.mark.parametrize(
    "kw, name",
    [({"r_max": -1.0}, "r_max"), ({"mode": "clip"}, "mode"), ({"logits_fn": 3}, "logits_fn"),
     ({"log_prefix": ""}, "log_prefix")],
)  # fmt: skip
def test_bad_arguments_raise_naming_them(kw, name):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        RadiusLimitCallback(**kw)


def test_a_step_without_a_recorded_forward_raises_before_any_change():
    model = _hf.tiny_gpt2()
    cb = RadiusLimitCallback()
    cb.on_train_begin(None, _State(), None, model=model)
    with pytest.raises(RuntimeError, match="no training forward"):
        cb.on_pre_optimizer_step(None, None, None, optimizer=torch.optim.SGD(model.parameters()))
    assert cb.limiter.steps == 0 and not cb.limiter.pending
    cb.on_train_end(None, None, None)
    assert not model._forward_pre_hooks


class _State:
    stateful_callbacks: dict = {}  # noqa: RUF012

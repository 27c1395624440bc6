"""A KL controller drives GRPO's beta: the betas are the controller's own updates on the KL
that GRPO logged; the controller's state survives a checkpoint."""

import pytest

pytest.importorskip("trl")

from datasets import Dataset
from trl import GRPOConfig

from tests.integrations import _hf
from torchsteer.control.kl import PIDKLController
from torchsteer.integrations.trl import KLControlledGRPOTrainer


def reward(completions, **kwargs):
    """A toy reward: how often the completion says w1."""
    return [float(c.count("w1")) for c in completions]


def controller():
    return PIDKLController(target=0.005, kp=1.0, ki=2.0, beta0=0.1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """GRPO loads its reference model from the policy's path: the tiny model on disk."""
    path = tmp_path_factory.mktemp("tiny")
    tok = _hf.tokenizer()
    tok.eos_token = "[PAD]"
    _hf.tiny_gpt2().save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def grpo(model_dir, out, ctl, steps=3, resume=None, beta_zero=False, **kw):
    kw = {"save_strategy": "no", **kw}
    args = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=4, num_generations=4,
        max_completion_length=4, beta=0.0 if beta_zero else 0.1, learning_rate=0.05,
        max_steps=steps,
        logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
        **kw,
    )  # fmt: skip
    prompts = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5 w6", "w7 w8", "w9"] * 4})
    from transformers import AutoTokenizer

    trainer = KLControlledGRPOTrainer(
        model=model_dir, reward_funcs=reward, args=args, train_dataset=prompts,
        processing_class=AutoTokenizer.from_pretrained(model_dir), kl_controller=ctl,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_beta_follows_the_controllers_update_rule(model_dir, tmp_path):
    ctl = controller()
    trainer = grpo(model_dir, tmp_path, ctl)
    kls = _hf.logged(trainer, "kl")[:3]
    hand, coefs = controller(), []
    for kl in kls:
        coefs.append(hand.update(kl=kl, n_steps=4))
    assert max(kls) > 0 and len(set(coefs)) == 3  # beta moved with the KL
    assert _hf.logged(trainer, "kl_control/coef") == pytest.approx(coefs, rel=1e-9)
    assert trainer.beta == pytest.approx(hand.coef, rel=1e-12)
    assert ctl.signals() == pytest.approx(hand.signals(), rel=1e-9)


def test_controller_state_is_resumed(model_dir, tmp_path):
    full = controller()
    grpo(model_dir, tmp_path / "a", full, steps=4)
    grpo(model_dir, tmp_path / "b", controller(), steps=4, save_strategy="steps", save_steps=2)
    resumed = controller()
    trainer = grpo(model_dir, tmp_path / "b", resumed, steps=4,
                   resume=str(tmp_path / "b" / "checkpoint-2"))  # fmt: skip
    assert trainer.beta_control.updates == 4
    assert resumed.integral == pytest.approx(full.integral, rel=1e-5)


def test_beta_zero_and_bad_controllers_are_refused(model_dir, tmp_path):
    with pytest.raises(ValueError, match="Invalid kl_controller"):
        grpo(model_dir, tmp_path, object())
    with pytest.raises(ValueError, match="Invalid beta"):
        grpo(model_dir, tmp_path, controller(), beta_zero=True)

"""torchsteer's f-divergences as GKD's loss: equal to TRL's own generalized JSD loss on the
same inputs (value and gradient, float64), and a GKD run with it equals TRL's."""

import pytest

pytest.importorskip("trl")

import torch
from trl.experimental.gkd import GKDTrainer

from torchsteer.integrations.trl import FDivergenceGKDTrainer, gkd_f_divergence_loss


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 2
    zt = torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 7, (3, 5), generator=g)
    labels[0, :2] = -100
    labels[2, 4] = -100
    return zs, zt, labels


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("n_items", [None, 20])
def test_loss_equals_trls_generalized_jsd(beta, temperature, n_items):
    zs, zt, labels = inputs()
    a = zs.clone().requires_grad_()
    b = zs.clone().requires_grad_()
    want = GKDTrainer.generalized_jsd_loss(
        b, zt, labels, beta=beta, temperature=temperature, num_items_in_batch=n_items
    )
    got = gkd_f_divergence_loss(
        a, zt, labels, beta=beta, temperature=temperature, num_items_in_batch=n_items
    )
    assert got.item() == pytest.approx(want.item(), rel=1e-10, abs=1e-13)
    (ga,) = torch.autograd.grad(got, a)
    (gb,) = torch.autograd.grad(want, b)
    assert torch.allclose(ga, gb, rtol=1e-9, atol=1e-12)


def test_other_kinds_and_no_labels():
    zs, zt, _ = inputs(1)
    kl = gkd_f_divergence_loss(zs, zt, kind="kl")
    p, lq = zt.softmax(-1), zs.log_softmax(-1)
    oracle = (p * (p.log() - lq)).sum() / zs.shape[0]  # batchmean over B, as TRL
    assert kl.item() == pytest.approx(oracle.item(), rel=1e-12)
    tv = gkd_f_divergence_loss(zs, zt, kind="tv")
    assert tv.item() == pytest.approx(
        (0.5 * (p - zs.softmax(-1)).abs().sum() / zs.shape[0]).item(), rel=1e-12
    )


def test_bad_divergence_is_refused_before_the_trainer_is_built():
    with pytest.raises(ValueError, match="Invalid kind"):
        FDivergenceGKDTrainer(divergence="wasserstein")


def gkd_run(cls, beta, tmp, **kw):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig

    from tests.integrations import _hf

    tok = _hf.tokenizer()
    tok.eos_token = "[PAD]"
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    turn = [{"role": "user", "content": "w1 w2 w3"}, {"role": "assistant", "content": "w4 w5"}]
    student, teacher = _hf.tiny_gpt2(), _hf.tiny_gpt2(seed=5)
    args = GKDConfig(
        output_dir=str(tmp), per_device_train_batch_size=4, lmbda=0.0, beta=beta, max_steps=2,
        learning_rate=0.1, report_to="none", use_cpu=True, disable_tqdm=True,
        save_strategy="no", logging_steps=1, seed=0, max_length=16,
    )  # fmt: skip
    trainer = cls(
        model=student, teacher_model=teacher, args=args, processing_class=tok,
        train_dataset=Dataset.from_dict({"messages": [turn] * 8}), **kw,
    )  # fmt: skip
    trainer.train()
    return student


@pytest.mark.parametrize("beta, kind", [(0.0, "kl"), (0.3, "generalized_js")])
def test_a_gkd_run_with_the_f_divergence_equals_trls(tmp_path, beta, kind):
    from tests.integrations import _hf

    want = gkd_run(GKDTrainer, beta, tmp_path)
    got = gkd_run(FDivergenceGKDTrainer, beta, tmp_path, divergence=kind)
    other = gkd_run(FDivergenceGKDTrainer, beta, tmp_path, divergence="tv")
    assert _hf.max_diff(got, want) < 1e-6
    assert _hf.max_diff(other, want) > 1e-3  # the loss is really the chosen divergence

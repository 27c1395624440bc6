"""f-DPO against float64 formulas, DPO in closed form, and TRL's DPOTrainer where installed."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from torchsteer.objectives import f_dpo_logits, f_dpo_loss


def _batch(seed, n=7, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(n, generator=g, dtype=torch.float64) - 5.0 for _ in range(4)]


def _fprime(kind, u, alpha=0.5):
    """f'(u) of the f-DPO paper, written directly from u (python floats)."""
    if kind == "reverse_kl":
        return math.log(u)
    if kind == "forward_kl":
        return 1.0 - 1.0 / u
    if kind == "js":
        return math.log(2.0 * u / (1.0 + u))
    return (u ** (alpha - 1.0) - 1.0) / (alpha - 1.0)


def _loss_oracle(kind, pc, pr, rc, rr, beta, alpha=0.5, eps=0.0):
    out = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        h = _fprime(kind, math.exp(a - c), alpha) - _fprime(kind, math.exp(b - d), alpha)
        z = beta * h
        logsig = lambda x: -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))  # noqa: E731
        out.append(-(1 - eps) * logsig(z) - eps * logsig(-z))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(3))
def test_reverse_kl_is_dpo_in_closed_form(seed):
    pc, pr, rc, rr = _batch(seed)
    beta = 0.1
    dpo = -torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    got = f_dpo_loss(pc, pr, rc, rr, beta, "reverse_kl", reduction="none")
    torch.testing.assert_close(got, dpo, rtol=1e-14, atol=0)
    assert f_dpo_loss(pc, pr, rc, rr, beta).item() == pytest.approx(dpo.mean().item(), rel=1e-14)


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "js", "alpha"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_each_divergence_against_its_float64_formula(kind, eps):
    pc, pr, rc, rr = _batch(1, scale=1.0)
    for alpha in (0.5, 0.2, 1.7, -0.5) if kind == "alpha" else (0.5,):
        got = f_dpo_loss(pc, pr, rc, rr, 0.3, kind, alpha, eps, reduction="none")
        want = _loss_oracle(kind, pc, pr, rc, rr, 0.3, alpha, eps)
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)


def test_alpha_limits_are_reverse_and_forward_kl():
    pc, pr, rc, rr = _batch(2, scale=1.0)
    rkl = f_dpo_logits(pc, pr, rc, rr, "reverse_kl")
    fkl = f_dpo_logits(pc, pr, rc, rr, "forward_kl")
    torch.testing.assert_close(f_dpo_logits(pc, pr, rc, rr, "alpha", 0.0), fkl, rtol=1e-14, atol=0)
    assert torch.equal(f_dpo_logits(pc, pr, rc, rr, "alpha", 1.0), rkl)
    for d in (1e-3, 1e-6):
        err = (f_dpo_logits(pc, pr, rc, rr, "alpha", 1.0 - d) - rkl).abs().max().item()
        assert err < 10 * d * rkl.abs().max().item()  # O(1 - alpha), no cancellation


def test_gradient_matches_finite_differences():
    pc, pr, rc, rr = _batch(3, n=4, scale=1.0)
    for kind in ("reverse_kl", "forward_kl", "js", "alpha"):
        x = torch.stack([pc, pr]).requires_grad_(True)

        def f(x, kind=kind):
            return f_dpo_loss(x[0], x[1], rc, rr, 0.5, kind, 0.3, 0.05)

        assert torch.autograd.gradcheck(f, (x,))


def test_bad_input_raises():
    pc, pr, rc, rr = _batch(0)
    for kwargs, word in (
        ({"divergence": "tv"}, "divergence"),
        ({"beta": 0.0}, "beta"),
        ({"beta": math.nan}, "beta"),
        ({"label_smoothing": 0.6}, "label_smoothing"),
        ({"divergence": "alpha", "alpha": math.inf}, "alpha"),
        ({"reduction": "max"}, "reduction"),
    ):
        args = {"beta": 0.1, **kwargs}
        with pytest.raises(ValueError, match=word):
            f_dpo_loss(pc, pr, rc, rr, **args)
    with pytest.raises(ValueError, match="ref_rejected_logps shape"):
        f_dpo_loss(pc, pr, rc, rr[:3], 0.1)
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        f_dpo_loss(pc, pr.long(), rc, rr, 0.1)


def _trl_loss(kind, alpha, pc, pr, rc, rr, beta):
    """TRL DPOTrainer._compute_loss on a stub trainer whose model returns the given log-probs."""
    dpo = pytest.importorskip("trl.trainer.dpo_trainer")  # checked against trl 1.16.0
    if not hasattr(dpo.DPOTrainer, "_compute_loss"):
        pytest.skip("this TRL computes the DPO loss elsewhere (the stub targets trl 1.16)")
    n = pc.shape[0]
    per_token = torch.cat([pc, pr]).float()[:, None].repeat(1, 2) / 2  # two tokens per answer
    out = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros(2 * n, 2),
        mean_logits=torch.zeros(2 * n, 2),
        is_top1=torch.zeros(2 * n, 2, dtype=torch.bool),
        aux_loss=None,
    )
    model = lambda **kw: out  # noqa: E731
    model.training = True
    acc = SimpleNamespace(device="cpu", gather_for_metrics=lambda t: t, gather=lambda t: t)
    stub = SimpleNamespace(
        model=model,
        accelerator=acc,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type=kind,
        f_alpha_divergence_coef=alpha,
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * n, 3, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, 3, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 1, 1]] * (2 * n)),
        "ref_chosen_logps": rc.float(),
        "ref_rejected_logps": rr.float(),
    }
    return dpo.DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)


@pytest.mark.parametrize(
    ("kind", "trl_kind", "alpha"),
    [
        ("reverse_kl", "reverse_kl", 0.5),
        ("forward_kl", "forward_kl", 0.5),
        ("js", "js_divergence", 0.5),
        ("alpha", "alpha_divergence", 0.5),
        ("alpha", "alpha_divergence", 0.3),
    ],
)
def test_equals_trl_dpo_trainer(kind, trl_kind, alpha):
    pc, pr, rc, rr = _batch(4, n=6, scale=0.5)
    pc, pr = pc + 4.0, pr + 4.0  # ratios near 1, within TRL's exponent clamp
    want = _trl_loss(trl_kind, alpha, pc, pr, rc, rr, 0.2)
    got = f_dpo_loss(pc.float(), pr.float(), rc.float(), rr.float(), 0.2, kind, alpha)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)

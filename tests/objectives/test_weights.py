"""PACED weights against the Beta kernel, APO's coefficient step by step, resume bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from torchsteer.control.kl import AdaptiveKLController
from torchsteer.objectives import (
    DifficultyAdaptiveKL,
    PACEDWeights,
    apo_kl_weight,
    pass_rates,
    stcr_advantages,
)


@pytest.mark.parametrize(("a", "b"), [(1.0, 1.0), (2.0, 0.5), (0.5, 3.0), (1.3, 1.3)])
def test_paced_weights_are_the_beta_kernel(a, b):
    p = torch.tensor([0.05, 0.125, 0.3, 0.5, 0.625, 0.9, 0.99], dtype=torch.float64)
    c1, c0 = (torch.tensor(x + 1.0, dtype=torch.float64) for x in (a, b))
    pdf = torch.distributions.Beta(c1, c0).log_prob(p).exp()
    w = PACEDWeights(a, b).update(p)
    torch.testing.assert_close(w, pdf / pdf.mean(), rtol=1e-12, atol=0)
    s = PACEDWeights(a, b, normalize="sum").update(p)
    torch.testing.assert_close(s, pdf / pdf.sum(), rtol=1e-12, atol=0)
    raw = PACEDWeights(a, b, normalize="none").update(p)
    beta_fn = math.exp(math.lgamma(a + 1) + math.lgamma(b + 1) - math.lgamma(a + b + 2))
    torch.testing.assert_close(raw, pdf * beta_fn, rtol=1e-12, atol=0)
    # the frontier of competence: the kernel's mode a / (a + b)
    grid = torch.linspace(0, 1, 10001, dtype=torch.float64)
    mode = grid[PACEDWeights(a, b, normalize="none").kernel(grid).argmax()].item()
    assert mode == pytest.approx(a / (a + b), abs=1e-4)


def test_paced_endpoints_counts_and_signals():
    paced = PACEDWeights(1.0, 2.0, normalize="none")
    w = paced.update(n_correct=torch.tensor([0, 2, 8, 4]), n_samples=8)
    want = [0.0, 0.25 * 0.75**2, 0.0, 0.5 * 0.5**2]
    assert w.tolist() == pytest.approx(want, rel=1e-14)
    assert paced.mean_raw == pytest.approx(sum(want) / 4, rel=1e-14)
    ess = sum(want) ** 2 / (4 * sum(x * x for x in want))
    assert paced.ess == pytest.approx(ess, rel=1e-14)
    # 0^0 = 1: with a = 0 the p = 0 end stays open
    assert PACEDWeights(0.0, 1.0, normalize="none").update(torch.tensor([0.0, 1.0])).tolist() == [
        1.0,
        0.0,
    ]
    # no prompt at the frontier: all weights 0, nothing divided by zero
    z = PACEDWeights(1.0, 1.0).update(torch.tensor([0.0, 1.0, 1.0]))
    assert z.tolist() == [0.0, 0.0, 0.0]


def test_paced_bad_input_raises_and_keeps_state():
    paced = PACEDWeights(1.0, 1.0)
    paced.update(torch.tensor([0.25, 0.5]))
    before = paced.state_dict()
    for kwargs, word in (
        ({"pass_rate": torch.tensor([0.5, 1.5])}, "pass_rate"),
        ({"pass_rate": torch.tensor([math.nan])}, "pass_rate"),
        ({"pass_rate": torch.ones(2, 2) / 2}, "pass_rate"),
        ({"n_correct": torch.tensor([9]), "n_samples": 8}, "n_correct"),
        ({"n_correct": torch.tensor([1])}, "n_samples"),
        ({}, "pass_rate or n_correct"),
    ):
        with pytest.raises(ValueError, match=word):
            paced.update(**kwargs)
        assert paced.state_dict() == before
    for a, b, word in ((-1.0, 1.0, "a"), (1.0, math.inf, "b")):
        with pytest.raises(ValueError, match=f"Invalid {word}"):
            PACEDWeights(a, b)
    with pytest.raises(ValueError, match="normalize"):
        PACEDWeights(1.0, 1.0, normalize="max")
    with pytest.raises(ValueError, match="state keys"):
        paced.load_state_dict({"steps": 1, "momentum": 0.0})


def test_apo_weight_by_hand():
    d = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 0.5], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, 0.3, 2.0, 1.0, -1.0], dtype=torch.float64)
    e = math.e
    want = [1.0, 1 - math.exp(-e * 0.75), 1 - math.exp(-e * 0.5), 1 - math.exp(-e * 0.25), 1.0, 1.0]
    assert apo_kl_weight(d, adv).tolist() == pytest.approx(want, rel=1e-14)


def test_difficulty_adaptive_kl_step_by_step_against_a_hand_computed_sequence():
    base = AdaptiveKLController(beta0=0.2, target=1.0, horizon=10)
    ctl = DifficultyAdaptiveKL(base)
    kls = [1.5, 0.5, 1.0, 3.0]
    rates = [0.25, 0.5, 1.0, 0.75]
    beta, seq = 0.2, []
    for kl in kls:  # Ziegler's update by hand, n_steps = 2 samples per step
        e = min(max(kl / 1.0 - 1.0, -0.2), 0.2)
        beta *= 1.0 + e * 2 / 10
        seq.append(beta)
    got, pens = [], []
    for kl, p in zip(kls, rates):
        w = ctl.weights(torch.tensor([p, p]), torch.tensor([1.0, -1.0]))
        kl_i = torch.tensor([kl, 2 * kl], dtype=torch.float64)
        pens.append(ctl.penalty(kl_i, w).item())
        got.append(ctl.update(kl=kl, n_steps=2))
        assert ctl.mean_weight == pytest.approx(w.mean().item(), rel=1e-14)
    assert got == pytest.approx(seq, rel=1e-14)
    coefs = [0.2, *seq[:-1]]  # the penalty of a step uses the coefficient before its update
    for pen, c, kl, p in zip(pens, coefs, kls, rates):
        d = 1.0 - p
        w = 1.0 if d in (0.0, 1.0) else 1.0 - math.exp(-math.e * (1.0 - d))
        assert pen == pytest.approx(c * (w * kl + 1.0 * 2 * kl) / 2, rel=1e-14)


def test_resume_bit_for_bit():
    def run(ctl, paced, steps, start=0):
        out = []
        g = torch.Generator().manual_seed(start)
        for _ in range(steps):
            p = torch.randint(0, 9, (6,), generator=g).double() / 8
            adv = torch.randn(6, generator=g, dtype=torch.float64)
            w = ctl.weights(p, adv)
            c = ctl.update(kl=float(w.mean()) * 0.7, n_steps=6)
            out.append((c, paced.update(p).tolist(), w.tolist()))
        return out

    a = DifficultyAdaptiveKL(AdaptiveKLController(beta0=0.1, target=0.5, horizon=20))
    pa = PACEDWeights(1.0, 2.0)
    run(a, pa, 5)
    state, pstate = a.state_dict(), pa.state_dict()
    tail = run(a, pa, 5, start=1)
    b = DifficultyAdaptiveKL(AdaptiveKLController(beta0=0.7, target=0.5, horizon=20))
    pb = PACEDWeights(1.0, 2.0)
    b.load_state_dict(state)
    pb.load_state_dict(pstate)
    assert run(b, pb, 5, start=1) == tail
    assert b.state_dict() == a.state_dict() and pb.state_dict() == pa.state_dict()


def test_difficulty_adaptive_kl_bad_input_keeps_state():
    ctl = DifficultyAdaptiveKL(0.1)
    ctl.weights(torch.tensor([0.5]), torch.tensor([1.0]))
    before = ctl.state_dict()
    with pytest.raises(ValueError, match="pass_rate"):
        ctl.weights(torch.tensor([1.5]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="advantages shape"):
        ctl.weights(torch.tensor([0.5, 0.5]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="weights shape"):
        ctl.penalty(torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match="base"):
        DifficultyAdaptiveKL(-1.0)
    assert ctl.state_dict() == before


def test_stcr_by_hand():
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0], [-0.5, -0.5, -0.5, -0.5]], dtype=torch.float64)
    lengths = torch.tensor([[10, 30, 5, 20], [100, 200, 300, 400]])
    correct = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    got = stcr_advantages(adv, lengths, correct)
    # group 0: mean correct length 15; sample 1 is wrong and 15 longer; sample 2 is shorter
    want = [[1.0, -1.0 * (2 - 1.00001**-15), -1.0, 1.0], [-0.5] * 4]
    assert got.tolist() == [pytest.approx(r, rel=1e-12) for r in want]


def test_pass_rates():
    assert pass_rates([0, 3, 4], 4).tolist() == [0.0, 0.75, 1.0]

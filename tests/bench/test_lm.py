"""The lm suite: its loss floor, its metric and time to target, on tiny configurations."""

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from torchsteer.bench.registry import Context, get_suite
from torchsteer.bench.suites import lm

TINY = dataclasses.replace(
    lm.QUICK, n_layer=1, width=16, context=8, batch_size=4, steps=6, eval_every=3,
    val_windows=8, second_order_steps=2, newton_steps=1,
)  # fmt: skip


@pytest.fixture(scope="module")
def lang():
    return lm.language()


class TrueChain(nn.Module):
    """Logits = log Q[x_t, :] (order 1): the best possible predictor of the suite's language."""

    def __init__(self, lang):
        super().__init__()
        assert lang.n_groups == 1
        with np.errstate(divide="ignore"):
            self.register_buffer("logq", torch.as_tensor(np.log(lang.transitions[0])))

    def forward(self, x):
        return self.logq[x]


def test_target_is_five_percent_above_the_exact_entropy_rate(lang):
    suite = get_suite("lm")
    assert suite.target == pytest.approx(1.05 * lang.entropy_rate, rel=1e-15)
    assert not suite.higher_is_better
    # the order-1 language: every position's floor is H, the metric scores t >= 1
    np.testing.assert_allclose(lang.position_floor(5), lang.entropy_rate, rtol=1e-12)


def test_validation_loss_of_the_true_chain_is_its_nll(lang):
    xv, yv = lm._windows(lang, 64, TINY, seed=3)
    value = lm.validation_loss(TrueChain(lang), xv, yv)
    tokens = torch.cat([xv, yv[:, -1:]], 1).numpy()
    expected = lang.nll(tokens)[:, 1:].mean()  # float64 oracle, positions t >= 1
    assert value == pytest.approx(expected, rel=1e-12)
    # and it is the entropy rate up to sampling noise (LLN)
    assert abs(value - lang.entropy_rate) < 5 * lang.nll(tokens)[:, 1:].std() / math.sqrt(448)


def test_validation_loss_leaves_out_position_zero(lang):
    model = lm.make_model(TINY, 0)
    xv, yv = lm._windows(lang, 8, TINY, seed=4)
    with torch.no_grad():
        logits = model(xv).double()
    logp = logits - torch.logsumexp(logits, -1, keepdim=True)
    manual = -logp.gather(-1, yv.unsqueeze(-1)).squeeze(-1)[:, 1:].mean().item()
    assert lm.validation_loss(model, xv, yv) == pytest.approx(manual, rel=1e-5)
    assert model.training  # restored


def test_time_to_target_on_a_scripted_curve(lang, monkeypatch):
    target = 1.05 * lang.entropy_rate
    curve = iter([4.0, 3.0, target * 1.001, target * 0.999, 1.0, 1.0])  # point 3 reaches it
    monkeypatch.setattr(lm, "validation_loss", lambda model, x, y: next(curve))
    ticks = itertools.count()
    clock = lambda: 0.5 * next(ticks)  # noqa: E731 -- each step takes 0.5 fake CPU s
    calls = []
    arm = lm.Arm(name="fake", make=lambda m: None, step=lambda *a: calls.append(1) or 2.0,
                 steps=20)  # fmt: skip
    config = dataclasses.replace(TINY, steps=20, eval_every=2)
    run = lm.run_arm(arm, config, seed=0, lang=lang, clock=clock)
    # points at steps 0, 2, 4, 6; the metric meets the target at step 6 and the arm stops
    assert run.extra["step"] == [0, 2, 4, 6]
    assert run.time_to_target == pytest.approx(6 * 0.5)
    assert run.cpu_time == pytest.approx([0.0, 1.0, 2.0, 3.0])
    assert run.steps == [0, 2 * 32, 4 * 32, 6 * 32]  # tokens: batch 4 x context 8 per step
    assert len(calls) == 6 + 2  # six steps and the two memory-probe steps
    assert run.loss[1:] == [2.0, 2.0, 2.0] and run.step_time == pytest.approx(0.5)


def test_never_reaching_the_target_gives_none(lang, monkeypatch):
    monkeypatch.setattr(lm, "validation_loss", lambda model, x, y: 3.0)
    arm = lm.Arm(name="fake", make=lambda m: None, step=lambda *a: 2.0, steps=4)
    run = lm.run_arm(arm, dataclasses.replace(TINY, steps=4, eval_every=2), 0, lang)
    assert run.time_to_target is None and run.extra["step"] == [0, 2, 4]


def test_tiny_suite_runs_every_arm(lang):
    ticks = []
    runs = lm.run(Context(quick=True, seeds=[0], advance=lambda: ticks.append(1)), TINY)
    arms = lm.methods(TINY)
    assert [r.method for r in runs] == [a.name for a in arms] and len(ticks) == len(arms)
    fresh = lm.make_model(TINY, 0)
    xv, yv = lm._windows(lang, TINY.val_windows, TINY, lm.VAL_SEED)
    for r, arm in zip(runs, arms):
        assert r.extra["step"][-1] == arm.steps  # no arm reaches the target this soon
        assert r.steps == [s * 32 for s in r.extra["step"]]
        assert r.metric[0] == pytest.approx(lm.validation_loss(fresh, xv, yv), rel=1e-6)
        assert all(math.isfinite(m) for m in r.metric)
        assert r.peak_memory is None or r.peak_memory > 0
    # every arm moved the model: its validation loss changed
    assert all(r.metric[-1] != r.metric[0] for r in runs)
    newton = runs[-1].extra["optimizer_record"]
    assert newton["closure_evals"] >= 1 and newton["failed_steps"] == 0

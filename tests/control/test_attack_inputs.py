"""Bad input the attack rerun (benchmarks/attack.py) found accepted or answered with a raw
error in control/: each must raise ValueError naming the problem, the object unchanged.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from torchsteer.control import (
    AdaptiveKLController,
    DROWeighting,
    FixedKLController,
    KLStatistics,
    PIDKLController,
    SAFEController,
    double_softmin,
    kl_exact,
)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: FixedKLController(beta=True), "beta"),
        (lambda: AdaptiveKLController(beta0=True), "beta0"),
        (lambda: AdaptiveKLController(horizon=True), "horizon"),
        (lambda: PIDKLController(target=True), "target"),
        (lambda: PIDKLController(target=0.1, kp=True), "kp"),
        (lambda: SAFEController(penalty_scale=True), "penalty_scale"),
        (lambda: SAFEController(target_velocity=False), "target_velocity"),
    ],
)
def test_a_bool_hyperparameter_is_refused(make, name):
    # True was read as 1.0 (bool is an int): a flag passed by mistake became a coefficient
    with pytest.raises(ValueError, match=f"Invalid {name}:"):
        make()


def test_d_ema_is_named_in_its_own_error():
    with pytest.raises(ValueError, match=r"Invalid d_ema: 1\.5"):
        PIDKLController(target=0.1, d_ema=1.5)
    with pytest.raises(ValueError, match=r"Invalid ema: 1\.0"):
        PIDKLController(target=0.1, ema=1.0)


def test_kl_statistics_names_a_statistic_that_is_not_a_number():
    acc = KLStatistics()
    acc.add(kl=0.1)
    before = copy.deepcopy(acc.state_dict())
    with pytest.raises(ValueError, match="Invalid entropy: 'x'"):
        acc.add(kl=0.2, entropy="x")
    assert acc.state_dict() == before


def test_kl_statistics_refuses_a_state_with_unknown_keys():
    acc = KLStatistics()
    acc.add(kl=0.1, n_steps=2)
    before = copy.deepcopy(acc.state_dict())
    with pytest.raises(ValueError, match="unknown keys"):
        acc.load_state_dict({"beta": 0.3})  # another object's state was read as empty
    assert acc.state_dict() == before
    acc.load_state_dict({})  # an empty state still resets, as before
    assert acc.state_dict() == {"sums": {}, "batches": 0, "n_steps": 0}


def test_kl_exact_checks_shapes_and_dtypes():
    a = torch.randn(4, 6, dtype=torch.float64)
    p, q = a.softmax(-1), a.flip(0).softmax(-1)  # the closed form sum p log(p / q)
    torch.testing.assert_close(kl_exact(a, a.flip(0)), (p * (p / q).log()).sum(-1))
    with pytest.raises(ValueError, match="Invalid logits_ref: shape"):
        kl_exact(a, a[:, :5])
    with pytest.raises(ValueError, match="floating point"):
        kl_exact(a.long(), a.long())


def test_double_softmin_names_shapes_that_do_not_broadcast():
    v1, v2 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5])
    want = -0.3 * (
        torch.logsumexp(torch.stack([-v1 / 0.3, -v2.expand(3) / 0.3], -1), -1) - math.log(2.0)
    )
    assert torch.equal(double_softmin(v1, v2), want)  # broadcasting still works
    with pytest.raises(ValueError, match="Invalid v2: shape"):
        double_softmin(v1, torch.ones(2))


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"momentum": True}, "momentum"),
        ({"class_step": True}, "class_step"),
        ({"max_weight": True}, "max_weight"),
        ({"max_weight": math.inf}, "max_weight"),
    ],
)
def test_dro_weighting_refuses_bool_and_infinite_hyperparameters(kw, name):
    with pytest.raises(ValueError, match=f"Invalid {name}:"):
        DROWeighting(**kw)


def test_dro_weighting_refuses_a_state_with_unknown_keys():
    w = DROWeighting(0.5, mode="streaming")
    w.weights(torch.rand(6))
    before = copy.deepcopy(w.state_dict())
    with pytest.raises(ValueError, match="unknown keys"):
        w.load_state_dict({"beta": 0.3, "step": 0})
    after = w.state_dict()
    assert after.keys() == before.keys()
    assert all(
        torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v
        for k, v in before.items()
    )

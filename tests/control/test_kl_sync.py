"""The KL controllers' tensor path (issue 17): no host sync with ``nonfinite="skip"`` once
PID's delay line is full, one (the check) with ``"raise"``; the same coefficients as the
float path bit for bit, and a masked bad statistic leaves the state as it was."""

import math

import pytest
import torch

from tests._sync import SyncCounter
from torchsteer.control.kl import AdaptiveKLController, FixedKLController, PIDKLController


def _kls(n=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g, dtype=torch.float64) * 0.6).tolist()


def _make(kind):
    if kind == "adaptive":  # n_steps > horizon / (2 clip): the factor's clamp is hit too
        return AdaptiveKLController(beta0=0.2, target=0.3, horizon=100, clip=0.2)
    if kind == "pid":
        return PIDKLController(target=0.2, kp=0.5, ki=0.3, kd=0.4, delay=4, entropy_floor=0.5)
    return FixedKLController(beta=0.3)


def _feed(ctl, kl, tensor):
    kw = {"kl": torch.tensor(kl, dtype=torch.float64) if tensor else kl, "n_steps": 64}
    if isinstance(ctl, PIDKLController):
        ent = 0.2 + kl
        kw["entropy"] = torch.tensor(ent, dtype=torch.float64) if tensor else ent
    return ctl.update(**kw)


@pytest.mark.parametrize("kind", ["adaptive", "pid", "fixed"])
def test_the_tensor_path_equals_the_float_path_bit_for_bit(kind):
    a, b = _make(kind), _make(kind)
    for kl in _kls():
        ca, cb = _feed(a, kl, False), _feed(b, kl, True)
        assert float(cb) == ca and isinstance(cb, torch.Tensor) == (kind != "fixed")
    assert {k: float(v) for k, v in b.signals().items()} == a.signals()


@pytest.mark.parametrize("kind", ["adaptive", "pid"])
@pytest.mark.parametrize(("nonfinite", "syncs"), [("skip", 0), ("raise", 1)])
def test_a_steady_state_update_syncs_only_for_the_raise_check(kind, nonfinite, syncs):
    ctl = _make(kind)
    ctl.nonfinite = nonfinite
    counts = []
    for kl in _kls():
        with SyncCounter() as c:
            _feed(ctl, kl, True)
        counts.append(c.total)
    filling = 4 if (kind == "pid" and nonfinite == "skip") else 0  # PID's delay line fills
    assert counts[filling:] == [syncs] * (len(counts) - filling)
    assert all(n <= 1 for n in counts)


@pytest.mark.parametrize("kind", ["adaptive", "pid"])
def test_a_skipped_bad_statistic_leaves_the_state_as_it_was(kind):
    ref, ctl = _make(kind), _make(kind)
    ctl.nonfinite = "skip"
    kls = _kls()
    for i, kl in enumerate(kls):
        if i == 9:
            before = {k: float(v) for k, v in ctl.signals().items()}
            with SyncCounter() as c:
                coef = ctl.update(kl=torch.tensor(math.nan), entropy=torch.tensor(1.0), n_steps=64)
            assert c.total == 0 and float(coef) == before["coef"]
            assert {k: float(v) for k, v in ctl.signals().items()} == before
            continue
        assert float(_feed(ctl, kl, True)) == _feed(ref, kl, False)


def test_raise_names_the_statistic_and_keeps_the_state():
    ctl = _make("pid")
    for kl in _kls(6):
        _feed(ctl, kl, True)
    state = {k: v for k, v in ctl.state_dict().items()}
    with pytest.raises(ValueError, match=r"Invalid entropy: -1\.0"):
        ctl.update(kl=torch.tensor(0.1), entropy=torch.tensor(-1.0))
    assert ctl.state_dict().keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(torch.as_tensor(ctl.state_dict()[k]), torch.as_tensor(v))
    with pytest.raises(ValueError, match="Invalid nonfinite"):
        ctl.nonfinite = "ignore"

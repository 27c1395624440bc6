"""DROWeighting's host synchronizations (issue 17): none with ``nonfinite="skip"`` (the skip
masked on the device, the state kept bit for bit), one (the check) with ``"raise"``; the
weights and the streaming normalizer equal the closed form."""

import math

import pytest
import torch

from tests._sync import SyncCounter
from torchsteer.control import DROWeighting


def _losses(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(16, generator=g) * 3 for _ in range(n)]


@pytest.mark.parametrize("mode", ["batch", "streaming"])
@pytest.mark.parametrize(("nonfinite", "syncs"), [("skip", 0), ("raise", 1)])
def test_a_call_syncs_only_for_the_raise_check(mode, nonfinite, syncs):
    dro = DROWeighting(temperature=0.5, mode=mode, nonfinite=nonfinite, momentum=0.3)
    counts = []
    for losses in _losses():
        with SyncCounter() as c:
            dro(losses)
        counts.append(c.total)
    assert counts == [syncs] * 5


def test_streaming_normalizer_matches_the_closed_form():
    """u_1 = mean e^{l/r}; u <- (1 - gamma) u + gamma mean e^{l/r}, capped at 2x growth
    (never hit here); weights e^{l/r} / u, in float64."""
    r, gamma = 0.5, 0.3
    dro = DROWeighting(temperature=r, mode="streaming", momentum=gamma, nonfinite="skip")
    u = None
    for losses in _losses():
        losses = losses.double()
        w = dro.weights(losses)
        e = (losses.double() / r).exp()
        m = float(e.mean())
        u = m if u is None else (1 - gamma) * u + gamma * m
        assert dro.log_normalizer == pytest.approx(math.log(u), rel=1e-12)
        torch.testing.assert_close(w, e / u, rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", ["batch", "streaming"])
def test_skip_leaves_the_state_bit_for_bit_and_returns_zero(mode):
    batches = _losses()
    a = DROWeighting(temperature=0.5, mode=mode, nonfinite="skip", momentum=0.3)
    b = DROWeighting(temperature=0.5, mode=mode, momentum=0.3)  # "raise": host-checked
    for i, losses in enumerate(batches):
        if i == 2:
            bad = losses.clone()
            bad[3] = math.nan
            with SyncCounter() as c:
                loss = a(bad)
            assert c.total == 0 and float(loss) == 0.0
            assert torch.equal(a.last_weights, torch.zeros(16))
            with pytest.raises(ValueError, match="not finite"):
                b(bad)
            continue
        assert torch.equal(a(losses), b(losses))
    assert a.log_normalizer == b.log_normalizer and a.state_dict()["step"] == 5


def test_a_skipped_first_call_leaves_the_normalizer_unset():
    dro = DROWeighting(mode="streaming", nonfinite="skip")
    dro(torch.tensor([1.0, math.inf]))
    assert dro.log_normalizer is None and dro.state_dict()["log_normalizer"] is None
    losses = torch.tensor([0.5, 1.5])
    dro(losses)
    assert dro.log_normalizer == pytest.approx(math.log(float(losses.double().exp().mean())))


def test_invalid_nonfinite_raises():
    with pytest.raises(ValueError, match="Invalid nonfinite"):
        DROWeighting(nonfinite="ignore")

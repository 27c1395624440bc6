"""The CPU step that reads as it goes is the joined-transfer step of before, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchsteer.optim import Sven, _sven_device


def _run(monkeypatch, free: tuple, kappa: float, scale: float, momentum: float, steps=4):
    monkeypatch.setattr(_sven_device, "FREE_READS", free)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = Sven(model.parameters(), lr=0.1, rank=4, kappa=kappa, momentum=momentum, seed=1)
    x, y = torch.randn(16, 2), torch.randn(16)
    for _ in range(steps):
        opt.step(lambda: scale * (model(x).squeeze(-1) - y) ** 2)
    state = opt.state_dict()["state"]
    return [p.detach().clone() for p in model.parameters()], state


@pytest.mark.parametrize("kappa", [2.0, 1.0])
@pytest.mark.parametrize("scale", [1.0, 2.0**40, 2.0**-40])  # R rescaled outside the band
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_read_as_it_goes_equals_the_joined_transfer(monkeypatch, kappa, scale, momentum):
    new_p, new_s = _run(monkeypatch, ("cpu",), kappa, scale, momentum)
    old_p, old_s = _run(monkeypatch, (), kappa, scale, momentum)
    for a, b in zip(new_p, old_p, strict=True):
        assert torch.equal(a, b)
    for key, value in old_s[0].items():
        assert torch.equal(new_s[0][key], value), key


@pytest.mark.parametrize("free", [("cpu",), ()])
def test_nonfinite_and_negative_losses_raise_on_both(monkeypatch, free):
    monkeypatch.setattr(_sven_device, "FREE_READS", free)
    model = nn.Linear(2, 1)
    x = torch.randn(4, 2)
    before = [p.detach().clone() for p in model.parameters()]
    opt = Sven(model.parameters(), rank=2)
    bad = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    with pytest.raises(ValueError, match="per-sample losses"):
        opt.step(lambda: model(x).squeeze(-1) ** 2 + bad)
    opt = Sven(model.parameters(), rank=2, kappa=1.0)
    with pytest.raises(ValueError, match="needs losses >= 0"):
        opt.step(lambda: model(x).squeeze(-1) - 10.0)
    for a, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(a, b)

"""soup_reference (SALSA): the weighted average of state dicts, in float64."""

from __future__ import annotations

import copy

import pytest
import torch

from torchsteer.objectives import soup_reference


def _models(seed):
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    out = []
    for i in range(3):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * (i + 1) * torch.randn_like(p))
        out.append(m)
    return out


def test_soup_is_the_weighted_average():
    models = _models(0)
    w = [0.5, 0.3, 0.2]
    soup = soup_reference(models, w)
    for k, t in soup.items():
        ts = [m.state_dict()[k] for m in models]
        if t.is_floating_point():
            want = sum(wi * x.double() for wi, x in zip(w, ts)).float()
            assert torch.equal(t, want), k
        else:
            assert torch.equal(t, ts[0]), k
    # uniform by default; a linear layer's soup output is the average of the outputs
    lin = [torch.nn.Linear(5, 2).double() for _ in range(4)]
    ref = copy.deepcopy(lin[0])
    ref.load_state_dict(soup_reference(lin))
    x = torch.randn(7, 5, dtype=torch.float64)
    want = sum(m(x) for m in lin) / 4
    torch.testing.assert_close(ref(x), want, rtol=1e-13, atol=1e-15)
    # the soup is a new tensor: changing it does not touch the models
    soup["0.weight"].zero_()
    assert models[0].state_dict()["0.weight"].abs().sum() > 0


def test_bad_input_raises():
    a, b, c = _models(1)
    with pytest.raises(ValueError, match="at least two"):
        soup_reference([a])
    with pytest.raises(ValueError, match="weights"):
        soup_reference([a, b], [0.7, 0.7])
    with pytest.raises(ValueError, match="weights"):
        soup_reference([a, b], [1.5, -0.5])
    with pytest.raises(ValueError, match="weights"):
        soup_reference([a, b], [1.0])
    with pytest.raises(ValueError, match="other keys"):
        soup_reference([a, torch.nn.Linear(4, 3)])
    with pytest.raises(ValueError, match=r"entry '0\.weight'"):
        soup_reference([a.state_dict(), {**b.state_dict(), "0.weight": torch.zeros(2, 2)}])
    c.state_dict()["1.num_batches_tracked"].fill_(5)
    with pytest.raises(ValueError, match="integer entry"):
        soup_reference([a, c])

"""The README's closure path forms the per-sample rows from one backward (GraphRowCapture)
and takes the same steps as the functional path; where it cannot, it falls back to the exact
batched backward with one warning that says why."""

import warnings

import pytest
import torch
from torch import nn

import torchsteer.optim.sven as sven_module
from torchsteer.optim import Sven

DT = torch.float64


def model_and_data(seed=0, batchnorm=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(2, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 1)]
    if batchnorm:
        layers.insert(1, nn.BatchNorm1d(8))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(16, 2, generator=g, dtype=DT)
    return nn.Sequential(*layers).to(DT), x, torch.sin(x.sum(1))


def per_sample(out, y):
    return (out.squeeze(-1) - y) ** 2


def test_closure_path_takes_one_backward_and_the_functional_steps(monkeypatch):
    m_closure, x, y = model_and_data()
    m_functional, _, _ = model_and_data()

    def no_batched_backward(*args, **kwargs):
        raise AssertionError("the closure path took the batched backward")

    monkeypatch.setattr(sven_module, "graph_jacobian", no_batched_backward)
    a = Sven(m_closure.parameters(), lr=0.3, rank=8)
    b = Sven(m_functional.parameters(), lr=0.3, rank=8, model=m_functional, loss_fn=per_sample)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        for _ in range(3):
            a.step(lambda: per_sample(m_closure(x), y))
            b.step(batch=(x, y))
    for p, q in zip(m_closure.parameters(), m_functional.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_batch_coupled_model_falls_back_with_one_warning_naming_the_layer():
    model, x, y = model_and_data(batchnorm=True)
    model.train()
    opt = Sven(model.parameters(), lr=0.3, rank=8)
    with pytest.warns(RuntimeWarning, match="BatchNorm1d in training mode") as record:
        opt.step(lambda: per_sample(model(x), y))
    assert record[0].filename == __file__  # points at the user's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(lambda: per_sample(model(x), y))  # warned once per optimizer
    assert int(opt.state[next(model.parameters())]["step"]) == 2

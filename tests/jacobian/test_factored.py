"""The per-sample Jacobian as layer factors (FactoredRows) against the per-sample autograd loop
in float64: its Gram matrix, its transposed product, its dense form, with a row scale; which
weights are factored; the dense rows themselves when none is worth it."""

import pytest
import torch
from torch import nn

from torchsteer.jacobian.captured import GraphRowCapture
from torchsteer.jacobian.factored import FactoredRows, worth_factoring

from .test_captured import loop_rows

DT = torch.float64


class Tied(nn.Module):
    """A 40 x 40 layer called twice (not factored) between factored ones."""

    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(3, 40), nn.Linear(40, 40), nn.Linear(40, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.mid(torch.tanh(self.mid(torch.tanh(self.inp(x)))))))


class Positions(nn.Module):
    """Embedding -> Linear 64 x 64 over T = 2 positions (factored) -> LayerNorm -> head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 64)
        self.lin = nn.Linear(64, 64)
        self.ln = nn.LayerNorm(64)
        self.head = nn.Linear(64, 1)

    def forward(self, idx):
        return self.head(self.ln(torch.tanh(self.lin(self.emb(idx))))).sum((1, 2))


def cases():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(3, 40), nn.GELU(), nn.Linear(40, 48), nn.GELU(), nn.Linear(48, 1)
    ).to(DT)
    return {  # (model, input, number of factored weights)
        "mlp": (mlp, torch.randn(9, 3, generator=g, dtype=DT), 1),
        "tied": (Tied().to(DT), torch.randn(9, 3, generator=g, dtype=DT), 0),
        "positions": (Positions().to(DT), torch.randint(0, 9, (9, 2), generator=g), 1),
    }


def captured(name):
    model, x, n_factored = cases()[name]
    params = list(model.parameters())
    cap = GraphRowCapture(params)

    def losses_fn():
        return (model(x).reshape(x.shape[0], -1).sum(1) - 0.3) ** 2

    with cap:
        losses = losses_fn()
    return cap, losses, loop_rows(model, losses_fn, params), n_factored


@pytest.mark.parametrize("name", ["mlp", "positions"])
def test_factored_products_equal_the_per_sample_loop(name):
    cap, losses, J, n_factored = captured(name)
    F = cap.factors(losses)
    assert isinstance(F, FactoredRows), cap.reason
    assert len(F.factors) == n_factored
    assert F.shape == tuple(J.shape) and F.rest.shape[1] < J.shape[1]
    g = torch.Generator().manual_seed(3)
    v = torch.randn(J.shape[0], generator=g, dtype=DT)
    s = torch.rand(J.shape[0], generator=g, dtype=DT) + 0.5
    torch.testing.assert_close(F.dense(), J, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(F.gram(), J @ J.T, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(F.rmatvec(v), J.T @ v, rtol=1e-11, atol=1e-12)
    sJ = s.unsqueeze(1) * J
    torch.testing.assert_close(F.scaled(s).gram(), sJ @ sJ.T, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(F.scaled(s).rmatvec(v), sJ.T @ v, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(F.scaled(s).dense(), sJ, rtol=1e-12, atol=1e-13)
    # a Gram matrix formed in float32 from float64 factors is the float64 one to float32 rounding
    torch.testing.assert_close(F.gram(torch.float32), (J @ J.T).float(), rtol=1e-5, atol=1e-5)


def test_a_weight_called_twice_is_not_factored_and_none_worth_it_gives_the_dense_rows():
    cap, losses, J, _ = captured("tied")
    out = cap.factors(losses)  # inp 3 x 40 and out 40 x 1: too small; mid: two calls
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, J, rtol=1e-10, atol=1e-12)
    assert torch.equal(out, cap.rows(losses))  # the dense rows themselves, bit for bit


def test_worth_factoring_weighs_positions_against_the_layer_area():
    assert worth_factoring(1, 32, 32) and not worth_factoring(1, 16, 16)  # area 1024 / 256
    assert worth_factoring(2, 64, 64) and not worth_factoring(3, 64, 64)  # 8 * 4 / 9 * 128
    assert not worth_factoring(2, 32, 32)  # 8 * 4 * 64 > 1024 (measured slower)
    assert not worth_factoring(128, 768, 768)  # GPT-2 small's layers at T = 128


def test_refusals_stay_refusals():
    model = nn.Sequential(nn.Linear(3, 40), nn.BatchNorm1d(40), nn.Linear(40, 40)).to(DT)
    cap = GraphRowCapture(list(model.parameters()))
    with cap:
        losses = model(torch.randn(5, 3, dtype=DT)).sum(1)
    assert cap.factors(losses) is None and "BatchNorm1d" in cap.reason


class ZeroInput(nn.Module):
    """A Linear with no inputs (weight 40 x 0) beside a factored 40 x 40 one."""

    def __init__(self):
        super().__init__()
        self.z, self.a = nn.Linear(0, 40), nn.Linear(3, 40)
        self.b, self.c = nn.Linear(40, 40), nn.Linear(40, 1)

    def forward(self, x):
        h = torch.tanh(self.a(x) + self.z(x[:, :0]))
        return self.c(torch.tanh(self.b(h)))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_a_zero_size_linear_beside_a_factored_one():
    # the positions T = numel(x) / (B in) were computed before the size test: 1 / 0
    torch.manual_seed(0)
    model = ZeroInput().to(DT)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(4), dtype=DT)
    params = list(model.parameters())
    cap = GraphRowCapture(params)

    def losses_fn():
        return (model(x).squeeze(-1) - 0.2) ** 2

    with cap:
        losses = losses_fn()
    F = cap.factors(losses)
    assert isinstance(F, FactoredRows) and len(F.factors) == 1
    torch.testing.assert_close(
        F.dense(), loop_rows(model, losses_fn, params), rtol=1e-12, atol=1e-13
    )

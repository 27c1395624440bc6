"""Per-sample rows from one backward (GraphRowCapture) against the per-sample autograd loop in
float64, and its refusals wherever a row could be wrong."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchsteer.jacobian.captured import GraphRowCapture

from .models import TinyTransformer

DT = torch.float64


def loop_rows(model, losses_fn, params):
    """Oracle: one autograd.grad per sample of the per-sample losses."""
    losses = losses_fn()
    rows = []
    for a in range(losses.shape[0]):
        g = torch.autograd.grad(losses[a], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [(torch.zeros_like(p) if t is None else t).reshape(-1) for t, p in zip(g, params)]
            )
        )
    return torch.stack(rows)


class SeqModel(nn.Module):
    """Embedding (with padding_idx) -> Conv1d -> RMSNorm -> LayerNorm -> Linear over (B, T)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.conv = nn.Conv1d(6, 5, 3, padding=1, stride=1, dilation=1)
        self.rms = nn.RMSNorm(5)
        self.ln = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, idx):
        h = self.emb(idx)  # (B, T, 6)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)  # (B, T, 5)
        h = self.ln(torch.tanh(self.rms(h)))
        return self.head(h).mean(1)


def cases():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    cnn = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 3),
    ).to(DT)
    return {
        "mlp": (mlp, torch.randn(7, 4, generator=g, dtype=DT)),
        "cnn": (cnn, torch.randn(7, 2, 5, 5, generator=g, dtype=DT)),
        "transformer": (TinyTransformer().to(DT), torch.randn(7, 4, generator=g, dtype=DT)),
        "embedding": (SeqModel().to(DT), torch.randint(0, 11, (7, 5), generator=g)),
    }


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer", "embedding"])
def test_rows_equal_the_per_sample_loop(name):
    model, x = cases()[name]
    y = torch.randint(0, 3, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    params = list(model.parameters())
    cap = GraphRowCapture(params)
    with cap:
        losses = F.cross_entropy(model(x), y, reduction="none")
    J = cap.rows(losses)
    assert J is not None, cap.reason
    ref = loop_rows(model, lambda: F.cross_entropy(model(x), y, reduction="none"), params)
    torch.testing.assert_close(J, ref, rtol=1e-10, atol=1e-12)


def test_frozen_and_unused_parameters_get_zero_columns_and_layers_used_twice_add():
    torch.manual_seed(1)
    lin, unused = nn.Linear(3, 3).to(DT), nn.Linear(3, 3).to(DT)
    lin.bias.requires_grad_(False)
    params = [lin.weight, lin.bias, unused.weight]
    x = torch.randn(4, 3, dtype=DT)
    cap = GraphRowCapture(params)
    with cap:
        losses = lin(torch.tanh(lin(x))).pow(2).sum(1)  # lin used twice
    J = cap.rows(losses)
    ref = loop_rows(lin, lambda: lin(torch.tanh(lin(x))).pow(2).sum(1), [lin.weight])
    torch.testing.assert_close(J[:, :9], ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(J[:, 9:], torch.zeros(4, 12, dtype=DT))


def refused(model_fn, params, match):
    cap = GraphRowCapture(params)
    with cap:
        losses = model_fn()
    assert cap.rows(losses) is None
    assert match in cap.reason, cap.reason


def test_refuses_whenever_a_row_could_be_wrong():
    torch.manual_seed(2)
    x = torch.randn(4, 3, dtype=DT)
    lin = nn.Linear(3, 2).to(DT)
    # the weight also used outside the layer (a penalty on it)
    refused(
        lambda: lin(x).sum(1) + (lin.weight**2).sum(),
        list(lin.parameters()),
        "used outside its layer",
    )
    # weight tying through F.linear
    emb = nn.Embedding(5, 3).to(DT)
    idx = torch.randint(0, 5, (4, 2))
    refused(
        lambda: F.linear(emb(idx), emb.weight).sum((1, 2)),
        list(emb.parameters()),
        "used outside its layer",
    )
    # a batch-coupled layer
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).to(DT).train()
    refused(lambda: bn(x).squeeze(1), list(bn.parameters()), "BatchNorm1d in training mode")
    # a layer with no per-sample rule
    gru = nn.GRU(3, 2, batch_first=True).to(DT)
    refused(lambda: gru(x.unsqueeze(1))[0].sum((1, 2)), list(gru.parameters()), "GRU")
    # the batch not leading (sequence-first input of 4 steps, batch 2)
    refused(
        lambda: lin(torch.randn(4, 2, 3, dtype=DT)).sum((0, 2)),
        list(lin.parameters()),
        "leading dimension",
    )
    # an in-place change of a layer output after the layer ran
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 1)).to(DT)
    refused(lambda: seq(x).squeeze(1), list(seq.parameters()), "in-place")

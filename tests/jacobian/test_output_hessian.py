"""The closed-form output Hessian of the mean softmax cross-entropy against autograd's double
backward (float64): H_out u, the Gauss-Newton products and dense matrix, RegularizedNewton's
steps; every other loss refused by name."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchsteer.jacobian import GGNOperator
from torchsteer.jacobian.output_hessian import SoftmaxCrossEntropyHessian
from torchsteer.optim import RegularizedNewton

DT = torch.float64


def autograd_hout(z, y, u):
    loss = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1))
    (g,) = torch.autograd.grad(loss, z, create_graph=True)
    (h,) = torch.autograd.grad(g, z, u)
    return h


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 6)])
def test_closed_form_equals_the_double_backward(shape):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(*shape, generator=g, dtype=DT, requires_grad=True)
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    loss = F.cross_entropy(z.reshape(-1, shape[-1]), y.reshape(-1))
    (g_out,) = torch.autograd.grad(loss, z, retain_graph=True)
    H = SoftmaxCrossEntropyHessian(z, g_out)
    for _ in range(3):
        u = torch.randn(*shape, generator=g, dtype=DT)
        torch.testing.assert_close(H(u), autograd_hout(z, y, u), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "loss_of",
    [
        lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1),
        lambda z, y: F.cross_entropy(z, y, reduction="sum"),
        lambda z, y: F.cross_entropy(z, torch.where(y == y[0], -100, y)),  # an ignored row
        lambda z, y: F.cross_entropy(z, y, weight=torch.linspace(0.5, 2.0, z.shape[1], dtype=DT)),
        lambda z, y: ((z - 1.0) ** 2).mean(),
    ],
    ids=["label smoothing", "sum", "ignore_index", "class weights", "mse"],
)
def test_other_losses_are_refused_by_name(loss_of):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 4, generator=g, dtype=DT, requires_grad=True)
    y = torch.randint(0, 4, (6,), generator=g)
    loss = loss_of(z, y)
    (g_out,) = torch.autograd.grad(loss, z)
    with pytest.raises(ValueError, match="Invalid output_hessian='cross_entropy'"):
        SoftmaxCrossEntropyHessian(z, g_out)


def classifier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4)).to(DT)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 3, generator=g, dtype=DT)
    return model, x, torch.randint(0, 4, (10,), generator=g)


def test_gauss_newton_products_and_dense_matrix_equal_autograds():
    model, x, y = classifier()
    params = list(model.parameters())
    out = model(x)
    loss = F.cross_entropy(out, y)
    auto = GGNOperator(loss, out, params, DT)
    closed = GGNOperator(loss, out, params, DT, output_hessian="cross_entropy")
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        v = torch.randn(auto.shape[0], generator=g, dtype=DT)
        torch.testing.assert_close(closed.matvec(v), auto.matvec(v), rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(closed.dense(), auto.dense(), rtol=1e-11, atol=1e-13)


def test_regularized_newton_takes_the_same_steps_and_refuses_bad_settings():
    runs = []
    for closed in (None, "cross_entropy"):
        model, x, y = classifier()
        opt = RegularizedNewton(
            model.parameters(), curvature="gauss_newton", gamma0=0.5, cg_maxiter=20,
            output_hessian=closed,
        )  # fmt: skip

        def closure(model=model, x=x, y=y):
            out = model(x)
            return F.cross_entropy(out, y), out

        for _ in range(4):
            opt.step(closure)
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-9, atol=1e-11)
    model, _, _ = classifier()
    with pytest.raises(ValueError, match="Invalid output_hessian: 'cross_entropy' needs"):
        RegularizedNewton(model.parameters(), curvature="hessian", output_hessian="cross_entropy")
    with pytest.raises(ValueError, match="Invalid output_hessian: 'mse'"):
        RegularizedNewton(model.parameters(), curvature="gauss_newton", output_hessian="mse")

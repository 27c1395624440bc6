"""The curvature operators of the graph path against dense float64 matrices from torch.func."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, hessian, jacrev, vmap

from torchsteer.jacobian import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    flatten,
    graph_hvp,
    unflatten,
)

DT = torch.float64


def problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    model = model.to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    return model, torch.randn(6, 3, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)


def oracles(model, x, y):
    """Hessian, GGN and empirical Fisher of the mean cross-entropy as dense (P, P) matrices."""
    names = [n for n, _ in model.named_parameters()]
    p0 = flatten(dict(model.named_parameters())).detach()

    def outputs(flat):
        return functional_call(
            model, dict(zip(names, unflatten(flat, list(model.parameters())))), (x,)
        )

    def loss(flat):
        return F.cross_entropy(outputs(flat), y)

    H = hessian(loss)(p0)
    J = jacrev(outputs)(p0).reshape(-1, p0.numel())  # (B * C, P)
    z = outputs(p0).detach()
    H_out = hessian(lambda zz: F.cross_entropy(zz.reshape(z.shape), y))(z.reshape(-1))
    G = J.T @ H_out @ J

    def sample_loss(flat, xi, yi):
        out = functional_call(
            model, dict(zip(names, unflatten(flat, list(model.parameters())))), (xi[None],)
        )
        return F.cross_entropy(out, yi[None])

    rows = vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(p0, x, y)
    return {"hessian": H, "ggn": G, "fisher": rows.T @ rows / x.shape[0]}


def operators(model, x, y):
    params = list(model.parameters())
    with torch.enable_grad():
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
        out = model(x)
        return {
            "hessian": HessianOperator(grads, params, DT),
            "ggn": GGNOperator(F.cross_entropy(out, y), out, params, DT),
            "fisher": EmpiricalFisherOperator(
                F.cross_entropy(model(x), y, reduction="none"), params, DT
            ),
        }


@pytest.mark.parametrize("name", ["hessian", "ggn", "fisher"])
def test_products_dense_and_columns_match_torch_func(name):
    model, x, y = problem()
    C = oracles(model, x, y)[name]
    op = operators(model, x, y)[name]
    P = C.shape[0]
    assert op.shape == (P, P)
    V = torch.randn(P, 3, generator=torch.Generator().manual_seed(5), dtype=DT)
    torch.testing.assert_close(op.matvec(V[:, 0]), C @ V[:, 0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op @ V, C @ V, rtol=1e-10, atol=1e-12)
    assert op.products == 4
    torch.testing.assert_close(op.dense(), C, rtol=1e-10, atol=1e-12)


def test_fisher_per_sample_rows_and_ggn_is_psd():
    model, x, y = problem(seed=3)
    ops = operators(model, x, y)
    G = ops["fisher"].per_sample()
    torch.testing.assert_close(G.T @ G / 6, oracles(model, x, y)["fisher"], rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(ops["ggn"].dense()).min() > -1e-12  # cross-entropy is convex


def test_linear_loss_has_zero_hessian_and_ggn_needs_the_outputs():
    w = torch.randn(4, dtype=DT, requires_grad=True)
    with torch.enable_grad():
        grads = torch.autograd.grad((w * 3.0).sum(), [w], create_graph=True)
    op = HessianOperator(grads, [w], DT)
    assert torch.equal(op.matvec(torch.ones(4, dtype=DT)), torch.zeros(4, dtype=DT))
    assert torch.equal(op.dense(), torch.zeros(4, 4, dtype=DT))
    out = w * 2.0
    with pytest.raises(ValueError, match="does not depend on the returned outputs"):
        GGNOperator((w**2).sum(), out, [w], DT)


def test_graph_hvp_is_the_hessian_product_per_parameter():
    model, x, y = problem(seed=4)
    params = list(model.parameters())
    H = oracles(model, x, y)["hessian"]
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(2), dtype=DT)
    hv = graph_hvp(F.cross_entropy(model(x), y), params, unflatten(v, params))
    assert [t.shape for t in hv] == [p.shape for p in params]
    torch.testing.assert_close(flatten(hv), H @ v, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="Invalid loss"):
        graph_hvp(model(x).sum(1), params, unflatten(v, params))

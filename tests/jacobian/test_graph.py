"""The graph path (from a closure's live autograd graph) equals the functional path."""

import pytest
import torch

from torchsteer.jacobian import (
    JacobianOperator,
    flatten,
    graph_hvp,
    graph_jacobian,
    graph_jvp,
    graph_vjp,
    model_fn,
    param_dict,
    unflatten,
)

from .models import NAMES, ce, make
from .reference import dense_hessian, dense_jacobian


@pytest.mark.parametrize("name", NAMES)
def test_graph_products_match_dense(name):
    model, x, y = make(name)
    params = list(model.parameters())
    J = dense_jacobian(model, lambda m: ce(m(x), y))
    losses = ce(model(x), y)  # what a closure returns: (B,) with its graph
    g = torch.Generator().manual_seed(5)
    v = torch.randn(J.shape[1], generator=g, dtype=torch.float64)
    jv = graph_jvp(losses, params, unflatten(v, params))
    torch.testing.assert_close(jv, J @ v, rtol=1e-10, atol=1e-12)
    u = torch.randn(losses.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        flatten(graph_vjp(losses, params, u)), J.T @ u, rtol=1e-10, atol=1e-12
    )
    for chunk in (None, 2):
        torch.testing.assert_close(
            graph_jacobian(losses, params, chunk_size=chunk), J, rtol=1e-10, atol=1e-12
        )


@pytest.mark.parametrize("name", NAMES)
def test_graph_hvp_matches_dense(name):
    model, x, y = make(name)
    params = list(model.parameters())
    H = dense_hessian(model, lambda m: ce(m(x), y).mean())
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    hv = graph_hvp(ce(model(x), y).mean(), params, unflatten(v, params))
    torch.testing.assert_close(flatten(hv), H @ v, rtol=1e-9, atol=1e-11)


def test_batched_graph_products_equal_columnwise():
    model, x, y = make("mlp")
    params = list(model.parameters())
    losses = ce(model(x), y)
    J = dense_jacobian(model, lambda m: ce(m(x), y))
    V = torch.randn(J.shape[1], 3, dtype=torch.float64)
    op = JacobianOperator.from_graph(losses, params)
    torch.testing.assert_close(op.matmat(V), J @ V, rtol=1e-10, atol=1e-12)
    U = torch.randn(J.shape[0], 3, dtype=torch.float64)
    torch.testing.assert_close(op.rmatmat(U), J.T @ U, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_operator_from_function_and_scipy(name):
    model, x, _ = make(name)
    p = param_dict(model)
    J = dense_jacobian(model, lambda m: m(x))
    op = JacobianOperator.from_function(model_fn(model, x), p)
    assert op.shape == tuple(J.shape)
    V = torch.randn(J.shape[1], 4, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), J @ V, rtol=1e-10, atol=1e-12)
    U = torch.randn(J.shape[0], 2, dtype=torch.float64)
    torch.testing.assert_close(op.rmatmat(U), J.T @ U, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.dense(), J, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.T.matmat(U), J.T @ U, rtol=1e-10, atol=1e-12)
    sp = op.to_scipy()
    v = V[:, 0].numpy()
    torch.testing.assert_close(torch.as_tensor(sp.matvec(v)), J @ V[:, 0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        torch.as_tensor(sp.rmatvec(U[:, 0].numpy())), J.T @ U[:, 0], rtol=1e-10, atol=1e-12
    )


def test_operator_rejects_wrong_shapes():
    op = JacobianOperator.from_matrix(torch.ones(3, 4))
    with pytest.raises(ValueError, match="Invalid V"):
        op.matmat(torch.ones(3, 1))
    with pytest.raises(ValueError, match="Invalid U"):
        op.rmatmat(torch.ones(4, 1))

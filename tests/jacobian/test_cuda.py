"""The core on CUDA gives the CPU numbers (float64). Skipped without a GPU."""

import pytest
import torch

from torchsteer.jacobian import (
    JacobianOperator,
    flatten,
    graph_jacobian,
    hvp,
    jvp,
    model_fn,
    numel,
    param_dict,
    per_sample_jacobian,
)
from torchsteer.linalg import conjugate_gradient, randomized_svd

from .models import NAMES, ce, make

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("name", NAMES)
def test_products_on_cuda_equal_cpu(name):
    model, x, y = make(name)
    v = torch.randn(numel(param_dict(model)), dtype=torch.float64)
    ref_jv = jvp(model_fn(model, x), param_dict(model), v)[1]
    ref_J = per_sample_jacobian(model, ce, x, y)
    ref_hv = flatten(hvp(lambda q: ce(model_fn(model, x)(q), y).mean(), param_dict(model), v))
    model, x, y, v = model.cuda(), x.cuda(), y.cuda(), v.cuda()
    p = param_dict(model)
    torch.testing.assert_close(jvp(model_fn(model, x), p, v)[1].cpu(), ref_jv)
    torch.testing.assert_close(per_sample_jacobian(model, ce, x, y).cpu(), ref_J)
    torch.testing.assert_close(
        graph_jacobian(ce(model(x), y), list(model.parameters())).cpu(), ref_J
    )
    hv = flatten(hvp(lambda q: ce(model_fn(model, x)(q), y).mean(), p, v))
    torch.testing.assert_close(hv.cpu(), ref_hv)


def test_linalg_on_cuda():
    g = torch.Generator().manual_seed(0)
    Q1 = torch.linalg.qr(torch.randn(40, 30, generator=g, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64)).Q
    s = torch.cat([torch.linspace(10, 5, 5), 1e-3 * torch.ones(25)]).double()
    A = Q1 @ torch.diag(s) @ Q2.T
    U, S, V = randomized_svd(JacobianOperator.from_matrix(A.cuda()), 5, power_iters=2)
    torch.testing.assert_close(S.cpu(), s[:5], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        (U * S @ V.T).cpu(), Q1[:, :5] * s[:5] @ Q2[:, :5].T, rtol=0, atol=1e-5
    )
    M = A.T @ A + torch.eye(30, dtype=torch.float64)
    b = torch.randn(30, generator=g, dtype=torch.float64)
    res = conjugate_gradient(lambda z: M.cuda() @ z, b.cuda(), tol=1e-12)
    torch.testing.assert_close(res.x.cpu(), torch.linalg.solve(M, b), rtol=1e-8, atol=1e-10)

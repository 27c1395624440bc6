"""The functional path against dense float64 Jacobians/Hessians from torch.autograd.functional."""

import pytest
import torch

from torchsteer.jacobian import (
    flatten,
    ggn_vp,
    hvp,
    jacobian,
    jvp,
    model_fn,
    numel,
    param_dict,
    per_sample_jacobian,
    vjp,
)

from .models import NAMES, ce, make
from .reference import dense_hessian, dense_jacobian


@pytest.mark.parametrize("name", NAMES)
def test_jvp_and_vjp_match_dense_jacobian(name):
    model, x, _ = make(name)
    p = param_dict(model)
    J = dense_jacobian(model, lambda m: m(x))
    g = torch.Generator().manual_seed(1)
    v = torch.randn(numel(p), generator=g, dtype=torch.float64)
    out, jv = jvp(model_fn(model, x), p, v)
    torch.testing.assert_close(out, model(x))
    torch.testing.assert_close(jv.reshape(-1), J @ v, rtol=1e-10, atol=1e-12)
    u = torch.randn(out.shape, generator=g, dtype=torch.float64)
    jtu = flatten(vjp(model_fn(model, x), p, u))
    torch.testing.assert_close(jtu, J.T @ u.reshape(-1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_jacobian_chunked_equals_dense(name):
    model, x, _ = make(name)
    p = param_dict(model)
    J = dense_jacobian(model, lambda m: m(x))
    torch.testing.assert_close(jacobian(model_fn(model, x), p), J, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        jacobian(model_fn(model, x), p, chunk_size=4), J, rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("name", NAMES)
def test_per_sample_jacobian_matches_dense(name):
    model, x, y = make(name)
    J = dense_jacobian(model, lambda m: ce(m(x), y))
    for chunk in (None, 2):
        Jp = per_sample_jacobian(model, ce, x, y, chunk_size=chunk)
        torch.testing.assert_close(Jp, J, rtol=1e-10, atol=1e-12)
    Jv = per_sample_jacobian(model, ce, x, y, method="vmap")
    torch.testing.assert_close(Jv, J, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seq", [False, True])
def test_linear_outer_product_path_matches_dense(seq):
    """The nn.Linear fast path, on flat inputs and on sequences (B, T, in), frozen layer too."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 5),
        torch.nn.GELU(),
        torch.nn.Linear(5, 4, bias=False),
        torch.nn.Tanh(),
        torch.nn.Linear(4, 2),
    ).double()
    model[2].weight.requires_grad_(False)
    x = torch.randn(6, 7, 3, dtype=torch.float64) if seq else torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64)

    def sq(out, t):
        out = out.mean(1) if seq else out
        return ((out - t) ** 2).sum(1)

    J = dense_jacobian(model, lambda m: sq(m(x), y))
    Jl = per_sample_jacobian(model, sq, x, y, method="linear")
    torch.testing.assert_close(Jl, J, rtol=1e-10, atol=1e-12)
    buf = torch.full_like(J, float("nan"))
    assert per_sample_jacobian(model, sq, x, y, out=buf) is buf
    torch.testing.assert_close(buf, J, rtol=1e-10, atol=1e-12)
    from torchsteer.jacobian.per_sample import linear_per_sample_jacobian

    trainable = {k: v for k, v in model.named_parameters() if v.requires_grad}
    values, Jr = linear_per_sample_jacobian(model, sq, x, y, trainable, return_values=True)
    torch.testing.assert_close(Jr, J, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(values, sq(model(x), y), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="Invalid method"):
        per_sample_jacobian(make("cnn")[0], ce, *make("cnn")[1:], method="linear")


@pytest.mark.parametrize("name", NAMES)
def test_hvp_matches_dense_hessian(name):
    model, x, y = make(name)
    p = param_dict(model)
    H = dense_hessian(model, lambda m: ce(m(x), y).mean())
    v = torch.randn(numel(p), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    hv = hvp(lambda q: ce(model_fn(model, x)(q), y).mean(), p, v)
    torch.testing.assert_close(flatten(hv), H @ v, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", NAMES)
def test_ggn_vp_matches_dense_gauss_newton(name):
    model, x, y = make(name)
    p = param_dict(model)
    z = model(x).detach()
    J = dense_jacobian(model, lambda m: m(x))
    H_out = torch.autograd.functional.hessian(
        lambda zz: ce(zz.reshape(z.shape), y).mean(), z.reshape(-1)
    )
    G = J.T @ H_out @ J
    v = torch.randn(numel(p), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gv = ggn_vp(model_fn(model, x), lambda out: ce(out, y).mean(), p, v)
    torch.testing.assert_close(flatten(gv), G @ v, rtol=1e-9, atol=1e-11)
    # positive semi-definite: v^T G v >= 0
    assert float(v @ flatten(gv)) >= -1e-12


@pytest.mark.parametrize("name", NAMES)
def test_jvp_matches_central_finite_difference(name):
    model, x, _ = make(name)
    p = param_dict(model)
    theta = flatten(p).detach()
    v = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    v = v / v.norm()
    f = model_fn(model, x)
    from torchsteer.jacobian import unflatten

    h = 1e-5
    fd = (f(unflatten(theta + h * v, p)) - f(unflatten(theta - h * v, p))) / (2 * h)
    _, jv = jvp(f, p, v)
    torch.testing.assert_close(jv, fd, rtol=1e-7, atol=1e-8)


def test_linear_model_jvp_is_exact():
    # f = W x + b: J v = dW x + db exactly
    lin = torch.nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    dW, db = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    _, jv = jvp(model_fn(lin, x), param_dict(lin), {"weight": dW, "bias": db})
    torch.testing.assert_close(jv, x @ dW.T + db, rtol=0, atol=1e-15)


def test_bad_tangent_raises():
    model, x, _ = make("mlp")
    p = param_dict(model)
    with pytest.raises(ValueError, match="Invalid vector"):
        jvp(model_fn(model, x), p, torch.zeros(numel(p) + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="Invalid tangent"):
        jvp(model_fn(model, x), p, {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="Invalid cotangent"):
        vjp(model_fn(model, x), p, torch.zeros(3, dtype=torch.float64))

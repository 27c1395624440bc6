"""The one per-sample Jacobian dispatcher: each path (outer products, expanded weights, vmap)
against the dense float64 Jacobian, with the per-sample losses it returns and its buffer."""

import pytest
import torch
from torch import nn

from torchsteer.jacobian import per_sample_jacobian

from .models import ce, make
from .reference import dense_jacobian

# which explicit methods apply to which model (auto takes the first that applies)
APPLIES = {
    "mlp": ("linear", "expanded", "vmap"),
    "cnn": ("expanded", "vmap"),
    "transformer": ("expanded", "vmap"),  # Linear and LayerNorm; attention has no weights
}


@pytest.mark.parametrize("name", list(APPLIES))
def test_every_applicable_method_gives_the_dense_rows_and_the_losses(name):
    model, x, y = make(name)
    J = dense_jacobian(model, lambda m: ce(m(x), y))
    with torch.no_grad():
        losses = ce(model(x), y)
    for method in ("auto", *APPLIES[name]):
        values, Jm = per_sample_jacobian(model, ce, x, y, method=method, return_values=True)
        torch.testing.assert_close(Jm, J, rtol=1e-10, atol=1e-12, msg=method)
        torch.testing.assert_close(values, losses, rtol=1e-12, atol=1e-14, msg=method)
        assert not values.requires_grad
        buf = torch.full_like(J, float("nan"))
        assert per_sample_jacobian(model, ce, x, y, method=method, out=buf) is buf
        torch.testing.assert_close(buf, J, rtol=1e-10, atol=1e-12, msg=method)


def test_embedding_model_takes_expanded_weights_and_matches_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.LayerNorm(6), nn.Linear(6, 3))
    model = model.double()
    x = torch.randint(0, 7, (5, 2))
    y = torch.randint(0, 3, (5,))
    J = dense_jacobian(model, lambda m: ce(m(x), y))
    for method in ("auto", "expanded", "vmap"):
        torch.testing.assert_close(
            per_sample_jacobian(model, ce, x, y, method=method), J, rtol=1e-10, atol=1e-12
        )


def test_explicit_methods_that_do_not_apply_raise_and_bad_buffers_are_named():
    model, x, y = make("cnn")
    with pytest.raises(ValueError, match=r"'linear' needs every parameter in an nn\.Linear"):
        per_sample_jacobian(model, ce, x, y, method="linear")
    bn, xb, yb = make("bn")  # BatchNorm: not a module expanded weights support
    with pytest.raises(ValueError, match="'expanded' needs every trainable parameter"):
        per_sample_jacobian(bn, ce, xb, yb, method="expanded")
    with pytest.raises(ValueError, match="Invalid method"):
        per_sample_jacobian(model, ce, x, y, method="fast")
    P = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="Invalid out"):
        per_sample_jacobian(model, ce, x, y, out=torch.zeros(5, P + 1, dtype=torch.float64))

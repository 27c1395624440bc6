"""Bad arguments of the public derivative products, found by the attack rerun
(benchmarks/attack.py): raw torch errors ("element 0 of tensors does not require grad",
"Mismatch in shape: grad_output[0]", torch.func's "Expected f(*args) to return a scalar",
a reshape error for an empty batch) or a silent truncation (``flatten_like``). Each now
raises ValueError naming the argument; valid calls are checked against dense oracles.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torchsteer.jacobian import (
    flatten_like,
    graph_jacobian,
    graph_jvp,
    hvp,
    per_sample_jacobian,
)

F64 = torch.float64


def _linear():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    x = torch.randn(5, 4, dtype=F64)
    return model, x


def test_graph_jvp_matches_the_dense_jacobian_and_names_bad_tangents():
    model, x = _linear()
    out = model(x)
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]
    J = graph_jacobian(out, params)
    want = J @ torch.cat([t.reshape(-1) for t in v])
    torch.testing.assert_close(graph_jvp(out, params, v).reshape(-1), want)
    with pytest.raises(ValueError, match=r"Invalid v\[0\]: shape \(2,\)"):
        graph_jvp(out, params, [torch.ones(2), v[1]])
    with pytest.raises(ValueError, match="1 tangents for 2 parameters"):
        graph_jvp(out, params, v[:1])


def test_graph_products_name_an_output_without_a_graph():
    model, x = _linear()
    out = model(x).detach()
    with pytest.raises(ValueError, match="Invalid output: it does not require grad"):
        graph_jacobian(out, list(model.parameters()))


def test_hvp_names_a_non_scalar_function():
    params = {"w": torch.randn(3, dtype=F64)}
    v = {"w": torch.ones(3, dtype=F64)}
    got = hvp(lambda p: (p["w"] ** 3).sum(), params, v)["w"]
    torch.testing.assert_close(got, 6 * params["w"])  # H = diag(6 w)
    with pytest.raises(ValueError, match="Invalid f: hvp needs a scalar function"):
        hvp(lambda p: p["w"] ** 3, params, v)


def test_flatten_like_refuses_counts_and_sizes_that_do_not_match():
    like = [torch.zeros(2, 2), torch.zeros(3)]
    torch.testing.assert_close(
        flatten_like([None, torch.ones(3)], like, F64),
        torch.tensor([0, 0, 0, 0, 1, 1, 1], dtype=F64),
    )
    with pytest.raises(ValueError, match="Invalid tensors: 1 for 2 parameters"):
        flatten_like([torch.ones(4)], like, F64)
    with pytest.raises(ValueError, match=r"Invalid tensors\[1\]: 2 entries"):
        flatten_like([torch.ones(4), torch.ones(2)], like, F64)


def test_per_sample_jacobian_names_an_empty_batch():
    model, x = _linear()
    y = torch.randint(0, 3, (5,))

    def ce(out, t):
        return F.cross_entropy(out, t, reduction="none")

    J = per_sample_jacobian(model, ce, x, y)
    assert J.shape == (5, 15)
    with pytest.raises(ValueError, match="Invalid inputs: an empty batch"):
        per_sample_jacobian(model, ce, x[:0], y[:0])

"""f_divergence reads the host a fixed number of times per call, whatever the chunk count
(the row checks are gathered on the device and read once), and a user's
``torch.compile`` of the call gives the eager value and gradient.

Oracles: the eager call (value and gradient, float32 rounding); the count with one chunk
(before, each chunk read its row checks: 6 reads per chunk).
"""

from __future__ import annotations

import pytest
import torch

from tests._sync import SyncCounter
from torchsteer.divergence import f_divergence, fused_linear_divergence


def _logits(n=24, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 3, torch.randn(n, v, generator=g) * 3


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "js"])
def test_host_reads_do_not_grow_with_the_chunks(kind):
    zs, zt = _logits()
    counts = []
    for chunk in (24, 5, 1):
        s = zs.clone().requires_grad_()
        with SyncCounter() as c:
            f_divergence(s, zt, kind, chunk_size=chunk).backward()
        counts.append(c.total)
    assert counts[0] == counts[1] == counts[2] <= 2, counts


def test_fused_linear_host_reads_do_not_grow_with_the_chunks():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(24, 8, generator=g), torch.randn(30, 8, generator=g)
    counts = []
    for chunk in (24, 1):
        hs = h.clone().requires_grad_()
        with SyncCounter() as c:
            fused_linear_divergence(hs, w, h, w * 0.5, chunk_size=chunk).backward()
        counts.append(c.total)
    assert counts[0] == counts[1], counts


def test_a_bad_row_in_a_late_chunk_is_still_named():
    zs, zt = _logits()
    zt[17, 3] = float("inf")
    zs[20, 0] = float("nan")
    with pytest.raises(ValueError, match="teacher_logits: row 17 holds \\+inf"):
        f_divergence(zs, zt, chunk_size=4)


@pytest.mark.parametrize("kind", ["kl", "generalized_js"])
def test_torch_compile_of_the_call_gives_the_eager_value_and_gradient(kind):
    torch._dynamo.reset()
    zs, zt = _logits(n=16, v=40)
    args = {"beta": 0.3} if kind == "generalized_js" else {}

    def loss(s, t):
        return f_divergence(s, t, kind, chunk_size=4, **args)

    compiled = torch.compile(loss)
    a, b = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    ref, out = loss(a, zt), compiled(b, zt)
    ref.backward()
    out.backward()
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-7)
    assert torch.allclose(b.grad, a.grad, rtol=1e-5, atol=1e-8)
    assert b.grad.abs().max() > 1e-3  # a gradient that is there

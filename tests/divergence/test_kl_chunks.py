"""The fewer-pass KL chunk (forward and reverse) against the generic chunk of the generators.

The oracle is the generic chunk (``gen.terms`` on log-softmaxes, itself checked against dense
float64 definitions and scipy in test_f_divergence.py), reached through a subclass of the
generator, which the dispatch does not send to the fast chunk. Values, gradients and the
pattern of infinite and NaN entries must agree; -inf logits on either side, both sides,
temperatures and float32 are covered.
"""

import importlib
import math

import pytest
import torch

from torchsteer.divergence import _kl_chunks, f_divergence
from torchsteer.divergence.f_divergence import _chunk
from torchsteer.divergence.generators import KL, ReverseKL


class _GenericKL(KL):  # same math, generic path
    pass


class _GenericReverseKL(ReverseKL):
    pass


GENS = {False: (KL(), _GenericKL()), True: (ReverseKL(), _GenericReverseKL())}


def _case(seed, dtype, pattern):
    g = torch.Generator().manual_seed(seed)
    s = 4.0 * torch.randn(6, 40, generator=g, dtype=torch.float64)
    t = 4.0 * torch.randn(6, 40, generator=g, dtype=torch.float64)
    inf = -math.inf
    if pattern in ("both", "mixed"):
        s[:, -5:], t[:, -5:] = inf, inf  # a padded vocabulary
    if pattern in ("teacher", "mixed"):
        t[1, 3], t[4, 7:9] = inf, inf  # p = 0 where q > 0
    if pattern in ("student", "mixed"):
        s[2, 5], s[5, 0] = inf, inf  # q = 0 where p > 0
    return s.to(dtype), t.to(dtype)


def _run(gen, s, t, temperature):
    tops = torch.empty(s.shape[0], 2, dtype=s.dtype)
    g = torch.empty_like(s)
    values = _chunk(s.clone(), t.clone(), gen, temperature, tops, g, scale=0.37)
    return values, g, tops


def _same(a, b, rtol):
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.equal(torch.isposinf(a), torch.isposinf(b))
    assert torch.equal(torch.isneginf(a), torch.isneginf(b))
    ok = torch.isfinite(a)
    scale = b[ok].abs().max().clamp(min=1e-30)
    assert float((a[ok] - b[ok]).abs().max() / scale) <= rtol


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("pattern", ["finite", "both", "teacher", "student", "mixed"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_fast_chunk_equals_generic_chunk(reverse, pattern, temperature, dtype, rtol):
    fast, generic = GENS[reverse]
    s, t = _case(3, dtype, pattern)
    v1, g1, tops1 = _run(fast, s, t, temperature)
    v0, g0, tops0 = _run(generic, s, t, temperature)
    assert torch.equal(tops1, tops0)
    _same(v1, v0, rtol)
    _same(g1, g0, rtol)


def test_dispatch_takes_the_fast_chunk(monkeypatch):
    calls = []
    real = _kl_chunks.kl_chunk

    def spy(*a, **k):
        calls.append(a[2])
        return real(*a, **k)

    module = importlib.import_module("torchsteer.divergence.f_divergence")
    monkeypatch.setattr(module, "kl_chunk", spy)
    zs = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(3, 9, dtype=torch.float64)
    for kind in ("kl", "reverse_kl", "js"):
        f_divergence(zs, zt, kind).backward()
    assert calls == [False, True]  # js stays on the generic chunk


def test_minus_inf_student_logit_has_gradient_zero():
    s, t = _case(5, torch.float64, "student")
    s.requires_grad_(True)
    f_divergence(s, t, "kl", reduction="sum").backward()
    assert torch.equal(s.grad[2, 5], torch.zeros((), dtype=s.dtype))
    assert torch.equal(s.grad[5, 0], torch.zeros((), dtype=s.dtype))
    # the other entries of those rows keep q - p
    q, p = torch.softmax(s.detach(), -1), torch.softmax(t, -1)
    keep = torch.isfinite(s.detach())
    assert torch.allclose(s.grad[keep], (q - p)[keep], rtol=1e-12, atol=1e-15)

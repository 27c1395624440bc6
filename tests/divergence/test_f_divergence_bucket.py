"""f_divergence(top_k=, tail="bucket"): the teacher's top-k support S plus one entry for the
mass off S, on both sides. Oracles: the float64 formula written here (p~ = [p_S, 1 - sum_S p],
q~ likewise, D_f = sum q~ f(p~ / q~)), sparse_kd with the bucket, torch.autograd.gradcheck.
"""

from __future__ import annotations

import math

import pytest
import torch

from torchsteer.divergence import f_divergence, sparse_kd


def _logits(n=6, v=12, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=dtype) * 2 for _ in range(2))


def _bucket_reference(zs, zt, k, kind):
    p, q = torch.softmax(zt.double(), -1), torch.softmax(zs.double(), -1)
    idx = zt.double().topk(k, -1).indices
    p_s, q_s = p.gather(-1, idx), q.gather(-1, idx)
    pt = torch.cat([p_s, 1 - p_s.sum(-1, keepdim=True)], -1)
    qt = torch.cat([q_s, 1 - q_s.sum(-1, keepdim=True)], -1)
    if kind == "kl":
        per_row = (pt * (pt.log() - qt.log())).sum(-1)
    elif kind == "reverse_kl":
        per_row = (qt * (qt.log() - pt.log())).sum(-1)
    else:  # js
        m = (pt + qt) / 2
        per_row = 0.5 * (pt * (pt / m).log()).sum(-1) + 0.5 * (qt * (qt / m).log()).sum(-1)
    return per_row.sum() / zs.shape[0]


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "js"])
@pytest.mark.parametrize("k", [1, 4, 11])
def test_value_equals_the_float64_formula(kind, k):
    zs, zt = _logits()
    got = f_divergence(zs, zt, kind, top_k=k, tail="bucket")
    assert got.item() == pytest.approx(_bucket_reference(zs, zt, k, kind).item(), rel=1e-10)
    renormalized = f_divergence(zs, zt, kind, top_k=k)
    assert abs(got.item() - renormalized.item()) > 1e-6  # the bucket is another divergence


def test_value_and_gradient_equal_sparse_kd_with_a_mask():
    zs, zt = _logits(n=8, v=20, seed=1, dtype=torch.float32)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    zt[1, 3] = math.nan  # a masked row is never read
    a, b = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    got = f_divergence(a, zt, "js", top_k=5, tail="bucket", mask=mask, reduction="mean")
    lp = torch.log_softmax(torch.where(mask[:, None], zt, 0.0), -1)  # any valid masked row
    idx = lp.topk(5, -1).indices
    ref = sparse_kd(b, idx, lp.gather(-1, idx), "js", tail="bucket", mask=mask, reduction="mean")
    got.backward()
    ref.backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(a.grad, b.grad)
    assert a.grad[~mask].abs().max() == 0 and a.grad[mask].abs().max() > 1e-4
    off_s = torch.ones_like(zs, dtype=torch.bool).scatter(-1, idx, False) & mask[:, None]
    assert a.grad[off_s].abs().max() > 1e-6  # the bucket passes gradient off S too


def test_gradcheck_float64():
    zs, zt = _logits(n=3, v=7, seed=2)
    zs.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: f_divergence(z, zt, "kl", top_k=3, tail="bucket"), (zs,)
    )


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"tail": "bucket"}, "needs top_k"),
        ({"tail": "drop", "top_k": 2}, "Invalid tail"),
        ({"tail": "bucket", "top_k": 2, "temperature": 2.0}, "T = 1 only"),
        ({"tail": "bucket", "top_k": 0}, "Invalid top_k"),
    ],
)
def test_bad_arguments_are_named(kw, match):
    zs, zt = _logits()
    with pytest.raises(ValueError, match=match):
        f_divergence(zs, zt, **kw)


def test_a_nan_teacher_row_is_named():
    zs, zt = _logits()
    zt[2, 0] = math.nan
    with pytest.raises(ValueError, match="teacher_logits: row 2 holds NaN"):
        f_divergence(zs, zt, top_k=3, tail="bucket")

"""f_divergence(..., top_k=k): the teacher's top-k support, the tail renormalized away.

Oracles: the dense float64 definitions of test_f_divergence on the k entries chosen by a
numpy argsort of the teacher logits; finite differences (gradcheck) in float64; sparse_kd
with the same support; the whole-vocabulary f_divergence at k = V.
"""

import numpy as np
import pytest
import torch

from torchsteer.divergence import f_divergence, sparse_kd

from .test_f_divergence import CASES, dense, logits


def support(zt, k):
    """Per row the indices of the k largest teacher logits (numpy, independent of torch)."""
    order = np.argsort(-zt.detach().numpy(), axis=-1, kind="stable")
    return torch.from_numpy(order[..., :k].copy())


@pytest.mark.parametrize("kind,args", CASES)
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_value_and_gradient_match_the_dense_definition_on_the_support(kind, args, T):
    k = 4
    zs = logits(seed=1).requires_grad_(True)
    zt = logits(seed=2)
    got = f_divergence(zs, zt, kind, temperature=T, top_k=k, reduction="none", **args)
    (g_got,) = torch.autograd.grad(got.sum(), zs)
    idx = support(zt, k)
    zs_d = zs.detach().clone().requires_grad_(True)
    want = dense(zs_d.gather(-1, idx), zt.gather(-1, idx), kind, args, T)
    (g_want,) = torch.autograd.grad(want.sum(), zs_d)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    off = torch.ones_like(zs, dtype=torch.bool).scatter(-1, idx, False)
    assert bool((g_got[off] == 0).all())  # tokens off the support: gradient exactly 0


@pytest.mark.parametrize("kind,args", CASES)
def test_gradcheck_finite_differences(kind, args):
    zs = logits(n=3, v=7, seed=3).requires_grad_(True)
    zt = logits(n=3, v=7, seed=4)
    mask = torch.tensor([True, False, True])

    def fn(x):
        return f_divergence(x, zt, kind, top_k=3, temperature=1.7, mask=mask, **args)

    assert torch.autograd.gradcheck(fn, (zs,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kind,args", CASES)
@pytest.mark.parametrize("chunk", [1, 2, 7])
def test_chunked_equals_unchunked(kind, args, chunk):
    zs = logits(n=7, v=13, seed=5).requires_grad_(True)
    zt = logits(n=7, v=13, seed=6)
    out = {}
    for c in (None, chunk):
        v = f_divergence(zs, zt, kind, top_k=5, chunk_size=c, reduction="sum", **args)
        out[c] = (v, torch.autograd.grad(v, zs)[0])
    torch.testing.assert_close(out[chunk][0], out[None][0], rtol=1e-13, atol=0)
    torch.testing.assert_close(out[chunk][1], out[None][1], rtol=1e-13, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_mask_excludes_rows_exactly(reduction):
    zs = logits(n=6, v=9, seed=7).requires_grad_(True)
    zt = logits(n=6, v=9, seed=8)
    mask = torch.tensor([True, False, True, True, False, True])
    zt_bad = zt.clone()
    zt_bad[~mask] = float("nan")  # masked rows are not checked and contribute nothing
    got = f_divergence(zs, zt_bad, "js", top_k=3, mask=mask, reduction="none")
    (g,) = torch.autograd.grad(got.sum(), zs)
    assert bool((got[~mask] == 0).all()) and bool((g[~mask] == 0).all())
    full = f_divergence(zs, zt, "js", top_k=3, reduction="none")
    torch.testing.assert_close(got[mask], full[mask], rtol=0, atol=0)
    red = f_divergence(zs, zt_bad, "js", top_k=3, mask=mask, reduction=reduction)
    sel = full[mask].sum()
    want = {"mean": sel / 4, "sum": sel, "batchmean": sel / 6, "none": got}[reduction]
    torch.testing.assert_close(red, want, rtol=1e-13, atol=0)


@pytest.mark.parametrize(
    "kind,args",
    [("kl", {}), ("reverse_kl", {}), ("js", {}), ("generalized_js", {"beta": 0.9}), ("tv", {})],
)
@pytest.mark.parametrize("T", [1.0, 0.5, 3.0])
def test_equals_sparse_kd_with_the_teacher_top_k(kind, args, T):
    zs = logits(n=5, v=20, seed=9).requires_grad_(True)
    zt = logits(n=5, v=20, seed=10)
    idx = support(zt, 6)
    lp = torch.log_softmax(zt, -1).gather(-1, idx)
    got = f_divergence(zs, zt, kind, top_k=6, temperature=T, reduction="mean", **args)
    want = sparse_kd(zs, idx, lp, kind, temperature=T, reduction="mean", **args)
    (g_got,) = torch.autograd.grad(got, zs)
    (g_want,) = torch.autograd.grad(want, zs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-14)


def test_top_k_equal_to_the_vocabulary_is_the_full_divergence():
    zs, zt = logits(v=11, seed=11), logits(v=11, seed=12)
    got = f_divergence(zs, zt, "kl", top_k=11, temperature=2.0, reduction="none")
    want = f_divergence(zs, zt, "kl", temperature=2.0, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_float32_and_leading_dims():
    zs = logits(n=6, v=10, seed=13).reshape(2, 3, 10)
    zt = logits(n=6, v=10, seed=14).reshape(2, 3, 10)
    got = f_divergence(zs.float(), zt.float(), "kl", top_k=4, reduction="none")
    want = f_divergence(zs, zt, "kl", top_k=4, reduction="none")
    assert got.shape == (2, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [0, -1, 12, 2.0, 3.5, True, "3"])
def test_bad_top_k_raises(k):
    zs, zt = logits(v=11), logits(v=11, seed=1)
    with pytest.raises(ValueError, match="Invalid top_k"):
        f_divergence(zs, zt, "kl", top_k=k)


def test_nan_student_logit_off_the_support_raises():
    zs, zt = logits(v=11), logits(v=11, seed=1)
    low = int(zt[2].argmin())  # never in the top 3
    zs[2, low] = float("nan")
    with pytest.raises(ValueError, match="student_logits: row 2 holds NaN"):
        f_divergence(zs, zt, "kl", top_k=3)

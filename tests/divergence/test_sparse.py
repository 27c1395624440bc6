"""sparse_kd (top-k teacher) against direct enumeration in float64 with scipy."""

import math

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.special
import torch

from torchsteer.divergence import f_divergence, sparse_kd


def data(n=5, v=12, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs = 3 * torch.randn(n, v, generator=g, dtype=torch.float64)
    zt = 3 * torch.randn(n, v, generator=g, dtype=torch.float64)
    lp_full = torch.log_softmax(zt, -1)
    top = lp_full.topk(k, -1)
    return zs, zt, top.indices, top.values


def enumerate_rows(zs, idx, lp, kind, T, tail):
    """Row by row in numpy: the (k or k+1)-point distributions, then scipy."""
    out = []
    for z, i, l in zip(zs.numpy(), idx.numpy(), lp.numpy(), strict=True):
        p_k = np.exp(l)
        if tail == "renormalize":
            p = p_k ** (1 / T) / np.sum(p_k ** (1 / T))
            q = np.exp(z[i] / T) / np.sum(np.exp(z[i] / T))
        else:
            q_full = np.exp(z) / np.sum(np.exp(z))
            p = np.append(p_k, 1 - p_k.sum())
            q = np.append(q_full[i], 1 - q_full[i].sum())
        if kind == "kl":
            out.append(scipy.special.rel_entr(p, q).sum())
        elif kind == "reverse_kl":
            out.append(scipy.special.rel_entr(q, p).sum())
        else:
            out.append(scipy.spatial.distance.jensenshannon(p, q) ** 2)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "js"])
@pytest.mark.parametrize("tail,T", [("renormalize", 1.0), ("renormalize", 2.5), ("bucket", 1.0)])
def test_matches_direct_enumeration(kind, tail, T):
    zs, _, idx, lp = data(seed=1)
    got = sparse_kd(zs, idx, lp, kind, tail=tail, temperature=T, reduction="none")
    want = enumerate_rows(zs, idx, lp, kind, T, tail)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("T", [1.0, 0.5, 3.0])
def test_probability_domain_softening_is_softmax_over_t(T):
    """k = V: p^(1/T) renormalized equals softmax(z_t / T), so sparse KD is f_divergence."""
    zs, zt, idx, lp = data(v=9, k=9, seed=2)
    for kind in ("kl", "js"):
        got = sparse_kd(zs, idx, lp, kind, temperature=T, reduction="none")
        want = f_divergence(zs, zt, kind, temperature=T, reduction="none")
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_bucket_is_at_most_the_full_divergence():
    zs, zt, idx, lp = data(seed=3)
    bucket = sparse_kd(zs, idx, lp, "kl", tail="bucket", reduction="none")
    full = f_divergence(zs, zt, "kl", reduction="none")
    assert (bucket <= full + 1e-12).all() and (bucket > 0).all()


@pytest.mark.parametrize("tail,T", [("renormalize", 2.0), ("bucket", 1.0)])
def test_gradcheck_and_unread_vocabulary(tail, T):
    zs, _, idx, lp = data(4, 8, 3, seed=4)
    zs.requires_grad_(True)
    torch.autograd.gradcheck(
        lambda z: sparse_kd(z, idx, lp, "js", tail=tail, temperature=T, reduction="sum"), (zs,)
    )
    sparse_kd(zs, idx, lp, "kl", tail=tail, temperature=T).backward()
    off = torch.ones_like(zs, dtype=torch.bool).scatter(-1, idx, False)
    if tail == "renormalize":  # tokens off the support are never read
        assert (zs.grad[off] == 0).all()
    else:
        assert (zs.grad[off] != 0).all()


def test_mask_excludes_rows_exactly():
    zs, _, idx, lp = data(6, 10, 3, seed=5)
    mask = torch.tensor([True, False, True, True, False, True])
    for tail in ("renormalize", "bucket"):
        z = zs.clone().requires_grad_(True)
        got = sparse_kd(z, idx, lp, "kl", tail=tail, mask=mask, reduction="sum")
        got.backward()
        zk = zs[mask].clone().requires_grad_(True)
        want = sparse_kd(zk, idx[mask], lp[mask], "kl", tail=tail, reduction="sum")
        want.backward()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
        assert (z.grad[~mask] == 0).all()
        torch.testing.assert_close(z.grad[mask], zk.grad, rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(idx=lambda i: i[:, :2]), "shape mismatch"),
        (dict(idx=lambda i: i + 100), "outside"),
        (dict(idx=lambda i: torch.cat([i[:, :1], i[:, :1], i[:, 2:]], 1)), "repeats"),
        (dict(idx=lambda i: i.double()), "integer"),
        (dict(lp=lambda p: p + 5.0), "> 0"),
        (dict(lp=lambda p: torch.full_like(p, math.nan)), "NaN"),
        (dict(tail="bottom"), "tail"),
        (dict(tail="bucket", temperature=2.0), "softened tail"),
        (dict(lp=lambda p: torch.full_like(p, -0.1), tail="bucket"), "mass exceeds 1"),
        (dict(temperature=0.0), "temperature"),
    ],
)
def test_bad_input_raises(change, match):
    zs, _, idx, lp = data(seed=6)
    idx = change.pop("idx", lambda i: i)(idx)
    lp = change.pop("lp", lambda p: p)(lp)
    with pytest.raises(ValueError, match=match):
        sparse_kd(zs, idx, lp, **change)

"""f_divergence against dense float64 definitions, scipy, TRL's formula and its identities."""

import math

import pytest
import scipy.spatial.distance
import scipy.special
import torch

from torchsteer.divergence import f_divergence, generator

# dense definitions: q f(p / q) summed, from the formulas (not from the package)
F = {
    "kl": lambda r: r * torch.log(r),
    "reverse_kl": lambda r: -torch.log(r),
    "js": lambda r: 0.5 * (r * torch.log(r) - (r + 1) * torch.log((r + 1) / 2)),
    "tv": lambda r: 0.5 * torch.abs(r - 1),
    "hellinger": lambda r: (torch.sqrt(r) - 1) ** 2,
    "chi2": lambda r: (r - 1) ** 2,
}
CASES = [(k, {}) for k in F] + [
    ("alpha", {"alpha": 0.3}),
    ("alpha", {"alpha": 0.8}),
    ("alpha", {"alpha": 1.7}),
    ("alpha", {"alpha": -0.5}),
    ("generalized_js", {"beta": 0.3}),
    ("generalized_js", {"beta": 0.3, "normalized": True}),
    ("skew_kl", {"lam": 0.1}),
    ("skew_reverse_kl", {"lam": 0.1}),
]


def dense(zs, zt, kind, args, T=1.0):
    q, p = torch.softmax(zs / T, -1), torch.softmax(zt / T, -1)
    if kind in F:
        return (q * F[kind](p / q)).sum(-1)
    if kind == "alpha":
        a = args["alpha"]
        return ((p**a * q ** (1 - a) - a * p - (1 - a) * q) / (a * (a - 1))).sum(-1)
    if kind == "generalized_js":
        b = args["beta"]
        m = (1 - b) * q + b * p
        d = b * (p * torch.log(p / m)).sum(-1) + (1 - b) * (q * torch.log(q / m)).sum(-1)
        return d / (b * (1 - b)) if args.get("normalized") else d
    lam = args["lam"]
    if kind == "skew_kl":
        return (p * torch.log(p / (lam * p + (1 - lam) * q))).sum(-1)
    return (q * torch.log(q / ((1 - lam) * p + lam * q))).sum(-1)


def logits(n=5, v=11, spread=3.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (spread * torch.randn(n, v, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("kind,args", CASES)
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_value_and_gradient_match_dense_float64(kind, args, T):
    zs, zt = logits(seed=1), logits(seed=2)
    zs.requires_grad_(True)
    got = f_divergence(zs, zt, kind, temperature=T, reduction="none", **args)
    (g_got,) = torch.autograd.grad((got * torch.arange(1.0, 6, dtype=got.dtype)).sum(), zs)
    want = dense(zs, zt, kind, args, T)
    (g_want,) = torch.autograd.grad((want * torch.arange(1.0, 6, dtype=got.dtype)).sum(), zs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind,args", CASES)
def test_gradcheck(kind, args):
    zs = logits(3, 6, seed=3).requires_grad_(True)
    zt = logits(3, 6, seed=4)
    torch.autograd.gradcheck(lambda z: f_divergence(z, zt, kind, reduction="sum", **args), (zs,))


def test_scipy_rel_entr_and_jensenshannon():
    zs, zt = logits(seed=5), logits(seed=6)
    q, p = torch.softmax(zs, -1).numpy(), torch.softmax(zt, -1).numpy()
    kl = f_divergence(zs, zt, "kl", reduction="none").numpy()
    rkl = f_divergence(zs, zt, "reverse_kl", reduction="none").numpy()
    js = f_divergence(zs, zt, "js", reduction="none").numpy()
    assert abs(kl - scipy.special.rel_entr(p, q).sum(-1)).max() < 1e-12
    assert abs(rkl - scipy.special.rel_entr(q, p).sum(-1)).max() < 1e-12
    assert abs(js - scipy.spatial.distance.jensenshannon(p, q, axis=-1) ** 2).max() < 1e-12


@pytest.mark.parametrize("kind,args", CASES)
def test_zero_on_equal_and_nonnegative(kind, args):
    z = logits(seed=7, spread=10.0)
    assert f_divergence(z, z.clone(), kind, reduction="none", **args).abs().max() < 1e-12
    d = f_divergence(logits(seed=8, spread=10.0), z, kind, reduction="none", **args)
    assert (d > 0).all()


def test_js_at_most_log2():
    zs = torch.tensor([[0.0, -1e3], [1.0, 2.0]], dtype=torch.float64)
    zt = torch.tensor([[-1e3, 0.0], [2.0, 1.0]], dtype=torch.float64)
    d = f_divergence(zs, zt, "js", reduction="none")
    assert (d <= math.log(2)).all() and abs(d[0] - math.log(2)) < 1e-12


@pytest.mark.parametrize("beta", [1e-3, 1e-4])
def test_normalized_generalized_js_limits(beta):
    zs, zt = logits(seed=9, spread=1.0), logits(seed=10, spread=1.0)
    kl = f_divergence(zs, zt, "kl", reduction="none")
    rkl = f_divergence(zs, zt, "reverse_kl", reduction="none")
    lo = f_divergence(zs, zt, "generalized_js", beta=beta, normalized=True, reduction="none")
    hi = f_divergence(zs, zt, "generalized_js", beta=1 - beta, normalized=True, reduction="none")
    e_lo, e_hi = (lo - kl).abs().max(), (hi - rkl).abs().max()
    assert e_lo < 30 * beta and e_hi < 30 * beta
    assert e_lo > 0.01 * beta  # an O(beta) error, not a coincidence
    ends = [
        f_divergence(zs, zt, "generalized_js", beta=b, normalized=True, reduction="none")
        for b in (0, 1)
    ]
    torch.testing.assert_close(ends[0], kl)
    torch.testing.assert_close(ends[1], rkl)


def test_alpha_limits():
    zs, zt = logits(seed=11), logits(seed=12)
    kl = f_divergence(zs, zt, "kl", reduction="none")
    rkl = f_divergence(zs, zt, "reverse_kl", reduction="none")
    for a, ref in ((1e-4, rkl), (1 - 1e-4, kl), (0.0, rkl), (1.0, kl)):
        d = f_divergence(zs, zt, "alpha", alpha=a, reduction="none")
        assert (d - ref).abs().max() < 50 * max(a * (1 - a), 1e-12)


@pytest.mark.parametrize("kind,args", CASES)
@pytest.mark.parametrize("chunk", [1, 7, 23])
def test_chunked_equals_unchunked(kind, args, chunk):
    zt = logits(23, 9, seed=13, dtype=torch.float32)
    zs1 = logits(23, 9, seed=14, dtype=torch.float32).requires_grad_(True)
    zs2 = zs1.detach().clone().requires_grad_(True)
    a = f_divergence(zs1, zt, kind, chunk_size=chunk, **args)
    b = f_divergence(zs2, zt, kind, chunk_size=23, **args)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    torch.testing.assert_close(zs1.grad, zs2.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind,args", CASES)
def test_mask_excludes_rows_exactly(kind, args):
    zs, zt = logits(6, 8, seed=15), logits(6, 8, seed=16)
    mask = torch.tensor([True, False, True, True, False, True])
    zs_bad = zs.clone()
    zs_bad[~mask] = float("nan")  # masked rows are never read
    zs_bad.requires_grad_(True)
    got = f_divergence(zs_bad, zt, kind, mask=mask, reduction="sum", chunk_size=4, **args)
    got.backward()
    zk = zs[mask].clone().requires_grad_(True)
    want = f_divergence(zk, zt[mask], kind, reduction="sum", **args)
    want.backward()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    assert (zs_bad.grad[~mask] == 0).all()
    torch.testing.assert_close(zs_bad.grad[mask], zk.grad, rtol=0, atol=1e-13)
    mean = f_divergence(zs, zt, kind, mask=mask, reduction="mean", **args)
    torch.testing.assert_close(mean, want / 4)


def test_all_masked_gives_zero_and_zero_gradient():
    zs = logits(4, 5, seed=17).requires_grad_(True)
    for red in ("mean", "sum", "batchmean"):
        d = f_divergence(
            zs, logits(4, 5), "js", mask=torch.zeros(4, dtype=torch.bool), reduction=red
        )
        d.backward()
        assert d.item() == 0.0 and (zs.grad == 0).all()
        zs.grad = None


@pytest.mark.parametrize("kind,args", CASES)
def test_padded_vocabulary_contributes_nothing(kind, args):
    zs, zt = logits(4, 7, seed=18), logits(4, 7, seed=19)
    pad_s = torch.cat([zs, torch.full((4, 3), -math.inf, dtype=zs.dtype)], 1).requires_grad_(True)
    pad_t = torch.cat([zt, torch.full((4, 3), -math.inf, dtype=zs.dtype)], 1)
    d = f_divergence(pad_s, pad_t, kind, reduction="sum", **args)
    d.backward()
    zr = zs.clone().requires_grad_(True)
    ref = f_divergence(zr, zt, kind, reduction="sum", **args)
    ref.backward()
    assert torch.isfinite(d) and torch.isfinite(pad_s.grad).all()
    torch.testing.assert_close(d, ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(pad_s.grad[:, :7], zr.grad, rtol=1e-12, atol=1e-13)
    assert (pad_s.grad[:, 7:] == 0).all()


def test_teacher_minus_inf_forward_kl_is_finite_and_exact():
    zs = logits(2, 5, seed=20)
    zt = logits(2, 5, seed=21)
    zt[:, 0] = -math.inf
    got = f_divergence(zs, zt, "kl", reduction="none")
    q, p = torch.softmax(zs, -1), torch.softmax(zt, -1)
    want = torch.tensor(scipy.special.rel_entr(p.numpy(), q.numpy()).sum(-1))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "js"])
def test_bf16_input_computes_in_fp32(kind):
    zs, zt = logits(8, 50, seed=22, spread=5.0), logits(8, 50, seed=23, spread=5.0)
    s16 = zs.to(torch.bfloat16).requires_grad_(True)
    t16 = zt.to(torch.bfloat16)
    d = f_divergence(s16, t16, kind)
    d.backward()
    assert d.dtype == torch.float32 and s16.grad.dtype == torch.bfloat16
    s64 = s16.detach().double().requires_grad_(True)
    ref = dense(s64, t16.double(), kind, {}).sum() / 8
    ref.backward()
    assert abs(d.item() - ref.item()) < 1e-5 * abs(ref.item())
    torch.testing.assert_close(s16.grad.double(), s64.grad, rtol=1e-2, atol=1e-4)


def trl_generalized_jsd(student_logits, teacher_logits, beta, temperature=1.0):
    """TRL's generalized_jsd_loss (GKDTrainer) from its definition, reduction 'batchmean'
    on (B, T, V): sum / (B * T)."""
    s = torch.log_softmax(student_logits / temperature, -1)
    t = torch.log_softmax(teacher_logits / temperature, -1)
    kl = torch.nn.functional.kl_div
    if beta == 0:
        jsd = kl(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = kl(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        m = torch.logsumexp(torch.stack([s + torch.log(1 - b), t + torch.log(b)]), 0)
        jsd = b * kl(m, t, reduction="none", log_target=True) + (1 - b) * kl(
            m, s, reduction="none", log_target=True
        )
    return jsd.sum() / (jsd.size(0) * jsd.size(1))


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_trl_generalized_jsd_reproduced(beta):
    zs = logits(6, 13, seed=24).reshape(2, 3, 13).requires_grad_(True)
    zt = logits(6, 13, seed=25).reshape(2, 3, 13)
    want = trl_generalized_jsd(zs, zt, beta, temperature=2.0)
    (gw,) = torch.autograd.grad(want, zs)
    got = f_divergence(zs, zt, "generalized_js", beta=beta, temperature=2.0, reduction="mean")
    (gg,) = torch.autograd.grad(got, zs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(gg, gw, rtol=0, atol=1e-12)


def test_generator_functions_match_their_definitions():
    lr = torch.linspace(-4, 4, 17, dtype=torch.float64)
    for kind, args in CASES:
        g = generator(kind, **args)
        r = torch.exp(lr).requires_grad_(True)
        f = g.f(torch.log(r))
        (d1,) = torch.autograd.grad(f.sum(), r, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), r)
        torch.testing.assert_close(g.psi(lr), (f - r * d1).detach(), rtol=1e-9, atol=1e-9)
        if kind != "tv":
            torch.testing.assert_close(g.weight(lr), d2 * r.detach() ** 2, rtol=1e-9, atol=1e-9)
        assert abs(g.f(torch.zeros(1, dtype=torch.float64))).item() < 1e-15


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda s, t: f_divergence(s, t[:2]), "shape mismatch"),
        (lambda s, t: f_divergence(s, t[:, :3]), "vocabulary"),
        (lambda s, t: f_divergence(s[:, :0], t[:, :0]), "V=0"),  # was a raw IndexError
        (lambda s, t: f_divergence(s[0, :0], t[0, :0]), "V=0"),
        (lambda s, t: f_divergence(s, t, temperature=0.0), "temperature"),
        (lambda s, t: f_divergence(s, t, temperature=-1.0), "temperature"),
        (lambda s, t: f_divergence(s, t, "nope"), "kind"),
        (lambda s, t: f_divergence(s, t, "generalized_js", beta=1.5), "beta"),
        (lambda s, t: f_divergence(s, t, "alpha", alpha=float("nan")), "alpha"),
        (lambda s, t: f_divergence(s, t, "skew_kl", lam=1.0), "lam"),
        (lambda s, t: f_divergence(s, t, "kl", beta=0.5), "argument"),
        (lambda s, t: f_divergence(s, t, reduction="avg"), "reduction"),
        (lambda s, t: f_divergence(s, t, mask=torch.ones(3, dtype=torch.bool)), "mask"),
        (lambda s, t: f_divergence(s, t, chunk_size=0), "chunk_size"),
        (lambda s, t: f_divergence(s, t.requires_grad_(True)), "teacher"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call(logits(4, 5), logits(4, 5))


@pytest.mark.parametrize("value,match", [(float("nan"), "NaN"), (math.inf, r"\+inf")])
def test_nan_or_inf_logits_raise(value, match):
    zs = logits(4, 5)
    zs[2, 1] = value
    with pytest.raises(ValueError, match=f"student_logits: row 2 holds {match}"):
        f_divergence(zs, logits(4, 5))
    with pytest.raises(ValueError, match="only -inf"):
        f_divergence(logits(4, 5), torch.full((4, 5), -math.inf, dtype=torch.float64))

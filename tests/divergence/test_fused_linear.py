"""fused_linear_divergence against f_divergence on materialized logits, gradcheck, masks."""

import math

import pytest
import torch

from torchsteer.divergence import f_divergence, fused_linear_divergence

CASES = [
    ("kl", {}),
    ("reverse_kl", {}),
    ("js", {}),
    ("generalized_js", {"beta": 0.3, "normalized": True}),
    ("alpha", {"alpha": 0.7}),
    ("skew_kl", {"lam": 0.1}),
]


def tensors(n=(2, 5), hs=7, ht=4, v=13, seed=0, dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    out = dict(hs=r(*n, hs), ws=r(v, hs), ht=r(*n, ht), wt=r(v, ht))
    out["bs"] = r(v) if bias else None
    out["bt"] = r(v) if bias else None
    return out


def unfused(x, kind, args, **kw):
    zs = x["hs"] @ x["ws"].T + (0 if x["bs"] is None else x["bs"])
    zt = x["ht"] @ x["wt"].T + (0 if x["bt"] is None else x["bt"])
    return f_divergence(zs, zt, kind, **kw, **args)


def fused(x, kind, args, **kw):
    return fused_linear_divergence(
        x["hs"], x["ws"], x["ht"], x["wt"], kind,
        student_bias=x["bs"], teacher_bias=x["bt"], **kw, **args,
    )  # fmt: skip


def copy(x):
    return {k: None if v is None else v.detach().clone() for k, v in x.items()}


def leaves(x):
    return [x[k].requires_grad_(True) for k in ("hs", "ws", "bs") if x[k] is not None]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind,args", CASES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean", "none"])
def test_gradcheck_float64(kind, args, reduction):
    x = tensors(seed=1)
    hs, ws, bs = leaves(x)

    def fn(a, b, c):
        y = dict(x, hs=a, ws=b, bs=c)
        return fused(y, kind, args, reduction=reduction, chunk_size=3, temperature=1.7)

    torch.autograd.gradcheck(fn, (hs, ws, bs))


def test_gradcheck_without_bias_and_with_a_linear_head():
    x = tensors(seed=2, bias=False)
    hs, ws = leaves(x)
    torch.autograd.gradcheck(lambda a, b: fused(dict(x, hs=a, ws=b), "js", {}), (hs, ws))
    head = torch.nn.Linear(7, 13, dtype=torch.float64)
    teacher = torch.nn.Linear(4, 13, dtype=torch.float64).requires_grad_(False)
    got = fused_linear_divergence(x["hs"], head, x["ht"], teacher, "kl", reduction="sum")
    got.backward()
    ref_w = head.weight.detach().clone().requires_grad_(True)
    ref_b = head.bias.detach().clone().requires_grad_(True)
    zt = teacher(x["ht"])
    want = f_divergence(x["hs"].detach() @ ref_w.T + ref_b, zt, "kl", reduction="sum")
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(head.weight.grad, ref_w.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.bias.grad, ref_b.grad, rtol=1e-10, atol=1e-12)


def run(f, x, kind, args, kw, w):
    d = f(x, kind, args, **kw)
    (d * w).sum().backward() if kw["reduction"] == "none" else d.backward()
    return d


@pytest.mark.parametrize("kind,args", CASES)
@pytest.mark.parametrize("chunk", [1, 7, None])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_equals_unfused_float32(kind, args, chunk, reduction):
    kw = dict(temperature=2.0, reduction=reduction, chunk_size=chunk)
    xa = tensors((3, 9), 32, 24, 257, seed=3, dtype=torch.float32)
    xa["hs"], xa["ht"] = 0.5 * xa["hs"], 0.5 * xa["ht"]  # logits of spread ~3
    xb = copy(xa)
    la, lb = leaves(xa), leaves(xb)
    w = torch.linspace(0.5, 2.0, 27).reshape(3, 9)
    a, b = run(fused, xa, kind, args, kw, w), run(unfused, xb, kind, args, kw, w)
    assert a.dtype == torch.float32 and rel(a, b) < 1e-6
    for p, q in zip(la, lb, strict=True):
        assert p.grad.dtype == torch.float32 and rel(p.grad, q.grad) < 1e-6


@pytest.mark.parametrize("kind,args", CASES)
@pytest.mark.parametrize("chunk", [1, 7])
def test_fused_float32_as_accurate_as_unfused(kind, args, chunk):
    """Wider logits (spread ~6): both float32 forms against the float64 value and gradients."""
    kw = dict(temperature=2.0, reduction="mean", chunk_size=chunk)
    x64 = tensors((3, 9), 32, 24, 257, seed=3)
    l64 = leaves(x64)
    want = run(unfused, x64, kind, args, kw, None)
    errs = []
    for f in (fused, unfused):
        x = tensors((3, 9), 32, 24, 257, seed=3, dtype=torch.float32)
        lx = leaves(x)
        d = run(f, x, kind, args, kw, None)
        grads = [rel(p.grad.double(), q.grad) for p, q in zip(lx, l64, strict=True)]
        errs.append([rel(d.double(), want), *grads])
    for e_fused, e_unfused in zip(*errs, strict=True):
        assert e_fused <= 1.5 * e_unfused + 1e-7 and e_fused < 2e-6


@pytest.mark.parametrize("kind,args", CASES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_masked_tokens_contribute_nothing(kind, args, reduction):
    x = tensors((2, 6), seed=4)
    mask = torch.tensor([[True, False, True, True, False, True], [False] * 5 + [True]])
    bad, keep = copy(x), copy(x)
    bad["hs"][~mask] = math.nan  # masked rows are never read
    bad["ht"][~mask] = math.inf
    lb = leaves(bad)
    got = fused(bad, kind, args, mask=mask, reduction=reduction, chunk_size=2)
    (got.sum() if reduction == "none" else got).backward()
    keep["hs"], keep["ht"] = keep["hs"][mask], keep["ht"][mask]
    lk = leaves(keep)
    want = fused(keep, kind, args, reduction="sum")
    want.backward()
    if reduction == "none":
        assert (got[~mask] == 0).all()
        torch.testing.assert_close(got.sum(), want, rtol=1e-13, atol=0)
    else:
        torch.testing.assert_close(got, want / (5 if reduction == "mean" else 1))
    scale = 1 / 5 if reduction == "mean" else 1
    assert (lb[0].grad[~mask] == 0).all()
    torch.testing.assert_close(lb[0].grad[mask], lk[0].grad * scale, rtol=1e-12, atol=1e-14)
    for p, q in zip(lb[1:], lk[1:], strict=True):
        torch.testing.assert_close(p.grad, q.grad * scale, rtol=1e-12, atol=1e-14)


def test_all_masked_gives_zero_and_zero_gradient():
    x = tensors(seed=5)
    hs, ws, bs = leaves(x)
    d = fused(x, "js", {}, mask=torch.zeros(2, 5, dtype=torch.bool), reduction="mean")
    d.backward()
    assert d.item() == 0.0 and all((p.grad == 0).all() for p in (hs, ws, bs))


def test_bf16_hidden_computes_in_fp32_and_grad_scales():
    x = tensors((4, 8), 16, 16, 50, seed=6, dtype=torch.bfloat16)
    hs, ws, bs = leaves(x)
    d = fused(x, "kl", {})
    (3.0 * d).backward()
    assert d.dtype == torch.float32 and hs.grad.dtype == ws.grad.dtype == torch.bfloat16
    y = {k: v.detach().double() for k, v in x.items()}
    ly = leaves(y)
    ref = unfused(y, "kl", {})
    (3.0 * ref).backward()
    assert abs(d.item() - ref.item()) < 1e-5 * abs(ref.item())
    for p, q in zip((hs, ws, bs), ly, strict=True):
        assert rel(p.grad.double(), q.grad) < 1e-2


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(ht=torch.zeros(2, 4, 4, dtype=torch.float64)), "leading shape"),
        (dict(ws=torch.zeros(13, 6, dtype=torch.float64)), "student hidden size"),
        (dict(wt=torch.zeros(12, 4, dtype=torch.float64), bt=None), "vocabulary"),
        (dict(bs=torch.zeros(12, dtype=torch.float64)), "student_bias"),
        (dict(ws=torch.zeros(13, dtype=torch.float64)), "student_head"),
        (dict(wt=torch.full((13, 4), math.nan, dtype=torch.float64)), "teacher_head"),
        (dict(wt=torch.zeros(13, 4, dtype=torch.float64, requires_grad=True)), "teacher_head"),
    ],
)
def test_bad_input_raises(change, match):
    x = dict(tensors(), **change)
    with pytest.raises(ValueError, match=match):
        fused(x, "kl", {})


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(reduction="avg"), "reduction"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(mask=torch.ones(3, dtype=torch.bool)), "mask"),
        (dict(beta=2.0), "argument"),
    ],
)
def test_bad_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        fused(tensors(), "kl", {}, **kw)


def test_nan_hidden_raises_naming_the_row():
    x = tensors(seed=7)
    x["hs"][1, 2, 0] = math.nan
    with pytest.raises(ValueError, match="student_logits: row 7 holds NaN"):
        fused(x, "kl", {})
    x = tensors(seed=7)
    head = torch.nn.Linear(7, 13, dtype=torch.float64)
    with pytest.raises(ValueError, match="own bias"):
        fused_linear_divergence(x["hs"], head, x["ht"], x["wt"], student_bias=x["bs"])

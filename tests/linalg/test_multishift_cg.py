"""multishift_cg against separate CG runs per shift (a textbook CG on the dense float64 matrix,
and the library's shifted_cg), and against the dense solve when converged."""

import pytest
import torch

from torchsteer.linalg.multishift_cg import multishift_cg
from torchsteer.linalg.shifted_solvers import shifted_cg

DT = torch.float64


def spd(n=40, cond=1e2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    eigs = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=DT) / cond
    b = torch.randn(n, generator=gen, dtype=DT)
    return Q @ torch.diag(eigs) @ Q.T, b


def textbook_cg(A, b, k, tol=0.0):
    """Hestenes-Stiefel CG from zero on the dense A: (x, iterations, broke down)."""
    x, r = torch.zeros_like(b), b.clone()
    p, rs = r.clone(), r @ r
    for it in range(k):
        if rs.sqrt() <= tol * b.norm():
            return x, it, False
        Ap = A @ p
        pap = p @ Ap
        if not pap > 0:
            return x, it, True
        alpha = rs / pap
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = r @ r
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x, k, False


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("k", [1, 2, 7, 15])
def test_every_shift_is_its_own_cg_iterate(k):
    # k below the point where CG loses orthogonality: beyond it any two CG codes part at
    # their rounding amplified (here at k = 25: textbook vs shifted_cg 3.1e-6, vs this 7.7e-6)
    H, b = spd()
    shifts = [1e-3, 2e-3, 4e-3, 8e-3, 0.5]
    out, products = multishift_cg(lambda v: H @ v, b, shifts, tol=0.0, maxiter=k)
    assert products == k
    eye = torch.eye(len(b), dtype=DT)
    for s, res in zip(shifts, out):
        ref, its, _ = textbook_cg(H + s * eye, b, k)
        assert rel(res.x, ref) < 1e-10
        lib = shifted_cg(lambda v: H @ v, b, s, 0.0, k)
        assert rel(res.x, lib.x) < 1e-10
        assert res.iterations == its == k and not res.breakdown and not res.unfinished
        assert not res.converged
        # the reported residual is |b - (H + s I) x|
        true = float((b - (H + s * eye) @ res.x).norm())
        assert abs(res.residual_norm - true) <= 1e-8 * b.norm() + 1e-6 * true


def test_each_shift_stops_on_its_own_tolerance():
    H, b = spd(n=200, cond=10.0)  # converges well before CG loses orthogonality
    shifts = [1e-3, 1e-2, 1e-1, 1.0]
    tol = 1e-8
    out, products = multishift_cg(lambda v: H @ v, b, shifts, tol=tol, maxiter=400)
    eye = torch.eye(len(b), dtype=DT)
    counts = []
    for s, res in zip(shifts, out):
        ref, its, _ = textbook_cg(H + s * eye, b, 400, tol)
        assert res.converged and res.iterations == its
        assert rel(res.x, ref) < 1e-10
        exact = torch.linalg.solve(H + s * eye, b)
        assert rel(res.x, exact) < 1e-6
        counts.append(its)
    assert products == max(counts)
    assert counts == sorted(counts, reverse=True) and counts[-1] < counts[0]  # larger: sooner


def test_a_shift_that_is_indefinite_breaks_down_alone():
    eigs = torch.tensor([0.5, 1.0, 2.0, 10.0], dtype=DT)
    H = torch.diag(eigs)
    b = torch.tensor([1.0, 0.1, 0.1, 0.1], dtype=DT)  # b^T (H - 3 I) b < 0
    out, _ = multishift_cg(lambda v: H @ v, b, [1.0, -3.0], tol=1e-12, maxiter=10)
    ref = shifted_cg(lambda v: H @ v, b, -3.0, 1e-12, 10)
    assert out[1].breakdown and ref.breakdown and out[1].iterations == ref.iterations == 0
    assert torch.equal(out[1].x, torch.zeros_like(b))
    assert (
        out[0].converged
        and rel(out[0].x, torch.linalg.solve(H + torch.eye(4, dtype=DT), b)) < 1e-10
    )


def test_base_breakdown_leaves_the_other_shifts_unfinished():
    H = torch.diag(torch.tensor([-1.0, 1.0, 2.0], dtype=DT))
    b = torch.tensor([1.0, 0.1, 0.1], dtype=DT)
    out, products = multishift_cg(lambda v: H @ v, b, [0.1, 5.0], tol=1e-12, maxiter=10)
    assert out[0].breakdown and not out[0].converged
    assert out[1].unfinished and not out[1].converged and not out[1].breakdown
    assert products == 0


def test_zero_rhs_is_converged_at_zero():
    H, _ = spd(n=5)
    out, products = multishift_cg(lambda v: H @ v, torch.zeros(5, dtype=DT), [0.1, 1.0])
    assert products == 0 and all(r.converged and not r.x.any() for r in out)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(shifts=[]), "shifts"),
        (dict(shifts=[0.1, float("nan")]), "shifts"),
        (dict(shifts=[0.1], tol=float("nan")), "tol"),
        (dict(shifts=[0.1], b=torch.ones(3, 2, dtype=DT)), "b"),
    ],
)
def test_bad_input_is_named(kwargs, match):
    args = dict(b=torch.ones(3, dtype=DT), tol=1e-6)
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"Invalid {match}"):
        multishift_cg(lambda v: v, **args)

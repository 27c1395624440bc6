"""sinkhorn_divergence against oracles.

Oracles: a dense float64 log-domain Sinkhorn written here (many iterations) with the PRIMAL
value <P, C> + eps KL(P || a b^T) formed from its plan; POT's ``ot.sinkhorn2`` /
``ot.sinkhorn`` (log-stabilised, test-only dependency); the eps -> inf limit <a b^T, C>;
central finite differences in float64 for every gradient path; exact identities (S(a, a)
= 0, a Dirac pair in the batch-wise form, SinKD's released loss as B x the transport cost).
"""

import math
import warnings

import numpy as np
import pytest
import torch

from torchsteer.divergence import sinkhorn_divergence
from torchsteer.divergence.sinkhorn import grid_cost

D = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _reference_plan(a, b, C, eps, iters=20000):
    """Dense float64 log-domain Sinkhorn (numpy), written from the definition."""
    from scipy.special import logsumexp

    a, b, C = (np.asarray(x, dtype=np.float64) for x in (a, b, C))
    f, g = np.zeros(len(a)), np.zeros(len(b))
    la, lb = np.log(a), np.log(b)
    for _ in range(iters):
        f_old, g_old = f, g
        f = -eps * logsumexp(lb[None, :] + (g[None, :] - C) / eps, axis=1)
        g = -eps * logsumexp(la[:, None] + (f[:, None] - C) / eps, axis=0)
        # a fixed point to rounding: further sweeps cannot move the plan
        if max(np.abs(f - f_old).max(), np.abs(g - g_old).max()) <= 1e-15:
            break
    P = np.exp(la[:, None] + lb[None, :] + (f[:, None] + g[None, :] - C) / eps)
    return P


def _primal(P, a, b, C, eps):
    a, b, C = (np.asarray(x, dtype=np.float64) for x in (a, b, C))
    Q = a[:, None] * b[None, :]
    kl = np.sum(P * np.log(P / Q) - P + Q)
    return float(np.sum(P * C) + eps * kl)


def _problem(seed, n=6, m=5, pairs=3):
    g = _gen(seed)
    zp, zq = (
        torch.randn(pairs, n, generator=g, dtype=D),
        torch.randn(pairs, m, generator=g, dtype=D),
    )
    C = torch.rand(n, m, generator=g, dtype=D)
    return zp, zq, C


def test_matches_dense_float64_reference_primal_value():
    zp, zq, C = _problem(0)
    eps = 0.05
    got = sinkhorn_divergence(
        zp, zq, C, epsilon=eps, debiased=False, reduction="none", tol=1e-13, n_iters=100000
    )
    a, b = torch.softmax(zp, -1), torch.softmax(zq, -1)
    for k in range(zp.shape[0]):
        P = _reference_plan(a[k], b[k], C, eps)
        want = _primal(P, a[k], b[k], C, eps)
        assert abs(got[k].item() - want) < 1e-11 * max(1.0, abs(want))


def test_cost_gradient_is_the_plan_and_matches_pot():
    ot = pytest.importorskip("ot")
    zp, zq, C = _problem(1, n=7, m=7, pairs=2)
    eps = 0.1
    Cg = C.clone().requires_grad_(True)
    vals = sinkhorn_divergence(
        zp, zq, Cg, epsilon=eps, debiased=False, reduction="none", tol=1e-13, n_iters=100000
    )
    vals[0].backward()
    a, b = torch.softmax(zp, -1).numpy(), torch.softmax(zq, -1).numpy()
    P_pot = ot.sinkhorn(
        a[0], b[0], C.numpy(), eps, method="sinkhorn_log", stopThr=1e-15, numItermax=100000
    )
    np.testing.assert_allclose(Cg.grad.numpy(), P_pot, rtol=0, atol=1e-12)
    # POT's sinkhorn2 is the transport part <P, C>; ours is <P, C> + eps KL(P || a b^T)
    lin = ot.sinkhorn2(
        a[1], b[1], C.numpy(), eps, method="sinkhorn_log", stopThr=1e-15, numItermax=100000
    )
    P1 = _reference_plan(a[1], b[1], C, eps)
    assert abs(float(np.sum(P1 * C.numpy())) - float(lin)) < 1e-11
    assert abs(vals[1].item() - _primal(P1, a[1], b[1], C, eps)) < 1e-11


def test_large_epsilon_limit_is_the_independent_coupling():
    zp, zq, C = _problem(2)
    a, b = torch.softmax(zp, -1), torch.softmax(zq, -1)
    want = torch.einsum("pi,pj,ij->p", a, b, C)
    for eps, bound in ((1e3, 1e-3), (1e5, 1e-5)):
        got = sinkhorn_divergence(zp, zq, C, epsilon=eps, debiased=False, reduction="none")
        err = (got - want).abs().max().item()
        assert err < bound  # O(1 / eps): the plan tends to a b^T
    assert (want.max() - want.min()).item() > 1e-2  # not a constant


def test_debiased_is_zero_on_equal_inputs_and_nonnegative():
    g = _gen(3)
    z = torch.randn(8, 50, generator=g, dtype=D) * 2
    w = torch.randn(8, 50, generator=g, dtype=D) * 2
    kw = dict(reduction="none", tol=1e-11, n_iters=20000)
    for eps in (1e-1, 1e-2, 1e-3):  # grid spacing^2 / 2 = 2e-4 < eps
        same = sinkhorn_divergence(z, z, epsilon=eps, **kw)
        assert same.abs().max().item() < 1e-12
        diff = sinkhorn_divergence(z, w, epsilon=eps, **kw)
        assert (diff > 0).all()
    biased = sinkhorn_divergence(z, z, epsilon=1e-1, debiased=False, reduction="none")
    assert (biased > 1e-4).all()  # the entropic bias the debiasing removes


def test_scaling_and_log_domains_agree():
    zp, zq, C = _problem(4, n=30, m=30, pairs=5)
    C = C + C.t()
    for eps in (0.5, 0.05, 0.01):
        out = []
        for domain in ("scaling", "log"):
            v, rep = sinkhorn_divergence(
                zp,
                zq,
                C,
                epsilon=eps,
                reduction="none",
                tol=1e-12,
                n_iters=50000,
                domain=domain,
                return_report=True,
            )
            assert rep.domain == domain and rep.converged and rep.marginal_error <= 1e-12
            out.append(v)
        torch.testing.assert_close(out[0], out[1], rtol=1e-10, atol=1e-13)


def test_auto_domain_falls_back_to_log_when_kernel_underflows():
    zp, zq, _ = _problem(5, n=20, m=20, pairs=2)
    C = 2.0 * grid_cost(20)  # max C = 1
    _, rep = sinkhorn_divergence(zp, zq, C, epsilon=1e-3, return_report=True, tol=1e-8)
    assert rep.domain == "log" and rep.converged  # max C / eps = 1000 > 600
    _, rep = sinkhorn_divergence(zp, zq, C, epsilon=1e-2, return_report=True, tol=1e-8)
    assert rep.domain == "scaling"


def _fd_check(fn, x, h=1e-6, rtol=1e-6):
    x = x.clone().requires_grad_(True)
    fn(x).backward()
    fd = torch.zeros_like(x).flatten()
    flat = x.detach().flatten()
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = h
        fd[i] = (fn((flat + e).view_as(x)) - fn((flat - e).view_as(x))) / (2 * h)
    fd = fd.view_as(x)
    scale = fd.abs().max().item()
    assert scale > 1e-6
    assert (x.grad - fd).abs().max().item() <= rtol * scale, (x.grad, fd)


@pytest.mark.parametrize("debiased", [True, False])
@pytest.mark.parametrize("eps", [0.3, 0.02])
def test_logit_gradients_match_finite_differences(debiased, eps):
    g = _gen(6)
    zp, zq = torch.randn(2, 6, generator=g, dtype=D), torch.randn(2, 6, generator=g, dtype=D)
    C = grid_cost(6) * 2
    kw = dict(epsilon=eps, debiased=debiased, tol=1e-13, n_iters=100000, temperature=1.5)
    _fd_check(lambda x: sinkhorn_divergence(x, zq, C, reduction="sum", **kw), zp)
    _fd_check(lambda x: sinkhorn_divergence(zp, x, C, reduction="mean", **kw), zq)


def test_cost_gradient_matches_finite_differences():
    zp, zq, C = _problem(7, n=4, m=3, pairs=2)
    kw = dict(epsilon=0.1, debiased=False, tol=1e-13, n_iters=100000)
    _fd_check(lambda c: sinkhorn_divergence(zp, zq, c, **kw), C)


def test_pot_kl_envelope_gradient_differs_from_finite_differences():
    """The POT bug the issue names: ot.solve(reg_type='KL', grad='envelope') w.r.t. a."""
    ot = pytest.importorskip("ot")
    g = _gen(8)
    za, zb = torch.randn(6, generator=g, dtype=D), torch.randn(6, generator=g, dtype=D)
    C, eps = grid_cost(6) * 2, 0.05

    def pot_value(z):
        a = torch.softmax(z, -1)
        res = ot.solve(
            C,
            a,
            torch.softmax(zb, -1),
            reg=eps,
            reg_type="KL",
            grad="envelope",
            max_iter=100000,
            tol=1e-14,
        )
        return res.value

    def ours(z):
        return sinkhorn_divergence(
            z[None], zb[None], C, epsilon=eps, debiased=False, tol=1e-13, n_iters=100000
        )

    x = za.clone().requires_grad_(True)
    pot_value(x).backward()
    h = 1e-6
    fd = torch.stack(
        [(ours(za + h * e) - ours(za - h * e)) / (2 * h) for e in torch.eye(6, dtype=D)]
    )
    fd_pot = torch.stack(
        [(pot_value(za + h * e) - pot_value(za - h * e)) / (2 * h) for e in torch.eye(6, dtype=D)]
    )
    torch.testing.assert_close(fd_pot, fd, rtol=1e-6, atol=1e-9)  # same value function
    y = za.clone().requires_grad_(True)
    ours(y).backward()
    torch.testing.assert_close(y.grad, fd, rtol=1e-6, atol=1e-9)  # ours: right
    assert (x.grad - fd).norm() > 0.1 * fd.norm()  # POT's envelope: wrong


def test_batchwise_gradients_match_finite_differences():
    g = _gen(9)
    zs, zt = torch.randn(4, 5, generator=g, dtype=D), torch.randn(4, 5, generator=g, dtype=D)
    for debiased in (True, False):
        kw = dict(epsilon=0.1, batchwise=True, debiased=debiased, tol=1e-13, n_iters=100000)
        _fd_check(lambda x, kw=kw: sinkhorn_divergence(x, zt, **kw), zs, rtol=1e-5)
        _fd_check(lambda x, kw=kw: sinkhorn_divergence(zs, x, **kw), zt, rtol=1e-5)


def test_batchwise_one_row_is_the_samplewise_l1_distance():
    """B = 1: two Dirac point masses, the batch-wise value is ||a - b||_1 for any eps; the
    sample-wise OT under the cost 2 (1 - I) tends to 2 TV = ||a - b||_1 as eps -> 0."""
    g = _gen(10)
    zp, zq = torch.randn(1, 8, generator=g, dtype=D), torch.randn(1, 8, generator=g, dtype=D)
    l1 = (torch.softmax(zp, -1) - torch.softmax(zq, -1)).abs().sum()
    bw = sinkhorn_divergence(zp, zq, epsilon=0.3, batchwise=True, debiased=False)
    assert abs(bw.item() - l1.item()) < 1e-14
    C = 2.0 * (1.0 - torch.eye(8, dtype=D))
    sw = sinkhorn_divergence(zp, zq, C, epsilon=1e-3, debiased=False, tol=1e-12, n_iters=100000)
    assert abs(sw.item() - l1.item()) < 2e-3  # the gap is about 1.04 eps here


def test_batchwise_matches_samplewise_solver_on_its_cost_and_released_is_b_times():
    """The batch-wise value is OT_eps(1/B, 1/B) over W = cdist(a, b, 1); SinKD's released
    normalisations converge to B x its plan, so the released loss -> B <P, W>."""
    g = _gen(11)
    B = 16
    zs, zt = torch.randn(B, 10, generator=g, dtype=D), torch.randn(B, 10, generator=g, dtype=D)
    a, b = torch.softmax(zs / 2, -1), torch.softmax(zt / 2, -1)
    W = torch.cdist(a, b, p=1).clone().requires_grad_(True)
    u = torch.zeros(1, B, dtype=D)
    kw = dict(epsilon=0.1, debiased=False, tol=1e-13, n_iters=100000)
    ref = sinkhorn_divergence(u, u, W, **kw)  # uniform histograms over the B points
    bw = sinkhorn_divergence(zs, zt, batchwise=True, temperature=2.0, **kw)
    assert abs(bw.item() - ref.item()) < 1e-13
    ref.backward()
    transport = (W.grad * W).sum().item()  # W.grad = P, mass 1
    rel = sinkhorn_divergence(
        zs, zt, batchwise=True, temperature=2.0, released=True, epsilon=0.1, n_iters=5000
    )
    assert abs(rel.item() - B * transport) < 1e-9 * B * transport
    # the released loss at its 20 iterations, written here from SinKD's description
    K = torch.exp(-torch.cdist(a, b, p=1) / 0.1)
    for _ in range(20):
        K = K / K.sum(1, keepdim=True)
        K = K / K.sum(0, keepdim=True)
    want = (K * torch.cdist(a, b, p=1)).sum()
    got = sinkhorn_divergence(
        zs, zt, batchwise=True, temperature=2.0, released=True, epsilon=0.1, n_iters=20
    )
    assert torch.equal(got, want)


def test_zero_mass_bins_equal_the_problem_without_them():
    zp, zq, C = _problem(12, n=7, m=7, pairs=2)
    C = C + C.t()
    C.fill_diagonal_(0)
    zp[:, 2] = -math.inf
    zq[:, 5] = -math.inf
    kw = dict(epsilon=0.05, tol=1e-12, n_iters=100000, reduction="none")
    got = sinkhorn_divergence(zp, zq, C, debiased=False, **kw)
    keep_p, keep_q = [0, 1, 3, 4, 5, 6], [0, 1, 2, 3, 4, 6]
    want = sinkhorn_divergence(
        zp[:, keep_p], zq[:, keep_q], C[keep_p][:, keep_q], debiased=False, **kw
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_float32_inputs_give_float32_close_to_float64():
    zp, zq, _ = _problem(13, n=12, m=12, pairs=4)
    x32 = zp.float().requires_grad_(True)
    v32 = sinkhorn_divergence(x32, zq.float(), epsilon=0.01)
    v32.backward()
    x64 = zp.clone().requires_grad_(True)
    v64 = sinkhorn_divergence(x64, zq, epsilon=0.01)
    v64.backward()
    assert v32.dtype == torch.float32 and x32.grad.dtype == torch.float32
    assert abs(v32.item() - v64.item()) <= 1e-6 * abs(v64.item())
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)


def test_report_and_nonconvergence_warning():
    zp, zq, _ = _problem(14, n=50, m=50, pairs=3)
    _, rep = sinkhorn_divergence(zp, zq, epsilon=1e-3, tol=1e-9, return_report=True)
    assert rep.converged and 0 < rep.marginal_error <= 1e-9 and rep.iterations >= 1
    with pytest.warns(RuntimeWarning, match="marginal error"):
        _, bad = sinkhorn_divergence(
            zp, zq, epsilon=1e-3, n_iters=1, scaling=None, tol=1e-12, return_report=True
        )
    assert not bad.converged and bad.marginal_error > 1e-12 and bad.iterations == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sinkhorn_divergence(zp, zq, epsilon=1e-1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(q=torch.zeros(3, 5)), "leading shapes"),
        (dict(q=torch.zeros(2, 4)), "bins"),
        (dict(cost=torch.ones(4, 5)), "cost shape"),
        (dict(cost=-torch.ones(5, 5)), "negative"),
        (dict(cost=torch.full((5, 5), math.nan)), "NaN or inf"),
        (dict(cost=torch.rand(5, 5, generator=_gen(0)) + torch.eye(5)), "symmetric"),
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=-1.0), "epsilon"),
        (dict(epsilon=math.nan), "epsilon"),
        (dict(n_iters=0), "n_iters"),
        (dict(tol=0.0), "tol"),
        (dict(temperature=0.0), "temperature"),
        (dict(reduction="batchmean"), "reduction"),
        (dict(scaling=1.5), "scaling"),
        (dict(domain="fast"), "domain"),
        (dict(released=True), "released"),
        (dict(p=torch.tensor([[0.0, math.nan, 1.0, 2.0, 3.0]] * 2)), "p_logits: row 0 holds NaN"),
        (dict(q=torch.tensor([[0.0, 1.0, 2.0, 3.0, math.inf]] * 2)), "q_logits: row 0 holds"),
        (dict(q=torch.full((2, 5), -math.inf)), "all -inf"),
        (dict(p=torch.zeros(2, 5, dtype=torch.long)), "floating"),
        (dict(batchwise=True, p=torch.zeros(2, 3, 5), q=torch.zeros(2, 3, 5)), "batchwise"),
        (dict(batchwise=True, cost=torch.ones(2, 2)), "callable"),
    ],
)
def test_bad_input_raises_naming_it(kwargs, match):
    p = kwargs.pop("p", torch.zeros(2, 5))
    q = kwargs.pop("q", torch.zeros(2, 5))
    with pytest.raises(ValueError, match=match):
        sinkhorn_divergence(p, q, **kwargs)

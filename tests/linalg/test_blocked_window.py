"""BlockedGradientWindow against the explicit block-diagonal inverse (float64), against dense
windows run on each block's slice alone, and the bfloat16 window against float64 algebra on
the same rounded gradients."""

import itertools

import pytest
import torch

from torchsteer.linalg.blocked_window import BlockedGradientWindow, block_bounds
from torchsteer.linalg.gradient_window import GradientWindow, NonFiniteGradientError

F64 = torch.float64


def ring(history, m, d):
    """The window as the spec defines it: the last m gradients, zero rows while filling."""
    rows = torch.zeros(m, d, dtype=F64)
    for i, g in enumerate(history[-m:]):
        rows[(len(history) - len(history[-m:]) + i) % m] = g.double()
    return rows


def block_inverse_product(rows, g, bounds, damp):
    """(F^{-1} g)_k = (damp I + G_k^T G_k / m)^{-1} g_k, every block by an explicit solve."""
    m = rows.shape[0]
    out = torch.empty(g.numel(), dtype=F64)
    for lo, hi in itertools.pairwise(bounds):
        gk = rows[:, lo:hi]
        fisher = damp * torch.eye(hi - lo, dtype=F64) + gk.T @ gk / m
        out[lo:hi] = torch.linalg.solve(fisher, g[lo:hi].double())
    return out


def assert_blocks_close(u, want, bounds, tol=1e-9):
    """Every block's relative error |u_k - want_k| / |want_k| below ``tol`` (the dense
    window's test uses the same bound: the explicit solve rounds by cond(F_k) eps too)."""
    for lo, hi in itertools.pairwise(bounds):
        err = float((u[lo:hi] - want[lo:hi]).norm() / want[lo:hi].norm())
        assert err < tol, (lo, hi, err)


def test_block_bounds():
    assert block_bounds(10, 4) == (0, 4, 8, 10)
    assert block_bounds(8, 4) == (0, 4, 8)
    assert block_bounds(3, 10) == (0, 3)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="block_size"):
            block_bounds(10, bad)


# (6, 50, 7): blocks narrower than m (the last holds 1 coordinate) have a rank-deficient Gram,
# cond(m damp I + K_k) ~ 1 + |g_k|^2 / (m damp) ~ 1e4, and the dense window's O(m^2)
# updates drift by ~cond * eps per step between refreshes: 1e-8 there.
@pytest.mark.parametrize(
    "m, d, block_size, damp, tol",
    [(4, 10, 4, 1e-2, 1e-9), (6, 50, 7, 1e-3, 1e-8), (3, 9, 3, 1.0, 1e-9)],
)
def test_every_block_equals_the_explicit_inverse_through_wraparound(m, d, block_size, damp, tol):
    gen = torch.Generator().manual_seed(m * d)
    window = BlockedGradientWindow(m, d, block_size, damp, dtype=F64)
    bounds = block_bounds(d, block_size)
    assert window.n_blocks == len(bounds) - 1 > 1
    history = []
    for _ in range(3 * m + 1):  # the ring wraps three times
        g = torch.randn(d, generator=gen, dtype=F64) * 3.0
        history.append(g)
        u = window.add_and_solve(g)
        want = block_inverse_product(ring(history, m, d), g, bounds, damp)
        assert_blocks_close(u, want, bounds, tol)
    v = torch.randn(d, generator=gen, dtype=F64)
    rows = ring(history, m, d)
    assert_blocks_close(window.solve(v), block_inverse_product(rows, v, bounds, damp), bounds, tol)
    dense_inverse = torch.zeros(d, d, dtype=F64)
    for lo, hi in itertools.pairwise(bounds):
        gk = rows[:, lo:hi]
        dense_inverse[lo:hi, lo:hi] = torch.linalg.inv(damp * torch.eye(hi - lo, dtype=F64)
                                                       + gk.T @ gk / m)  # fmt: skip
    assert_blocks_close(window.inverse_diagonal(), dense_inverse.diagonal(), bounds, tol)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_each_block_is_bitwise_the_dense_window_on_its_slice(dtype):
    """The same code on the same numbers: block k of the blocked window and a dense
    GradientWindow fed only g[b_k:b_{k+1}] agree (bitwise on this machine's BLAS; to one
    rounding of a pass in general, since a BLAS may sum a strided column block in another
    order than a contiguous one), also across refreshes."""
    m, d, block_size = 8, 1000, 300
    window = BlockedGradientWindow(m, d, block_size, 1e-4, dtype=dtype)
    bounds = block_bounds(d, block_size)
    dense = [GradientWindow(m, hi - lo, 1e-4, dtype=dtype) for lo, hi in itertools.pairwise(bounds)]
    gen = torch.Generator().manual_seed(0)
    tol = dict(rtol=1e-12, atol=0) if dtype == F64 else dict(rtol=1e-4, atol=1e-6)
    for _ in range(3 * m):
        g = (torch.randn(d, generator=gen) * 2).to(dtype)
        u = window.add_and_solve(g)
        for w, lo, hi in zip(dense, bounds, bounds[1:]):
            torch.testing.assert_close(u[lo:hi], w.add_and_solve(g[lo:hi]), **tol)
    for k, (w, lo, hi) in enumerate(zip(dense, bounds, bounds[1:])):
        assert torch.equal(window.grads[:, lo:hi], w.grads)
        torch.testing.assert_close(window.gram[k], w.gram, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(window.inverse[k], w.inverse, rtol=1e-5, atol=1e-12)


def test_nonfinite_gradient_in_one_block_leaves_every_block_unchanged():
    window = BlockedGradientWindow(3, 12, 4, 0.1, dtype=F64)
    window.add_and_solve(torch.randn(12, dtype=F64))
    before = {k: v.clone() for k, v in window.state_dict().items()}
    for bad in (float("nan"), float("inf")):
        g = torch.randn(12, dtype=F64)
        g[10] = bad  # the last block only
        with pytest.raises(NonFiniteGradientError):
            window.add_and_solve(g)
        for k, v in window.state_dict().items():
            assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="shape"):
        window.add_and_solve(torch.randn(11, dtype=F64))


def test_state_dict_round_trip_continues_bit_for_bit_and_bad_shapes_are_refused():
    gen = torch.Generator().manual_seed(5)
    a = BlockedGradientWindow(4, 30, 8, 1e-3, dtype=torch.float32, refresh_every=3)
    for _ in range(6):
        a.add_and_solve(torch.randn(30, generator=gen))
    b = BlockedGradientWindow(4, 30, 8, 1e-3, dtype=torch.float32, refresh_every=3)
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    for _ in range(6):  # through Cholesky refreshes of each block
        g = torch.randn(30, generator=gen)
        assert torch.equal(a.add_and_solve(g), b.add_and_solve(g))
    other = BlockedGradientWindow(4, 30, 10, 1e-3)  # 3 blocks, not 4
    with pytest.raises(ValueError, match="gram"):
        other.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="damp"):
        BlockedGradientWindow(4, 30, 8, 1e-2).load_state_dict(a.state_dict())


def test_bfloat16_window_computes_in_float32():
    """bf16 storage, float32 passes, float64 Gram and inverse. Oracle: the float64 explicit
    block inverse applied to the *same* bf16-rounded gradients, so storage rounding is not
    an error here; what is left is float32 arithmetic. A float32 pass over d_b = 512 terms
    errs by about sqrt(d_b) eps32 = 3e-6 relative and the Woodbury form m G^T M e_j does not
    amplify it on well-spread gradients (see docs/mfac.md: 4e-6 at damp 1e-5), so 1e-4 is
    a safe bound. It is far below what bf16 arithmetic would give (eps_bf16 = 7.8e-3 per
    rounding): the product against the unrounded gradients, shown below, is off by > 1e-3."""
    m, d, block_size, damp = 16, 1536, 512, 1e-3
    gen = torch.Generator().manual_seed(7)
    window = BlockedGradientWindow(m, d, block_size, damp, dtype=torch.bfloat16)
    assert window.grads.dtype == torch.bfloat16 and window.compute_dtype == torch.float32
    bounds, rounded, exact = block_bounds(d, block_size), [], []
    worst = storage = 0.0
    for _ in range(2 * m):
        g = torch.randn(d, generator=gen, dtype=F64)
        gb = g.to(torch.bfloat16)
        rounded.append(gb.double())
        exact.append(g)
        u = window.add_and_solve(gb.float())
        assert u.dtype == torch.float32
        want = block_inverse_product(ring(rounded, m, d), gb.double(), bounds, damp)
        worst = max(worst, float((u.double() - want).norm() / want.norm()))
        raw = block_inverse_product(ring(exact, m, d), g, bounds, damp)
        storage = max(storage, float((raw - want).norm() / raw.norm()))
    assert worst < 1e-4
    assert storage > 1e-3  # the bf16 rounding the oracle shares: 10x beyond the tolerance

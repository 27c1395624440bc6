"""GradientWindow against the dense float64 inverse of F = damp I + (1/m) W^T W."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchsteer.linalg.gradient_window import GradientWindow, NonFiniteGradientError

F64 = torch.float64


def dense_fisher(rows: list[torch.Tensor], m: int, d: int, damp: float) -> torch.Tensor:
    """damp I + (1/m) W^T W with W the given rows padded by zero rows to m (divisor m)."""
    w = torch.zeros(m, d, dtype=F64)
    for i, r in enumerate(rows):
        w[i] = r
    return damp * torch.eye(d, dtype=F64) + w.T @ w / m


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("refresh_every", [1, 3, None, 1000])
def test_dynamic_product_equals_dense_solve_through_wraparound(refresh_every):
    m, d, damp = 4, 9, 1e-2
    gen = torch.Generator().manual_seed(0)
    window = GradientWindow(m, d, damp, dtype=F64, refresh_every=refresh_every)
    history = []
    for t in range(3 * m + 1):  # wraps around three times
        g = torch.randn(d, generator=gen, dtype=F64) * (1.0 + t)
        history.append(g)
        u = window.add_and_solve(g)
        f = dense_fisher(history[-m:], m, d, damp)  # row order is irrelevant (see below)
        assert rel_err(u, torch.linalg.solve(f, g)) < 1e-9
        v = torch.randn(d, generator=gen, dtype=F64)
        assert rel_err(window.solve(v), torch.linalg.solve(f, v)) < 1e-9
        assert window.count == min(t + 1, m) and window.index == (t + 1) % m
    assert window.robust_refreshes == 0
    # the ring holds the last m gradients, slot t % m
    for t in range(len(history) - m, len(history)):
        assert torch.equal(window.grads[t % m], history[t])


def test_empty_window_is_identity_over_damp():
    window = GradientWindow(5, 7, 0.3, dtype=F64)
    v = torch.randn(7, dtype=F64)
    assert torch.allclose(window.solve(v), v / 0.3, rtol=1e-14, atol=0)


def test_single_gradient_closed_form():
    m, d, damp = 6, 11, 0.05
    g = torch.randn(d, dtype=F64)
    window = GradientWindow(m, d, damp, dtype=F64)
    u = window.add_and_solve(g)
    expected = g / (damp + g.dot(g) / m)  # along g, divisor m although one row is filled
    assert rel_err(u, expected) < 1e-12
    v = torch.randn(d, dtype=F64)
    v -= v.dot(g) / g.dot(g) * g  # orthogonal to the only gradient
    assert rel_err(window.solve(v), v / damp) < 1e-10


def test_vector_orthogonal_to_window_is_scaled_by_one_over_damp():
    m, d, damp = 5, 12, 1e-3
    gen = torch.Generator().manual_seed(1)
    window = GradientWindow(m, d, damp, dtype=F64)
    for _ in range(m + 2):
        window.add(torch.randn(d, generator=gen, dtype=F64))
    q, _ = torch.linalg.qr(window.grads.T)  # basis of the span of the stored rows
    v = torch.randn(d, generator=gen, dtype=F64)
    v -= q @ (q.T @ v)
    assert rel_err(window.solve(v), v / damp) < 1e-9


def test_row_order_does_not_matter():
    m, d, damp = 5, 8, 1e-2
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randn(d, generator=gen, dtype=F64) for _ in range(m)]
    a, b = GradientWindow(m, d, damp, dtype=F64), GradientWindow(m, d, damp, dtype=F64)
    for r in rows:
        a.add(r)
    for i in torch.randperm(m, generator=gen).tolist():
        b.add(rows[i])
    v = torch.randn(d, generator=gen, dtype=F64)
    assert rel_err(a.solve(v), b.solve(v)) < 1e-11
    assert rel_err(a.inverse_diagonal(), b.inverse_diagonal()) < 1e-11


def test_static_product_diagonal_and_saliency_equal_dense_inverse():
    m, d, damp = 6, 10, 1e-2
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(m, d, generator=gen, dtype=F64)
    window = GradientWindow.from_gradients(grads, damp)
    inv = torch.linalg.inv(dense_fisher(list(grads), m, d, damp))
    x = torch.randn(d, generator=gen, dtype=F64)
    assert rel_err(window.solve(x), inv @ x) < 1e-10
    diag = window.inverse_diagonal(block_size=3)  # several column blocks
    assert rel_err(diag, inv.diagonal()) < 1e-10
    w = torch.randn(d, generator=gen, dtype=F64)
    assert rel_err(window.obs_saliency(w), w**2 / (2 * inv.diagonal())) < 1e-10


def test_diagonal_after_wraparound_and_rebuild_match_incremental():
    m, d, damp = 3, 7, 0.1
    gen = torch.Generator().manual_seed(4)
    window = GradientWindow(m, d, damp, dtype=F64)
    history = [torch.randn(d, generator=gen, dtype=F64) for _ in range(2 * m + 1)]
    for g in history:
        window.add(g)
    inv = torch.linalg.inv(dense_fisher(history[-m:], m, d, damp))
    assert rel_err(window.inverse_diagonal(), inv.diagonal()) < 1e-10
    rebuilt = GradientWindow(m, d, damp, dtype=F64)
    rebuilt.grads.copy_(window.grads)
    rebuilt.rebuild(block_size=2)
    assert torch.allclose(rebuilt.gram, window.gram, rtol=1e-13, atol=1e-13)
    assert torch.allclose(rebuilt.inverse, window.inverse, rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 6),
    d=st.integers(1, 12),
    log_damp=st.floats(-3.0, 2.0),
    steps=st.integers(0, 14),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_random_shapes_and_damping(m, d, log_damp, steps, seed):
    damp = 10.0**log_damp
    gen = torch.Generator().manual_seed(seed)
    window = GradientWindow(m, d, damp, dtype=F64)
    history = []
    for _ in range(steps):
        g = torch.randn(d, generator=gen, dtype=F64)
        history.append(g)
        u = window.add_and_solve(g)
        f = dense_fisher(history[-m:], m, d, damp)
        assert rel_err(u, torch.linalg.solve(f, g)) < 1e-7
    v = torch.randn(d, generator=gen, dtype=F64)
    f = dense_fisher(history[-m:], m, d, damp)
    assert rel_err(window.solve(v), torch.linalg.solve(f, v)) < 1e-7


def _snapshot(window: GradientWindow) -> dict:
    return {k: v.clone() for k, v in window.state_dict().items()}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradient_is_rejected_and_window_unchanged(bad):
    window = GradientWindow(3, 5, 0.1, dtype=F64)
    for _ in range(4):
        window.add(torch.randn(5, dtype=F64))
    before = _snapshot(window)
    g = torch.randn(5, dtype=F64)
    g[2] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        window.add_and_solve(g)
    with pytest.raises(NonFiniteGradientError):
        window.add(g)
    after = window.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_overflow_of_the_window_dtype_is_rejected_and_float16_computes_in_float32():
    """A float16 window stores in float16 but computes in float32: |g|^2 = 3.6e5 (above the
    float16 maximum 65504) is fine and the product is the closed form g / (damp + |g|^2/m);
    entries that overflow float16 storage (1e5) are rejected with the window unchanged."""
    window = GradientWindow(2, 4, 0.1, dtype=torch.float16)
    with pytest.raises(NonFiniteGradientError):
        window.add(torch.full((4,), 1e5))
    assert window.count == 0 and not window.grads.any()
    g = torch.full((4,), 300.0)
    u = window.add_and_solve(g)
    torch.testing.assert_close(u, g / (0.1 + 3.6e5 / 2), rtol=1e-6, atol=0)


def test_bad_shapes_and_hyperparameters():
    window = GradientWindow(2, 4, 0.1)
    with pytest.raises(ValueError, match="shape"):
        window.add(torch.zeros(5))
    with pytest.raises(ValueError, match="shape"):
        window.solve(torch.zeros(2, 2))
    for kwargs, text in [
        (dict(ngrads=0, dim=3), "ngrads"),
        (dict(ngrads=2, dim=0), "dim"),
        (dict(ngrads=2, dim=3, damp=0.0), "damp"),
        (dict(ngrads=2, dim=3, damp=float("nan")), "damp"),
        (dict(ngrads=2, dim=3, refresh_every=0), "refresh_every"),
        (dict(ngrads=2, dim=3, dtype=torch.int32), "dtype"),
    ]:
        with pytest.raises(ValueError, match=f"Invalid {text}"):
            GradientWindow(**kwargs)


def test_state_dict_round_trip_continues_bit_for_bit():
    m, d, damp = 4, 6, 1e-2
    gen = torch.Generator().manual_seed(5)
    a = GradientWindow(m, d, damp, dtype=F64, refresh_every=3)
    for _ in range(6):
        a.add(torch.randn(d, generator=gen, dtype=F64))
    b = GradientWindow(m, d, damp, dtype=F64, refresh_every=3)
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    for _ in range(2 * m):
        g = torch.randn(d, generator=gen, dtype=F64)
        assert torch.equal(a.add_and_solve(g), b.add_and_solve(g))
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    with pytest.raises(ValueError, match="damp"):
        GradientWindow(m, d, 0.5, dtype=F64).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="grads"):
        GradientWindow(m, d + 1, damp, dtype=F64).load_state_dict(a.state_dict())


def test_float32_window_is_accurate_where_float32_can_be():
    """The step's form m G^T M e_j keeps float32 accurate at damp 1e-5; the primal form
    (g - G^T c) / damp loses |g|^2 / (m damp) to cancellation."""
    m, d, damp = 8, 400, 1e-5
    gen = torch.Generator().manual_seed(6)
    w32 = GradientWindow(m, d, damp, dtype=torch.float32)
    history = []
    for _ in range(m + 3):
        g = (torch.randn(d, generator=gen) / d**0.5).to(torch.float32)
        history.append(g.double())
        u = w32.add_and_solve(g)
        truth = torch.linalg.solve(dense_fisher(history[-m:], m, d, damp), g.double())
        assert rel_err(u.double(), truth) < 1e-4


def test_nearly_dependent_large_float32_gradients_stay_bounded():
    """Float32 Gram rounding (~1e-7 |g|^2) far above m damp: the window cannot be accurate,
    but the product stays finite and within the bound ||F^{-1} g|| <= ||g|| / damp."""
    m, d, damp = 8, 3000, 1e-5
    gen = torch.Generator().manual_seed(7)
    base = 30.0 * torch.randn(3, d, generator=gen)
    window = GradientWindow(m, d, damp, dtype=torch.float32)
    for t in range(3 * m):
        g = base[t % 3] + 1e-4 * torch.randn(d, generator=gen)
        u = window.add_and_solve(g).double()
        assert torch.isfinite(u).all()
        assert float(u.norm()) <= float(g.double().norm()) / damp * 1.01
    assert torch.isfinite(window.inverse).all()
    assert window.robust_refreshes > 0  # the regime this test is about was reached


def test_refresh_keeps_products():
    m, d, damp = 4, 6, 1e-2
    gen = torch.Generator().manual_seed(8)
    window = GradientWindow(m, d, damp, dtype=F64, refresh_every=1000)
    for _ in range(3 * m):
        window.add(torch.randn(d, generator=gen, dtype=F64))
    v = torch.randn(d, generator=gen, dtype=F64)
    before = window.solve(v)
    window.refresh()
    assert rel_err(window.solve(v), before) < 1e-10
    window.refresh(robust=True)
    assert rel_err(window.solve(v), before) < 1e-10


class _ThreadShards:
    """``reduce`` for column shards run as threads in one process: sums the shards' tensors."""

    def __init__(self, n: int):
        import threading

        self.barrier = threading.Barrier(n)
        self.parts: dict[int, torch.Tensor] = {}

    def reducer(self, shard: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.parts[shard] = t.clone()
            self.barrier.wait()
            total = sum(self.parts[i] for i in sorted(self.parts))
            self.barrier.wait()  # everyone has read before the next call overwrites
            return total

        return reduce


def test_column_shards_equal_the_whole_window():
    """Two shards of the columns (3 + 4 of d = 7) with a summing ``reduce``: every product,
    the rebuild and the inverse diagonal are the whole window's slices; a NaN in one shard's
    columns is rejected by both and leaves both unchanged."""
    from concurrent.futures import ThreadPoolExecutor

    m, d, damp, cut = 3, 7, 1e-2, 3
    gen = torch.Generator().manual_seed(9)
    grads = [torch.randn(d, generator=gen, dtype=F64) for _ in range(2 * m + 1)]
    v = torch.randn(d, generator=gen, dtype=F64)
    bad = grads[0].clone()
    bad[5] = float("nan")  # in shard 1's columns only
    shards = _ThreadShards(2)

    def run(shard):
        cols = slice(0, cut) if shard == 0 else slice(cut, d)
        window = GradientWindow(
            m, len(range(d)[cols]), damp, dtype=F64, reduce=shards.reducer(shard)
        )
        steps = [window.add_and_solve(g[cols]) for g in grads]
        before = {k: t.clone() for k, t in window.state_dict().items()}
        try:
            window.add(bad[cols])
            rejected = False
        except NonFiniteGradientError:
            rejected = all(torch.equal(before[k], t) for k, t in window.state_dict().items())
        solved = window.solve(v[cols])
        window.rebuild()
        return steps, solved, window.solve(v[cols]), window.inverse_diagonal(), rejected

    with ThreadPoolExecutor(2) as pool:
        (s0, v0, r0, d0, ok0), (s1, v1, r1, d1, ok1) = pool.map(run, (0, 1))
    assert ok0 and ok1
    fisher = dense_fisher(grads[-m:], m, d, damp)
    for t, g in enumerate(grads):
        truth = torch.linalg.solve(dense_fisher(grads[max(0, t - m + 1) : t + 1], m, d, damp), g)
        assert rel_err(torch.cat([s0[t], s1[t]]), truth) < 1e-10
    truth = torch.linalg.solve(fisher, v)
    assert rel_err(torch.cat([v0, v1]), truth) < 1e-10
    assert rel_err(torch.cat([r0, r1]), truth) < 1e-10
    assert rel_err(torch.cat([d0, d1]), torch.linalg.inv(fisher).diagonal()) < 1e-10


def test_identity_reduce_takes_the_shard_path_and_equals_the_plain_window():
    m, d, damp = 3, 5, 1e-2
    gen = torch.Generator().manual_seed(10)
    plain = GradientWindow(m, d, damp, dtype=F64)
    shard = GradientWindow(m, d, damp, dtype=F64, reduce=lambda t: t)
    for _ in range(3 * m):
        g = torch.randn(d, generator=gen, dtype=F64)
        torch.testing.assert_close(
            shard.add_and_solve(g), plain.add_and_solve(g), rtol=1e-12, atol=0
        )
    with pytest.raises(NonFiniteGradientError):
        shard.add(torch.full((d,), float("inf"), dtype=F64))
    with pytest.raises(ValueError, match="gradient shape"):
        shard.add(torch.zeros(d + 1, dtype=F64))


def test_duplicate_float32_gradients_take_the_float64_pass_and_stay_downhill():
    """Exact duplicates: the coefficients x = m M e_j are ~1/damp in directions that G^T
    annihilates, so a float32 pass G^T x cancels to noise (uphill steps); the window notices
    (pass_error) and accumulates in float64, and the solve check refreshes a drifted M.
    Oracle: F^{-1} g = g / (damp + k |g|^2 / m) with k copies of g."""
    m, d, damp = 1024, 500, 1e-5
    g = 3.0 * torch.randn(d, generator=torch.Generator().manual_seed(3))
    window = GradientWindow(m, d, damp, dtype=torch.float32)
    gg = float(g.double() @ g.double())
    for k in range(1, 61):
        u = window.add_and_solve(g).double()
        want = gg / (damp + k * gg / m)
        assert float(g.double() @ u) == pytest.approx(want, rel=1e-2)
    assert window.float64_passes > 0 and window.accuracy_refreshes > 0


def test_independent_float32_gradients_keep_the_fused_pass():
    """Normal input: neither check fires, so the numerics are the plain window's."""
    m, d, damp = 64, 2000, 1e-5
    gen = torch.Generator().manual_seed(4)
    window = GradientWindow(m, d, damp, dtype=torch.float32)
    for t in range(2 * m):
        window.add_and_solve(torch.randn(d, generator=gen) * (1 + t % 5))
        assert window.pass_error <= 1e-2
    assert (window.float64_passes, window.accuracy_refreshes, window.robust_refreshes) == (0, 0, 0)

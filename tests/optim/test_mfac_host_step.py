"""The default MFAC window step (``linalg/_window_host.py``): one read, decided on the host.

Oracle: the host-decided step ``GradientWindow.add_and_coefficients`` (06f44c7's code, kept
for the sharded window), run on a twin window fed the same gradients: every buffer, the ring
position, the diagnostics and the returned coefficients must be equal bit for bit, also on
near-duplicate gradients where the checks fire (robust and accuracy refreshes, the float64
Gram) and across refreshes. A non-finite gradient must leave every buffer as it was.
"""

import pytest
import torch

from tests._sync import SyncCounter
from torchsteer.linalg.blocked_window import BlockedGradientWindow
from torchsteer.linalg.gradient_window import GradientWindow, NonFiniteGradientError

DIAGNOSTICS = ("robust_refreshes", "accuracy_refreshes", "float64_passes", "gram_rebuilds")


def _gradients(dtype, d, steps, noise, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=gen, dtype=dtype)
    out = []
    for _ in range(steps):
        fresh = torch.randn(d, generator=gen, dtype=dtype)
        out.append(base + noise * fresh if noise else fresh)
    return out


def _blocks(w):
    return w.blocks if isinstance(w, BlockedGradientWindow) else [w]


def _assert_windows_equal(a, b):
    for x, y in zip(_blocks(a), _blocks(b)):
        for name in ("grads", "gram", "inverse"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        assert (x.index, x.count, x.since_refresh) == (y.index, y.count, y.since_refresh)
        assert (x.float64_gram, x.calm_steps) == (y.float64_gram, y.calm_steps)
        assert (x.pass_error, x.gram_error) == (y.pass_error, y.gram_error)
        assert [getattr(x, k) for k in DIAGNOSTICS] == [getattr(y, k) for k in DIAGNOSTICS]


def _make(blocked, m, d, damp, dtype):
    if blocked:
        return BlockedGradientWindow(m, d, d // 3 + 1, damp, dtype=dtype)
    return GradientWindow(m, d, damp, dtype=dtype)


CASES = {  # name: (dtype, m, d, damp, steps, noise, gradient indices made non-finite)
    "f32_random": (torch.float32, 8, 500, 1e-4, 30, 0.0, {11: "nan"}),
    "f64_random": (torch.float64, 8, 200, 1e-4, 30, 0.0, {5: "inf"}),
    "f32_near_duplicates": (torch.float32, 16, 300, 1e-4, 50, 1e-6, {20: "overflow"}),
    "f32_duplicates": (torch.float32, 16, 300, 1e-7, 40, 1e-9, {3: "nan"}),
    "bf16_window": (torch.bfloat16, 8, 300, 1e-4, 25, 0.0, {}),
}


def _spoil(g, how):
    g = g.clone()
    if how == "overflow":  # finite numbers whose squared norm overflows float32
        g.fill_(1e30)
    else:
        g[7] = float(how)
    return g


@pytest.mark.parametrize("blocked", [False, True], ids=["dense", "blocked"])
@pytest.mark.parametrize("name", list(CASES))
def test_host_step_equals_the_host_decided_step_bit_for_bit(name, blocked):
    dtype, m, d, damp, steps, noise, spoiled = CASES[name]
    gdtype = torch.float32 if dtype == torch.bfloat16 else dtype
    window, oracle = _make(blocked, m, d, damp, dtype), _make(blocked, m, d, damp, dtype)
    fired = 0
    for t, g in enumerate(_gradients(gdtype, d, steps, noise)):
        if t in spoiled:
            g = _spoil(g, spoiled[t])
        with SyncCounter() as c:
            x = window.settle(window.host_add(g).tolist())
        try:
            want = oracle.add_and_coefficients(g)
        except NonFiniteGradientError:
            want = None
        if want is None:
            assert x is None
        else:
            assert x is not None and torch.equal(x, want)
            calm = all(w.since_refresh > 0 and not w.float64_gram for w in _blocks(window))
            if calm and not any(
                w.robust_refreshes or w.accuracy_refreshes for w in _blocks(window)
            ):
                assert c.total == 1, c.counts  # the one read, where nothing was refreshed
        _assert_windows_equal(window, oracle)
        fired += sum(w.robust_refreshes + w.gram_rebuilds for w in _blocks(window))
    if name.startswith("f32_dup") or name == "f32_near_duplicates":
        assert fired > 0  # the checks' repairs were exercised


@pytest.mark.parametrize("how", ["nan", "inf", "overflow"])
def test_a_non_finite_gradient_changes_nothing(how):
    window = GradientWindow(8, 400, 1e-4, dtype=torch.float32)
    for g in _gradients(torch.float32, 400, 11, 0.0):
        window.settle(window.host_add(g).tolist())
    before = {k: getattr(window, k).clone() for k in ("grads", "gram", "inverse")}
    ring = (window.index, window.count, window.since_refresh)
    bad = _spoil(_gradients(torch.float32, 400, 1, 0.0, seed=3)[0], how)
    assert window.settle(window.host_add(bad).tolist()) is None
    for k, v in before.items():
        assert torch.equal(getattr(window, k), v), k
    assert (window.index, window.count, window.since_refresh) == ring


def test_a_device_step_after_host_steps_sees_the_host_ring():
    """The ring tensor is written lazily after host steps: a device step that follows (and
    its ring) equals one after host-decided steps."""
    a, b = (GradientWindow(8, 300, 1e-4, dtype=torch.float32) for _ in range(2))
    gs = _gradients(torch.float32, 300, 12, 0.0)
    for g in gs[:11]:
        a.settle(a.host_add(g).tolist())
        b.add_and_coefficients(g)
    xa, ra, _ = a.device_add(gs[11])
    xb, rb, _ = b.device_add(gs[11])
    assert torch.equal(a.ring, b.ring) and torch.equal(ra, rb) and torch.equal(xa, xb)
    assert a.ring.tolist()[:2] == [12 % 8, 8]


def _bits(state):
    """Every tensor of a state dict as its raw bits (so -0.0 and 0.0 differ), the rest as is."""
    if isinstance(state, dict):
        return {k: _bits(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return [_bits(v) for v in state]
    if isinstance(state, torch.Tensor) and state.is_floating_point():
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[state.element_size()]
        return state.detach().clone().view(ints).tolist()
    return state.tolist() if isinstance(state, torch.Tensor) else state


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_refused_step_leaves_every_bit_of_the_state(policy):
    """The attack's case (issue 18): one step on an almost empty window (its inverse holds
    -0.0), then a NaN gradient; the state must keep every bit, signs of zero included (the
    device-decided step had rewritten -0.0 as 0.0)."""
    from torchsteer.linalg import NonFiniteGradientError
    from torchsteer.optim import MFAC

    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x, y = torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    opt = MFAC(model.parameters(), lr=1e-2, ngrads=4, nonfinite=policy)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    before = _bits([opt.state_dict(), model.state_dict()])
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    model[2].weight.grad[0, 0] = float("nan")
    if policy == "raise":
        with pytest.raises(NonFiniteGradientError):
            opt.step()
    else:
        opt.step()
    after = _bits([opt.state_dict(), model.state_dict()])
    if policy == "skip":  # a skipped step is counted, nothing else changes
        for s_b, s_a in zip(before[0]["state"].values(), after[0]["state"].values()):
            s_b.pop("skipped_steps", None), s_a.pop("skipped_steps", None)
    assert after == before

"""Sven on factored rows (FactoredRows: the Gram matrix and M^T y without the (B, P) matrix),
on the closure path and the functional path, takes the steps of the dense solve of the
functional path's torch.func Jacobian (factoring switched off: the oracle), with every
setting the factored solve sees; the rare rescale falls back to the dense matrix; bad input
is refused with nothing changed."""

import pytest
import torch
from torch import nn

from tests._sync import SyncCounter
from torchsteer.jacobian.factored import FactoredRows
from torchsteer.optim import Sven, _sven_device

DT = torch.float64


def model_and_data(seed=0, dtype=DT, scale=1.0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(2, 40), nn.GELU(), nn.Linear(40, 40), nn.GELU(), nn.Linear(40, 1)
    ).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(24, 2, generator=g, dtype=dtype)
    return model, x, torch.sin(x.sum(1)) * scale


def counting(monkeypatch):
    calls = {"gram": 0, "dense": 0}
    gram, dense = FactoredRows.gram, FactoredRows.dense

    def counted_gram(self, *a, **k):
        calls["gram"] += 1
        return gram(self, *a, **k)

    def counted_dense(self, *a, **k):
        calls["dense"] += 1
        return dense(self, *a, **k)

    monkeypatch.setattr(FactoredRows, "gram", counted_gram)
    monkeypatch.setattr(FactoredRows, "dense", counted_dense)
    return calls


def run_both(settings, steps=4, dtype=DT, scale=1.0):
    m_closure, x, y = model_and_data(dtype=dtype, scale=scale)
    m_functional, _, _ = model_and_data(dtype=dtype, scale=scale)

    def per_sample(out, y):
        return (scale * out.squeeze(-1) - y) ** 2

    a = Sven(m_closure.parameters(), **settings)
    b = Sven(m_functional.parameters(), **settings, model=m_functional, loss_fn=per_sample)
    b._factored_ok = lambda rows, path: False  # the oracle: torch.func's dense Jacobian
    for _ in range(steps):
        a.step(lambda: per_sample(m_closure(x), y))
        b.step(batch=(x, y))
    return m_closure, m_functional, a, b


SETTINGS = {
    "default": dict(lr=0.3, rank=8),
    "kappa 1": dict(lr=0.3, rank=8, kappa=1.0),
    "damped": dict(lr=0.3, rank=12, damping=0.05),
    "rtol": dict(lr=0.3, rank=24, rtol=0.05),
    "momentum": dict(lr=0.2, rank=8, momentum=0.9),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_factored_closure_path_takes_the_functional_steps(monkeypatch, name):
    calls = counting(monkeypatch)
    m_closure, m_functional, a, b = run_both(SETTINGS[name])
    assert calls == {"gram": 4, "dense": 0}  # every closure step solved on the factors
    for p, q in zip(m_closure.parameters(), m_functional.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
    first = next(m_closure.parameters())
    sa, sb = a.state[first], b.state[next(m_functional.parameters())]
    for key in ("kept_rank", "sigma_max", "sigma_min", "linearized_reduction"):
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-9, atol=1e-11)


def test_float64_gram_of_a_float32_model(monkeypatch):
    calls = counting(monkeypatch)
    settings = dict(lr=0.3, rank=8, gram_dtype=torch.float64)
    m_closure, m_functional, _, _ = run_both(settings, steps=2, dtype=torch.float32)
    assert calls["gram"] == 2
    for p, q in zip(m_closure.parameters(), m_functional.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_micro_batches_take_the_dense_rows(monkeypatch):
    calls = counting(monkeypatch)
    m_closure, m_functional, _, _ = run_both(dict(lr=0.3, rank=4, microbatch_size=4), steps=2)
    assert calls == {"gram": 0, "dense": 0}
    for p, q in zip(m_closure.parameters(), m_functional.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


def test_an_out_of_band_spectrum_is_rescaled_on_the_dense_matrix(monkeypatch):
    calls = counting(monkeypatch)  # S_max ~ 2^40 > 2^30: the solve is redone on s_M M
    m_closure, m_functional, a, _ = run_both(dict(lr=0.3, rank=8), steps=2, scale=2.0**40)
    assert calls == {"gram": 2, "dense": 2}
    assert float(a.state[next(m_closure.parameters())]["sigma_max"]) > 2.0**30
    for p, q in zip(m_closure.parameters(), m_functional.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("where", ["input", "target"])
def test_nan_is_refused_with_nothing_changed(monkeypatch, where):
    counting(monkeypatch)
    model, x, y = model_and_data()
    if where == "input":
        x[3, 0] = float("nan")
    else:
        y[5] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    opt = Sven(model.parameters(), lr=0.3, rank=8)
    with pytest.raises(ValueError, match="Invalid per-sample losses: contains NaN or Inf"):
        opt.step(lambda: (model(x).squeeze(-1) - y) ** 2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert len(opt.state) == 0
    skip = Sven(model.parameters(), lr=0.3, rank=8, nonfinite="skip")
    skip.step(lambda: (model(x).squeeze(-1) - y) ** 2)  # counted (warned after a run)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert int(skip.state[next(model.parameters())]["skipped_steps"]) == 1


def test_a_factored_step_reads_the_host_once(monkeypatch):
    monkeypatch.setattr(_sven_device, "FREE_READS", ())  # the device path's reads, on the CPU
    calls = counting(monkeypatch)
    model, x, y = model_and_data(dtype=torch.float32)
    opt = Sven(model.parameters(), lr=0.3, rank=8)
    opt.step(lambda: (model(x).squeeze(-1) - y) ** 2)
    with SyncCounter() as counter:
        opt.step(lambda: (model(x).squeeze(-1) - y) ** 2)
    assert calls["gram"] == 2 and dict(counter.counts) == {"tolist": 1}  # the verdict only


def test_the_functional_path_factors_too_and_takes_the_dense_steps(monkeypatch):
    calls = counting(monkeypatch)
    m_oracle, x, y = model_and_data()
    m_factored, _, _ = model_and_data()

    def per_sample(out, y):
        return (out.squeeze(-1) - y) ** 2

    a = Sven(m_factored.parameters(), lr=0.3, rank=8, model=m_factored, loss_fn=per_sample)
    b = Sven(m_oracle.parameters(), lr=0.3, rank=8, model=m_oracle, loss_fn=per_sample)
    b._factored_ok = lambda rows, path: False
    for _ in range(3):
        a.step(batch=(x, y))
        b.step(batch=(x, y))
    assert calls == {"gram": 3, "dense": 0}
    for p, q in zip(m_factored.parameters(), m_oracle.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


def test_one_factored_step_is_the_truncated_pseudoinverse_step():
    model, x, y = model_and_data()
    params = list(model.parameters())
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def losses_of(flat):
        chunks, start = {}, 0
        for name, p in model.named_parameters():
            chunks[name] = flat[start : start + p.numel()].view_as(p)
            start += p.numel()
        out = torch.func.functional_call(model, chunks, (x,))
        return (out.squeeze(-1) - y) ** 2

    J = torch.autograd.functional.jacobian(losses_of, theta)  # (B, P) float64
    U, S, Vh = torch.linalg.svd(J, full_matrices=False)
    k = 8
    expected = theta - 0.3 * (Vh[:k].T @ ((U[:, :k].T @ losses_of(theta)) / S[:k]))
    opt = Sven(params, lr=0.3, rank=k, rtol=0.0)
    opt.step(lambda: (model(x).squeeze(-1) - y) ** 2)
    got = torch.cat([p.detach().reshape(-1) for p in params])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


def test_max_abs_bounds_the_entries_and_is_exact_for_one_position():
    from ..jacobian.test_factored import captured

    for name, exact in (("mlp", True), ("positions", False)):
        cap, losses, J, _ = captured(name)
        F = cap.factors(losses)
        s = torch.linspace(-2.0, 3.0, J.shape[0], dtype=DT)
        true = (s.unsqueeze(1) * J).abs().max()
        bound = F.scaled(s).max_abs()
        if exact:
            torch.testing.assert_close(bound, true, rtol=1e-15, atol=0.0)
        else:
            assert true <= bound  # a bound: sum_t |g_t| |x_t|^T over T = 2 positions
    F.factors[0][1][0, 0, 0] = float("nan")
    assert torch.isnan(F.max_abs())


def test_masked_skip_steps_on_factors_take_the_dense_steps_and_skip_a_nan_batch(monkeypatch):
    calls = counting(monkeypatch)
    m_closure, x, y = model_and_data()
    m_oracle, _, _ = model_and_data()
    bad = x.clone()
    bad[2, 1] = float("nan")

    def per_sample(out, y):
        return (out.squeeze(-1) - y) ** 2

    a = Sven(m_closure.parameters(), lr=0.3, rank=8, nonfinite="skip")
    b = Sven(m_oracle.parameters(), lr=0.3, rank=8, nonfinite="skip")
    b._factored_ok = lambda rows, path: False
    reads = []
    for xs in (x, x, bad, x, x):
        with SyncCounter() as counter:
            a.step(lambda xs=xs: per_sample(m_closure(xs), y))
        reads.append(sum(counter.counts.values()))
        b.step(lambda xs=xs: per_sample(m_oracle(xs), y))
    assert calls["gram"] == 5 and calls["dense"] == 0
    assert reads[1:] == [0, 0, 0, 0]  # masked steps: no host read, the NaN batch included
    first_a, first_b = next(m_closure.parameters()), next(m_oracle.parameters())
    assert int(a.state[first_a]["skipped_steps"]) == 1 == int(b.state[first_b]["skipped_steps"])
    for p, q in zip(m_closure.parameters(), m_oracle.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)

"""KL-DRO weights: closed forms, limits, streaming and class-level state, bad input, DDP."""

from __future__ import annotations

import copy
import math

import pytest
import scipy.stats
import torch

from torchsteer.control.dro import DROWeighting, kl_dro_value, kl_dro_weights

D = torch.float64


# -- the closed forms of the spec ---------------------------------------------------------
def test_two_point_closed_form():
    losses = torch.tensor([0.0, math.log(3.0)], dtype=D)
    torch.testing.assert_close(kl_dro_weights(losses, 1.0), torch.tensor([0.25, 0.75], dtype=D))
    torch.testing.assert_close(kl_dro_value(losses, 1.0), torch.tensor(math.log(2.0), dtype=D))


@pytest.mark.parametrize("r", [0.3, 1.0, 4.0])
def test_value_gradient_is_softmax(r):
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(7, generator=g, dtype=D).mul(3).requires_grad_(True)
    (grad,) = torch.autograd.grad(kl_dro_value(losses, r), losses)
    torch.testing.assert_close(grad, torch.softmax(losses.detach() / r, 0))


@pytest.mark.parametrize("r", [0.5, 2.0])
def test_value_is_the_kl_regularized_maximum(r):
    """max_w sum w l - r KL(w || uniform): attained at w*, no random w does better."""
    g = torch.Generator().manual_seed(1)
    losses = torch.randn(6, generator=g, dtype=D)
    n = losses.numel()

    def objective(w):
        return (w * losses).sum() - r * (w * (w * n).log()).sum()

    w_star = kl_dro_weights(losses, r)
    torch.testing.assert_close(objective(w_star), kl_dro_value(losses, r))
    for _ in range(50):
        w = torch.distributions.Dirichlet(torch.ones(n, dtype=D)).sample()
        assert objective(w) <= kl_dro_value(losses, r) + 1e-12


def test_limits():
    losses = torch.tensor([0.3, 2.0, 1.1, -0.4], dtype=D)
    torch.testing.assert_close(kl_dro_weights(losses, 1e7), torch.full((4,), 0.25, dtype=D))
    torch.testing.assert_close(kl_dro_value(losses, 1e7), losses.mean(), rtol=0, atol=1e-6)
    torch.testing.assert_close(kl_dro_weights(losses, 1e-3), torch.tensor([0, 1, 0, 0.0], dtype=D))
    # r -> 0: the value tends to the maximum loss (gap r log n)
    assert abs(float(kl_dro_value(losses, 1e-3)) - 2.0) <= 1e-3 * math.log(4) + 1e-12


def test_group_dro_step():
    dro = DROWeighting(class_level=True, num_classes=2, class_step=0.01)
    dro(torch.tensor([1.0, 2.0], dtype=D), torch.tensor([0, 1]))
    expected = torch.tensor([1.0, math.exp(0.01)], dtype=D) / (1 + math.exp(0.01))
    torch.testing.assert_close(dro.class_weights, expected)
    torch.testing.assert_close(
        dro.class_weights, torch.tensor([0.4975, 0.5025], dtype=D), atol=1e-4, rtol=0
    )


# -- DROWeighting in batch mode ---------------------------------------------------------------
def test_batch_weights_and_gradient():
    g = torch.Generator().manual_seed(2)
    losses = torch.rand(9, generator=g, dtype=D).mul(2).requires_grad_(True)
    dro = DROWeighting(temperature=0.7)
    loss = dro(losses)
    w = 9 * torch.softmax(losses.detach() / 0.7, 0)
    torch.testing.assert_close(dro.last_weights, w)
    torch.testing.assert_close(loss, (w * losses.detach()).mean())
    (grad,) = torch.autograd.grad(loss, losses)
    # the weights are detached: d loss / d l_i = w_i / B = d value / d l_i
    (grad_value,) = torch.autograd.grad(kl_dro_value(losses, 0.7), losses)
    torch.testing.assert_close(grad, grad_value)


def test_class_level_batch_weights():
    losses = torch.tensor([0.2, 1.5, 0.7, 2.5, 0.1], dtype=D)
    labels = torch.tensor([0, 1, 1, 2, 0])
    dro = DROWeighting(temperature=2.0, class_level=True, num_classes=3, class_step=0.1)
    w = dro.weights(losses, labels)
    class_loss = torch.tensor([0.15, 1.1, 2.5], dtype=D)
    q = torch.softmax(0.1 * class_loss, 0)  # from the uniform q
    torch.testing.assert_close(dro.class_weights, q)
    p = (losses / 2.0).exp() * q[labels]
    torch.testing.assert_close(w, 5 * p / p.sum())


def test_clip_and_warmup():
    losses = torch.tensor([0.0, 0.0, 5.0], dtype=D)
    dro = DROWeighting(temperature=1.0, max_weight=2.0, warmup_steps=2, mode="streaming")
    for _ in range(2):
        torch.testing.assert_close(dro.weights(losses), torch.ones(3, dtype=D))
    assert dro.log_normalizer is not None  # the normalizer tracked the warm-up
    w = dro.weights(losses)
    u = (losses.exp().mean()).item()  # every batch is the same, so u is its mean
    torch.testing.assert_close(w, (losses.exp() / u).clamp(max=2.0))
    assert float(w.max()) == 2.0 and dro.step == 3


# -- streaming mode ----------------------------------------------------------------------------
def _stream(seed, n_batches=6, batch=5, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, generator=g, dtype=D) * 3 + shift for _ in range(n_batches)]


@pytest.mark.parametrize("gamma", [0.1, 0.5, 1.0])
def test_streaming_against_direct_computation(gamma):
    r = 0.8
    dro = DROWeighting(temperature=r, mode="streaming", momentum=gamma)
    u = None
    for losses in _stream(3):
        batch_u = (losses / r).exp().mean().item()
        u = batch_u if u is None else (1 - gamma) * u + gamma * batch_u
        torch.testing.assert_close(dro.weights(losses), (losses / r).exp() / u)
        assert dro.log_normalizer == pytest.approx(math.log(u), rel=1e-12)


def test_streaming_is_stable_in_log_space():
    """Shifting every loss by c leaves w_i = e^{l_i/r} / u unchanged; e^{1000} overflows."""
    a = DROWeighting(temperature=1.0, mode="streaming")
    b = DROWeighting(temperature=1.0, mode="streaming")
    for small, big in zip(_stream(4), _stream(4, shift=1000.0)):
        torch.testing.assert_close(a.weights(small), b.weights(big))


def test_streaming_class_level():
    r, gamma, eta = 1.5, 0.3, 0.05
    dro = DROWeighting(r, "streaming", gamma, class_level=True, num_classes=3, class_step=eta)
    g = torch.Generator().manual_seed(5)
    log_q = torch.full((3,), -math.log(3), dtype=D)
    u = None
    for losses in _stream(5):
        y = torch.randint(0, 3, (5,), generator=g)
        sums = torch.zeros(3, dtype=D).index_add_(0, y, losses)
        counts = torch.bincount(y, minlength=3).to(D).clamp(min=1)
        log_q = torch.log_softmax(log_q + eta * sums / counts, 0)
        batch_u = (losses / r).exp().mean().item()
        u = batch_u if u is None else (1 - gamma) * u + gamma * batch_u
        expected = (losses / r).exp() / u * 3 * log_q.exp()[y]
        torch.testing.assert_close(dro.weights(losses, y), expected)


def _running_class_reference(stream, num_classes, eta, beta):
    """Slow reference of the running class losses and the EG step on them."""
    run = [None] * num_classes
    log_q = [-math.log(num_classes)] * num_classes
    out = []
    for losses, y in stream:
        step = [0.0] * num_classes
        for c in range(num_classes):
            members = [float(v) for v, k in zip(losses, y) if int(k) == c]
            if not members:  # absent: the running loss stays, no step for this class
                continue
            m = sum(members) / len(members)
            run[c] = m if run[c] is None else (1 - beta) * run[c] + beta * m
            step[c] = run[c]
        z = [a + eta * b for a, b in zip(log_q, step)]
        lse = math.log(sum(math.exp(v) for v in z))
        log_q = [v - lse for v in z]
        out.append(([math.nan if v is None else v for v in run], [math.exp(v) for v in log_q]))
    return out


@pytest.mark.parametrize("beta", [0.25, 1.0])
def test_running_class_losses_against_reference(beta):
    """class_momentum: EMA of the class means of the classes present; beta = 1: batch rule."""
    g = torch.Generator().manual_seed(9)
    stream = [(torch.rand(4, generator=g, dtype=D) * 2, torch.randint(0, 3, (4,), generator=g))]
    stream.append((torch.tensor([0.3, 1.7, 0.9, 0.2], dtype=D), torch.tensor([0, 0, 0, 0])))
    stream += [
        (torch.rand(4, generator=g, dtype=D) * 2, torch.randint(0, 3, (4,), generator=g))
        for _ in range(5)
    ]
    r, eta = 1.3, 0.4
    dro = DROWeighting(r, class_level=True, num_classes=3, class_step=eta, class_momentum=beta)
    plain = DROWeighting(r, class_level=True, num_classes=3, class_step=eta)
    ref = _running_class_reference(stream, 3, eta, beta)
    for (losses, y), (run, q) in zip(stream, ref):
        w = dro.weights(losses, y)
        torch.testing.assert_close(dro.class_losses, torch.tensor(run, dtype=D), equal_nan=True)
        torch.testing.assert_close(dro.class_weights, torch.tensor(q, dtype=D))
        p = (losses / r).exp() * torch.tensor(q, dtype=D)[y]
        torch.testing.assert_close(w, 4 * p / p.sum())
        w_plain = plain.weights(losses, y)
        if beta == 1.0:
            torch.testing.assert_close(w, w_plain)
    if beta < 1.0:  # the running losses differ from the batch rule
        assert not torch.allclose(dro.class_weights, plain.class_weights)


# -- state -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["batch", "streaming"])
def test_state_round_trip_continues_identically(mode):
    kw = dict(temperature=0.9, mode=mode, class_level=True, num_classes=4, class_step=0.2)
    kw["class_momentum"] = 0.3
    g = torch.Generator().manual_seed(6)
    batches = [
        (torch.rand(8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(8)
    ]
    a = DROWeighting(**kw)
    for losses, y in batches[:4]:
        a(losses, y)
    b = DROWeighting(**kw)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.step == a.step == 4
    for losses, y in batches[4:]:
        assert torch.equal(a.weights(losses, y), b.weights(losses, y))
    assert torch.equal(a.log_class_weights, b.log_class_weights)
    assert torch.equal(a.class_losses, b.class_losses)


def test_load_state_dict_tolerates_missing_keys():
    dro = DROWeighting(temperature=2.0, mode="streaming")
    dro(torch.tensor([1.0, 2.0]))
    before = dro.state_dict()
    dro.load_state_dict({"step": 7})
    assert dro.step == 7 and dro.temperature == 2.0
    assert dro.log_normalizer == float(before["log_normalizer"])


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "losses, labels, match",
    [
        (torch.tensor([1.0, float("nan"), 0.0]), torch.tensor([0, 1, 0]), "losses"),
        (torch.tensor([1.0, float("inf"), 0.0]), torch.tensor([0, 1, 0]), "losses"),
        (torch.tensor([1.0, -float("inf"), 0.0]), torch.tensor([0, 1, 0]), "losses"),
        (torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0, 3, 0]), "labels"),
        (torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0, -1, 0]), "labels"),
        (torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]), "labels"),
        (torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0, 1]), "labels"),
        (torch.tensor([1.0, 2.0, 0.0]), None, "labels"),
        (torch.ones(2, 2), torch.tensor([0, 1]), "losses"),
        (torch.tensor([1, 2, 0]), torch.tensor([0, 1, 0]), "losses"),
    ],
)
@pytest.mark.parametrize("mode", ["batch", "streaming"])
def test_bad_input_raises_and_keeps_state(losses, labels, match, mode):
    dro = DROWeighting(mode=mode, class_level=True, num_classes=3, class_step=0.5)
    dro.class_momentum = 0.5
    dro(torch.tensor([0.5, 2.0, 1.0]), torch.tensor([0, 1, 2]))
    before = copy.deepcopy(dro.state_dict())
    with pytest.raises(ValueError, match=match):
        dro(losses, labels)
    after = dro.state_dict()
    assert after["step"] == before["step"] == 1
    for key in ("log_normalizer", "log_class_weights", "class_losses"):
        assert (after[key] is None and before[key] is None) or torch.equal(after[key], before[key])


def test_overflow_at_small_temperature_raises():
    dro = DROWeighting(temperature=1e-300)
    with pytest.raises(ValueError, match="losses"):
        dro(torch.tensor([1.0, 2.0], dtype=torch.float32))  # l / r overflows float32
    assert dro.step == 0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(mode="online"), "mode"),
        (dict(momentum=0.0), "momentum"),
        (dict(momentum=1.5), "momentum"),
        (dict(class_level=True), "num_classes"),
        (dict(class_level=True, num_classes=0), "num_classes"),
        (dict(class_step=-0.1), "class_step"),
        (dict(class_momentum=0.0), "class_momentum"),
        (dict(class_momentum=1.5), "class_momentum"),
        (dict(class_momentum=True), "class_momentum"),
        (dict(max_weight=0.0), "max_weight"),
        (dict(warmup_steps=-1), "warmup_steps"),
    ],
)
def test_invalid_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        DROWeighting(**kwargs)


def test_invalid_temperature_assignment_keeps_old_value():
    dro = DROWeighting(temperature=2.0)
    for bad in (0.0, -3.0, float("inf")):
        with pytest.raises(ValueError, match="Invalid temperature"):
            dro.temperature = bad
    assert dro.temperature == 2.0
    with pytest.raises(ValueError, match="Invalid temperature"):
        kl_dro_weights(torch.ones(3), 0.0)


# -- signals -------------------------------------------------------------------------------
def test_signals_match_direct_formulas():
    losses = torch.tensor([0.1, 0.9, 2.3, 1.4, 0.0], dtype=D)
    dro = DROWeighting(temperature=0.6, class_level=True, num_classes=2)
    assert dro.signals() == {}
    dro(losses, torch.tensor([0, 1, 1, 0, 0]))
    w = dro.last_weights
    s = dro.signals()
    assert s["ess"] == pytest.approx(float(w.sum() ** 2 / (w**2).sum()), rel=1e-12)
    assert s["ess_fraction"] == pytest.approx(s["ess"] / 5, rel=1e-12)
    assert s["max_weight"] == pytest.approx(float(w.max()), rel=1e-12)
    assert s["weight_entropy"] == pytest.approx(scipy.stats.entropy(w.numpy()), rel=1e-10)
    assert s["class_weight_max"] == pytest.approx(2 * float(dro.class_weights.max()), rel=1e-12)
    assert s["temperature"] == 0.6


# -- DDP: two gloo processes against one process on the whole batch ---------------------------
SIZES = (3, 5)  # unequal local batches


def _ddp_cases():
    g = torch.Generator().manual_seed(7)
    n = sum(SIZES)
    batches = [
        (torch.rand(n, generator=g, dtype=D) * 3, torch.randint(0, 3, (n,), generator=g))
        for _ in range(3)
    ]
    return [
        ("batch", dict(temperature=0.5), batches),
        ("streaming", dict(temperature=0.8, mode="streaming"), batches),
        ("class", dict(temperature=1.0, class_level=True, num_classes=3, class_step=0.3), batches),
        ("stream-class", dict(mode="streaming", class_level=True, num_classes=3), batches),
        ("class-ema", dict(class_level=True, num_classes=3, class_momentum=0.4), batches),
    ]


def _ddp_worker(rank, world_size):
    lo, hi = sum(SIZES[:rank]), sum(SIZES[: rank + 1])
    results = {}
    for key, kwargs, batches in _ddp_cases():
        dro = DROWeighting(**kwargs)
        out = []
        for losses, y in batches:
            labels = y[lo:hi] if dro.class_level else None
            w = dro.weights(losses[lo:hi], labels)
            out.append((w, dro(losses[lo:hi], labels)))
        results[key] = (out, dro.signals())
    # a NaN on one rank only: both ranks raise, the state stays
    dro = DROWeighting(mode="streaming")
    bad = torch.tensor([1.0, float("nan")]) if rank == 1 else torch.tensor([1.0, 2.0])
    try:
        dro(bad)
        results["nan"] = False
    except ValueError:
        results["nan"] = dro.step == 0 and dro.log_normalizer is None
    # bad input on one rank only (an empty batch, float labels): every rank raises, no hang
    for key, kwargs, local in (
        ("empty", dict(mode="streaming"), (torch.ones(0, dtype=D), None)),
        ("float labels", dict(class_level=True, num_classes=3), (torch.ones(2), torch.ones(2))),
    ):
        dro = DROWeighting(**kwargs)
        good = (torch.ones(2), torch.zeros(2, dtype=torch.long) if dro.class_level else None)
        try:
            dro(*(local if rank == 1 else good))
            results[key] = "no error"
        except ValueError as exc:
            results[key] = (str(exc), dro.step)
    return results


@pytest.mark.distributed
def test_ddp_weights_equal_one_process():
    from tests.distributed.harness import run_ranks

    ranks = run_ranks(_ddp_worker, 2)
    for key, kwargs, batches in _ddp_cases():
        single = DROWeighting(**kwargs)
        for i, (losses, y) in enumerate(batches):
            labels = y if single.class_level else None
            w = single.weights(losses, labels)
            loss = single(losses, labels)
            (w0, loss0), (w1, loss1) = ranks[0][key][0][i], ranks[1][key][0][i]
            torch.testing.assert_close(torch.cat([w0, w1]), w)
            # DDP averages the gradients (so, in effect, the losses) over the 2 ranks
            torch.testing.assert_close((loss0 + loss1) / 2, loss)
        for r in range(2):
            for name, value in single.signals().items():
                assert ranks[r][key][1][name] == pytest.approx(value, rel=1e-9)
    assert ranks[0]["nan"] and ranks[1]["nan"]
    for key in ("empty", "float labels"):
        (msg0, step0), (msg1, step1) = ranks[0][key], ranks[1][key]
        assert "another rank" in msg0 and step0 == step1 == 0, ranks[0][key]
        assert msg1.startswith("Invalid losses" if key == "empty" else "Invalid labels"), msg1


def test_streaming_weights_are_bounded_by_batch_over_gamma():
    """u includes the current batch, so e^{l_i/r} / u <= B / gamma: a loss spike cannot overflow."""
    gamma, spike = 0.01, torch.tensor([0.0, 0.0, 0.0, 200.0])
    dro = DROWeighting(temperature=1.0, mode="streaming", momentum=gamma)
    dro(torch.zeros(4))
    w = dro.weights(spike)
    u = (1 - gamma) * 1.0 + gamma * (3 + math.exp(200.0)) / 4  # direct, in float64
    assert float(w[3]) == pytest.approx(math.exp(200.0) / u, rel=1e-5)
    assert float(w[3]) <= 4 / gamma * (1 + 1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["batch", "streaming"])
def test_cuda_matches_cpu(mode):
    kw = dict(temperature=0.7, mode=mode, class_level=True, num_classes=4, class_step=0.1)
    kw["class_momentum"] = 0.5
    cpu, gpu = DROWeighting(**kw), DROWeighting(**kw)
    g = torch.Generator().manual_seed(8)
    for _ in range(3):
        losses = torch.rand(16, generator=g, dtype=D)
        y = torch.randint(0, 4, (16,), generator=g)
        expected = cpu(losses, y)
        got = gpu(losses.cuda(), y.cuda())
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), expected)
    state = gpu.state_dict()  # saved on the CPU, loads into a CPU weighting
    DROWeighting(**kw).load_state_dict(state)
    torch.testing.assert_close(state["log_class_weights"], cpu.log_class_weights)


def _outlier_run(max_growth, outlier: bool):
    """Losses near 1 (r = 0.1), one loss of 20 in batch 3: the weighted loss 10 batches later."""
    g = torch.Generator().manual_seed(5)
    dro = DROWeighting(temperature=0.1, mode="streaming", momentum=0.1, max_growth=max_growth)
    for i in range(14):
        losses = 1.0 + 0.05 * torch.randn(16, generator=g, dtype=D)
        if outlier and i == 3:
            losses[0] = 20.0
        loss = dro(losses)
    return float(loss)


def test_streaming_recovers_from_one_outlier():
    clean = _outlier_run(2.0, outlier=False)
    assert _outlier_run(2.0, outlier=True) == pytest.approx(clean, rel=0.5)
    assert _outlier_run(None, outlier=True) < 1e-50 * clean  # the uncapped average stalls


def test_streaming_carried_normalizer_grows_at_most_max_growth():
    """The spike batch's own weights use the full u; the u carried on is capped at 2 u_prev."""
    gamma, spike = 0.1, torch.tensor([0.0, 0.0, 0.0, 50.0], dtype=D)
    dro = DROWeighting(temperature=1.0, mode="streaming", momentum=gamma)
    dro(torch.zeros(4, dtype=D))
    w = dro.weights(spike)
    u = (1 - gamma) + gamma * (3 + math.exp(50.0)) / 4
    torch.testing.assert_close(w, spike.exp() / u)
    assert dro.log_normalizer == pytest.approx(math.log(2.0), rel=1e-12)
    later = dro.weights(torch.zeros(4, dtype=D))  # u = 0.9 * 2 + 0.1 * 1
    torch.testing.assert_close(later, torch.full((4,), 1 / 1.9, dtype=D))


@pytest.mark.parametrize("bad", [1.0, 0.5, math.inf, math.nan, True, "2"])
def test_invalid_max_growth(bad):
    with pytest.raises(ValueError, match="Invalid max_growth"):
        DROWeighting(mode="streaming", max_growth=bad)


@pytest.mark.parametrize(
    "bad",
    [
        {"log_class_weights": torch.zeros(5, dtype=D)},
        {"class_losses": torch.zeros(2, dtype=D)},
        {"step": -1},
        {"step": 1.5},
        {"temperature": 0.0},
        {"log_normalizer": math.nan},
    ],
)
def test_rejected_load_state_dict_changes_nothing(bad):
    """Every value is checked before any is assigned (a shape error came after the others)."""
    dro = DROWeighting(0.7, "streaming", class_level=True, num_classes=3, class_momentum=0.5)
    for losses in _stream(2, n_batches=3):
        dro(losses, torch.tensor([0, 1, 2, 0, 1]))
    before = dro.state_dict()
    state = {**DROWeighting(2.0, "streaming", class_level=True, num_classes=3).state_dict()}
    state.update({"step": 7, "log_normalizer": torch.tensor(3.0, dtype=D), **bad})
    with pytest.raises(ValueError, match="Invalid"):
        dro.load_state_dict(state)
    after = dro.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k], k

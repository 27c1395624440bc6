"""The limiter's general JVP with the Linear primals taken from the training forward.

Oracle: the dense float64 Jacobian of the logits (``torch.func.jacrev`` at theta_old, eval
mode) times the update of a twin optimizer stepped without the limiter, its per-sample
spread, and ``theta_old + min(1, r_max / r) p``.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from torchsteer.bench.gpt import GPT, GPTConfig
from torchsteer.control.radius import RadiusLimiter
from torchsteer.control.radius._linear_reuse import LinearRecorder


@pytest.fixture(autouse=True)
def _math_attention():
    with sdpa_kernel([SDPBackend.MATH]):  # forward-mode AD (the CPU flash kernel has none)
        yield


def _gpt(seed=0, dtype=torch.float64, layers=1):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=11, context=6, n_layer=layers, n_head=2, width=8, tie_weights=True)
    model = GPT(cfg).to(dtype)
    tok = torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(seed + 1))
    return model, tok[:, :-1].contiguous(), tok[:, 1:].contiguous()


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _oracle_r(model, old, p, x):
    """max over rows of (max - min) of (J p), J dense float64 by jacrev, over pi."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [q.shape for _, q in model.named_parameters()]
    sizes = [math.prod(s) for s in shapes]
    twin = copy.deepcopy(model).double().eval()

    def logits(flat):
        params = {k: t.view(s) for k, t, s in zip(names, flat.split(sizes), shapes)}
        return functional_call(twin, params, (x,)).reshape(-1)

    J = torch.func.jacrev(logits)(old.double())  # (B T V, P)
    a = (J @ p.double()).reshape(-1, model(x).shape[-1])
    return float((a.amax(1) - a.amin(1)).max()) / math.pi


def _loss(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _spy(monkeypatch):
    """The answering contexts of the steps (their ``hits``)."""
    seen = []
    orig = LinearRecorder.answering

    def answering(self, point, names_of):
        ctx = orig(self, point, names_of)
        seen.append(ctx)
        return ctx

    monkeypatch.setattr(LinearRecorder, "answering", answering)
    return seen


@pytest.mark.parametrize("layers", [1, 2])
def test_gpt_limited_step_equals_the_dense_oracle(monkeypatch, layers):
    """Every Linear call (4 per block, the tied head) answered from the forward; r, the
    scale and the parameters as the dense Jacobian says, step after step."""
    seen = _spy(monkeypatch)
    model, x, y = _gpt(layers=layers)
    twin = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.05)
    r_max = 0.3
    lim = RadiusLimiter(model, r_max=r_max)
    assert isinstance(lim._recorder, LinearRecorder)
    for _ in range(4):
        old = _flat(model)
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            _loss(m, x, y).backward()
        twin_opt.step()  # the unlimited update from the same state
        p = _flat(twin) - old
        lim.step(opt, x)
        r = _oracle_r(model, old, p, x)
        assert lim.signals["r"] == pytest.approx(r, rel=1e-10)
        s = min(1.0, r_max / r)
        torch.testing.assert_close(_flat(model), old + s * p, rtol=1e-12, atol=1e-14)
        assert seen[-1].hits == 4 * layers + 1
        with torch.no_grad():  # the twin follows the limited step (its state: the same)
            for a, b in zip(twin.parameters(), model.parameters()):
                a.copy_(b)
    assert lim.reused == 4 and lim.limited >= 1
    assert not any("forward" in m.__dict__ for m in model.modules())  # overrides gone


def test_gpt_float32_reuse_equals_the_general_jvp():
    """The same r and parameters (to float32 rounding) as ``reuse_forward=False``."""
    model, x, y = _gpt(dtype=torch.float32, layers=2)
    twin = copy.deepcopy(model)
    opts = [torch.optim.Adam(m.parameters(), lr=0.05) for m in (model, twin)]
    fast = RadiusLimiter(model, r_max=0.3)
    slow = RadiusLimiter(twin, r_max=0.3, reuse_forward=False)
    for _ in range(4):
        for m, o, lim in ((model, opts[0], fast), (twin, opts[1], slow)):
            o.zero_grad()
            _loss(m, x, y).backward()
            lim.step(o, x)
        assert fast.signals["r"] == pytest.approx(slow.signals["r"], rel=1e-5)
        torch.testing.assert_close(_flat(model), _flat(twin), rtol=1e-5, atol=1e-6)
    assert fast.reused == 4 and slow.reused == 0 and fast.limited >= 1


class _EmbedMLP(nn.Module):
    """Embedding (no chain rule) -> Linear -> [Dropout] -> GELU -> Linear, a Linear called
    twice when ``twice``."""

    def __init__(self, dropout=0.0, twice=False):
        super().__init__()
        self.emb = nn.Embedding(13, 6)
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 5)
        self.drop, self.twice = nn.Dropout(dropout), twice

    def forward(self, idx):
        h = self.a(self.emb(idx))
        if self.twice:
            h = self.a(torch.tanh(h))
        return self.b(F.gelu(self.drop(h)))


def _embed_problem(**kw):
    torch.manual_seed(0)
    model = _EmbedMLP(**kw).double()
    g = torch.Generator().manual_seed(3)
    return model, torch.randint(0, 13, (9,), generator=g), torch.randint(0, 5, (9,), generator=g)


def _monitor_step(model, x, y, step_x=None, between=None, lr=2.0):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    lim = RadiusLimiter(model, mode="monitor")
    opt.zero_grad()
    _loss(model, x, y).backward()
    if between is not None:
        between(model)
    old = _flat(model)
    lim.step(opt, x if step_x is None else step_x)
    return lim, _oracle_r(model, old, _flat(model) - old, x)


@pytest.mark.parametrize(
    "case,hits",
    [
        ("plain", 2),
        ("twice", 3),  # a module called twice: its calls answered in order
        ("dropout", 1),  # train-mode dropout: b's eval-mode input differs; a's matches
        ("other batch object", 0),
        ("parameter changed", 0),
        ("parameter replaced", 0),
    ],
)
def test_every_call_is_checked_and_falls_back(monkeypatch, case, hits):
    """Never a wrong primal: a call whose input differs, a stale record, a replaced weight
    compute the primal as usual; r equals the oracle's in every case."""
    seen = _spy(monkeypatch)
    model, x, y = _embed_problem(dropout=0.5 if case == "dropout" else 0.0, twice=case == "twice")
    kw = {}
    if case == "other batch object":
        kw["step_x"] = x.clone()
    if case == "parameter changed":

        def bump(m):  # (a change through ``.data`` is invisible, to autograd as to the record)
            with torch.no_grad():
                m.a.weight.mul_(1.5)

        kw["between"] = bump

    def replace(m):  # a new Parameter object of the same value (the optimizer keeps the old)
        m.a.weight = nn.Parameter(m.a.weight.detach().clone())

    if case == "parameter replaced":
        kw["between"] = replace
    lim, r_ref = _monitor_step(model, x, y, **kw)
    assert lim.signals["r"] == pytest.approx(r_ref, rel=1e-10)
    assert (seen[-1].hits if seen else 0) == hits
    assert lim.reused == int(hits > 0)


def test_inplace_change_of_a_recorded_output_falls_back():
    """An activation changed in place after the Linear ran (an in-place ReLU): no reuse."""
    torch.manual_seed(0)
    emb, a, b = nn.Embedding(13, 6), nn.Linear(6, 6), nn.Linear(6, 5)
    model = nn.Sequential(emb, a, nn.ReLU(inplace=True), b).double()
    x, y = torch.randint(0, 13, (9,)), torch.randint(0, 5, (9,))
    lim, r_ref = _monitor_step(model, x, y)
    assert lim.reused == 0
    assert lim.signals["r"] == pytest.approx(r_ref, rel=1e-10)


def test_a_failed_measurement_removes_the_overrides(monkeypatch):
    """An error inside the pass: theta_old back, no ``forward`` override left on a module."""
    model, x, y = _embed_problem()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    lim = RadiusLimiter(model)
    _loss(model, x, y).backward()
    old = _flat(model)

    def boom(*args, **kwargs):
        assert "forward" in model.a.__dict__  # the pass runs with the override
        raise RuntimeError("boom")

    monkeypatch.setattr("torchsteer.control.radius.limiter.worst_spread", boom)
    with pytest.raises(RuntimeError, match="boom"):
        lim.step(opt, x)
    assert torch.equal(_flat(model), old)
    assert not any("forward" in m.__dict__ for m in model.modules())
    lim.remove_hooks()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_neg_grad_direction_reuses_the_forward(monkeypatch):
    """``direction="neg_grad"`` measures -lr g at the live parameters: the same record."""
    seen = _spy(monkeypatch)
    model, x, y = _embed_problem()
    lr = 0.7
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    lim = RadiusLimiter(model, mode="monitor", direction="neg_grad")
    _loss(model, x, y).backward()
    old = _flat(model)
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    lim.step(opt, x)
    assert seen[-1].hits == 2
    assert lim.signals["r"] == pytest.approx(_oracle_r(model, old, -lr * g, x), rel=1e-10)


def test_float64_norm_of_a_long_update_matches_a_long_double_sum():
    """|p| of the flat update: one reduction when short (bitwise as before), chunked when long;
    both against a long-double sum of squares."""
    import numpy as np

    from torchsteer.control.radius._buffers import float64_norm

    g = torch.Generator().manual_seed(0)
    for n in (1000, (1 << 20) + 12345, 3 * (1 << 20)):
        v = torch.randn(n, generator=g) * 1e-2
        a = v.numpy().astype(np.longdouble)
        ref = float(np.sqrt((a * a).sum()))
        assert float64_norm(v).dtype == torch.float64
        assert float(float64_norm(v)) == pytest.approx(ref, rel=1e-14)
    v = torch.randn(1000, generator=g)
    assert torch.equal(float64_norm(v), torch.linalg.vector_norm(v, dtype=torch.float64))


def test_fd1_on_a_model_that_is_not_a_chain_measures_without_reuse():
    # RadiusLimiter(method="fd1") on a GPT raised AttributeError at construction (the
    # unsupported recorder was dropped, then its remove() registered); now it measures by
    # one-sided differences as with reuse_forward=False, bit for bit
    model, x, y = _gpt(dtype=torch.float64)
    twin = copy.deepcopy(model)
    lims = [
        RadiusLimiter(m, r_max=0.05, method="fd1", reuse_forward=r)
        for m, r in ((model, True), (twin, False))
    ]
    opts = [torch.optim.SGD(m.parameters(), lr=1.0) for m in (model, twin)]
    for _ in range(2):
        for m, opt, lim in zip((model, twin), opts, lims):
            opt.zero_grad()
            _loss(m, x, y).backward()
            lim.step(opt, x)
    assert lims[0].reused == 0 and lims[0].limited >= 1
    assert lims[0].signals["r"] == lims[1].signals["r"]
    assert torch.equal(_flat(model), _flat(twin))

"""One linearization, many J v (issue 16): :class:`GraphJVP` against the two-pass product.

The oracle for bit-identity is the two-pass double-VJP product as it was before the
linearization was kept (``_two_pass_jvp`` below, a copy of the old ``graph_jvp`` kept only in
this test): the graph of ``g(u) = J^T u`` built afresh for each product. The oracle for the
value is the dense float64 Jacobian of ``torch.func.jacrev``. The RegularizedNewton
trajectories compare against the same optimizer whose curvature products run the old two-pass
code (the old ``matvec`` bodies, copied below and patched in for the reference run).
"""

import weakref

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import torchsteer.optim.regularized_newton as rn_module
from torchsteer.jacobian import (
    EmpiricalFisherOperator,
    GGNOperator,
    GraphJVP,
    JacobianOperator,
    flatten_like,
    graph_jvp,
    graph_vjp,
)
from torchsteer.jacobian import graph as graph_module
from torchsteer.optim import RegularizedNewton

from .models import ce, make


def _two_pass_jvp(output, params, v, batched=False):
    """The old ``graph_jvp`` (before issue 16), verbatim but for the input checks."""
    dummy = torch.zeros_like(output, requires_grad=True)
    g = torch.autograd.grad(output, params, dummy, create_graph=True, allow_unused=True)
    pairs = [(gi, vi) for gi, vi in zip(g, v) if gi is not None]
    if not pairs:
        shape = output.shape if not batched else (v[0].shape[0], *output.shape)
        return torch.zeros(shape, dtype=output.dtype, device=output.device)
    gs, vs = zip(*pairs)
    (jv,) = torch.autograd.grad(
        gs, dummy, vs, retain_graph=True, allow_unused=True, is_grads_batched=batched
    )
    if jv is None:
        shape = output.shape if not batched else (v[0].shape[0], *output.shape)
        return torch.zeros(shape, dtype=output.dtype, device=output.device)
    return jv


@torch.enable_grad()
def _old_ggn_matvec(self, v):
    """``GGNOperator.matvec`` before issue 16."""
    self.products += 1
    jv = _two_pass_jvp(self.outputs, self.params, self._split(v))
    u = self._hout(jv)
    return flatten_like(graph_vjp(self.outputs, self.params, u), self.params, self.dtype)


@torch.enable_grad()
def _old_fisher_matvec(self, v):
    """``EmpiricalFisherOperator.matvec`` before issue 16."""
    self.products += 1
    gv = _two_pass_jvp(self.losses, self.params, self._split(v))
    out = flatten_like(graph_vjp(self.losses, self.params, gv), self.params, self.dtype)
    return out / self.batch


class WithOddParameters(nn.Module):
    """An MLP with a zero-size parameter on the path and an unused one off it."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.empty = nn.Parameter(torch.zeros(0))
        self.unused = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.net(x) + self.empty.sum()


def _model(name, dtype):
    if name == "odd":
        torch.manual_seed(3)
        model = WithOddParameters()
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(4))
    elif name == "linear":  # the output linear in the parameters
        torch.manual_seed(3)
        model = nn.Linear(4, 3)
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(4))
    else:
        model, x, _ = make(name)
    return model.to(dtype), x.to(dtype)


def _tangents(params, gen, batch=None):
    lead = () if batch is None else (batch,)
    return [torch.randn(*lead, *p.shape, generator=gen).to(p.dtype) for p in params]


def _dense_jacobian(model, x):
    """(N, P) float64 Jacobian of the flattened outputs, by ``torch.func.jacrev``."""
    model = model.double()
    named = {k: p.detach() for k, p in model.named_parameters()}
    jac = jacrev(lambda q: functional_call(model, q, (x.double(),)).reshape(-1))(named)
    return torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in named], dim=1)


MODELS = ["mlp", "transformer", "odd", "linear"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", MODELS)
def test_kept_linearization_is_the_two_pass_product_bit_for_bit(name, dtype):
    model, x = _model(name, dtype)
    params = list(model.parameters())
    out = model(x)
    jvp = GraphJVP(out, params)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):  # several v in a row on one linearization
        v = _tangents(params, gen)
        assert torch.equal(jvp(v), _two_pass_jvp(out, params, v))
    for _ in range(2):  # batched tangents on the same linearization
        V = _tangents(params, gen, batch=3)
        assert torch.equal(jvp(V, batched=True), _two_pass_jvp(out, params, V, batched=True))
    v = _tangents(params, gen)  # and unbatched again after the batched ones
    assert torch.equal(jvp(v), _two_pass_jvp(out, params, v))
    assert torch.equal(graph_jvp(out, params, v), _two_pass_jvp(out, params, v))


@pytest.mark.parametrize("name", MODELS)
def test_kept_linearization_is_the_dense_jacobian(name):
    model, x = _model(name, torch.float64)
    params = list(model.parameters())
    J = _dense_jacobian(model, x)
    out = model(x)
    jvp = GraphJVP(out, params)
    gen = torch.Generator().manual_seed(8)
    for _ in range(2):
        v = torch.randn(J.shape[1], generator=gen, dtype=torch.float64)
        parts = list(v.split([p.numel() for p in params]))
        got = jvp([t.reshape(p.shape) for t, p in zip(parts, params)]).reshape(-1)
        torch.testing.assert_close(got, J @ v, rtol=1e-10, atol=1e-12)
    V = torch.randn(J.shape[1], 4, generator=gen, dtype=torch.float64)
    op = JacobianOperator.from_graph(out, params)
    for _ in range(2):  # matmat twice on one operator: the second reuses the linearization
        torch.testing.assert_close(op.matmat(V), J @ V, rtol=1e-10, atol=1e-12)


def test_output_that_is_the_parameter_and_output_without_parameters():
    p = torch.randn(3, dtype=torch.float64, requires_grad=True)
    v = [torch.randn(3, dtype=torch.float64)]
    assert torch.equal(GraphJVP(p, [p])(v), v[0])  # g(u) = u: J = I
    q = torch.randn(2, dtype=torch.float64, requires_grad=True)
    out = (q * 2).sum() * torch.ones(4, dtype=torch.float64)
    jvp = GraphJVP(out, [p])  # p unused: J = 0
    assert torch.equal(jvp(v), torch.zeros(4, dtype=torch.float64))
    V = [torch.randn(2, 3, dtype=torch.float64)]
    assert torch.equal(jvp(V, batched=True), torch.zeros(2, 4, dtype=torch.float64))


def test_bad_input_names_the_error_and_builds_nothing():
    model, x = _model("mlp", torch.float64)
    params = list(model.parameters())
    out = model(x)
    jvp = GraphJVP(out, params)
    with pytest.raises(ValueError, match=r"Invalid v\[0\]"):
        jvp([torch.ones(2), *_tangents(params[1:], torch.Generator())])
    with pytest.raises(ValueError, match="Invalid v: 1 tangents"):
        jvp(_tangents(params[:1], torch.Generator()))
    assert jvp._linearization is None  # a rejected product linearizes nothing
    with pytest.raises(ValueError, match="Invalid output"):
        GraphJVP(out.detach(), params)(_tangents(params, torch.Generator()))


class _PassCounter:
    """Counts reverse passes: every run of the autograd engine (``torch.autograd.grad``
    and ``backward`` both go through ``torch.autograd._engine_run_backward``), and separately
    the passes through the model's own forward graph (a hook on the output's node)."""

    def __init__(self, monkeypatch, output):
        self.engine = 0
        self.model = 0
        original = torch.autograd._engine_run_backward

        def counted(*args, **kwargs):
            self.engine += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(torch.autograd, "_engine_run_backward", counted)
        output.grad_fn.register_hook(self._through_model)

    def _through_model(self, *_):
        self.model += 1

    def take(self):
        counts = (self.engine, self.model)
        self.engine = self.model = 0
        return counts


def test_one_reverse_pass_per_product_after_the_first(monkeypatch):
    model, x = _model("mlp", torch.float64)
    params = list(model.parameters())
    out = model(x)
    count = _PassCounter(monkeypatch, out)
    gen = torch.Generator().manual_seed(9)
    jvp = GraphJVP(out, params)
    assert count.take() == (0, 0)  # built lazily: nothing until the first product
    jvp(_tangents(params, gen))
    assert count.take() == (2, 1)  # the linearization (through the model) and the product
    for _ in range(3):
        jvp(_tangents(params, gen))
        assert count.take() == (1, 0)  # one pass, through the kept graph of g alone
    jvp(_tangents(params, gen, batch=2), batched=True)
    assert count.take() == (1, 0)
    for _ in range(2):  # the two-pass product: both passes every time
        _two_pass_jvp(out, params, _tangents(params, gen))
        assert count.take() == (2, 1)
    v = _tangents(params, gen)
    before = jvp(v)
    count.take()
    jvp.release()  # frees the kept graph; the next product builds it again, the same
    assert jvp._linearization is None and count.take() == (0, 0)
    assert torch.equal(jvp(v), before) and count.take() == (2, 1)


@pytest.mark.parametrize("kind", ["gauss_newton", "empirical_fisher"])
def test_curvature_products_cost_one_pass_fewer_and_equal_the_old(monkeypatch, kind):
    model, x, y = make("transformer")
    params = list(model.parameters())
    out = model(x)
    losses = ce(out, y)

    def build():
        if kind == "gauss_newton":
            return GGNOperator(losses.mean(), out, params, torch.float64)
        return EmpiricalFisherOperator(losses, params, torch.float64)

    old_matvec = _old_ggn_matvec if kind == "gauss_newton" else _old_fisher_matvec
    new_op, old_op = build(), build()
    count = _PassCounter(monkeypatch, out if kind == "gauss_newton" else losses)
    P = new_op.shape[0]
    gen = torch.Generator().manual_seed(10)
    passes = 3 if kind == "gauss_newton" else 2  # J v, (H_out), J^T u
    for i in range(4):
        v = torch.randn(P, generator=gen, dtype=torch.float64)
        count.take()
        got = new_op.matvec(v)
        assert count.take() == (passes + (i == 0), 1 + (i == 0))
        want = old_matvec(old_op, v)
        assert count.take() == (passes + 1, 2)
        assert torch.equal(got, want)
    assert new_op.products == old_op.products == 4


def _trajectory(kind, solver, dtype, old: bool, monkeypatch=None):
    """Five RegularizedNewton steps on a fixed-seed MLP; the parameters after each step."""
    if old:
        monkeypatch.setattr(GGNOperator, "matvec", _old_ggn_matvec)
        monkeypatch.setattr(EmpiricalFisherOperator, "matvec", _old_fisher_matvec)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, generator=gen).to(dtype)
    y = torch.randint(0, 2, (16,), generator=gen)
    opt = RegularizedNewton(model.parameters(), curvature=kind, solver=solver)

    def closure():
        out = model(x)
        losses = ce(out, y)
        return (losses.mean(), out) if kind == "gauss_newton" else losses

    path = []
    for _ in range(5):
        opt.step(closure)
        path.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))
    record = opt.state[next(iter(model.parameters()))]
    if old:
        monkeypatch.undo()
    return torch.stack(path), record["curvature_products"], record["cg_iterations"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "kind,solver",
    [("gauss_newton", "cg"), ("gauss_newton", "multishift"), ("empirical_fisher", "cg")],
)
def test_regularized_newton_trajectory_is_the_old_one_bit_for_bit(monkeypatch, kind, solver, dtype):
    old_path, old_products, old_iters = _trajectory(kind, solver, dtype, True, monkeypatch)
    assert GGNOperator.matvec is not _old_ggn_matvec  # the patch is gone
    new_path, new_products, new_iters = _trajectory(kind, solver, dtype, False)
    assert old_products > 5  # products were taken: the comparison covers them
    assert (new_products, new_iters) == (old_products, old_iters)
    assert not torch.equal(new_path[0], new_path[-1])  # it moved
    assert torch.equal(new_path, old_path)


@pytest.mark.parametrize(
    "kind,solver",
    [("gauss_newton", "cg"), ("gauss_newton", "multishift"), ("empirical_fisher", "cg")],
)
def test_no_linearization_outlives_the_step_or_meets_a_trial_graph(monkeypatch, kind, solver):
    """The operator, its kept graph of g and its dummy cotangent are freed when the step
    returns (RegularizedNewton builds one operator per step), and the kept graph is released
    before every trial evaluation builds its own graph (so the trial's peak memory is what
    it was before the linearization was kept)."""
    made, dummies = [], []
    make_curvature, linearize = rn_module.make_curvature, graph_module.GraphJVP._linearize

    def recording_make(*args):
        op = make_curvature(*args)
        made.append(weakref.ref(op))
        return op

    def recording_linearize(self):
        out = linearize(self)
        dummies.append(weakref.ref(out[0]))
        return out

    monkeypatch.setattr(rn_module, "make_curvature", recording_make)
    monkeypatch.setattr(graph_module.GraphJVP, "_linearize", recording_linearize)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (16,))
    opt = RegularizedNewton(model.parameters(), curvature=kind, solver=solver, gamma0=100.0)
    alive_at_closure = []

    def closure():
        alive_at_closure.append(sum(d() is not None for d in dummies))
        out = model(x)
        losses = ce(out, y)
        return (losses.mean(), out) if kind == "gauss_newton" else losses

    for step in range(3):
        opt.step(closure)
        assert len(made) == step + 1 and dummies  # one operator per step, linearized
        assert made[-1]() is None and all(d() is None for d in dummies)  # no gc pass needed
    record = opt.state[next(iter(model.parameters()))]
    assert record["tries"] > 3  # gamma0 = 100: rejected tries, so trials between solves
    assert len(alive_at_closure) == record["closure_evals"]
    assert not any(alive_at_closure)  # no kept graph while a closure builds its own
    # at most one linearization per try (a retry that takes products builds it again)
    assert 3 <= len(dummies) <= record["tries"]
    if solver == "cg":  # every CG retry takes products
        assert len(dummies) > 3

"""RegularizedNewton's input checks (issue 18 #10, issue 19): bad input raises a clear error
and leaves the parameters and the optimizer's state exactly as they were."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchsteer.jacobian import flatten
from torchsteer.optim.regularized_newton import RegularizedNewton


def problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True))
    return model, x, y


def snapshot(model, opt):
    return flatten([p.detach() for p in model.parameters()]).clone(), copy.deepcopy(
        opt.state_dict()
    )


def same(a, b):
    """Equal state dicts, tensors compared bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
    return a == b or (a != a and b != b)


def test_complex_parameters_are_refused_at_construction_and_in_add_param_group():
    z = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match=r"Invalid parameter 0: dtype torch.complex64.*real"):
        RegularizedNewton([z])
    opt = RegularizedNewton([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="complex64"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1


def test_mixed_dtypes_say_so_and_change_nothing():
    model, x, y = problem()
    model[2].float()  # one layer in float32, the other in float64
    opt = RegularizedNewton(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    closure = lambda: F.mse_loss(model[2](model[1](model[0](x)).float()).double(), y)  # noqa: E731
    with pytest.raises(ValueError, match=r"need one dtype; got torch.float32 \(2 tensors\)"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert len(opt.state) == 0


def test_all_parameters_frozen_is_a_no_op_that_returns_the_loss():
    """As ``torch.optim``: nothing to update, the closure's loss is returned, no state; with
    some parameters frozen, those stay and the others move."""
    model, x, y = problem()
    model.requires_grad_(False)
    opt = RegularizedNewton(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(lambda: F.mse_loss(model(x), y))
    assert torch.equal(loss, F.mse_loss(model(x), y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert len(opt.state) == 0
    model[2].requires_grad_(True)
    opt.step(lambda: F.mse_loss(model(x), y))
    assert opt.state[model[0].weight]["record"]["accepted"]
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), before[:2]))


@pytest.mark.parametrize("fail_at", [1, 2])  # the evaluation at x, or the first trial point
@pytest.mark.parametrize("reuse", [False, True])
def test_a_closure_that_raises_mid_step_changes_nothing(fail_at, reuse):
    """A closure that raises leaves ``state`` (``step`` included) and the parameters as they
    were; the next steps are those of a twin that never saw the failure (with
    ``reuse_trial``, after one fresh evaluation: the kept trial graph is not state)."""
    model, x, y = problem()
    twin = copy.deepcopy(model)
    opt = RegularizedNewton(model.parameters(), gamma0=4.0, reuse_trial=reuse)
    twin_opt = RegularizedNewton(twin.parameters(), gamma0=4.0, reuse_trial=reuse)
    closure = lambda: F.mse_loss(model(x), y)  # noqa: E731
    twin_closure = lambda: F.mse_loss(twin(x), y)  # noqa: E731
    for _ in range(2):
        opt.step(closure)
        twin_opt.step(twin_closure)
    before = snapshot(model, opt)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("data loader died")
        return F.mse_loss(model(x), y)

    with pytest.raises(RuntimeError, match="data loader died"):
        opt.step(flaky)
    after = snapshot(model, opt)
    assert torch.equal(before[0], after[0]) and same(before[1], after[1])
    assert opt.state[model[0].weight]["step"].item() == 2
    for _ in range(3):
        opt.step(closure)
        twin_opt.step(twin_closure)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    state, twin_state = opt.state_dict()["state"][0], twin_opt.state_dict()["state"][0]
    if reuse:  # the failed step dropped the kept trial graph: one fresh evaluation more
        assert state.pop("closure_evals") == twin_state.pop("closure_evals") + 1
        state["record"].pop("reused"), twin_state["record"].pop("reused")
    assert same(state, twin_state)


@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton", "empirical_fisher", "dense"])
def test_sparse_gradients_raise_a_clear_value_error(curvature):
    emb = nn.Embedding(10, 3, sparse=True).double()
    idx = torch.tensor([1, 2, 3])
    before = emb.weight.detach().clone()
    closures = {
        "hessian": lambda: (emb(idx) ** 2).sum(),
        "dense": lambda: (emb(idx) ** 2).sum(),
        "gauss_newton": lambda: (lambda z: ((z**2).sum(), z))(emb(idx)),
        "empirical_fisher": lambda: (emb(idx) ** 2).sum(1),
    }
    opt = RegularizedNewton(emb.parameters(), curvature=curvature)
    with pytest.raises(ValueError, match=r"sparse gradient.*sparse=False"):
        opt.step(closures[curvature])
    assert torch.equal(emb.weight, before) and len(opt.state) == 0


def test_lightning_automatic_optimization_says_use_manual_optimization():
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from .._lightning import trainer

    model, x, y = problem()

    class Auto(pl.LightningModule):  # automatic optimization, as a newcomer writes it
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, batch, batch_idx):
            return F.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return RegularizedNewton(self.parameters())

    before = [p.detach().clone() for p in model.parameters()]
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    expected = r"use manual optimization.*automatic_optimization = False"
    with pytest.raises(RuntimeError, match=expected):
        trainer(max_epochs=1).fit(Auto(), loader)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))

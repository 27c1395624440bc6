"""PGD: stays in the ball and the domain, reaches the closed-form worst case of a linear model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torchsteer.bench.attacks import pgd_attack, project

D = torch.float64


def _linear_pair(seed=0, d=6, n=10):
    """A 2-class linear classifier and data; the margin of class y is s_y (v . x + c)."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(d, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(2, d, generator=g, dtype=D))
        model.bias.copy_(torch.randn(2, generator=g, dtype=D))
    x = torch.randn(n, d, generator=g, dtype=D)
    y = torch.randint(0, 2, (n,), generator=g)
    return model, x, y


def _worst_case_loss(model, x, y, eps, dual_norm):
    """max_{|delta| <= eps} CE(model(x + delta), y) for 2 classes, in closed form.

    CE = softplus(-m) with margin m = (W_y - W_o) . x + (b_y - b_o), decreasing in m; the
    smallest margin in the ball is m - eps |W_y - W_o|_* (l1 norm for l_inf, l2 for l_2).
    """
    w, b = model.weight.detach(), model.bias.detach()
    sign = 1.0 - 2.0 * y.to(D)  # +1 for class 0, -1 for class 1
    v = (w[0] - w[1]).unsqueeze(0) * sign.unsqueeze(1)
    margin = (v * x).sum(1) + (b[0] - b[1]) * sign
    return F.softplus(-(margin - eps * dual_norm(v)))


@pytest.mark.parametrize(
    "norm, dual",
    [("linf", lambda v: v.abs().sum(1)), ("l2", lambda v: v.norm(dim=1))],
)
def test_reaches_the_closed_form_worst_case_of_a_linear_model(norm, dual):
    model, x, y = _linear_pair()
    eps = 0.3
    x_adv = pgd_attack(model, x, y, eps=eps, steps=10, alpha=eps / 4, norm=norm)
    loss = F.cross_entropy(model(x_adv), y, reduction="none")
    torch.testing.assert_close(loss, _worst_case_loss(model, x, y, eps, dual))
    if norm == "linf":  # the maximizer is the FGSM corner x + eps sign(grad)
        xr = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
        torch.testing.assert_close(x_adv, x + eps * grad.sign())


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("random_start", [False, True])
def test_stays_in_ball_and_domain_and_increases_loss(norm, random_start):
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x = torch.rand(20, 8, generator=g)
    y = torch.randint(0, 3, (20,), generator=g)
    eps = 0.2
    params_before = [p.detach().clone() for p in model.parameters()]
    x_adv = pgd_attack(
        model,
        x,
        y,
        eps=eps,
        steps=7,
        norm=norm,
        random_start=random_start,
        bounds=(0.0, 1.0),
        generator=g,
    )
    delta = x_adv - x
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps * (1 + 1e-6)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    with torch.no_grad():
        assert float(F.cross_entropy(model(x_adv), y)) > float(F.cross_entropy(model(x), y))
    for p, before in zip(model.parameters(), params_before):
        assert torch.equal(p.detach(), before) and p.grad is None


def test_zero_steps_and_projection():
    model, x, y = _linear_pair()
    assert torch.equal(pgd_attack(model, x, y, eps=0.5, steps=0), x)
    delta = torch.tensor([[3.0, -4.0], [0.1, 0.2]], dtype=D)
    torch.testing.assert_close(project(delta, 1.0, "l2")[0], torch.tensor([0.6, -0.8], dtype=D))
    torch.testing.assert_close(project(delta, 1.0, "l2")[1], delta[1])
    torch.testing.assert_close(project(delta, 0.15, "linf")[1], torch.tensor([0.1, 0.15], dtype=D))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(eps=-0.1, steps=3), "eps"),
        (dict(eps=float("nan"), steps=3), "eps"),
        (dict(eps=0.1, steps=-1), "steps"),
        (dict(eps=0.1, steps=10**6), "steps"),
        (dict(eps=0.1, steps=2.5), "steps"),
        (dict(eps=0.1, steps=3, norm="l1"), "norm"),
        (dict(eps=0.1, steps=3, alpha=-1.0), "alpha"),
        (dict(eps=0.1, steps=3, bounds=(1.0, 0.0)), "bounds"),
    ],
)
def test_invalid_arguments(kwargs, name):
    model, x, y = _linear_pair()
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        pgd_attack(model, x, y, **kwargs)

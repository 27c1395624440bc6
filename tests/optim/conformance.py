"""The optimizer conformance registry (in the spirit of PyTorch's ``OptimizerInfo``).

Every optimizer of the library joins with one :class:`OptimInfo`: how to build it, what its
closure returns, which hyperparameters are invalid. ``test_conformance.py`` runs the generic
tests over the registry: lockstep resume from ``state_dict``, parameter groups, dtypes,
non-finite input, invalid hyperparameters, closure and ``zero_grad`` semantics.
``torch.optim.SGD`` and ``Adam`` are registered first, so the suite is proven on optimizers
known to be right.

The shared problem is a tiny tanh MLP (4 -> 5 -> 2) on 8 samples with per-sample squared
error; ``closure_kind`` says how the closure is written:

- ``"backward"``: zero grads, ``loss.backward()``, return the scalar mean loss (torch.optim style);
- ``"per_sample"``: zero grads, return the per-sample loss vector (B,) with its graph;
- ``"scalar_graph"``: zero grads, return the scalar mean loss with its graph, no backward;
- ``"loss_and_outputs"``: zero grads, return ``(mean loss, model outputs)`` with the graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchsteer.optim.mfac import MFAC
from torchsteer.optim.regularized_newton import RegularizedNewton
from torchsteer.optim.sven import Sven

__all__ = ["INFOS", "OptimInfo", "make_closure", "make_problem"]


@dataclasses.dataclass(kw_only=True)
class OptimInfo:
    """How to build and drive one optimizer in the generic tests.

    Attributes:
        name: test id.
        cls: the optimizer class.
        kwargs: constructor arguments (besides params) for the generic tests.
        closure_kind: see the module docstring.
        invalid: ``(kwargs, text)`` pairs: building with ``kwargs`` must raise ``ValueError``
            whose message contains ``text``.
        nonfinite: the optimizer promises that a NaN/Inf loss or gradient raises (with
            ``nonfinite="raise"``) and leaves parameters and state untouched.
        bf16: bf16 parameters are supported.
        returns_loss: ``step(closure)`` returns the loss at the parameters before the step
            (mean over samples).
        float32_rtol: tolerance of the float32 run against the float64 run after 2 steps.
        model_kwarg: the constructor also takes ``model=`` (given the test model).
    """

    name: str
    cls: type
    kwargs: dict[str, Any]
    closure_kind: str = "backward"
    invalid: list[tuple[dict[str, Any], str]] = dataclasses.field(default_factory=list)
    nonfinite: bool = False
    bf16: bool = True
    returns_loss: bool = True
    float32_rtol: float = 1e-4
    model_kwarg: bool = False

    def build(self, model: nn.Module, params=None, **overrides) -> torch.optim.Optimizer:
        kw = {**self.kwargs, **overrides}
        if self.model_kwarg:
            kw["model"] = model
        return self.cls(model.parameters() if params is None else params, **kw)


def make_problem(dtype: torch.dtype = torch.float64, seed: int = 0):
    """(model, x, y): a 4 -> 5 -> 2 tanh MLP and 8 samples, deterministic."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)
    x = torch.randn(8, 4, generator=g).to(dtype)
    y = torch.randn(8, 2, generator=g).to(dtype)
    return model, x, y


def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((model(x) - y) ** 2).sum(dim=1)


def make_closure(
    info: OptimInfo, opt: torch.optim.Optimizer, model: nn.Module, x, y, calls=None
) -> Callable[[], Any]:
    """The closure of ``info.closure_kind`` (``calls`` collects ``torch.is_grad_enabled()``)."""

    def closure():
        if calls is not None:
            calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        if info.closure_kind == "per_sample":
            return per_sample_loss(model, x, y)
        if info.closure_kind == "loss_and_outputs":
            out = model(x)
            return 0.5 * ((out - y) ** 2).sum(dim=1).mean(), out
        loss = per_sample_loss(model, x, y).mean()
        if info.closure_kind == "backward":
            loss.backward()
        return loss

    return closure


INFOS: list[OptimInfo] = [
    OptimInfo(
        name="SGD",
        cls=torch.optim.SGD,
        kwargs={"lr": 0.1, "momentum": 0.9},
        invalid=[({"lr": -1.0}, "Invalid learning rate"), ({"momentum": -0.5}, "momentum")],
    ),
    OptimInfo(
        name="Adam",
        cls=torch.optim.Adam,
        kwargs={"lr": 0.01},
        invalid=[({"lr": -1.0}, "Invalid learning rate"), ({"betas": (1.0, 0.9)}, "beta")],
    ),
    OptimInfo(
        name="MFAC",
        cls=MFAC,
        kwargs={"lr": 0.05, "ngrads": 2, "damp": 0.1, "momentum": 0.5, "weight_decay": 0.01},
        invalid=[
            ({"lr": -1.0}, "Invalid lr"),
            ({"ngrads": 0}, "Invalid ngrads"),
            ({"damp": 0.0}, "Invalid damp"),
            ({"nonfinite": "x"}, "Invalid nonfinite"),
            ({"foreach": True}, "Invalid foreach"),
            ({"differentiable": True}, "Invalid differentiable"),
        ],
        nonfinite=True,
    ),
    OptimInfo(
        name="MFAC-blocked-bf16",
        cls=MFAC,
        kwargs={
            "lr": 0.05,
            "ngrads": 2,
            "damp": 0.1,
            "momentum": 0.5,
            "block_size": 5,
            "window_dtype": torch.bfloat16,
        },
        invalid=[
            ({"block_size": 0}, "Invalid block_size"),
            ({"memory_budget": -1.0}, "Invalid memory_budget"),
        ],
        nonfinite=True,
    ),
    OptimInfo(
        name="Sven",
        cls=Sven,
        kwargs={"lr": 0.5, "rank": 4, "rtol": 1e-3, "seed": 0},
        closure_kind="per_sample",
        invalid=[
            ({"lr": -1.0}, "Invalid lr"),
            ({"rank": 0}, "Invalid rank"),
            ({"kappa": 0.0}, "Invalid kappa"),
            ({"svd": "x"}, "Invalid svd"),
        ],
        nonfinite=True,
    ),
    OptimInfo(
        name="Sven-matrix-free",
        cls=Sven,
        kwargs={"lr": 0.5, "rank": 3, "jacobian": "matrix_free", "svd": "randomized", "seed": 0},
        closure_kind="per_sample",
        invalid=[({"oversample": -1}, "Invalid oversample")],
        nonfinite=True,
    ),
    OptimInfo(
        name="Sven-safeguarded",
        cls=Sven,
        kwargs={
            "lr": 0.5,
            "rank": 4,
            "rtol": 1e-5,
            "kappa": 1.0,
            "damping": 1e-4,
            "max_step_norm": 0.5,
            "gram_dtype": torch.float64,
            "seed": 0,
        },
        closure_kind="per_sample",
        invalid=[
            ({"damping": -1.0}, "Invalid damping"),
            ({"max_step_norm": 0.0}, "Invalid max_step_norm"),
        ],
        nonfinite=True,
    ),
    OptimInfo(
        name="RegularizedNewton",
        cls=RegularizedNewton,
        kwargs={"curvature": "hessian", "solver": "cg"},
        closure_kind="scalar_graph",
        invalid=[
            ({"curvature": "x"}, "Invalid curvature"),
            ({"gamma0": 0.0}, "Invalid gamma0"),
            ({"max_tries": 0}, "Invalid max_tries"),
        ],
        nonfinite=True,
    ),
    OptimInfo(
        name="RegularizedNewton-margin",
        cls=RegularizedNewton,
        kwargs={"curvature": "hessian", "growth": "margin", "reuse_trial": True},
        closure_kind="scalar_graph",
        invalid=[({"growth": "x"}, "Invalid growth"), ({"reuse_trial": 1}, "Invalid reuse_trial")],
        nonfinite=True,
    ),
    OptimInfo(
        name="RegularizedNewton-lanczos-ew",
        cls=RegularizedNewton,
        kwargs={"curvature": "hessian", "solver": "lanczos", "cg_tol": "eisenstat_walker"},
        closure_kind="scalar_graph",
        invalid=[({"cg_tol": "x"}, "Invalid cg_tol"), ({"solver": "lanczo"}, "Invalid solver")],
        nonfinite=True,
    ),
    OptimInfo(
        name="RegularizedNewton-gauss_newton",
        cls=RegularizedNewton,
        kwargs={"curvature": "gauss_newton", "solver": "cholesky"},
        closure_kind="loss_and_outputs",
        invalid=[({"solver": "x"}, "Invalid solver")],
        nonfinite=True,
    ),
    OptimInfo(
        name="RegularizedNewton-dense",
        cls=RegularizedNewton,
        kwargs={"curvature": "dense"},
        closure_kind="scalar_graph",
        invalid=[({"cg_maxiter": 0}, "Invalid cg_maxiter")],
        nonfinite=True,
    ),
    OptimInfo(
        name="RegularizedNewton-sqrt",
        cls=RegularizedNewton,
        kwargs={"curvature": "hessian", "regularization": "sqrt"},
        closure_kind="scalar_graph",
        invalid=[({"regularization": "cubic"}, "Invalid regularization")],
        nonfinite=True,
    ),
    OptimInfo(
        name="RegularizedNewton-empirical_fisher",
        cls=RegularizedNewton,
        kwargs={"curvature": "empirical_fisher"},
        closure_kind="per_sample",
        invalid=[({"regularization": "x"}, "Invalid regularization")],
        nonfinite=True,
    ),
]

"""What :class:`~torchsteer.optim.RegularizedNewton` checks and adapts before it steps.

- :func:`validate_group`: every hyperparameter of a param group, with the contract's
  :func:`~torchsteer.optim._contract.check_hyperparameter` / ``check_choice``.
- :func:`check_parameters` / :func:`check_gradients`: real floating-point parameters of one
  dtype and one device; dense gradients (a sparse ``nn.Embedding`` is refused by name).
- :func:`lightning_automatic`: is the closure Lightning's automatic-optimization closure
  (recognized by its type's module, without importing Lightning)?
- :func:`maximizing`: the closure of ``-f`` (``maximize=True`` minimizes ``-f``).
- The loss-scale normalization. With ``f`` scaled by ``s`` the gradient and the Hessian
  (and Gauss-Newton) scale by ``s``, ``lambda = |g| / gamma`` by ``s``, so the step
  ``delta = -(H + lambda I)^{-1} g`` and the accept test are invariant in exact arithmetic;
  in floating point ``|g|^2`` and CG's inner products overflow (float32, ``s = 1e20``) or
  underflow (``s = 1e-20``). The solvers therefore see ``g / c``, ``H / c`` and
  ``lambda / c`` with ``c = 4^k`` near ``max_i |g_i|`` (:func:`gradient_scale`): the same
  ``delta`` (``(H/c + lambda/c I)^{-1} g/c``), every intermediate of order one. ``c`` is a
  power of two, so the scaling is exact: where nothing over- or underflowed before, the
  iterates are the same bit for bit. The empirical Fisher is ``(1/B) G^T G``, and with
  ``G' = G / sqrt(c)`` (``sqrt(c) = 2^k``, exact) ``F / c = (1/B) G'^T G'``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from torchsteer.jacobian.output_hessian import OUTPUT_HESSIANS
from torchsteer.optim._contract import NONFINITE_POLICIES, check_choice, check_hyperparameter

__all__ = [
    "COUNTERS",
    "HYPERPARAMETERS",
    "LEGACY_DEFAULTS",
    "LIGHTNING_AUTOMATIC",
    "ScaledCurvature",
    "check_gradients",
    "check_parameters",
    "gradient_scale",
    "lightning_automatic",
    "maximizing",
    "validate_group",
    "validate_state",
]

CURVATURES = ("hessian", "gauss_newton", "empirical_fisher", "dense")
REGULARIZATIONS = ("gns", "sqrt")
SOLVERS = ("auto", "cg", "multishift", "lanczos", "cholesky", "woodbury")
GROWTHS = ("double", "margin")
HYPERPARAMETERS = (
    "curvature", "regularization", "gamma0", "growth", "max_tries", "solver", "cg_tol",
    "cg_maxiter", "cg_check_every", "lr", "maximize", "nonfinite", "reuse_trial", "foreach",
    "differentiable",
)  # fmt: skip
LEGACY_DEFAULTS = dict(  # what a checkpoint from before a key existed meant
    growth="double", lr=1.0, maximize=False, nonfinite="raise", reuse_trial=False,
    foreach=None, differentiable=False, cg_check_every=None,
)  # fmt: skip

LIGHTNING_AUTOMATIC = (
    "RegularizedNewton cannot run under Lightning's automatic optimization (it calls its "
    "closure several times per step and differentiates the loss itself): use manual "
    "optimization. In your LightningModule set `self.automatic_optimization = False` in "
    "__init__, and in training_step call `opt = self.optimizers()` and "
    "`loss = opt.step(closure=lambda: F.mse_loss(self(x), y))`, a closure that returns the "
    "loss without calling backward() (docs/regularized_newton.md, 'Lightning: manual "
    "optimization')"
)


def validate_group(group: dict[str, Any]) -> None:
    """Raise ``ValueError("Invalid <name>: ...")`` for the first bad hyperparameter."""
    check_choice("curvature", group["curvature"], CURVATURES)
    check_choice("regularization", group["regularization"], REGULARIZATIONS)
    check_hyperparameter("gamma0", group["gamma0"], low=0.0, low_open=True)
    check_choice("growth", group["growth"], GROWTHS)
    check_hyperparameter("max_tries", group["max_tries"], low=1, integer=True)
    check_choice("solver", group["solver"], SOLVERS)
    if group["solver"] == "woodbury" and group["curvature"] != "empirical_fisher":
        raise ValueError(
            f"Invalid solver: 'woodbury' needs curvature='empirical_fisher', "
            f"got {group['curvature']!r}"
        )
    cg_tol = group["cg_tol"]
    if isinstance(cg_tol, str) and cg_tol != "eisenstat_walker":
        raise ValueError(
            f"Invalid cg_tol: {cg_tol!r} (expected None, 'eisenstat_walker' or a number in (0, 1))"
        )
    if cg_tol is not None and not isinstance(cg_tol, str):
        check_hyperparameter("cg_tol", cg_tol, low=0.0, high=1.0, low_open=True, high_open=True)
    if group["cg_maxiter"] is not None:
        check_hyperparameter("cg_maxiter", group["cg_maxiter"], low=1, integer=True)
    if group.get("cg_check_every") is not None:
        check_hyperparameter("cg_check_every", group["cg_check_every"], low=1, integer=True)
    closed = group.get("output_hessian")
    check_choice("output_hessian", closed, (None, *OUTPUT_HESSIANS))
    if closed is not None and group["curvature"] != "gauss_newton":
        raise ValueError(
            f"Invalid output_hessian: {closed!r} needs curvature='gauss_newton', "
            f"got {group['curvature']!r}"
        )
    check_hyperparameter("lr", group["lr"], low=0.0, tensor=True)
    check_choice("maximize", group["maximize"], (False, True))
    check_choice("nonfinite", group["nonfinite"], NONFINITE_POLICIES)
    check_choice("reuse_trial", group["reuse_trial"], (False, True))
    if group["foreach"] not in (None, False):
        raise ValueError(
            f"Invalid foreach: {group['foreach']!r}; RegularizedNewton has no per-parameter "
            "loop to fuse (its step works on one flat vector): leave foreach=None"
        )
    if group["differentiable"] is not False:
        raise ValueError(
            f"Invalid differentiable: {group['differentiable']!r}; RegularizedNewton's step "
            "is an accept/reject search and cannot be differentiated: leave it False"
        )


def check_parameters(params: list[torch.Tensor], uniform: bool = True) -> None:
    """Real floating-point parameters (else ``ValueError``); ``uniform``: of one dtype and on
    one device, as the flat vector of the step needs."""
    for i, p in enumerate(params):
        if p.is_complex() or not p.is_floating_point():
            raise ValueError(
                f"Invalid parameter {i}: dtype {p.dtype}; RegularizedNewton needs real "
                "floating-point parameters (view a complex parameter as two real ones with "
                "torch.view_as_real)"
            )
    for attr in ("dtype", "device") if uniform else ():
        kinds = sorted({str(getattr(p, attr)) for p in params})
        if len(kinds) > 1:
            counts = ", ".join(
                f"{k} ({sum(str(getattr(p, attr)) == k for p in params)} tensors)" for k in kinds
            )
            raise ValueError(
                f"Invalid parameters: RegularizedNewton solves for all parameters as one "
                f"vector, so they need one {attr}; got {counts}: convert the model first "
                f"(e.g. model.to(torch.float64))"
            )


def check_gradients(grads, params: list[torch.Tensor]) -> None:
    """Dense gradients only: a sparse one (``nn.Embedding(sparse=True)``) raises ``ValueError``."""
    for i, (t, p) in enumerate(zip(grads, params)):
        if t is not None and t.layout != torch.strided:
            raise ValueError(
                f"Invalid gradient: parameter {i} (shape {tuple(p.shape)}) has a sparse "
                f"gradient ({t.layout}); RegularizedNewton needs dense gradients: build the "
                "embedding with sparse=False"
            )


def lightning_automatic(closure: Any) -> bool:
    """Whether ``closure`` is (or wraps, through ``functools.partial``) the closure of
    Lightning's automatic optimization, which runs ``backward()`` itself."""
    seen, todo = 0, [closure]
    while todo and seen < 16:
        obj = todo.pop()
        seen += 1
        module = type(obj).__module__ or ""
        if module.endswith("loops.optimization.automatic") and "lightning" in module:
            return True
        if isinstance(obj, functools.partial):
            todo.extend([obj.func, *obj.args, *obj.keywords.values()])
    return False


def _negate(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return -out
    if isinstance(out, tuple | list) and len(out) == 2 and isinstance(out[0], torch.Tensor):
        return (-out[0], out[1])  # gauss_newton: (loss, outputs); the outputs stay
    return out  # not a closure output: the parser says what was expected


def maximizing(closure):
    """The closure of ``-f``: per-sample losses, the scalar loss, or ``(loss, outputs)``."""
    return lambda: _negate(closure())


def gradient_scale(g: torch.Tensor) -> float:
    """``c = 4^k`` with ``4^k <= max_i |g_i| < 4^(k+1)`` (0.0 for ``g = 0``), ``k`` clamped
    so that ``c`` and ``1/c`` are normal numbers of ``g``'s dtype with room to spare."""
    top = float(g.abs().max()) if g.numel() else 0.0
    if top == 0.0:
        return 0.0
    bound = int(math.log2(torch.finfo(g.dtype).max)) // 2 - 4  # float32: 4^59; float64: 4^507
    k = max(-bound, min(bound, (math.frexp(top)[1] - 1) // 2))
    return 4.0**k


class ScaledCurvature:
    """``H / c`` for a curvature ``H`` (``c`` a power of 4): the products of
    :class:`~torchsteer.optim._newton_solvers._Curvature` times ``1 / c``; ``per_sample``
    times ``1 / sqrt(c)``. ``products`` counts the wrapped operator's products."""

    def __init__(self, curvature, inv: float) -> None:
        self.curvature, self.inv = curvature, inv
        self.dtype, self.params = curvature.dtype, curvature.params

    @property
    def products(self) -> int:
        return self.curvature.products

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.curvature.matvec(v) * self.inv

    def dense(self) -> torch.Tensor:
        return self.curvature.dense() * self.inv

    def per_sample(self) -> torch.Tensor:
        return self.curvature.per_sample() * math.sqrt(self.inv)


COUNTERS = (
    "closure_evals", "tries", "curvature_products", "cg_iterations", "failed_steps",
    "skipped_steps",
)  # fmt: skip


def validate_state(state: dict[str, Any]) -> None:
    """A saved global state: counters >= 0, ``gamma`` > 0 and ``M`` (``None`` or > 0)
    finite, ``forcing`` a pair ``(|g| > 0, tolerance in [0, 1])`` (else ``ValueError``)."""
    for key in ("step", *COUNTERS):
        if key in state:
            value = state[key]
            if isinstance(value, torch.Tensor) and value.dim() == 0:
                value = value.item()
            check_hyperparameter(f"state_dict {key}", value, low=0.0)
    if "gamma" in state:
        check_hyperparameter("state_dict gamma", state["gamma"], low=0.0, low_open=True)
    if state.get("M") is not None:
        check_hyperparameter("state_dict M", state["M"], low=0.0, low_open=True)
    if state.get("forcing") is not None:
        forcing = state["forcing"]
        if not (isinstance(forcing, tuple | list) and len(forcing) == 2):
            raise ValueError(f"Invalid state_dict forcing: {forcing!r} (expected a pair)")
        check_hyperparameter("state_dict forcing |g|", forcing[0], low=0.0, low_open=True)
        check_hyperparameter("state_dict forcing tolerance", forcing[1], low=0.0, high=1.0)

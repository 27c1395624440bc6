"""Softmax step-radius limiter ("ghosts of softmax").

Along a step theta -> theta + t v the logits move as z(x) + t a(x; v) to first order, with the
directional logit derivatives ``a(x; v) = J_z(x) v`` (C numbers per sample x, one forward-mode
JVP for the whole batch). The partition function ``F(t) = sum_k exp(z_k + a_k t)`` has complex
zeros, and cross-entropy along the line is analytic only within the distance to the nearest:

    rho*(x) >= pi / Delta_a(x; v),    Delta_a(x; v) = max_k a_k(x; v) - min_k a_k(x; v)

(binary: exactly ``sqrt(delta^2 + pi^2) / |a_1 - a_2|`` with the logit gap delta). Over a batch
S the worst sample sets the radius ``rho_a = pi / max_{x in S} Delta_a(x; v)`` (``pi T / ...``
for logits divided by a temperature T). Since Delta_a is linear in the direction, the
normalized step of an update p (any length) is

    r = |p| / rho_a(p / |p|) = max_x Delta_a(x; p) / pi.

Steps with r >= 1 are where training collapses; the limiter applies ``s p`` with
``s = min(1, r_max / r)``: direction unchanged, bit-identical to the base optimizer when
``r <= r_max``.

Cost of :class:`RadiusLimiter`: one JVP of the batch (about the price of one forward and one
backward) and one copy of the optimized parameters (P numbers, kept between the snapshot and
the correction) per step; the update ``p`` is a transient second P.

References:
    P. Sao, "Ghosts of Softmax: Complex Singularities That Limit Safe Step Sizes in
    Cross-Entropy", arXiv:2603.13552 (2026), Prop. 5.2 / Eq. 19.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from torchsteer import distributed
from torchsteer.control._radius_fold import folded_module
from torchsteer.control._radius_tangent import ActivationRecorder
from torchsteer.jacobian import jvp, model_fn, unflatten, unwrap_model

__all__ = [
    "RadiusLimiter",
    "logit_derivative",
    "logit_spread",
    "normalized_step",
]

LogitsFn = Callable[[nn.Module, Any], torch.Tensor]
_MODES = ("limit", "rho_set", "monitor")
_DIRECTIONS = ("update", "neg_grad")
_METHODS = ("jvp", "fd")
_CHANNELS_LAST = True  # the general CPU JVP with 4-d weights in channels-last (benchmarks toggle)
_FOLD = True  # fold eval-mode BatchNorm into the convolution before it (benchmarks toggle)


class _LogitsModule(nn.Module):
    """``forward(batch) = logits_fn(model, batch)``, so ``functional_call`` can swap parameters."""

    def __init__(self, model: nn.Module, logits_fn: LogitsFn):
        super().__init__()
        self.model = model
        self.logits_fn = logits_fn

    def forward(self, batch):
        return self.logits_fn(self.model, batch)


@contextlib.contextmanager
def _eval_mode(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Every submodule in eval mode (no BatchNorm statistics updates, no dropout), then restored."""
    if not enabled:
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _forward(model: nn.Module, inputs: Any, logits_fn: LogitsFn | None):
    if logits_fn is None:
        return model_fn(model, inputs), ""
    return model_fn(_LogitsModule(model, logits_fn), inputs), "model."


def _channels_last(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    cl = torch.channels_last
    return {k: t.contiguous(memory_format=cl) if t.dim() == 4 else t for k, t in tensors.items()}


def logit_derivative(
    model: nn.Module,
    inputs: Any,
    direction: Mapping[str, torch.Tensor] | torch.Tensor,
    *,
    params: Mapping[str, torch.Tensor] | None = None,
    logits_fn: LogitsFn | None = None,
    eval_mode: bool = True,
    method: str = "jvp",
    fd_eps: float | None = None,
) -> torch.Tensor:
    """Directional logit derivatives ``a = J_z v``, shaped like the logits (classes last).

    Args:
        model: the module (DDP / compile wrappers unwrapped).
        inputs: the batch handed to ``model`` (or to ``logits_fn``).
        direction: v, a dict over (a subset of) the trainable parameters' names, or a flat
            vector over all trainable parameters in ``named_parameters`` order.
        params: the point theta (same keys as ``direction``); default the live parameters.
        logits_fn: ``logits_fn(model, inputs) -> logits`` when the forward is not
            ``model(inputs)``.
        eval_mode: evaluate in eval mode (BatchNorm running statistics, no dropout); the
            modules' modes are restored afterwards and no buffer is modified.
        method: ``"jvp"`` (exact, one forward-mode pass) or ``"fd"`` (central finite
            difference, two plain forwards; error O(h^2), see ``fd_eps``).
        fd_eps: length ``|h v|`` of the finite-difference step (default 1e-2 in float32,
            1e-5 in float64).
    """
    if method not in _METHODS:
        raise ValueError(f"Invalid method: {method}")
    model = unwrap_model(model)
    live = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if isinstance(direction, torch.Tensor):
        direction = unflatten(direction, live)
    if params is None:
        params = {k: live[k] for k in direction}
    if set(params) != set(direction):
        raise ValueError("Invalid direction: its keys differ from the parameters' keys")
    f, prefix = _forward(model, inputs, logits_fn)
    theta = {k: params[k].detach() for k in direction}
    v = {k: direction[k].detach() for k in direction}
    folded = folded_module(model) if method == "jvp" and logits_fn is None and _FOLD else None
    if folded is not None:  # conv-BatchNorm pairs as one convolution: same J_z v, cheaper
        folded.channels_last = _CHANNELS_LAST
        f, prefix = model_fn(folded, inputs), "gm."
        used = {k for k, _ in folded.gm.named_parameters()}
        theta = {k: t for k, t in theta.items() if k in used}
        v = {k: t for k, t in v.items() if k in used}
    if (
        method == "jvp"
        and _CHANNELS_LAST
        and any(t.dim() == 4 and t.device.type == "cpu" for t in theta.values())
    ):
        # CPU convolutions, BatchNorm and pooling run several times faster in channels-last
        # (measured: benchmarks/radius.py); 4-d weights in that format carry it through
        theta, v = _channels_last(theta), _channels_last(v)
    with _eval_mode(model, eval_mode), torch.no_grad():
        if method == "jvp":
            return jvp(
                f, {prefix + k: t for k, t in theta.items()}, {prefix + k: t for k, t in v.items()}
            )[1]
        norm = float(_norm(v.values()))
        if norm == 0.0:
            return torch.zeros_like(f({prefix + k: t for k, t in theta.items()}))
        dtype = next(iter(theta.values())).dtype
        eps = fd_eps if fd_eps is not None else (1e-5 if dtype == torch.float64 else 1e-2)
        h = eps / norm
        plus = f({prefix + k: theta[k] + h * v[k] for k in theta})
        minus = f({prefix + k: theta[k] - h * v[k] for k in theta})
        return (plus - minus) / (2 * h)


def logit_spread(
    model: nn.Module, inputs: Any, direction, logits_fn: LogitsFn | None = None, **kwargs
) -> torch.Tensor:
    """Per-sample spread ``Delta_a(x; v) = max_k a_k - min_k a_k`` of ``a = J_z v``, shape (N,).

    Leading logit dimensions are flattened (a sequence model's tokens are samples). Keyword
    arguments as in :func:`logit_derivative`.
    """
    return _spread(logit_derivative(model, inputs, direction, logits_fn=logits_fn, **kwargs))


def _spread(a: torch.Tensor) -> torch.Tensor:
    a = a.reshape(-1, a.shape[-1])
    return a.amax(dim=1) - a.amin(dim=1)


def _worst_spread(model, inputs, direction, tangent=None, **kwargs) -> torch.Tensor:
    """``max_x Delta_a(x; v)`` over the batch, and over ranks under DDP (a 0-dim tensor);
    ``tangent`` is ``J_z v`` when already known."""
    if tangent is None:
        spread = logit_spread(model, inputs, direction, **kwargs)
    else:
        spread = _spread(tangent)
    worst = spread.max() if spread.numel() else spread.new_zeros(())
    return distributed.all_reduce_max(worst)


def _norm(tensors) -> torch.Tensor:
    norms = torch._foreach_norm([t.detach() for t in tensors])
    if len({(n.dtype, n.device) for n in norms}) > 1:  # mixed: one stack in float64
        norms = [n.double().cpu() for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms).double())


def normalized_step(
    model: nn.Module,
    inputs: Any,
    update,
    logits_fn: LogitsFn | None = None,
    temperature: float = 1.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, rho_a)`` of the update p: ``r = max_x Delta_a(x; p) / (pi T)``, ``rho_a = |p| / r``.

    ``rho_a`` is the radius along ``p / |p|`` (infinite when no logit moves); ``r`` does not
    depend on the sign of p and scales with its length. Under DDP the maximum over samples is
    a maximum over ranks too. Keyword arguments as in :func:`logit_derivative`.
    """
    r = _worst_spread(model, inputs, update, logits_fn=logits_fn, **kwargs) / (
        math.pi * temperature
    )
    norm = _norm(update.values() if isinstance(update, Mapping) else [update]).to(r.dtype)
    rho = torch.where(r > 0, norm / r, torch.full_like(r, math.inf))
    return r, rho


class RadiusLimiter:
    r"""Caps every optimizer step at a fraction ``r_max`` of the softmax radius.

    .. math::

        p = \theta_{new} - \theta_{old}, \quad r = \max_x \Delta_a(x; p) / \pi, \quad
        \theta \leftarrow \theta_{old} + \min(1, r_{max} / r)\, p

    Usage in any loop (the optimizer steps inside)::

        limiter = RadiusLimiter(model, r_max=1.0)
        loss = loss_fn(model(x), y); loss.backward()
        limiter.step(optimizer, x)

    Modes: ``"limit"`` (the controller above), ``"rho_set"`` (``s = r_max / r``: every step
    has length ``r_max * rho_a``, the learning rate picked by the radius), ``"monitor"``
    (measure only; the parameters are the optimizer's). Directions: ``"update"`` (the actual
    update p, the paper's method) or ``"neg_grad"`` (the released code's variant: the radius
    along -g, and ``r = Delta_a(lr g) / pi`` limits ``lr |g|`` by scaling every group's
    learning rate for this step; momentum and Adam's preconditioning are not measured).

    Args:
        model: the module whose logits are measured (DDP-wrapped is fine).
        r_max: the allowed normalized step (a target ``r_t < 1`` is stricter).
        logits_fn: ``logits_fn(model, inputs) -> logits`` when the forward is not ``model(x)``.
        mode: ``"limit"``, ``"rho_set"`` or ``"monitor"``.
        direction: ``"update"`` or ``"neg_grad"``.
        eval_mode: measure in eval mode (BatchNorm running statistics unchanged, no dropout).
        temperature: T when the loss uses ``logits / T`` (radius ``pi T / Delta_a``).
        method: ``"jvp"`` (exact) or ``"fd"`` (central finite difference; cheaper on some
            models, relative error of r about ``fd_eps^2``; the guarantee becomes approximate).
        fd_eps: the finite-difference step length (see :func:`logit_derivative`).
        nonfinite: when r or the update is NaN/Inf: ``"raise"`` (restore theta_old, then
            ValueError) or ``"skip"`` (restore theta_old and count the step as skipped). With
            ``"neg_grad"`` a non-finite gradient always raises, before the optimizer steps.
        reuse_forward: with ``method="jvp"`` and no ``logits_fn``, keep (by forward hooks) the
            activations of the model's latest forward and, when that forward is exactly the
            measured one (same batch object, same parameters, a chain of Linear, LayerNorm
            and elementwise modules; see :mod:`torchsteer.control._radius_tangent`), compute
            only the tangent from them: the same exact ``J_z p`` without the primal pass.
            Otherwise (BatchNorm, functional operations between modules, another batch) the
            general JVP runs. The attribute ``reused`` counts the steps that took this path.

    Memory: one copy of the optimized parameters (P numbers) between snapshot and correction.
    Parameters the model does not hold are rescaled with the rest but not measured; frozen
    parameters (``requires_grad=False``) are left alone.
    """

    def __init__(
        self,
        model: nn.Module,
        r_max: float = 1.0,
        logits_fn: LogitsFn | None = None,
        mode: str = "limit",
        direction: str = "update",
        eval_mode: bool = True,
        temperature: float = 1.0,
        method: str = "jvp",
        fd_eps: float | None = None,
        nonfinite: str = "raise",
        reuse_forward: bool = True,
    ):
        if not (isinstance(r_max, int | float) and math.isfinite(r_max) and r_max > 0):
            raise ValueError(f"Invalid r_max: {r_max}")
        if mode not in _MODES:
            raise ValueError(f"Invalid mode: {mode}")
        if direction not in _DIRECTIONS:
            raise ValueError(f"Invalid direction: {direction}")
        if method not in _METHODS:
            raise ValueError(f"Invalid method: {method}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"Invalid temperature: {temperature}")
        if fd_eps is not None and not (math.isfinite(fd_eps) and fd_eps > 0):
            raise ValueError(f"Invalid fd_eps: {fd_eps}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"Invalid nonfinite: {nonfinite}")
        self.model, self.r_max, self.logits_fn = model, float(r_max), logits_fn
        self.mode, self.direction, self.eval_mode = mode, direction, eval_mode
        self.temperature, self.method, self.fd_eps, self.nonfinite = (
            temperature,
            method,
            fd_eps,
            nonfinite,
        )
        self.steps, self.limited, self.skipped, self.reused = 0, 0, 0, 0
        self.last: dict[str, float] = {}
        self._names: dict[torch.Tensor, str] = {}
        self._pending: tuple | None = None
        self._recorder: ActivationRecorder | None = None
        self._reuse_ok = False
        if reuse_forward and method == "jvp" and logits_fn is None:
            root = unwrap_model(model)
            self._recorder = ActivationRecorder(root)
            self._prefix = {m: (n + "." if n else "") for n, m in root.named_modules()}
            if not self._recorder.supported:
                self._recorder = None

    # -- the step -----------------------------------------------------------------------------
    def step(self, optimizer: torch.optim.Optimizer, inputs: Any, closure=None):
        """Snapshot, ``optimizer.step(closure)``, measure and rescale; returns the closure's loss.

        With ``direction="neg_grad"`` the gradients must be present before the call (a closure
        is then evaluated once more by the optimizer, as usual).
        """
        self.before_step(optimizer, inputs)
        try:
            loss = optimizer.step(closure) if closure is not None else optimizer.step()
        except BaseException:
            self._pending = None
            raise
        self.after_step(inputs)
        return loss

    def before_step(self, optimizer: torch.optim.Optimizer, inputs: Any = None) -> None:
        """Snapshot theta_old (``"update"``), or measure along -g and scale the lr."""
        named = self._named_params(optimizer)
        rec = self._recorder
        self._reuse_ok = rec is not None and inputs is not None and rec.usable(inputs)
        if self.direction == "update":
            old = [p.detach().clone() for _, p in named]
            self._pending = ("update", optimizer, named, old)
            return
        if inputs is None:
            raise ValueError("Invalid inputs: direction='neg_grad' measures before the step")
        lrs = [g["lr"] for g in optimizer.param_groups]
        d = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = self._names.get(p)
                if name is not None and p.grad is not None:
                    d[name] = -group["lr"] * p.grad.detach()
        r, rho, tau = self._measure(inputs, d)
        s = self._scale(r, tau)
        if s is None:  # non-finite gradient: nothing has stepped yet; always an error
            self._record(r, rho, tau, 0.0, skipped=True)
            raise ValueError("Invalid gradient: the radius along -g is NaN or Inf")
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * s
        self._pending = ("neg_grad", optimizer, lrs, (r, rho, tau, s))

    def after_step(self, inputs: Any = None) -> dict[str, float]:
        """Measure the update and rescale it (``"update"``) or restore the lr (``"neg_grad"``)."""
        if self._pending is None:
            raise RuntimeError("after_step called without before_step")
        kind, optimizer, a, b = self._pending
        self._pending = None
        if kind == "neg_grad":
            for group, lr in zip(optimizer.param_groups, a):
                group["lr"] = lr
            self._record(*b)
            return self.last
        named, old = a, b
        with torch.no_grad():
            new = [p.detach() for _, p in named]
            update = torch._foreach_sub(new, old)
            d = {n: u for (n, _), u in zip(named, update) if n is not None}
            point = {n: o for (n, _), o in zip(named, old) if n is not None}
            r, rho, tau = self._measure(inputs, d, point)
            s = self._scale(r, tau)
            if s is None:
                torch._foreach_copy_(new, old)
                self._record(r, rho, tau, 0.0, skipped=True)
                if self.nonfinite == "raise":
                    raise ValueError("Invalid update: the step or its radius is NaN or Inf")
                return self.last
            if s != 1.0:
                torch._foreach_mul_(update, s)
                torch._foreach_add_(update, old)
                torch._foreach_copy_(new, update)
        self._record(r, rho, tau, s)
        return self.last

    # -- helpers ------------------------------------------------------------------------------
    def _named_params(self, optimizer) -> list[tuple[str | None, torch.Tensor]]:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if any(p not in self._names for p in params):
            self._names = {
                p: n for n, p in unwrap_model(self.model).named_parameters() if p.requires_grad
            }
        return [(self._names.get(p), p) for p in params]

    def _measure(self, inputs, d, point=None) -> tuple[float, float, float]:
        if not d:
            return 0.0, math.inf, 0.0
        tangent = None
        if self._reuse_ok:
            self._reuse_ok = False
            with torch.no_grad():
                tangent = self._recorder.tangent(
                    inputs, point or {}, d, self._prefix, check_params=False
                )
            self._recorder.clear()  # the activations are not needed any more
            self.reused += int(tangent is not None)
            if self._recorder.structural_failure:  # operations between modules: never applies
                self._recorder.remove()
                self._recorder = None
        worst = _worst_spread(
            self.model,
            inputs,
            d,
            tangent=tangent,
            params=point,
            logits_fn=self.logits_fn,
            eval_mode=self.eval_mode,
            method=self.method,
            fd_eps=self.fd_eps,
        )
        r_tau = torch.stack([worst.double() / (math.pi * self.temperature), _norm(d.values())])
        r, tau = r_tau.tolist()
        return r, (tau / r if r > 0 else math.inf), tau

    def _scale(self, r: float, tau: float) -> float | None:
        if not (math.isfinite(r) and math.isfinite(tau)):
            return None
        if self.mode == "monitor" or r == 0.0:
            return 1.0
        if self.mode == "rho_set":
            return self.r_max / r
        return 1.0 if r <= self.r_max else self.r_max / r

    def _record(self, r, rho, tau, s, skipped=False) -> None:
        self.steps += 1
        limited = (not skipped) and self.mode == "limit" and s < 1.0
        self.limited += int(limited)
        self.skipped += int(skipped)
        self.last = {
            "r": r,
            "rho_a": rho,
            "tau": tau,
            "scale": s,
            "limited": float(limited),
            "fraction_limited": self.limited / self.steps,
            "skipped": float(skipped),
            "step": self.steps,
        }

    @property
    def pending(self) -> bool:
        """True between :meth:`before_step` and :meth:`after_step`."""
        return self._pending is not None

    @property
    def signals(self) -> dict[str, float]:
        """The last step's ``r``, ``rho_a``, ``tau`` (|p|), ``scale``, ``limited`` and the
        running ``fraction_limited``."""
        return dict(self.last)

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "limited": self.limited,
            "skipped": self.skipped,
            "reused": self.reused,
            "last": dict(self.last),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        self.limited = int(state.get("limited", 0))
        self.skipped = int(state.get("skipped", 0))
        self.reused = int(state.get("reused", 0))
        self.last = dict(state.get("last", {}))

"""Directional logit derivatives and the softmax radius of a direction (the measurement).

``a(x; v) = J_z(x) v`` for every sample by one forward-mode JVP over ``functional_call`` at a
point theta (in eval mode by default), its per-sample spread ``Delta_a = max_k a_k - min_k a_k``
and the normalized step ``r = max_x Delta_a(x; p) / (pi T)`` of an update p with the radius
``rho_a = |p| / r``. See :mod:`torchsteer.control.radius` for the theory and the limiter.

On CPUs, 4-d weights run in channels-last and eval-mode BatchNorm is folded into the
convolution before it (:mod:`torchsteer.control.radius._fold`): the same ``J_z v``, cheaper
(the options ``channels_last`` and ``fold`` of :func:`logit_derivative`, on by default).

References:
    P. Sao, "Ghosts of Softmax: Complex Singularities That Limit Safe Step Sizes in
    Cross-Entropy", arXiv:2603.13552 (2026).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from torchsteer import distributed
from torchsteer.control.radius._checks import check_direction, check_positive, forward_error
from torchsteer.control.radius._fold import channels_last_strides, folded_module
from torchsteer.jacobian import jvp, model_fn, param_dict, unflatten, unwrap_model

__all__ = ["LogitsFn", "logit_derivative", "logit_spread", "normalized_step"]

LogitsFn = Callable[[nn.Module, Any], torch.Tensor]
METHODS = ("jvp", "fd", "fd1")  # the measurement methods (not in __all__: the limiter's)


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
        return _logits_only(model_fn(model, inputs), None), ""
    return _logits_only(model_fn(_LogitsModule(model, logits_fn), inputs), logits_fn), "model."


def _logits_only(f, logits_fn: LogitsFn | None):
    """``f`` that raises a clear error when its output is not one logits tensor (a model
    returning ``(logits, aux)`` needs ``logits_fn``)."""

    def logits(params):
        out = f(params)
        if not isinstance(out, torch.Tensor):
            what = "the model" if logits_fn is None else "logits_fn"
            raise ValueError(
                f"Invalid logits: {what} returned a {type(out).__name__}, not a tensor; pass "
                "logits_fn=lambda model, x: model(x)[0] (the element that holds the logits)"
            )
        return out

    return logits


def _channels_last(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: channels_last_strides(t) if t.dim() == 4 else t for k, t in tensors.items()}


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
    primal: torch.Tensor | None = None,
    channels_last: bool = True,
    fold: bool = True,
) -> torch.Tensor:
    """Directional logit derivatives ``a = J_z v``, shaped like the logits (classes last).

    Args:
        model: the module (DDP / compile wrappers unwrapped).
        inputs: the batch handed to ``model`` (or to ``logits_fn``).
        direction: v, a dict over the trainable parameters' names (all of them; a subset
            only with ``params`` naming the same subset), or a flat vector over all trainable
            parameters in ``named_parameters`` order. Unknown names, missing ones and
            shapes other than the parameter's raise ``ValueError``; so do an empty batch and a
            forward that fails on ``inputs`` (a ``RuntimeError`` of the model, named).
        params: the point theta (same keys as ``direction``); default the live parameters.
        logits_fn: ``logits_fn(model, inputs) -> logits`` when the forward is not
            ``model(inputs)``.
        eval_mode: evaluate in eval mode (BatchNorm running statistics, no dropout); the
            modules' modes are restored afterwards and no buffer is modified.
        method: ``"jvp"`` (exact, one forward-mode pass), ``"fd"`` (central finite
            difference, two plain forwards; error O(h^2), see ``fd_eps``) or ``"fd1"``
            (one-sided difference ``(z(theta + h v) - z(theta)) / h``, error O(h); one
            forward when ``primal`` is given).
        fd_eps: length ``|h v|`` of the finite-difference step (default: ``"fd"`` 1e-2 in
            float32, 1e-5 in float64; ``"fd1"`` 1e-3 in float32, 1e-7 in float64).
        primal: ``"fd1"`` only: the logits at theta (in the measured mode), when known.
        channels_last: ``"jvp"`` only: on CPUs, run 4-d weights (and the folded convolutions'
            outputs) in channels-last; the same ``J_z v`` to rounding, faster.
        fold: ``"jvp"`` without ``logits_fn`` only: fold eval-mode BatchNorm into the
            convolution (or Linear) before it; the same ``J_z v`` to rounding, faster.
    """
    if method not in METHODS:
        raise ValueError(f"Invalid method: {method}")
    model = unwrap_model(model)
    if isinstance(direction, torch.Tensor) or params is None:  # the limiter passes both dicts
        live = param_dict(model)
        if isinstance(direction, torch.Tensor):
            direction = unflatten(direction, live)
        check_direction(direction, live, params)
        if params is None:
            params = {k: live[k] for k in direction}
    else:  # (names and shapes only: no tensor is read)
        check_direction(direction, params, params)
    if set(params) != set(direction):
        raise ValueError("Invalid direction: its keys differ from the parameters' keys")
    theta = {k: params[k].detach() for k in direction}
    v = {k: direction[k].detach() for k in direction}
    folded = folded_module(model) if method == "jvp" and logits_fn is None and fold else None
    if folded is not None:  # conv-BatchNorm pairs as one convolution: same J_z v, cheaper
        folded.channels_last = channels_last  # (the cached module: set for this call)
        f, prefix = _logits_only(model_fn(folded, inputs), None), "gm."
        used = {k for k, _ in folded.gm.named_parameters()}
        theta = {k: t for k, t in theta.items() if k in used}
        v = {k: t for k, t in v.items() if k in used}
    else:
        f, prefix = _forward(model, inputs, logits_fn)
    if (
        method == "jvp"
        and channels_last
        and any(t.dim() == 4 and t.device.type == "cpu" for t in theta.values())
    ):
        # CPU convolutions, BatchNorm and pooling run several times faster in channels-last
        # (measured: benchmarks/radius.py); 4-d weights in that format carry it through
        theta, v = _channels_last(theta), _channels_last(v)
    try:
        return _derivative(f, prefix, theta, v, eval_mode, model, method, fd_eps, primal)
    except NotImplementedError:  # an operation without a forward-mode rule: not the input
        raise
    except RuntimeError as err:  # (a forward that fails on its inputs: a named error)
        raise forward_error(err) from err


def _derivative(f, prefix, theta, v, eval_mode, model, method, fd_eps, primal):
    """``J_z v`` at theta by ``method`` (see :func:`logit_derivative`)."""
    with _eval_mode(model, eval_mode), torch.no_grad():
        if method == "jvp":
            return jvp(
                f, {prefix + k: t for k, t in theta.items()}, {prefix + k: t for k, t in v.items()}
            )[1]
        norm = float(_norm(v.values()))
        if norm == 0.0:
            return torch.zeros_like(f({prefix + k: t for k, t in theta.items()}))
        dtype = next(iter(theta.values())).dtype
        if method == "fd1":
            default = 1e-7 if dtype == torch.float64 else 1e-3
            h = (fd_eps if fd_eps is not None else default) / norm
            plus = f({prefix + k: theta[k] + h * v[k] for k in theta})
            base = primal if primal is not None else f({prefix + k: t for k, t in theta.items()})
            return (plus - base.detach()) / h
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
    if a.dim() == 2 and a.shape[0] > 1 and a.stride(0) == 1 and a.shape[1] > 0:
        # a column-major (N, C) view (the recorder's logits tangent, computed as (C, N)):
        # reduce over the C rows of the contiguous (C, N), vectorized along the batch
        t = a.t()
        return t.amax(0) - t.amin(0)
    if a.dim() == 0 or math.prod(a.shape[:-1]) == 0:
        raise ValueError(
            f"Invalid inputs: an empty batch (logits of shape {tuple(a.shape)}); the radius "
            "needs at least one sample"
        )
    a = a.reshape(-1, a.shape[-1])
    if a.shape[-1] == 0:
        return a.new_zeros(a.shape[0])
    low, high = a.aminmax(dim=1)  # one pass over the logits' tangent
    return high - low


def worst_spread(model, inputs, direction, tangent=None, **kwargs) -> torch.Tensor:
    """``max_x Delta_a(x; v)`` over the batch, and over ranks under DDP (a 0-dim tensor);
    ``tangent`` is ``J_z v`` when already known.

    Under DDP every rank's verdict rides in the same all-reduce (max) as ``[worst_r, e_r]``:
    ``e_r = 1`` when its ``worst_r`` is NaN/Inf (a NaN in its batch alone), ``2`` when its
    measurement raised (inputs it rejects: this rank raises that error after the reduce).
    Where ``max e > 0`` the result is NaN on every rank, so each refuses (or, with
    ``nonfinite="skip"``, skips) the step alike and none waits in a collective (issue 18 #4);
    the flag is compared on the device (no host synchronization)."""
    if not distributed.is_distributed():
        spread = (
            _spread(tangent)
            if tangent is not None
            else logit_spread(model, inputs, direction, **kwargs)
        )
        return spread.max() if spread.numel() else spread.new_zeros(())
    ref = next(iter(direction.values())) if isinstance(direction, Mapping) else direction
    error = None
    try:
        spread = (
            _spread(tangent)
            if tangent is not None
            else logit_spread(model, inputs, direction, **kwargs)
        )
        worst = spread.max()
        flag = (~worst.isfinite()).to(worst.dtype)
    except (ValueError, RuntimeError) as exc:
        error, dtype = exc, tangent.dtype if tangent is not None else ref.dtype
        worst, flag = torch.zeros((), dtype=dtype, device=ref.device), torch.full((), 2.0)
    both = distributed.all_reduce_max(torch.stack([worst, flag.to(worst)]))
    if error is not None:
        raise error
    return torch.where(both[1] > 0, math.nan, both[0])


def _norms(tensors) -> torch.Tensor:
    """The tensors' norms stacked in float64."""
    norms = torch._foreach_norm([t.detach() for t in tensors])
    if len({(n.dtype, n.device) for n in norms}) > 1:  # mixed: one stack in float64
        norms = [n.double().cpu() for n in norms]
    return torch.stack(norms).double()


def _norm(tensors) -> torch.Tensor:
    return torch.linalg.vector_norm(_norms(tensors))


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
    temperature = check_positive("temperature", temperature)
    r = worst_spread(model, inputs, update, logits_fn=logits_fn, **kwargs) / (math.pi * temperature)
    norm = _norm(update.values() if isinstance(update, Mapping) else [update]).to(r.dtype)
    rho = torch.where(r > 0, norm / r, torch.full_like(r, math.inf))
    return r, rho

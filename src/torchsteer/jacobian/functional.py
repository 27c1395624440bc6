"""Derivative products on ``torch.func``: the functional path.

Notation: parameters theta (P numbers) as a dict ``name -> tensor``; ``f(params)`` returns
per-sample residuals r (B,), logits z (B, C) or a scalar loss. ``J = d f / d theta``.

- :func:`jvp`: ``J v`` in one forward-mode pass (``torch.func.jvp``).
- :func:`vjp`: ``J^T u`` in one reverse pass (``torch.func.vjp``).
- :func:`jacobian`: the dense ``J`` flattened to (N, P), reverse mode, rows chunked.
- :func:`per_sample_jacobian`: the (B, P) matrix of per-sample loss gradients by
  ``vmap(grad(.))`` over samples: about the cost of one backward of the batch, no B^2 term.
- :func:`hvp`: ``H v`` forward-over-reverse, ``jvp(grad(f))``.
- :func:`ggn_vp`: ``J^T H_L J v``: a JVP, the loss Hessian in output space, a VJP.

Tangents and results are dicts shaped like ``params``; a flat vector is accepted as a
tangent wherever a dict is (see :mod:`torchsteer.jacobian.params`). Build ``f`` from a
module with :func:`model_fn`; DDP and ``torch.compile`` wrappers are unwrapped.

Example::

    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    params = param_dict(model)
    f = model_fn(model, x)                      # f(params) = model(x) with those params
    logits, jv = jvp(f, params, v)              # (B, 2) each
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, grad, jacrev
from torch.func import jvp as _jvp
from torch.func import vjp as _vjp

from torchsteer.jacobian.params import unflatten, unwrap_model
from torchsteer.jacobian.per_sample import per_sample_jacobian  # re-exported: one dispatcher

__all__ = [
    "ggn_vp",
    "hvp",
    "jacobian",
    "jvp",
    "model_fn",
    "per_sample_jacobian",
    "vjp",
]

Params = Mapping[str, torch.Tensor]


def _detached(params: Params) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in params.items()}


def _as_tangent(v: Params | torch.Tensor, params: Params) -> dict[str, torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return unflatten(v, params)  # type: ignore[return-value]
    if set(v.keys()) != set(params.keys()):
        raise ValueError("Invalid tangent: its keys differ from the parameters' keys")
    return {k: v[k] for k in params}


def model_fn(
    model: nn.Module, *args: Any, buffers: Params | None = None, **kwargs: Any
) -> Callable[[Params], Any]:
    """``f(params) = model(*args, **kwargs)`` evaluated with ``params`` through ``functional_call``.

    Buffers (BatchNorm running statistics) are taken from the model unless given. Parameters
    not in ``params`` (frozen ones) keep their module values.
    """
    model = unwrap_model(model)
    bufs = dict(model.named_buffers()) if buffers is None else dict(buffers)

    def f(params: Params):
        return functional_call(model, ({**params, **bufs} if bufs else params), args, kwargs)

    return f


def jvp(f: Callable[[Params], torch.Tensor], params: Params, v: Params | torch.Tensor):
    """``(f(params), J v)`` in one forward-mode pass.

    Runs ``f`` once on dual tensors (``torch.autograd.forward_ad``): the same forward-mode
    arithmetic as ``torch.func.jvp``, without its functorch wrapping, which measured about
    15 % slower per call on an MLP. ``f`` may be called under ``torch.no_grad()``.

    Args:
        f: function of the parameter dict.
        params: the point theta.
        v: tangent, a dict like ``params`` or a flat vector of P entries.
    """
    tangent = _as_tangent(v, params)
    with fwAD.dual_level():
        duals = {k: fwAD.make_dual(p.detach(), tangent[k].detach()) for k, p in params.items()}
        out = fwAD.unpack_dual(f(duals))
    jv = out.tangent if out.tangent is not None else torch.zeros_like(out.primal)
    return out.primal, jv


def vjp(f: Callable[[Params], torch.Tensor], params: Params, u: torch.Tensor):
    """``J^T u`` as a dict like ``params`` (u shaped like ``f(params)``)."""
    out, vjp_fn = _vjp(f, _detached(params))
    if u.shape != out.shape:
        raise ValueError(f"Invalid cotangent: shape {tuple(u.shape)}, expected {tuple(out.shape)}")
    return vjp_fn(u)[0]


def _flatten_rows(jac: dict[str, torch.Tensor], params: Params, n: int) -> torch.Tensor:
    return torch.cat([jac[k].reshape(n, -1) for k in params], dim=1)


def jacobian(
    f: Callable[[Params], torch.Tensor], params: Params, chunk_size: int | None = None
) -> torch.Tensor:
    """The dense Jacobian of ``f`` flattened to (N, P), N = ``f(params).numel()``.

    Reverse mode over the N outputs (``jacrev``); ``chunk_size`` rows are computed at a time
    to bound memory. Works for any ``f``, including models whose samples interact (BatchNorm
    in train mode); for per-sample losses :func:`per_sample_jacobian` is much cheaper.
    """
    p = _detached(params)

    def flat_f(q):
        return f(q).reshape(-1)

    n = flat_f(p).numel()
    jac = jacrev(flat_f, chunk_size=chunk_size)(p)
    return _flatten_rows(jac, params, n)


def hvp(f: Callable[[Params], torch.Tensor], params: Params, v: Params | torch.Tensor):
    """Hessian-vector product ``H v`` of the scalar ``f``, forward-over-reverse (a dict).

    A non-scalar ``f`` raises ``ValueError`` (torch.func's own message names ``grad_and_value``).
    """
    try:
        return _jvp(grad(f), (_detached(params),), (_as_tangent(v, params),))[1]
    except RuntimeError as err:
        if "to return a scalar Tensor" in str(err):
            raise ValueError(
                "Invalid f: hvp needs a scalar function of the parameters (sum or mean it)"
            ) from err
        raise


def ggn_vp(
    outputs_fn: Callable[[Params], torch.Tensor],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    params: Params,
    v: Params | torch.Tensor,
):
    """Generalized Gauss-Newton product ``J^T H_L J v`` (a dict).

    ``J`` is the Jacobian of ``outputs_fn(params) -> z`` and ``H_L`` the Hessian of the scalar
    ``loss_fn(z)`` in output space, so the product is positive semi-definite whenever the loss
    is convex in z (squared error, cross-entropy).
    """
    p = _detached(params)
    z, vjp_fn = _vjp(outputs_fn, p)
    _, jv = _jvp(outputs_fn, (p,), (_as_tangent(v, params),))
    _, hjv = _jvp(grad(loss_fn), (z.detach(),), (jv,))
    return vjp_fn(hjv)[0]

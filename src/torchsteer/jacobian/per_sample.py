"""Per-sample loss gradients: the (B, P) matrix ``J[a] = d l_a / d theta``, samples independent.

:func:`per_sample_jacobian` dispatches to the cheapest of three paths, all O(B) single-sample
work with no B^2 term as in a batched backward:

1. **Outer products** (every optimized parameter the weight or bias of an ``nn.Linear``
   called once per forward). For a linear layer z = W a + b applied to sample a's input
   ``a_a`` (shape (T, in) when the layer acts on a sequence, T = 1 otherwise) with output
   gradient ``g_a = dl_a / dz_a``::

       dl_a / dW = sum_t g_a[t] a_a[t]^T        dl_a / db = sum_t g_a[t]

   One forward and one backward of the whole batch give every ``a_a`` and ``g_a`` (the
   backward of ``sum_a l_a`` yields ``g_a`` because samples do not interact); J is then
   written straight into its buffer, one outer-product kernel per layer: about one backward
   plus writing B * P numbers (:func:`linear_per_sample_jacobian`, None when it does not
   apply).
2. **Expanded weights** (every trainable parameter optimized and owned by a module torch's
   ``call_for_per_sample_grads`` supports: Linear, Conv, Embedding, LayerNorm, GroupNorm):
   one forward and one backward with ``grad_sample``.
3. **vmap**: ``vmap(grad(.))`` over single samples, any model.

``loss_fn(outputs, targets)`` returns per-sample losses; entries beyond the first dimension
are summed per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from torchsteer.jacobian.params import unwrap_model

__all__ = ["linear_per_sample_jacobian", "per_sample_jacobian"]

METHODS = ("auto", "linear", "expanded", "vmap")

# Modules whose parameters torch's expanded weights differentiate per sample in one backward.
_EXPANDED_WEIGHT_MODULES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Embedding,
    nn.LayerNorm,
    nn.GroupNorm,
)


def _linear_owners(model: nn.Module, names: list[str]) -> dict[str, nn.Linear] | None:
    """``{module prefix: Linear}`` when every name is ``<prefix>.weight`` or ``.bias`` of one."""
    modules = dict(model.named_modules())
    owners: dict[str, nn.Linear] = {}
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        mod = modules.get(prefix)
        if not isinstance(mod, nn.Linear) or leaf not in ("weight", "bias"):
            return None
        owners[prefix] = mod
    return owners


def linear_per_sample_jacobian(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    out: torch.Tensor | None = None,
    return_values: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    """The (B, P) per-sample Jacobian by outer products, or None when it does not apply.

    With ``return_values`` it returns ``(losses, J)``, the (B,) per-sample losses (detached)
    of the same forward. ``out``, a (B, P) buffer of the parameters' dtype, is written in
    place when given (a reused buffer avoids the page faults of a fresh allocation of B * P
    numbers each call).
    """
    names = list(params)
    owners = _linear_owners(model, names)
    if owners is None:
        return None
    B = inputs.shape[0]
    captured: dict[str, list[torch.Tensor]] = {p: [] for p in owners}
    handles = []
    for prefix, mod in owners.items():

        def hook(m, args, out, prefix=prefix):
            captured[prefix].append(args[0])
            captured[prefix].append(out)

        handles.append(mod.register_forward_hook(hook))
    try:
        q = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        bufs = dict(model.named_buffers())
        with torch.enable_grad():
            losses = loss_fn(functional_call(model, {**q, **bufs}, (inputs,)), targets)
            if losses.shape != (B,):
                return None
            if any(len(c) != 2 for c in captured.values()):
                return None  # a layer unused or called twice: not this fast path
            outs = [captured[p][1] for p in owners]
            grads = torch.autograd.grad(losses.sum(), outs, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    gmap = dict(zip(owners, grads))
    dtype = next(iter(params.values())).dtype
    P = sum(v.numel() for v in params.values())
    if out is not None:
        if out.shape != (B, P) or out.dtype != dtype:
            raise ValueError(
                f"Invalid out: {tuple(out.shape)} {out.dtype}, expected ({B}, {P}) {dtype}"
            )
        J = out
    else:
        J = torch.empty(B, P, dtype=dtype, device=inputs.device)
    offset = 0
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        n = params[name].numel()
        block = J[:, offset : offset + n]
        g = gmap[prefix]
        a = captured[prefix][0].detach()
        if g is None:
            block.zero_()
        elif leaf == "bias":
            block.copy_(g.reshape(B, -1, g.shape[-1]).sum(1))
        elif g.dim() == 2:
            torch.mul(g.unsqueeze(2), a.unsqueeze(1), out=block.view(B, g.shape[1], a.shape[1]))
        else:
            g3, a3 = g.reshape(B, -1, g.shape[-1]), a.reshape(B, -1, a.shape[-1])
            torch.bmm(g3.transpose(1, 2), a3, out=block.view(B, g3.shape[2], a3.shape[2]))
        offset += n
    return (losses.detach(), J) if return_values else J


def _summed(loss_fn, n: int):
    """``loss_fn`` with entries beyond the first dimension summed per sample."""

    def summed(output, target):
        losses = loss_fn(output, target)
        if losses.dim() >= 1 and losses.shape[0] == n:
            return losses.reshape(n, -1).sum(1)
        return losses  # not per-sample: the outer-product path declines it

    return summed


def _expanded_weights_apply(model: nn.Module, params: Mapping[str, torch.Tensor]) -> bool:
    """Whether every trainable parameter sits in a supported module and all are optimized."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if trainable != {id(p) for p in params.values()}:
        return False
    owners = (m for m in model.modules() if next(m.parameters(recurse=False), None) is not None)
    return all(type(m) in _EXPANDED_WEIGHT_MODULES for m in owners)


def _per_sample_expanded(model, loss_fn, inputs, targets, params):
    """One forward and one backward with torch's expanded weights (``grad_sample``)."""
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

    n = inputs.shape[0]
    try:
        with torch.enable_grad():
            out = call_for_per_sample_grads(model, batch_size=n, loss_reduction="sum")(inputs)
            values = loss_fn(out, targets).reshape(n, -1).sum(1)
            values.sum().backward()
        jac = torch.cat([p.grad_sample.reshape(n, -1) for p in params.values()], dim=1)
    finally:
        for p in params.values():
            if hasattr(p, "grad_sample"):
                del p.grad_sample
    return values.detach(), jac


def _per_sample_vmap(model, loss_fn, inputs, targets, params, chunk_size):
    """``vmap(grad_and_value)`` of the loss of one sample at a time."""
    bufs = dict(model.named_buffers())
    p = {k: v.detach() for k, v in params.items()}

    def sample_loss(q, x, y):
        out = functional_call(model, {**q, **bufs}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0)).sum()

    per_sample = vmap(grad_and_value(sample_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)
    grads, values = per_sample(p, inputs, targets)
    n = inputs.shape[0]
    return values, torch.cat([grads[k].reshape(n, -1) for k in params], dim=1)


def per_sample_jacobian(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    params: Mapping[str, torch.Tensor] | None = None,
    chunk_size: int | None = None,
    method: str = "auto",
    out: torch.Tensor | None = None,
    *,
    return_values: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the B per-sample losses, one row each: a (B, P) matrix.

    ``J[a] = grad_theta loss_fn(model(inputs[a:a+1]), targets[a:a+1])``. Each sample is
    treated alone, so the model must treat samples independently (eval-mode BatchNorm is
    fine, train-mode BatchNorm is not: use :func:`torchsteer.jacobian.jacobian` then).

    Args:
        model: the module (wrappers unwrapped).
        loss_fn: ``loss_fn(outputs, targets)`` per-sample losses (``reduction="none"``);
            entries beyond the first dimension are summed per sample.
        inputs: the batch inputs, leading dimension B.
        targets: the batch targets, leading dimension B.
        params: the parameters to differentiate (default: the trainable ones).
        chunk_size: samples per vmap chunk (bounds memory to chunk_size * P); implies vmap
            under ``"auto"``.
        method: ``"linear"`` (outer products), ``"expanded"`` (expanded weights), ``"vmap"``
            (any model) or ``"auto"``: the first of these that applies (see the module
            docstring; expanded weights fall back to vmap on a function they cannot handle).
            An explicit ``"linear"`` or ``"expanded"`` that does not apply raises ValueError.
        out: optional (B, P) buffer of the first parameter's dtype the result is written
            into (reuse it across steps: a fresh B * P allocation costs page faults
            comparable to the product itself).
        return_values: also return the (B,) per-sample losses (detached) of the same pass,
            as ``(losses, J)``.
    """
    if method not in METHODS:
        raise ValueError(f"Invalid method: {method!r} (expected one of {METHODS})")
    model = unwrap_model(model)
    if params is None:
        params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    B = inputs.shape[0]
    if B == 0:
        raise ValueError("Invalid inputs: an empty batch (0 samples) has no per-sample rows")
    if out is not None:
        dtype = next(iter(params.values())).dtype
        P = sum(v.numel() for v in params.values())
        if out.shape != (B, P) or out.dtype != dtype:
            raise ValueError(
                f"Invalid out: {tuple(out.shape)} {out.dtype}, expected ({B}, {P}) {dtype}"
            )
    summed = _summed(loss_fn, B)
    auto = method == "auto" and chunk_size is None
    found = None
    if method == "linear" or auto:
        found = linear_per_sample_jacobian(
            model, summed, inputs, targets, params, out=out, return_values=True
        )
        if found is None and method == "linear":
            raise ValueError("Invalid method: 'linear' needs every parameter in an nn.Linear")
    if found is None and (method == "expanded" or auto):
        if _expanded_weights_apply(model, params):
            try:
                found = _per_sample_expanded(model, loss_fn, inputs, targets, params)
            except RuntimeError:  # a function expanded weights cannot handle: use vmap
                if method == "expanded":
                    raise
        elif method == "expanded":
            raise ValueError(
                "Invalid method: 'expanded' needs every trainable parameter optimized and in "
                "a module expanded weights support (Linear, Conv, Embedding, LayerNorm, "
                "GroupNorm)"
            )
    if found is None:
        found = _per_sample_vmap(model, loss_fn, inputs, targets, params, chunk_size)
    values, J = found
    if out is not None and J is not out:
        J = out.copy_(J)
    return (values, J) if return_values else J

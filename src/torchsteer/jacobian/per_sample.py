"""Per-sample gradients of networks made of ``nn.Linear`` layers, by outer products.

For a linear layer z = W a + b applied to sample a's input ``a_a`` (shape (T, in) when the
layer acts on a sequence, T = 1 otherwise) with output gradient ``g_a = dl_a / dz_a``:

    dl_a / dW = sum_t g_a[t] a_a[t]^T        dl_a / db = sum_t g_a[t]

One forward and one backward of the whole batch give every ``a_a`` and ``g_a`` (the backward
of ``sum_a l_a`` yields ``g_a`` because samples do not interact); the (B, P) Jacobian is then
written straight into its buffer, one outer-product kernel per layer. This costs about one
backward plus writing B * P numbers, where ``vmap(grad(.))`` runs B batched matmuls of one
row each. It applies only when every trainable parameter is the weight or bias of an
``nn.Linear`` called once per forward; :func:`linear_per_sample_jacobian` returns ``None``
otherwise and the caller falls back to ``vmap(grad(.))``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["linear_per_sample_jacobian"]


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

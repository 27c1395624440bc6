"""BatchNorm folded into the convolution before it, for the eval-mode JVP of the radius limiter.

In eval mode a BatchNorm after a convolution (or Linear) is a per-channel affine map, so the
pair is one convolution with

    W' = W * alpha,  b' = (b - mu) * alpha + beta,  alpha = gamma / sqrt(var + eps)

(mu, var the running statistics). The logits are the same function of the parameters
(W, b, gamma, beta), so running the forward-mode JVP through the folded network gives the
same ``J_z v``: the folding is written in dual-tensor arithmetic and differentiates itself
(``dW' = dW alpha + W dalpha``). What it saves is the BatchNorm's forward and tangent
arithmetic over every activation (four elementwise passes of the batch per layer), about a
quarter of the JVP of a small CNN on a CPU (``benchmarks/radius.py``).

The model is traced once with ``torch.fx.symbolic_trace``; a pair is folded when the
convolution's output has the BatchNorm as its only user and the BatchNorm is in eval mode
with running statistics at the time of the JVP. Models that do not trace are run as they are.
"""

from __future__ import annotations

import weakref

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = ["folded_module"]

_CONVS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _FoldingInterpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, pairs: dict[str, str]):
        super().__init__(gm)
        self.pairs = pairs  # conv/linear target -> BatchNorm target
        self.folded: set[str] = set()

    def call_module(self, target, args, kwargs):
        if target in self.folded:  # this BatchNorm was folded into the layer before it
            return args[0]
        bn_name = self.pairs.get(target)
        if bn_name is not None and not kwargs and len(args) == 1:
            layer, bn = self.fetch_attr(target), self.fetch_attr(bn_name)
            if not bn.training and bn.running_mean is not None:
                self.folded.add(bn_name)
                return _folded_call(layer, bn, args[0])
        return super().call_module(target, args, kwargs)


def _folded_call(layer: nn.Module, bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    alpha = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        alpha = bn.weight * alpha
    bias = (
        -bn.running_mean * alpha if layer.bias is None else (layer.bias - bn.running_mean) * alpha
    )
    if bn.bias is not None:
        bias = bias + bn.bias
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    weight = layer.weight * alpha.reshape(shape)
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    return _CONVS[type(layer)](
        x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups
    )


class _Folded(nn.Module):
    """``forward(x)`` = the traced model with its conv-BatchNorm pairs folded (same names)."""

    def __init__(self, gm: torch.fx.GraphModule, pairs: dict[str, str]):
        super().__init__()
        self.gm, self.pairs = gm, pairs

    def forward(self, x):
        return _FoldingInterpreter(self.gm, self.pairs).run(x)


def _pairs(gm: torch.fx.GraphModule) -> dict[str, str]:
    mods = dict(gm.named_modules())
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), _BNS):
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        layer = mods.get(src.target)
        ok_conv = type(layer) in _CONVS and layer.padding_mode == "zeros"
        ok_linear = isinstance(layer, nn.Linear) and isinstance(mods[node.target], nn.BatchNorm1d)
        if (ok_conv or ok_linear) and len(node.args) == 1 and not node.kwargs:
            out[src.target] = node.target
    return out


def folded_module(model: nn.Module) -> nn.Module | None:
    """A module computing ``model(x)`` with conv-BatchNorm pairs folded in eval mode, its
    parameters named ``"gm." + name``; ``None`` when the model has no such pair or does not
    trace (cached per model)."""
    if model in _CACHE:
        result, modules = _CACHE[model]
        live = dict(model.named_modules())
        if all(live.get(name) is m for name, m in modules.items()):
            return result
    result = None
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # any model fx cannot trace runs unfolded
        gm = None
    if gm is not None:
        pairs = _pairs(gm)
        if pairs:
            result = _Folded(gm, pairs)
    live = dict(model.named_modules())  # retraced when a submodule is replaced
    used = {} if result is None else dict(result.gm.named_modules())
    _CACHE[model] = (result, {k: live.get(k) for k in used if k})
    return result

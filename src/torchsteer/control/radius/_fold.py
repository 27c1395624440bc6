"""BatchNorm folded into the convolution before it, for the eval-mode JVP of the radius limiter.

In eval mode a BatchNorm after a convolution (or Linear) is a per-channel affine map, so the
pair is one convolution with

    W' = W * alpha,  b' = (b - mu) * alpha + beta,  alpha = gamma / sqrt(var + eps)

(mu, var the running statistics). The logits are the same function of the parameters
(W, b, gamma, beta), so running the forward-mode JVP through the folded network gives the
same ``J_z v``: the folding is written in dual-tensor arithmetic and differentiates itself
(``dW' = dW alpha + W dalpha``). The folded convolution's tangent ``conv(x, dW') +
conv(dx, W') + db'`` is one convolution of ``[x, dx]`` with ``[dW', W']`` (no sum over the
activations), and its output is kept in channels-last on CPUs. This saves the BatchNorm's
forward and tangent arithmetic over every activation and the layout conversions: measured,
the JVP of the lr-spike CNN drops from about 1.1x to 0.6x a training forward+backward
(``benchmarks/radius.py``).

When the BatchNorm's only user is a ReLU (``F.relu``, ``torch.relu``, ``nn.ReLU``, not in
place), it is applied inside the folded layer, in place on the fresh primal and tangent
(``relu_`` and the mask ``threshold_backward`` written over the tangent): the same values,
two fewer activation-sized tensors (measured: about 2.5 ms of a 62 ms JVP on the lr-spike CNN).

The model is traced once with ``torch.fx.symbolic_trace``; a pair is folded when the
convolution's output has the BatchNorm as its only user and the BatchNorm is in eval mode
with running statistics at the time of the JVP. Models that do not trace are run as they are.
"""

from __future__ import annotations

import weakref

import torch
import torch.autograd.forward_ad as fwAD
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = ["folded_module"]

_CONVS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def channels_last_strides(t: torch.Tensor) -> torch.Tensor:
    """``t`` (4-d) in channels-last, with channels-last strides even where the layout is
    ambiguous (one channel, or 1 x 1 images): CPU convolutions pick their (much faster)
    channels-last kernels from the strides."""
    t = t.contiguous(memory_format=torch.channels_last)
    _, c, h, w = t.shape
    strides = (c * h * w, 1, w * c, c)
    if t.stride() != strides and t.is_contiguous():  # same memory order either way
        t = t.as_strided(t.shape, strides)
    return t


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """A 4-d (dual) CPU tensor with primal and tangent in channels-last."""
    if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.device.type != "cpu":
        return t
    primal, tangent = fwAD.unpack_dual(t)
    if tangent is None:
        return channels_last_strides(t)
    return fwAD.make_dual(channels_last_strides(primal), channels_last_strides(tangent))


class _FoldingInterpreter(torch.fx.Interpreter):
    def __init__(
        self,
        gm: torch.fx.GraphModule,
        pairs: dict[str, str],
        channels_last: bool,
        relus: dict[str, torch.fx.Node] | None = None,
    ):
        super().__init__(gm)
        self.pairs = pairs  # conv/linear target -> BatchNorm target
        self.relus = relus or {}  # BatchNorm target -> its only user, a ReLU (applied fused)
        self.folded: set[str] = set()
        self.skip: set[torch.fx.Node] = set()
        self.channels_last = channels_last

    def run_node(self, n):
        if n in self.skip:  # a ReLU already applied inside the folded layer
            return self.env[n.args[0]]
        return super().run_node(n)

    def call_module(self, target, args, kwargs):
        if target in self.folded:  # this BatchNorm was folded into the layer before it
            return args[0]
        bn_name = self.pairs.get(target)
        if bn_name is not None and not kwargs and len(args) == 1:
            layer, bn = self.fetch_attr(target), self.fetch_attr(bn_name)
            linear_ok = not isinstance(layer, nn.Linear) or args[0].dim() == 2  # (N, C) only
            if not bn.training and bn.running_mean is not None and linear_ok:
                self.folded.add(bn_name)
                x = _channels_last(args[0]) if self.channels_last else args[0]
                relu = self.relus.get(bn_name)
                out = _folded_call(layer, bn, x, self.channels_last, relu is not None)
                if relu is not None:
                    self.skip.add(relu)
                # one layout for primal and tangent: CPU convolutions, pooling and the
                # elementwise tangent rules are several times faster in channels-last, and
                # mixed layouts cost a conversion at every use
                return _channels_last(out) if self.channels_last else out
        return super().call_module(target, args, kwargs)


def _folded_call(
    layer: nn.Module, bn: nn.Module, x: torch.Tensor, channels_last: bool = False, relu=False
) -> torch.Tensor:
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
    if channels_last:
        weight = _channels_last(weight)
    if isinstance(layer, nn.Linear):
        out = F.linear(x, weight, bias)
        return F.relu(out) if relu else out
    conv, groups = _CONVS[type(layer)], layer.groups
    args = (layer.stride, layer.padding, layer.dilation)
    (xp, xt), (wp, wt), (bp, bt) = (fwAD.unpack_dual(t) for t in (x, weight, bias))
    if groups != 1 or (xt is None and wt is None):
        out = conv(x, weight, bias, *args, groups)
        return F.relu(out) if relu else out
    # the tangent conv(x, dW) + conv(dx, W) + db as one convolution over [x, dx]
    if xt is None:
        tangent = conv(xp, wt, bt, *args)
    elif wt is None:
        tangent = conv(xt, wp, bt, *args)
    else:
        tangent = conv(torch.cat([xp, xt], 1), torch.cat([wt, wp], 1), bt, *args)
    primal = conv(xp, wp, bp, *args)
    if relu:  # in place on the fresh outputs: no two more activation-sized tensors
        primal.relu_()
        torch.ops.aten.threshold_backward.grad_input(tangent, primal, 0, grad_input=tangent)
    return fwAD.make_dual(primal, tangent)


class _Folded(nn.Module):
    """``forward(x)`` = the traced model with its conv-BatchNorm pairs folded (same names)."""

    def __init__(self, gm: torch.fx.GraphModule, pairs: dict[str, str]):
        super().__init__()
        self.gm, self.pairs = gm, pairs
        self.channels_last = True
        self.relus = _relus(gm, pairs)

    def forward(self, x):
        return _FoldingInterpreter(self.gm, self.pairs, self.channels_last, self.relus).run(x)


def _relus(gm: torch.fx.GraphModule, pairs: dict[str, str]) -> dict[str, torch.fx.Node]:
    """BatchNorm target -> the ReLU that is its output's only user (``F.relu``,
    ``torch.relu`` or an ``nn.ReLU`` module, not in place): applied inside the folded layer."""
    mods = dict(gm.named_modules())
    bns = set(pairs.values())
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in bns or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.args != (node,) or user.kwargs.get("inplace", False):
            continue
        kw = set(user.kwargs) - {"inplace"}
        is_fn = user.op == "call_function" and user.target in (F.relu, torch.relu) and not kw
        is_mod = user.op == "call_module" and type(mods.get(user.target)) is nn.ReLU
        if is_mod and mods[user.target].inplace:
            continue
        if is_fn or (is_mod and not user.kwargs):
            out[node.target] = user
    return out


def _pairs(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Layer -> BatchNorm targets to fold: each module called once, the layer's only user the
    BatchNorm (exact types: a subclass may override forward)."""
    mods = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or type(mods.get(node.target)) not in _BNS:
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        layer = mods.get(src.target)
        ok_conv = type(layer) in _CONVS and layer.padding_mode == "zeros"
        ok_linear = type(layer) is nn.Linear and type(mods[node.target]) is nn.BatchNorm1d
        once = calls[src.target] == 1 and calls[node.target] == 1
        if (ok_conv or ok_linear) and once and len(node.args) == 1 and not node.kwargs:
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

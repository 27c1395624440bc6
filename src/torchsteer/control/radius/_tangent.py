"""Tangent-only JVP that reuses the activations of the training forward.

The radius limiter takes its JVP ``a = J_z(theta_old) p`` at the pre-step parameters, the
point where the training forward has just run. For a chain of modules whose output does not
depend on the training flag (Linear, LayerNorm, elementwise activations), that forward
already computed every primal quantity the JVP needs; only the tangent remains:

    Linear       dz = a dW^T + db + da W^T            (a: the recorded input)
    LayerNorm    dy = gamma * J_n du + dgamma * xhat + dbeta,
                 J_n = (I - 1 1^T / n - xhat xhat^T / n) / sigma   (symmetric: J_n du is
                 the normalization's backward applied to du; dgamma * xhat + dbeta is the
                 layer norm of u with weight dgamma and bias dbeta: three fused passes)
    GELU/ReLU/Tanh/Sigmoid   dy = f'(u) du   (PyTorch's own derivative kernels)

Forward hooks on the leaf modules keep (module, input, output) of the latest forward of the
model; the tangent pass walks them in call order, linking a module's input to an earlier
module's output by identity (``is``). It applies only when the recorded forward is exactly
the forward the measurement would run, and :meth:`ActivationRecorder.tangent` returns
``None`` (the caller falls back to the general dual-tensor JVP) otherwise:

- every leaf module called in that forward has a rule here (no BatchNorm, no unknown module);
  Dropout only when it was the identity (eval mode or ``p = 0``);
- each module input is the root input, an earlier module's output, or a tensor that did not
  require grad in a forward under grad mode (so its tangent is 0);
- the root module ran once on exactly the measured ``inputs`` (the same tensor object) and its
  output is a recorded module's output;
- no trainable parameter and no recorded tensor changed in place since (``_version``);
- the modules were in the same training mode as the measurement (``eval_mode`` only matters
  for modules that behave differently, which are not accepted anyway).

Cost: the tangent only, about two thirds of a forward-mode JVP's arithmetic on an MLP (no
primal matmuls), written with ``out=`` kernels into buffers kept from step to step (fresh
activation-sized tensors every step cost page faults: measured, about 10 % of the tangent).
Memory: references to the recorded activations until the measurement (autograd holds them
until the backward anyway), and the kept tangent buffers (about one per recorded module).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ActivationRecorder"]

_ELEMENTWISE = (nn.GELU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Dropout, nn.Flatten)
_SUPPORTED = (nn.Linear, nn.LayerNorm, *_ELEMENTWISE)


def _new(shape, like: torch.Tensor, role: int = 0) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _linear(module, a, da, theta, dtheta, stats=None, new=_new):
    w, dw, db = theta["weight"], dtheta.get("weight"), dtheta.get("bias")
    if a.dim() == 2 and (dw is not None or da is not None):  # into a kept buffer
        out = new((a.shape[0], w.shape[0]), a)
        if dw is not None:
            if db is None:
                torch.mm(a, dw.t(), out=out)
            else:
                torch.addmm(db, a, dw.t(), out=out)
            if da is not None:
                out.addmm_(da, w.t())
        else:
            torch.mm(da, w.t(), out=out)
            if db is not None:
                out.add_(db)
        return out
    out = None if dw is None else F.linear(a, dw, db)
    if da is not None:
        if out is not None and out.dim() == 2:
            out.addmm_(da, w.t())
        else:
            term = F.linear(da, w)
            out = term if out is None else out.add_(term)
    if db is not None and dw is None:
        out = db.expand(*a.shape[:-1], db.shape[0]).clone() if out is None else out.add_(db)
    return out


def _linear_t(module, a, da, theta, dtheta, stats=None, new=_new):
    """The logits' tangent as ``(dz)^T = dW a^T + W da^T + db``, computed (C, N) and returned
    as its (N, C) view: with few classes C, the (C x K) @ (K x N) products run at about twice
    the speed of (N x K) @ (K x C) (measured on the lr-spike MLP head: 93 vs 217 us), and the
    per-sample spread reduces over the C rows vectorized along the batch."""
    w, dw, db = theta["weight"], dtheta.get("weight"), dtheta.get("bias")
    if a.dim() != 2 or (dw is None and da is None):
        return _linear(module, a, da, theta, dtheta, stats, new)
    out = new((w.shape[0], a.shape[0]), a, 1)
    if dw is not None:
        if db is None:
            torch.mm(dw, a.t(), out=out)
        else:
            torch.addmm(db.unsqueeze(1), dw, a.t(), out=out)
        if da is not None:
            out.addmm_(w, da.t())
    else:
        torch.mm(w, da.t(), out=out)
        if db is not None:
            out.add_(db.unsqueeze(1))
    return out.t()


def _layer_norm(module, u, du, theta, dtheta, stats=None, new=_new):
    shape, gamma = module.normalized_shape, theta.get("weight")
    dgamma, dbeta = dtheta.get("weight"), dtheta.get("bias")
    if stats is not None:  # the training forward's mean and 1 / sigma: xhat in one pass
        mean, rstd = stats
        t = None
        if dgamma is not None:
            # (u - mean) * rstd: two row-broadcast passes that vectorize (an addcmul with two
            # (N, 1) operands does not: measured 3x slower), then the (C,) scale and shift
            xhat = torch.sub(u, mean, out=new(u.shape, u)).mul_(rstd)
            t = xhat.mul_(dgamma) if dbeta is None else xhat.mul_(dgamma).add_(dbeta)
        elif dbeta is not None:
            t = dbeta.expand_as(u).clone()
    else:
        if dgamma is None and dbeta is not None:
            dgamma = torch.zeros_like(dbeta)
        # one fused pass: t = dgamma * xhat + dbeta, and the row statistics of u
        t, mean, rstd = torch.native_layer_norm(u, shape, dgamma, dbeta, module.eps)
        if dgamma is None:
            t = None  # t is xhat; no parameter tangent
    if du is None:
        return t
    # J_n is symmetric: J_n du = (the normalization's backward)(du)
    out = torch.ops.aten.native_layer_norm_backward(
        du, u, shape, mean, rstd, None, None, [True, False, False]
    )[0]
    if gamma is not None:
        return out.mul_(gamma) if t is None else t.addcmul_(out, gamma)
    return out if t is None else out.add_(t)


def _elementwise(module, u, du, y, new=_new):
    if isinstance(module, nn.GELU):
        out = new(du.shape, du)
        return torch.ops.aten.gelu_backward.grad_input(
            du, u, approximate=module.approximate, grad_input=out
        )
    if isinstance(module, nn.ReLU):
        return torch.ops.aten.threshold_backward.grad_input(du, y, 0, grad_input=new(du.shape, du))
    if isinstance(module, nn.Tanh):
        return torch.ops.aten.tanh_backward.grad_input(du, y, grad_input=new(du.shape, du))
    if isinstance(module, nn.Sigmoid):
        return torch.ops.aten.sigmoid_backward.grad_input(du, y, grad_input=new(du.shape, du))
    if isinstance(module, nn.Flatten):
        return du.flatten(module.start_dim, module.end_dim)
    return du  # Identity, Dropout as the identity


_RULES = {nn.Linear: _linear, nn.LayerNorm: _layer_norm}


class ActivationRecorder:
    """Keeps each leaf module's input and output of the model's latest forward.

    Args:
        model: the (unwrapped) module whose ``forward(inputs)`` gives the logits.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.records: list[tuple] = []  # (module, input, output, versions, saved statistics)
        self.valid = False
        self.structural_failure = False  # the model's forward is not a chain of rules here
        self._root_input: Any = None
        self._root_output: Any = None
        self._versions: list[int] = []
        self._checked: list[int] | None = None  # parameter versions of the last checked record
        self._depth = 0
        self._handles = []
        leaves = [m for m in model.modules() if m is not model and next(m.children(), None) is None]
        # exact types: a subclass may override forward
        self.supported = bool(leaves) and all(type(m) in _SUPPORTED for m in leaves)
        if not self.supported:  # BatchNorm, attention, custom leaves: never applies, no hooks
            return
        self._params = list(model.parameters())
        # (module, name, parameter) of every parameter slot: the check that none was replaced
        # is one dict lookup per slot, without walking the module tree every step
        self._slots = [
            (m, k, p) for m in model.modules() for k, p in m._parameters.items() if p is not None
        ]
        self._keys = {m: None for m in leaves if type(m) in _RULES}  # module -> full names
        self._keys_of: Any = None
        self._buffers: dict[tuple[int, int], torch.Tensor] = {}  # tangent buffers, kept
        self._news: list = []  # record index -> its buffer getter (see _kept)
        self._kept_ptrs: set[int] = set()
        self._handles = [
            model.register_forward_pre_hook(self._start, with_kwargs=True),
            model.register_forward_hook(self._end, always_call=True),
        ]
        self._handles += [m.register_forward_hook(self._record) for m in leaves]

    def __getstate__(self):
        # copies (deepcopy of the model, pickling) start without a record: the activations
        # are non-leaf tensors, and a copy's forward records its own
        state = dict(self.__dict__)
        state.update(records=[], valid=False, _root_input=None, _root_output=None)
        state.update(_versions=[], _handles=[], _depth=0)
        # the kept tangent buffers are not shared, and the getters are bound to this object
        state.update(_buffers={}, _kept_ptrs=set(), _news=[])
        return state

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        self.records, self.valid = [], False
        self._root_input = self._root_output = None
        self._versions = []

    # -- hooks --------------------------------------------------------------------------------
    def _start(self, module, args, kwargs):
        self._depth += 1
        if self._depth > 1:  # a re-entrant call of the root: not a plain forward
            self.valid = False
            return
        self.clear()
        ok = len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
        self.valid = ok and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        if self.valid:
            self._root_input = args[0]
            self._versions = [p._version for p in self._params]

    def _record(self, module, args, output):
        # runs for every leaf in every forward: references and version numbers only
        if not self.valid or self._depth != 1:
            return
        if len(args) != 1 or not isinstance(output, torch.Tensor):
            self.valid = False
            return
        u, kind = args[0], type(module)
        if not isinstance(u, torch.Tensor) or (
            kind is nn.Dropout and module.training and module.p > 0
        ):
            self.valid = False
            return
        stats = None
        if kind is nn.LayerNorm:  # the forward's row statistics, saved for backward
            fn = output.grad_fn
            if fn is not None and fn.name() == "NativeLayerNormBackward0":
                # native_layer_norm's results 1 and 2: the mean and 1 / sigma, shape (..., 1)
                stats = (getattr(fn, "_saved_result1", None), getattr(fn, "_saved_result2", None))
                rows = u.numel() // math.prod(module.normalized_shape)
                if any(not isinstance(t, torch.Tensor) or t.numel() != rows for t in stats):
                    stats = None
        self.records.append((module, u, output, u._version, output._version, stats))

    def _end(self, module, args, output):
        self._depth -= 1
        if self._depth == 0 and self.valid:
            self._root_output = output if isinstance(output, torch.Tensor) else None
            self.valid = self._root_output is not None and bool(self.records)

    @property
    def root_output(self) -> torch.Tensor | None:
        """The model's output (the logits) of the recorded forward; ``None`` without a
        record (see :meth:`usable` for whether it is the measured forward)."""
        return self._root_output

    # -- the tangent pass ---------------------------------------------------------------------
    def usable(self, inputs: Any, check_params: bool = True) -> bool:
        """Whether the record is the forward on ``inputs`` (at the current parameters: call
        this before the optimizer steps; afterwards pass ``check_params=False``, which accepts
        only a record at the parameters of that earlier check: a closure may have run the
        forward again at other points, as LBFGS does)."""
        if not self.valid or inputs is not self._root_input:
            return False
        if check_params:
            if any(m._parameters.get(k) is not p for m, k, p in self._slots) or any(
                p._version != v for p, v in zip(self._params, self._versions)
            ):
                return False
            self._checked = self._versions
        elif self._versions != self._checked:
            return False
        return all(u._version == vu and y._version == vy for _, u, y, vu, vy, _ in self.records)

    def tangent(
        self,
        inputs: Any,
        theta: Mapping[str, torch.Tensor],
        direction: Mapping[str, torch.Tensor],
        prefix_of: Mapping[nn.Module, str],
        check_params: bool = True,
    ) -> torch.Tensor | None:
        """``J_z v`` at the recorded point from the recorded activations, or ``None``.

        Args:
            inputs: the batch of the measurement (must be the recorded root input).
            theta: the point's parameters by full name (needed: the recorded modules').
            direction: the tangent by full name; missing names have tangent 0.
            prefix_of: module -> its name prefix (``"body.0."``).
            check_params: see :meth:`usable`.
        """
        if not self.usable(inputs, check_params):
            return None
        with torch.no_grad():  # a measurement (the kept buffers are written with out=)
            return self._tangent(theta, direction, prefix_of)

    def _tangent(self, theta, direction, prefix_of) -> torch.Tensor | None:
        if prefix_of is not self._keys_of:  # the full names are cached per prefix map
            self._keys, self._keys_of = dict.fromkeys(self._keys), prefix_of
        tangents: dict[int, torch.Tensor | None] = {}
        news = self._news
        if len(news) < len(self.records):
            news += [self._kept(i) for i in range(len(news), len(self.records))]
        # one precision for the whole direction and point (the usual case): the per-module
        # check below then reduces to the activations' dtype
        dtypes = {t.dtype for t in direction.values()}
        dtypes.update(t.dtype for t in theta.values())
        same = next(iter(dtypes)) if len(dtypes) == 1 else None
        for i, (module, u, y, _, _, stats) in enumerate(self.records):
            new = news[i]
            if u is self._root_input:
                du = None
            elif id(u) in tangents:
                du = tangents[id(u)]
            elif not u.requires_grad:
                du = None
            else:  # the input came from an operation outside the recorded modules
                self.structural_failure = True
                return None
            rule = _RULES.get(type(module))
            if u.dtype != y.dtype or (du is not None and du.dtype != u.dtype):
                return None  # mixed precision (autocast): the general path
            if rule is None:
                dy = None if du is None else _elementwise(module, u, du, y, new)
            else:
                keys = self._keys.get(module)
                if keys is None:
                    prefix = prefix_of[module]
                    keys = self._keys[module] = (
                        ("weight", prefix + "weight"),
                        ("bias", prefix + "bias"),
                    )
                th, dth, known = {}, {}, u.dtype is same
                for k, full in keys:
                    if full in direction:
                        dth[k] = direction[full]
                    if full in theta:
                        th[k] = theta[full]
                    else:
                        th[k], known = getattr(module, k), False
                if not known and any(
                    t is not None and t.dtype != u.dtype for t in (*th.values(), *dth.values())
                ):
                    return None  # parameters and activations in different precisions
                if y is self._root_output and rule is _linear:
                    rule = _linear_t  # the logits: (C, N) layout
                dy = rule(module, u, du, th, dth, stats, new)
            tangents[id(y)] = dy
        if id(self._root_output) not in tangents:
            self.structural_failure = True
            return None
        out = tangents[id(self._root_output)]
        if out is None:
            return torch.zeros_like(self._root_output)
        if out.untyped_storage().data_ptr() in self._kept_ptrs:
            out = out.clone()  # the caller's own tensor: the kept buffers are reused next step
        return out

    def _kept(self, i: int):
        """``new(shape, like, role=0)``: the tangent buffer kept for record ``i`` (reused from
        step to step: no allocation, no page faults), reallocated when shape or type change."""

        def new(shape, like, role=0):
            key = (i, role)
            t = self._buffers.get(key)
            if t is None or t.shape != shape or t.dtype != like.dtype or t.device != like.device:
                if t is not None:
                    self._kept_ptrs.discard(t.untyped_storage().data_ptr())
                t = self._buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
                self._kept_ptrs.add(t.untyped_storage().data_ptr())
            return t

        return new

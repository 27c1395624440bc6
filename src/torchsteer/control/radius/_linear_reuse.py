"""The general JVP without the primal products of the Linear layers (``reuse_forward``).

The limiter's measurement ``a = J_z(theta_old) p`` runs one forward-mode pass at theta_old,
the point where the training forward has just run. For a model that is not a chain of the
rules of :mod:`torchsteer.control.radius._tangent` (a transformer: embeddings, attention and
residual additions between the modules) the pass still carries the primal of every layer,
but the primal of a Linear layer ``y = u W^T + b`` is an output the training forward already
computed. During the pass each ``nn.Linear`` call is answered from that forward:

    primal   y  = the recorded output (no product), when the pass's input u equals the
                  recorded input bit for bit (checked: one read of u)
    tangent  dy = du W^T + u dW^T + db            (two products: the JVP's own arithmetic)

so the pass costs the tangent's products plus the primal of the other operations (layer
norms, attention, activations: a small share of a transformer's forward). Exactness: the
primal is bitwise the one the pass would compute from the same input and weights up to the
product kernel (the training forward's ``linear``); the tangent is the same two products
that forward-mode AD forms for ``linear``. Any call that does not match (another input, a
mode-dependent module upstream such as dropout in training, a module called more often than
in the recorded forward) computes its primal as usual: never a wrong ``y``.

The record is valid when the training forward ran under grad mode on exactly the measured
``inputs`` (the same tensor object), every recorded Linear still holds the weight and bias
objects of its call, unchanged, and no recorded tensor changed in place since (``_version``),
checked before the optimizer steps: the measurement's point theta_old is then the point of
that forward. (A change through ``.data`` keeps the version, and is invisible to the record
as to autograd.)

Memory: references to every Linear input and output of the latest forward until the
measurement (autograd holds most of them until the backward anyway): for GPT-2 small at
B x T = 8 x 128 about 0.8 GB, the logits (8 x 128 x 50,257) the largest; the pass drops each
call's tensors once it has answered it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

__all__ = ["LinearRecorder"]


class LinearRecorder:
    """Forward hooks keeping every ``nn.Linear`` call (input, output) of the latest forward.

    Args:
        model: the (unwrapped) module whose ``forward(inputs)`` gives the logits.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.linears = [m for m in model.modules() if type(m) is nn.Linear]  # exact type
        self.supported = bool(self.linears)
        self.calls: dict[nn.Module, list[tuple]] = {}  # module -> [(u, y, W, b, versions)]
        self.valid = False
        self.structural_failure = False  # (the chain recorder's flag: never set here)
        self._root_input: Any = None
        self._checked: dict | None = None  # the record accepted before the optimizer stepped
        self._depth = 0
        self._handles = []
        if not self.supported:
            return
        self._handles = [
            model.register_forward_pre_hook(self._start, with_kwargs=True),
            model.register_forward_hook(self._end, always_call=True),
        ]
        self._handles += [m.register_forward_hook(self._record) for m in self.linears]

    def __getstate__(self):
        state = dict(self.__dict__)  # copies start without a record and without hooks
        state.update(calls={}, valid=False, _root_input=None, _checked=None, _handles=[])
        state.update(_depth=0)
        return state

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        self.calls, self.valid, self._root_input = {}, False, None

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

    def _record(self, module, args, output):
        if not self.valid or self._depth != 1:
            return
        u = args[0] if len(args) == 1 else None
        if not isinstance(u, torch.Tensor) or not isinstance(output, torch.Tensor):
            return  # this call is simply not answered from the record
        w, b = module.weight, module.bias  # the parameters of this call, and their versions
        vw, vb = w._version, None if b is None else b._version
        self.calls.setdefault(module, []).append(
            (u, output, u._version, output._version, w, vw, b, vb)
        )

    def _end(self, module, args, output):
        self._depth -= 1
        if self._depth == 0 and self.valid:
            self.valid = bool(self.calls)

    # -- the measurement ----------------------------------------------------------------------
    def usable(self, inputs: Any, check_params: bool = True) -> bool:
        """The record is the forward on ``inputs`` and every recorded Linear still holds the
        parameters of its call, unchanged (before the optimizer steps); after it,
        ``check_params=False`` accepts only the record of that earlier check."""
        if not self.valid or inputs is not self._root_input:
            return False
        if not check_params:
            return self.calls is self._checked and self._unchanged(params=False)
        ok = self._unchanged(params=True)
        self._checked = self.calls if ok else None
        return ok

    def _unchanged(self, params: bool) -> bool:
        for module, calls in self.calls.items():
            for u, y, vu, vy, w, vw, b, vb in calls:
                if u._version != vu or y._version != vy:
                    return False
                if params and (
                    module._parameters.get("weight") is not w
                    or module._parameters.get("bias") is not b
                    or w._version != vw
                    or (b is not None and b._version != vb)
                ):
                    return False
        return True

    def answering(self, point, names_of) -> _Answering:
        """A context in which every recorded Linear's call takes its primal from the record
        (see the module); it holds this record, which :meth:`clear` may then drop.
        ``point``: the names the measurement evaluates at theta_old (None: every parameter
        live); ``names_of``: parameter -> name. A Linear with a trained parameter outside
        ``point`` (taken live by the pass, it may have moved since the forward) computes its
        primal as usual."""
        return _Answering(self.calls, point, names_of)


class _Answering:
    def __init__(self, calls, point, names_of):
        self.calls, self.point, self.names_of = calls, point, names_of
        self.hits = 0  # Linear calls answered from the record
        self.patched: list[nn.Module] = []

    def __enter__(self) -> _Answering:
        for module, calls in self.calls.items():
            if "forward" in module.__dict__:  # someone else's override: leave it
                continue
            params = [p for p in module._parameters.values() if p is not None]
            if self.point is not None and any(
                p.requires_grad and self.names_of.get(p) not in self.point for p in params
            ):
                continue
            module.forward = self._answer(module, calls)
            self.patched.append(module)
        self.calls = None  # each call's tensors go once the pass has used them (peak memory)
        return self

    def __exit__(self, *exc) -> None:
        for module in self.patched:
            del module.forward
        self.patched = []

    def _answer(self, module: nn.Linear, calls: list[tuple]):
        plain = type(module).forward

        def forward(x):
            if not calls:
                return plain(module, x)
            u, y = calls.pop(0)[:2]
            xp, xt = fwAD.unpack_dual(x)
            if xp.shape != u.shape or xp.dtype != u.dtype or not torch.equal(xp, u):
                calls.clear()  # the pass left the recorded forward: no later call matches
                return plain(module, x)
            wp, wt = fwAD.unpack_dual(module.weight)
            bt = None if module.bias is None else fwAD.unpack_dual(module.bias).tangent
            self.hits += 1
            dy = _linear_tangent(xp, xt, wp, wt, bt)
            return y.detach() if dy is None else fwAD.make_dual(y.detach(), dy)

        return forward


def _linear_tangent(u, du, w, dw, db) -> torch.Tensor | None:
    """``du W^T + u dW^T + db`` shaped like the Linear's output (None: no tangent)."""
    lead = u.shape[:-1]
    u2 = u.reshape(-1, u.shape[-1])
    out = None
    if du is not None:
        du2 = du.reshape(-1, du.shape[-1])
        out = torch.mm(du2, w.t()) if db is None else torch.addmm(db, du2, w.t())
        if dw is not None:
            out.addmm_(u2, dw.t())
    elif dw is not None:
        out = torch.mm(u2, dw.t()) if db is None else torch.addmm(db, u2, dw.t())
    elif db is not None:
        out = db.expand(u2.shape[0], db.shape[0]).clone()
    return None if out is None else out.view(*lead, out.shape[-1])

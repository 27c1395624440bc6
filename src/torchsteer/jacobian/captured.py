"""Per-sample gradients from ONE backward of a closure's summed loss (the fast graph path).

A ``torch.optim`` user's closure runs the forward and returns per-sample losses
``l_a``, ``a = 1..B``. Every layer ``y = layer(x; W)`` of the forward sees, for sample ``a``,
its input ``x_a`` and (from one backward of ``L = sum_a l_a``) the output gradient
``g_a = dL / dy_a = dl_a / dy_a`` (samples are independent). The rows of the (B, P)
per-sample Jacobian are then, per layer, with ``t`` running over every position (sequence
steps, pixels) of sample ``a``:

- ``nn.Linear``: ``dl_a/dW = sum_t g_{a,t} x_{a,t}^T``, ``dl_a/db = sum_t g_{a,t}``;
- ``nn.Conv1d`` / ``nn.Conv2d`` (groups 1, zero padding): the same with ``x_{a,t}`` the
  unfolded input patch at output position t;
- ``nn.Embedding``: ``dl_a/dE[v] = sum_{t: i_{a,t} = v} g_{a,t}`` (nothing for
  ``padding_idx``);
- ``nn.LayerNorm`` / ``nn.RMSNorm`` (affine): ``dl_a/dw = sum_t g_{a,t} * xhat_{a,t}``,
  ``dl_a/db = sum_t g_{a,t}``, ``xhat`` the normalized input.

A layer used twice adds its uses. :class:`GraphRowCapture` records the layers of the forward
(a global forward hook, live only while the closure runs) and :meth:`GraphRowCapture.rows`
forms the matrix from one backward (``torch.autograd.grad`` of ``L`` with respect to the
recorded outputs only: no weight gradient is formed). It refuses (returns ``None`` with
:attr:`~GraphRowCapture.reason`) whenever a row could be wrong:

- a parameter owned by a layer type above not listed (e.g. a GRU, a custom module);
- a parameter used outside the recorded layer calls (weight tying through ``F.linear``, a
  penalty on the weights): the autograd graph is walked and each parameter must reach it
  exactly once per recorded call;
- a batch-coupled layer in the forward (BatchNorm in training mode);
- a layer input whose leading dimension is not B (the batch must lead, as on the functional
  path), or a layer input or output changed in place after the layer ran.

The caller then takes the exact path (a batched backward, :func:`graph_jacobian`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from torchsteer.jacobian.factored import MIN_FACTORED, FactoredRows, worth_factoring

__all__ = ["GraphRowCapture"]

_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.RMSNorm)


@dataclasses.dataclass
class _Call:
    module: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    versions: tuple[int, int]  # of x and y when recorded: an in-place change makes rows wrong

    def changed(self) -> bool:
        return (self.x._version, self.y._version) != self.versions


def _why_unsupported(module: nn.Module) -> str:
    if not isinstance(module, _SUPPORTED):
        return f"{type(module).__name__} (no per-sample rule)"
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return f"{type(module).__name__} with groups/padding_mode/padding string"
    if isinstance(module, nn.Embedding) and (
        module.sparse or module.max_norm is not None or module.scale_grad_by_freq
    ):
        return "Embedding with sparse=True, max_norm or scale_grad_by_freq"
    return ""


class GraphRowCapture:
    """Record the layers of one forward and form the per-sample rows from one backward.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
        >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
        >>> cap = GraphRowCapture(list(model.parameters()))
        >>> with cap:
        ...     losses = (model(x).squeeze(-1) - y) ** 2
        >>> cap.rows(losses).shape  # (B, P)
        torch.Size([5, 21])
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self.calls: list[_Call] = []
        self.reason = ""
        self._handle = None

    def __enter__(self) -> GraphRowCapture:
        self.calls, self.reason = [], ""
        self._handle = nn.modules.module.register_module_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: nn.Module, args, output) -> None:
        if self.reason:
            return
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            self.reason = f"{type(module).__name__} in training mode couples the samples"
            return
        index = self._index  # (the module's own slots: no generator, run on every call)
        if not any(p is not None and id(p) in index for p in module._parameters.values()):
            return
        why = _why_unsupported(module)
        if why:
            self.reason = f"a parameter belongs to {why}"
            return
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            self.reason = f"{type(module).__name__} called without a tensor input/output"
            return
        self.calls.append(_Call(module, x.detach(), output, (x._version, output._version)))

    def _check(self, losses: torch.Tensor) -> str:
        B = losses.shape[0]
        for call in self.calls:
            if call.changed():
                return (
                    f"an in-place operation changed a {type(call.module).__name__} input or output"
                )
            if call.x.dim() == 0 or call.x.shape[0] != B or call.y.shape[0] != B:
                name = type(call.module).__name__
                return f"a {name} input has leading dimension {call.x.shape[:1]}, not the batch {B}"
        uses = Counter()
        for call in self.calls:
            for p in dict.fromkeys(call.module._parameters.values()):  # unique, as parameters()
                if p is not None and id(p) in self._index and p.requires_grad:
                    uses[id(p)] += 1
        self._uses = uses  # layer calls per parameter (factors() keeps weights called once)
        found = _graph_uses(losses.grad_fn, self._index)
        for p in self.params:
            n_found, n_calls = found.get(id(p), 0), uses.get(id(p), 0)
            if p.requires_grad and n_found != n_calls:
                where = "outside its layer" if n_calls else "outside any supported layer"
                return (
                    f"a parameter of shape {tuple(p.shape)} is used {where} "
                    f"({n_found} uses in the graph, {n_calls} layer calls)"
                )
        return ""

    def _output_grads(self, losses: torch.Tensor):
        """The recorded calls whose output needs a gradient and ``dL/dy`` of each (one
        backward, the graph kept), or ``None`` with ``reason``."""
        if not self.reason:
            self.reason = self._check(losses)
        if self.reason:
            return None
        calls = [c for c in self.calls if c.y.requires_grad]
        gys = []
        if calls:
            with torch.enable_grad():
                gys = torch.autograd.grad(
                    losses.sum(), [c.y for c in calls], retain_graph=True, allow_unused=True
                )
        return [(c, gy) for c, gy in zip(calls, gys) if gy is not None]  # no graph: grads

    def rows(self, losses: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The (B, P) per-sample gradients of ``losses`` (B,), or ``None`` with ``reason``.

        The graph is kept (``retain_graph=True``) so that a caller may still take the exact
        path from it. ``out``: an optional (B, P) buffer written into.
        """
        grads = self._output_grads(losses)
        if grads is None:
            return None
        B = losses.shape[0]
        P = sum(p.numel() for p in self.params)
        first = self.params[0]
        J = out if out is not None else torch.empty(B, P, dtype=first.dtype, device=first.device)
        self._write(grads, J, self.params)
        return J

    def factors(
        self, losses: torch.Tensor, buffer: Callable[[], torch.Tensor] | None = None
    ) -> FactoredRows | torch.Tensor | None:
        """The rows of :meth:`rows` as :class:`~torchsteer.jacobian.factored.FactoredRows`:
        every ``nn.Linear`` weight called once and worth it
        (:func:`~torchsteer.jacobian.factored.worth_factoring`) kept as its layer's inputs
        and output gradients, all other coordinates as dense rows. When no weight is worth
        it, the dense rows of :meth:`rows` themselves (into ``buffer()``, if given: called
        only then); ``None`` with ``reason`` when :meth:`rows` would refuse. The parameters
        must share one dtype."""
        grads = self._output_grads(losses)
        if grads is None:
            return None
        B, uses, first = losses.shape[0], self._uses, self.params[0]
        offsets, start = {}, 0
        for p in self.params:
            offsets[id(p)], start = start, start + p.numel()
        factors, factored = [], set()
        for call, gy in grads:
            w = getattr(call.module, "weight", None)
            if not isinstance(call.module, nn.Linear) or id(w) not in offsets:
                continue
            if uses[id(w)] != 1 or w.numel() < MIN_FACTORED:  # (counted if requires_grad)
                continue
            T = call.x.numel() // (B * w.shape[1])
            if worth_factoring(T, w.shape[1], w.shape[0]):
                x = call.x.reshape(B, T, -1).to(first.dtype)
                factors.append((offsets[id(w)], x, gy.reshape(B, T, -1).to(first.dtype)))
                factored.add(id(w))
        P = sum(p.numel() for p in self.params)
        if not factors:
            J = buffer() if buffer is not None else first.new_empty(B, P)
            self._write(grads, J, self.params)
            return J
        rest = [p for p in self.params if id(p) not in factored]
        dense = first.new_empty(B, sum(p.numel() for p in rest))
        self._write(grads, dense, rest)
        slices, start = [], 0
        for p in rest:
            slices.append((offsets[id(p)], start, p.numel()))
            start += p.numel()
        return FactoredRows((B, P), factors, dense, slices)

    @staticmethod
    def _write(grads, J: torch.Tensor, params) -> None:
        """Write the rows of ``params`` (in this order, the columns of J) from ``grads``
        (other parameters' rows are not formed); a parameter that takes no row is zero."""
        B = J.shape[0]
        blocks, start = {}, 0
        for p in params:
            blocks[id(p)] = J[:, start : start + p.numel()].view(B, *p.shape)
            start += p.numel()
        written: set[int] = set()

        def block(p):
            """(dst, accumulate) for parameter p, or None when it takes no row."""
            if p is None or id(p) not in blocks or not p.requires_grad:
                return None
            acc = id(p) in written
            written.add(id(p))
            return blocks[id(p)], acc

        for call, gy in grads:
            _write_rows(call.module, call.x, gy.to(J.dtype), block)
        for p in params:
            if id(p) not in written:
                blocks[id(p)].zero_()


def _graph_uses(root, index: dict[int, int]) -> Counter:
    """How many edges of the autograd graph below ``root`` reach each parameter's leaf."""
    counts: Counter = Counter()
    seen, stack = set(), [root]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        for nxt, _ in fn.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                if id(var) in index:
                    counts[id(var)] += 1
            else:
                stack.append(nxt)
    return counts


def _into(target, compute) -> None:
    """``compute(dst)`` writes a result into ``dst``; ``target = (block, accumulate)``."""
    if target is None:
        return
    dst, acc = target
    if not acc:
        compute(dst)
    else:
        tmp = torch.empty_like(dst)
        compute(tmp)
        dst.add_(tmp)


def _write_rows(module: nn.Module, x: torch.Tensor, g: torch.Tensor, block) -> None:
    """Write one layer call's per-sample gradients (module docstring) into the parameter
    blocks, ``block(param) -> ((B, *shape) view, accumulate) | None``."""
    B = g.shape[0]
    bias = getattr(module, "bias", None)
    if isinstance(module, nn.Linear):
        xg = x.to(g.dtype)
        if g.dim() == 2:

            def weight(dst):
                torch.mul(g.unsqueeze(2), xg.unsqueeze(1), out=dst)

            _into(block(module.weight), weight)
            _into(block(bias), lambda dst: dst.copy_(g))
            return
        gf, xf = g.reshape(B, -1, g.shape[-1]), xg.reshape(B, -1, x.shape[-1])
        _into(block(module.weight), lambda dst: torch.bmm(gf.transpose(1, 2), xf, out=dst))
        _into(block(bias), lambda dst: torch.sum(gf, 1, out=dst))
        return
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        two = isinstance(module, nn.Conv2d)
        x4, g4 = (x, g) if two else (x.unsqueeze(2), g.unsqueeze(2))
        k = module.kernel_size if two else (1, *module.kernel_size)
        pad = module.padding if two else (0, *module.padding)
        st = module.stride if two else (1, *module.stride)
        dil = module.dilation if two else (1, *module.dilation)
        cols = F.unfold(x4.to(g.dtype), k, dilation=dil, padding=pad, stride=st)  # (B, C k, L)
        gl = g4.reshape(B, g4.shape[1], -1)  # (B, C_out, L)

        def weight(dst):
            torch.bmm(gl, cols.transpose(1, 2), out=dst.view(B, gl.shape[1], -1))

        _into(block(module.weight), weight)
        _into(block(bias), lambda dst: torch.sum(gl, 2, out=dst))
        return
    if isinstance(module, nn.Embedding):
        d = module.embedding_dim
        idx = x.reshape(B, -1)

        def table(dst):
            dst.zero_()
            dst.scatter_add_(1, idx.unsqueeze(-1).expand(B, idx.shape[1], d), g.reshape(B, -1, d))
            if module.padding_idx is not None:
                dst[:, module.padding_idx] = 0

        _into(block(module.weight), table)
        return
    shape = tuple(module.normalized_shape)
    xg = x.to(g.dtype)
    if isinstance(module, nn.LayerNorm):
        xhat = F.layer_norm(xg, shape, eps=module.eps)
    else:
        xhat = F.rms_norm(xg, shape, eps=module.eps)
    lead = tuple(range(1, g.dim() - len(shape)))

    def summed(t):
        return lambda dst: torch.sum(t, lead, out=dst) if lead else dst.copy_(t)

    _into(block(module.weight), summed(g * xhat))
    _into(block(bias), summed(g))

"""M-FAC: inverse empirical-Fisher preconditioning over a sliding window of gradients."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from torchsteer import distributed
from torchsteer.linalg.blocked_window import BlockedGradientWindow
from torchsteer.linalg.gradient_window import (
    GradientWindow,
    NonFiniteGradientError,
    nonfinite_error,
)
from torchsteer.optim._contract import (
    NONFINITE_POLICIES,
    GlobalStateMixin,
    check_choice,
    check_hyperparameter,
)
from torchsteer.optim._mfac_state import WINDOW_KEYS as _WINDOW_KEYS
from torchsteer.optim._mfac_state import validate_window_state
from torchsteer.optim._mfac_update import apply_fused, apply_vector
from torchsteer.optim.mfac_memory import check_memory_budget, mfac_n_blocks

__all__ = ["MFAC"]


class MFAC(GlobalStateMixin, torch.optim.Optimizer):
    """M-FAC (dynamic algorithm): steps along the inverse empirical Fisher of the last m gradients.

    With ``G`` the window (``m x d``) of the last ``m`` gradients over **all** parameters
    (of all groups, concatenated; rows start as zeros) and ``lambda = damp``::

        g  = grad + weight_decay * w             (coupled L2: the decayed gradient enters G)
        write g into the ring buffer G            (before the product)
        u  = F^{-1} g,   F = lambda I + (1/m) G^T G      (divisor m even while G fills)
        v  = momentum * v + (1 - momentum) * u    (EMA momentum, not heavy-ball)
        w  = w - lr * v

    ``F^{-1} g`` is computed matrix-free by Woodbury with the Gram ``K = G G^T`` and
    ``(m lambda I + K)^{-1}`` kept up to date in float64 (see
    :class:`~torchsteer.linalg.gradient_window.GradientWindow`): per step two passes over
    ``G`` (``G g`` and ``G^T x``) plus O(d + m^2). ``lr``, ``momentum`` and ``weight_decay`` may
    differ per group; ``ngrads``, ``damp``, ``window_dtype``, ``nonfinite``, ``shard`` and the
    window are global: the first param group may set them, every other group must agree
    (else ``ValueError``). All of them are keys of ``defaults`` and of every group, so
    ``state_dict()``, ``copy.deepcopy`` and ``pickle`` carry them (the optimizer contract,
    ``docs/optimizer_contract.md``). Param groups are added before the first step (the window
    spans them all). A parameter whose ``.grad`` is ``None`` contributes zeros and is not
    updated.

    A plain ``loss.backward(); opt.step()`` loop works; a closure, if given, is re-evaluated
    under ``torch.enable_grad()`` and must zero the gradients, compute the loss, call
    ``backward()`` and return the loss.

    Args:
        params: parameters or param groups.
        lr: learning rate (official default 1e-3); a float or a 0-d tensor.
        ngrads: window size ``m`` (official default 1024).
        damp: dampening ``lambda`` (official default 1e-5).
        momentum: EMA coefficient in [0, 1).
        weight_decay: coupled L2 coefficient.
        window_dtype: dtype of the window; default the first parameter's dtype (float32 for
            float16/bfloat16 parameters).
        nonfinite: ``"raise"`` (ValueError, nothing changes) or ``"skip"`` (the step is
            skipped and counted in ``state["skipped_steps"]`` of the first parameter) when a
            gradient has NaN/Inf.
        maximize: maximize the objective, as ``torch.optim`` does: the gradient enters as
            ``-grad`` (then ``+ weight_decay * w``); per group.
        shard: split the window across the ranks of ``torch.distributed`` (see below).
            ``None`` (default): shard when a process group of more than one process is
            initialized at the first step; ``False``: every rank keeps the whole window;
            ``True``: shard (in one process there is one shard, the whole window). A
            blocked window is not sharded (``shard=True`` with blocks raises).
        block_size: ``None`` (default): one window over all ``d`` parameters. An int: the
            flat parameter vector is cut into contiguous blocks of at most ``block_size``
            coordinates, each with its own ring window, Gram and Woodbury inverse
            (:class:`~torchsteer.linalg.blocked_window.BlockedGradientWindow`: ``F`` block
            diagonal, block ``k``'s update exactly dense M-FAC on its gradient slice);
            ``block_size >= d`` is the dense optimizer.
        capturable: keep the step counters and the ring position as tensors on the
            parameters' device (as ``torch.optim.Adam(capturable=True)``), so that a step
            with ``nonfinite="skip"`` needs no host synchronization (below). Default
            ``False``: they stay CPU tensors, as before, and each step reads once.
        check_every: with ``capturable=True`` and ``nonfinite="skip"``, read the step's
            checks every this many steps (default 16; see below). The iterates do not
            depend on it unless a check fires.
        memory_budget: ``None`` or bytes: a window whose
            :func:`~torchsteer.optim.mfac_memory.mfac_window_bytes` exceeds it raises
            ``ValueError`` at construction (and at the first step, before allocating),
            naming the bytes and the options that reduce them.

    Host synchronization: every decision of a window step -- the finiteness test, the
    Schur complement of the bordered-inverse update, the refresh schedule, the accuracy
    checks -- is a device tensor (``torchsteer.linalg._window_device``): a NaN/Inf gradient
    masks every write (parameters, momentum, window, Gram, counters stay as they were).
    By default a step reads its verdict and the checks in **one** transfer and then runs,
    on the host, exactly the original step's decisions and repairs (so the steps and
    ``nonfinite="raise"`` are as before; ``torchsteer.linalg._window_host``: the host knows
    the ring, so nothing over ``d`` numbers or ``M`` is masked). With ``capturable=True``
    and ``nonfinite="skip"`` nothing is read: a steady-state step makes no host
    synchronization. A step whose checks fire between reads (nearly dependent gradients)
    is *held*: its gradient enters the window, the parameters do not move, and so on
    until the next read repairs the window (float64 Gram, clamped-eigh refresh). Reads
    happen every ``check_every`` steps, on
    steps where a Cholesky refresh may be due (every ``m`` updates), every step while the
    Gram is in float64 mode or for ``m`` reads after a check fired, and at ``state_dict()``
    (which repairs a held window first).
    The sharded window (DDP) decides on the host, as before.

    Distributed (DDP): the gradients are already averaged over the ``R`` ranks, so every rank
    would hold the same window. Sharded, rank ``r`` keeps only columns
    ``[b[r], b[r + 1])`` of ``G`` with ``b = torchsteer.distributed.column_bounds(d, R)`` (the
    first ``d mod R`` ranks one column more): window memory about ``m d / R`` per rank.
    ``G g`` is a partial product all-reduced over the ranks (``m`` float64 numbers), the
    ``m x m`` Gram and inverse are replicated, each rank computes its slice of
    ``u = F^{-1} g`` and the slices are all-gathered (``d`` numbers), so every rank applies
    the same update and the parameters stay identical. The result equals one process on the
    whole batch up to float rounding. This assumes what DDP guarantees: identical
    parameters and gradients on every rank. The single-process path is unchanged.

    Checkpoints under sharding: like ``ZeroRedundancyOptimizer``, call
    :meth:`consolidate_state_dict` on **every** rank (Lightning does this for you); then
    ``state_dict()`` on the target rank (default 0) returns the whole window, in the same
    format as one process. ``load_state_dict`` takes that format on any number of ranks and
    keeps the rank's own columns, so a checkpoint resumes at any world size.

    Memory: the window holds ``m * d`` numbers of ``window_dtype`` -- ``m`` copies of the
    model (m = 1024 float32 for a 1M-parameter model is 4 GB) -- plus two ``m x m`` float64
    matrices per block, plus one momentum buffer per parameter when ``momentum > 0``;
    sharded, the window is ``m d / R`` numbers per rank (``mfac_window_bytes``). A bfloat16
    or float16 ``window_dtype`` stores the window so and computes in float32.

    References:
        Frantar, Kurtic, Alistarh. "M-FAC: Efficient Matrix-Free Approximations of
        Second-Order Information." NeurIPS 2021. arXiv:2107.03356.
    """

    policy_hyperparameters = ("nonfinite", "shard", "memory_budget", "capturable", "check_every")
    structural_hyperparameters = ("ngrads", "damp", "block_size")  # load keeps the live policies
    global_hyperparameters = (*structural_hyperparameters, "window_dtype", *policy_hyperparameters)
    global_state_keys = (*_WINDOW_KEYS, "step", "skipped_steps")

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        ngrads: int = 1024,
        damp: float = 1e-5,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        window_dtype: torch.dtype | None = None,
        nonfinite: str = "raise",
        shard: bool | None = None,
        *,
        block_size: int | None = None,
        memory_budget: float | None = None,
        capturable: bool = False,
        check_every: int = 16,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            ngrads=ngrads,
            damp=damp,
            momentum=momentum,
            weight_decay=weight_decay,
            window_dtype=window_dtype,
            nonfinite=nonfinite,
            shard=shard,
            block_size=block_size,
            memory_budget=memory_budget,
            capturable=capturable,
            check_every=check_every,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
        )
        self._validate_group(defaults)
        defaults["damp"] = float(damp)
        super().__init__(params, defaults)
        for p in self._params():
            if p.is_complex() or not p.is_floating_point():
                raise ValueError(f"Invalid parameter dtype: {p.dtype} (real floating point only)")
        self._check_budget(sum(p.numel() for p in self._params()))
        self._reset_runtime()

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_hyperparameter("lr", group["lr"], low=0.0, tensor=True)
        check_hyperparameter("ngrads", group["ngrads"], low=1, integer=True)
        check_hyperparameter("damp", group["damp"], low=0.0, low_open=True)
        check_hyperparameter("momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
        check_hyperparameter("weight_decay", group["weight_decay"], low=0.0)
        window_dtype = group["window_dtype"]
        if window_dtype is not None and not (
            isinstance(window_dtype, torch.dtype) and window_dtype.is_floating_point
        ):
            raise ValueError(f"Invalid window_dtype: {window_dtype}")
        check_choice("nonfinite", group["nonfinite"], NONFINITE_POLICIES)
        check_choice("shard", group["shard"], (None, True, False))
        if group["block_size"] is not None:
            check_hyperparameter("block_size", group["block_size"], low=1, integer=True)
        if group["memory_budget"] is not None:
            check_hyperparameter("memory_budget", group["memory_budget"], low=0, low_open=True)
        check_choice("maximize", group["maximize"], (False, True))
        check_choice("capturable", group["capturable"], (False, True))
        check_hyperparameter("check_every", group["check_every"], low=1, integer=True)
        if group.get("foreach") not in (None, False):
            raise ValueError(
                f"Invalid foreach: {group['foreach']!r}; MFAC's step is one pass over the "
                "window per parameter, not a per-parameter loop to fuse: leave foreach=None"
            )
        if group.get("differentiable", False) is not False:
            raise ValueError(
                f"Invalid differentiable: {group['differentiable']!r}; MFAC's step is not "
                "differentiable (its window is updated in place): leave differentiable=False"
            )

    def _reset_runtime(self) -> None:
        self._window: GradientWindow | None = None
        self._flat: torch.Tensor | None = None  # reused buffer for the concatenated gradient
        self._world = 1  # number of shards of the window
        self._widths: tuple[int, ...] = ()  # every shard's number of columns, rank order
        self._bounds = (0, 0)  # this rank's columns [lo, hi) of the window
        self._consolidated: torch.Tensor | None = None  # the whole window, on the target rank

    # The global hyperparameters, read from the first group (they are the same in all).
    @property
    def ngrads(self) -> int:
        return self.param_groups[0]["ngrads"]

    @property
    def damp(self) -> float:
        return float(self.param_groups[0]["damp"])

    @property
    def window_dtype(self) -> torch.dtype | None:
        return self.param_groups[0]["window_dtype"]

    @property
    def nonfinite(self) -> str:
        return self.param_groups[0]["nonfinite"]

    @property
    def shard(self) -> bool | None:
        return self.param_groups[0]["shard"]

    @property
    def capturable(self) -> bool:
        return self.param_groups[0]["capturable"]

    def _check_budget(self, dim: int) -> int:
        """The number of shards of a window over ``dim`` parameters; raises ``ValueError``
        (nothing allocated) when it breaks ``memory_budget`` or blocks meet ``shard=True``."""
        group = self.param_groups[0]
        blocked = mfac_n_blocks(dim, group["block_size"]) > 1
        if blocked and self.shard is True:
            raise ValueError(
                "Invalid shard: True with block_size < the number of parameters; MFAC does "
                "not shard a blocked window (leave shard=None or False)"
            )
        world = distributed.world_size() if self.shard is not False and not blocked else 1
        dtype = self._default_window_dtype(self._params()[0])
        check_memory_budget(dim, self.ngrads, group["block_size"], dtype,
                            group["memory_budget"], world_size=world)  # fmt: skip
        return world

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer`` (validated; ``ngrads``, ``damp``, ``window_dtype``,
        ``nonfinite`` and ``shard`` must equal the first group's). Only before the first
        step: the window's columns are the parameters of all groups, so a group added later
        raises ``ValueError`` (build a new optimizer, or add the group before training)."""
        if "window_grads" in self._first_state():
            raise ValueError(
                "Invalid param group: MFAC's window spans the parameters of all groups and "
                "already holds gradients; add every param group before the first step"
            )
        new = param_group.get("params") if isinstance(param_group, dict) else None
        new = [new] if isinstance(new, torch.Tensor) else new
        new = new if isinstance(new, (list, tuple)) else ()  # others: at the first step
        if self.param_groups and all(isinstance(p, torch.Tensor) for p in new):
            self._check_budget(sum(p.numel() for p in self._params() + list(new)))
        super().add_param_group(param_group)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _default_window_dtype(self, first: torch.Tensor) -> torch.dtype:
        if self.window_dtype is not None:
            return self.window_dtype
        if first.dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return first.dtype

    def _get_window(self) -> GradientWindow | BlockedGradientWindow:
        """The window, created lazily; its buffers live in the first parameter's state."""
        if self._window is not None:
            return self._window
        params = self._params()
        first = params[0]
        dim = sum(p.numel() for p in params)
        self._world = self._check_budget(dim)  # before anything is allocated
        bounds = distributed.column_bounds(dim, self._world)
        r = distributed.rank() if self._world > 1 else 0
        self._bounds = (bounds[r], bounds[r + 1])
        self._widths = tuple(bounds[s + 1] - bounds[s] for s in range(self._world))
        dtype, block_size = self._default_window_dtype(first), self.param_groups[0]["block_size"]
        if mfac_n_blocks(dim, block_size) > 1:
            window = BlockedGradientWindow(self.ngrads, dim, block_size, self.damp,
                                           dtype=dtype, device=first.device)  # fmt: skip
        else:
            window = GradientWindow(
                self.ngrads,
                self._bounds[1] - self._bounds[0],
                self.damp,
                dtype=dtype,
                device=first.device,
                reduce=distributed.all_reduce_sum if self._world > 1 else None,
            )
        state = self.state[first]
        if "window_grads" in state:
            saved = {v: state[k] for k, v in _WINDOW_KEYS.items() if k in state}
            if self._world > 1:  # a whole window (the checkpoint format): keep our columns
                saved["grads"] = self._own_columns(saved["grads"])
            window.load_state_dict(saved)
        else:
            state["step"] = torch.tensor(0.0)
            state["skipped_steps"] = torch.tensor(0.0)
        window.capturable = self.capturable and self._world == 1
        counters = first.device if window.capturable else "cpu"  # capturable: on the device
        for key in ("step", "skipped_steps"):
            state[key] = torch.as_tensor(state.get(key, 0.0), dtype=torch.float32).to(counters)
        self._window = window
        self._sync_state(window)
        return window

    def _sync_state(self, window: GradientWindow) -> None:
        state = self.state[self._params()[0]]
        window_state = window.state_dict()
        for key, name in _WINDOW_KEYS.items():
            state[key] = window_state[name]

    def _own_columns(self, grads: torch.Tensor) -> torch.Tensor:
        """Columns ``[lo, hi)`` of a whole ``(m, d)`` window (a contiguous copy)."""
        lo, hi = self._bounds
        if grads.dim() != 2 or grads.shape[1] < hi:
            raise ValueError(f"Invalid window state: grads {tuple(grads.shape)}")
        return grads[:, lo:hi].contiguous()

    def _flat_gradient(self, window: GradientWindow) -> torch.Tensor:
        """The concatenated gradient ``grad + weight_decay * w`` in the window dtype (its
        columns ``[lo, hi)`` when sharded)."""
        flat = self._flat
        if flat is None or flat.dtype != window.dtype or flat.device != window.device:
            flat = self._flat = torch.empty(window.dim, dtype=window.dtype, device=window.device)
        lo, hi = self._bounds
        offset = 0
        for group in self.param_groups:
            wd, sign = group["weight_decay"], -1.0 if group["maximize"] else 1.0
            for p in group["params"]:
                n = p.numel()
                a, b = max(lo, offset), min(hi, offset + n)  # overlap with our columns
                if a < b:
                    part = flat[a - lo : b - lo]
                    if p.grad is not None:
                        cut = b - a != n  # a parameter split by the shard boundary
                        grad = p.grad.reshape(-1)
                        part.copy_(grad[a - offset : b - offset] if cut else grad)
                        if sign < 0:
                            part.neg_()  # maximize: ascend the objective (torch.optim's sign)
                        if wd != 0.0:
                            w = p.detach().reshape(-1)
                            part.add_(w[a - offset : b - offset] if cut else w, alpha=wd)
                    else:
                        part.zero_()
                offset += n
        return flat

    def _momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        pstate = self.state[p]
        if "momentum_buffer" not in pstate:
            pstate["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return pstate["momentum_buffer"]

    @torch.compiler.disable(recursive=True)  # see the docstring: runs eagerly when compiled
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One M-FAC step. ``closure`` (optional) re-evaluates the model and returns the loss.

        Under ``torch.compile`` (``torch.compile(opt.step)`` or a compiled training step that
        calls it) the step runs eagerly (``torch.compiler.disable``): traced, its window's
        Python-side state was baked into the graph and the parameters silently stopped
        changing after the first step. With ``fullgraph=True`` torch.compile raises
        (``Unsupported: Skip calling torch.compiler.disable()d function``).

        Raises:
            ValueError: a gradient with NaN/Inf and ``nonfinite="raise"``, or a group
                hyperparameter set to an invalid value (parameters and state unchanged).
        """
        self._validate_groups()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if any(p.grad is not None and p.grad.is_sparse for p in self._params()):
            raise ValueError("Invalid gradient: MFAC does not support sparse gradients")
        window = self._get_window()  # allocates the window on the first step
        state = self.state[self._params()[0]]
        flat = self._flat_gradient(window)
        if self._world > 1:  # sharded: the host-decided step (its all-reduce carries |g|^2)
            try:
                x = window.add_and_coefficients(flat)
            except NonFiniteGradientError as error:
                self._nonfinite(error)  # raise, or count the step in skipped_steps
                return loss
            mask = None
            state["step"] += 1
        elif not window.capturable:  # the host knows the ring: decide there, one read
            x, mask = window.settle(window.host_add(flat).tolist()), None
            if x is None:
                self._nonfinite(nonfinite_error(window.dtype))  # window unchanged
                return loss
            state["step"] += 1
        else:
            x, report, mask = window.device_add(flat)  # no sync: every decision a tensor
            if self.nonfinite == "raise" or window.must_check(self.param_groups[0]["check_every"]):
                rows = report.tolist()  # the step's one host synchronization
                if not (rows[0][0] if isinstance(rows[0], list) else rows[0]):
                    self._nonfinite(nonfinite_error(window.dtype))  # window unchanged
                    return loss
                x, mask = window.resolve(rows, x), None
                state["step"] += 1
            else:  # nothing read: the masks count the step, or skip it
                window.note_unread()
                ok = report[..., 0].amin()
                state["step"].add_(ok)
                state["skipped_steps"].add_(1.0 - ok)
        self._sync_state(window)
        self._consolidated = None
        if self._world > 1 or not window.fusable:
            # sharded: our slice of u = G^T x, all-gathered; or the rows cancel (duplicate
            # gradients): G^T x accumulated in float64 (``GradientWindow.combine``); or
            # blocks, or a bfloat16/float16 window (the pass in float32)
            u = window.combine(x if mask is None else x * mask)
            if self._world > 1:
                u = distributed.all_gather_cat(u, sizes=self._widths)
            apply_vector(self, u, mask)
        else:
            apply_fused(self, window, x, mask)
        return loss

    @torch.no_grad()
    def consolidate_state_dict(self, to: int = 0) -> None:
        """Collect the sharded window on rank ``to`` for :meth:`state_dict` (a collective:
        call it on every rank). A no-op without sharding.

        Sends the window in row blocks of about 4 M numbers per rank (all-gathered; the
        ranks other than ``to`` drop them), so only rank ``to`` holds the ``m x d`` copy.
        Rank ``r`` holds the columns ``column_bounds(d, R)[r : r + 2]`` of the window.
        """
        window = self._window
        if window is None or self._world == 1:
            return
        dim = sum(p.numel() for p in self._params())
        keep = distributed.rank() == to
        full = window.grads.new_empty(window.ngrads, dim) if keep else None
        rows = max(1, (1 << 22) // max(1, max(self._widths)))
        for start in range(0, window.ngrads, rows):
            block = window.grads[start : start + rows]
            block = distributed.all_gather_cat(block, dim=1, sizes=self._widths)
            if keep:
                full[start : start + rows] = block
        self._consolidated = full

    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim.Optimizer``; sharded, the whole window collected by
        :meth:`consolidate_state_dict` (raises ``RuntimeError`` if it was not called on every
        rank since the last step)."""
        if self._window is not None:
            self._window.flush()  # capturable: repair a held step now (one read), not after
            self._sync_state(self._window)
        sd = super().state_dict()
        if self._window is not None and self._world > 1:
            if self._consolidated is None:
                raise RuntimeError(
                    "MFAC's window is sharded across ranks: call consolidate_state_dict() on "
                    "every rank first, then state_dict() on the target rank (default 0)"
                )
            first_id = sd["param_groups"][0]["params"][0]
            sd["state"][first_id] = dict(sd["state"][first_id], window_grads=self._consolidated)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as ``torch.optim.Optimizer`` does, but keep the dtypes of the window buffers
        (float64 Gram and inverse, ``window_dtype`` rows) and of the float32 step counters
        instead of casting them to the parameter dtype. Atomic: a state dict of another
        ``ngrads``, ``damp`` or model size, or with invalid values, raises ``ValueError`` and
        leaves the optimizer as it was."""
        super().load_state_dict(state_dict)

    def _validate_global_state(self, state: dict[str, Any], saved_groups: list[dict]) -> None:
        """The saved window (``_mfac_state.validate_window_state``): all its keys, the
        shapes of a dense or blocked window, finite buffers, the ring position, ``damp``."""
        validate_window_state(state, saved_groups[0], sum(p.numel() for p in self._params()))

    def _after_load_state_dict(self) -> None:
        self._reset_runtime()
        if "window_grads" in self._first_state():
            self._get_window()

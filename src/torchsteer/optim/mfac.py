"""M-FAC: inverse empirical-Fisher preconditioning over a sliding window of gradients."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from torchsteer import distributed
from torchsteer.linalg.gradient_window import GradientWindow, NonFiniteGradientError

__all__ = ["MFAC"]

_WINDOW_KEYS = {
    "window_grads": "grads",
    "window_gram": "gram",
    "window_inverse": "inverse",
    "window_index": "index",
    "window_count": "count",
    "window_since_refresh": "since_refresh",
    "window_damp": "damp",
}


class MFAC(torch.optim.Optimizer):
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
    differ per group; ``ngrads``, ``damp`` and the window are global. A parameter whose
    ``.grad`` is ``None`` contributes zeros and is not updated.

    A plain ``loss.backward(); opt.step()`` loop works; a closure, if given, is re-evaluated
    under ``torch.enable_grad()`` and must zero the gradients, compute the loss, call
    ``backward()`` and return the loss.

    Args:
        params: parameters or param groups.
        lr: learning rate (official default 1e-3).
        ngrads: window size ``m`` (official default 1024).
        damp: dampening ``lambda`` (official default 1e-5).
        momentum: EMA coefficient in [0, 1).
        weight_decay: coupled L2 coefficient.
        window_dtype: dtype of the window; default the first parameter's dtype (float32 for
            float16/bfloat16 parameters).
        nonfinite: ``"raise"`` (ValueError, nothing changes) or ``"skip"`` (the step is
            skipped and counted in ``state["skipped_steps"]`` of the first parameter) when a
            gradient has NaN/Inf.
        shard: split the window across the ranks of ``torch.distributed`` (see below).
            ``None`` (default): shard when a process group of more than one process is
            initialized at the first step; ``False``: every rank keeps the whole window;
            ``True``: shard (in one process there is one shard, the whole window).

    Distributed (DDP): the gradients are already averaged over the ``R`` ranks, so every rank
    would hold the same window. Sharded, rank ``r`` keeps only columns
    ``[r s, (r + 1) s)`` of ``G`` (``s = ceil(d / R)``): window memory ``m d / R`` per rank.
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
    matrices, plus one momentum buffer per parameter when ``momentum > 0``; sharded, the
    window is ``m d / R`` numbers per rank.

    References:
        Frantar, Kurtic, Alistarh. "M-FAC: Efficient Matrix-Free Approximations of
        Second-Order Information." NeurIPS 2021. arXiv:2107.03356.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        ngrads: int = 1024,
        damp: float = 1e-5,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        window_dtype: torch.dtype | None = None,
        nonfinite: str = "raise",
        shard: bool | None = None,
    ) -> None:
        if not (lr >= 0.0):
            raise ValueError(f"Invalid lr: {lr}")
        if isinstance(ngrads, bool) or not isinstance(ngrads, int) or ngrads < 1:
            raise ValueError(f"Invalid ngrads: {ngrads}")
        if not (0.0 < damp < float("inf")):
            raise ValueError(f"Invalid damp: {damp}")
        if not (0.0 <= momentum < 1.0):
            raise ValueError(f"Invalid momentum: {momentum}")
        if not (weight_decay >= 0.0):
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        if window_dtype is not None and not (
            isinstance(window_dtype, torch.dtype) and window_dtype.is_floating_point
        ):
            raise ValueError(f"Invalid window_dtype: {window_dtype}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"Invalid nonfinite: {nonfinite}")
        if shard not in (None, True, False):
            raise ValueError(f"Invalid shard: {shard}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.ngrads, self.damp = ngrads, float(damp)
        self.window_dtype, self.nonfinite, self.shard = window_dtype, nonfinite, shard
        for p in self._params():
            if p.is_complex() or not p.is_floating_point():
                raise ValueError(f"Invalid parameter dtype: {p.dtype} (real floating point only)")
        self._window: GradientWindow | None = None
        self._flat: torch.Tensor | None = None  # reused buffer for the concatenated gradient
        self._world = 1  # number of shards of the window
        self._bounds = (0, 0)  # this rank's columns [lo, hi) of the window
        self._consolidated: torch.Tensor | None = None  # the whole window, on the target rank

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _default_window_dtype(self, first: torch.Tensor) -> torch.dtype:
        if self.window_dtype is not None:
            return self.window_dtype
        if first.dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return first.dtype

    def _get_window(self) -> GradientWindow:
        """The window, created lazily; its buffers live in the first parameter's state."""
        if self._window is not None:
            return self._window
        params = self._params()
        first = params[0]
        dim = sum(p.numel() for p in params)
        self._world = distributed.world_size() if self.shard is not False else 1
        size = -(-dim // self._world)  # columns per shard; the last one is zero-padded
        lo = min(distributed.rank() * size, dim) if self._world > 1 else 0
        self._bounds = (lo, min(lo + size, dim))
        window = GradientWindow(
            self.ngrads,
            size,
            self.damp,
            dtype=self._default_window_dtype(first),
            device=first.device,
            reduce=distributed.all_reduce_sum if self._world > 1 else None,
        )
        state = self.state[first]
        if "window_grads" in state:
            saved = {v: state[k] for k, v in _WINDOW_KEYS.items()}
            if self._world > 1:  # a whole window (the checkpoint format): keep our columns
                saved["grads"] = self._own_columns(saved["grads"], size)
            window.load_state_dict(saved)
        else:
            state["step"] = torch.tensor(0.0)
            state["skipped_steps"] = torch.tensor(0.0)
        self._window = window
        self._sync_state(window)
        return window

    def _sync_state(self, window: GradientWindow) -> None:
        state = self.state[self._params()[0]]
        window_state = window.state_dict()
        for key, name in _WINDOW_KEYS.items():
            state[key] = window_state[name]

    def _own_columns(self, grads: torch.Tensor, size: int) -> torch.Tensor:
        """Columns ``[lo, hi)`` of a whole ``(m, d)`` window, zero-padded to ``size``."""
        lo, hi = self._bounds
        if grads.dim() != 2 or grads.shape[1] < hi:
            raise ValueError(f"Invalid window state: grads {tuple(grads.shape)}")
        out = grads.new_zeros(grads.shape[0], size)
        out[:, : hi - lo] = grads[:, lo:hi]
        return out

    def _flat_gradient(self, window: GradientWindow) -> torch.Tensor:
        """The concatenated gradient ``grad + weight_decay * w`` in the window dtype (its
        columns ``[lo, hi)`` when sharded; zeros beyond ``hi``)."""
        flat = self._flat
        if flat is None or flat.dtype != window.dtype or flat.device != window.device:
            flat = self._flat = torch.empty(window.dim, dtype=window.dtype, device=window.device)
        lo, hi = self._bounds
        if hi - lo < window.dim:
            flat[hi - lo :].zero_()  # the last shard's padding
        offset = 0
        for group in self.param_groups:
            wd = group["weight_decay"]
            for p in group["params"]:
                n = p.numel()
                a, b = max(lo, offset), min(hi, offset + n)  # overlap with our columns
                if p.grad is not None and p.grad.is_sparse:
                    raise ValueError("Invalid gradient: MFAC does not support sparse gradients")
                if a < b:
                    part = flat[a - lo : b - lo]
                    if p.grad is not None:
                        cut = b - a != n  # a parameter split by the shard boundary
                        grad = p.grad.reshape(-1)
                        part.copy_(grad[a - offset : b - offset] if cut else grad)
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

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One M-FAC step. ``closure`` (optional) re-evaluates the model and returns the loss.

        Raises:
            ValueError: a gradient with NaN/Inf and ``nonfinite="raise"`` (state unchanged).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        window = self._get_window()
        state = self.state[self._params()[0]]
        flat = self._flat_gradient(window)
        try:
            coeffs = window.add_and_coefficients(flat).to(window.dtype)
        except NonFiniteGradientError:
            if self.nonfinite == "raise":
                raise
            state["skipped_steps"] += 1
            return loss
        state["step"] += 1
        self._sync_state(window)
        self._consolidated = None
        if self._world > 1:
            self._apply_gathered(window, coeffs)
            return loss
        # u = F^{-1} g = G^T x, one column block of G per parameter, fused into the update:
        # the second pass over the window writes straight into the parameter (or its buffer).
        offset = 0
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                n = p.numel()
                if p.grad is not None:
                    block = window.grads[:, offset : offset + n].t()
                    if momentum != 0.0:
                        buf = self._momentum_buffer(p)
                        _addmv(buf.mul_(momentum), block, coeffs, 1.0 - momentum)
                        p.add_(buf, alpha=-lr)
                    else:
                        _addmv(p, block, coeffs, -lr)
                offset += n
        return loss

    def _apply_gathered(self, window: GradientWindow, coeffs: torch.Tensor) -> None:
        """Sharded step: our slice of ``u = G^T x``, all-gathered, applied on every rank."""
        u = torch.cat(distributed.all_gather(torch.mv(window.grads.t(), coeffs)))
        offset = 0
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                n = p.numel()
                if p.grad is not None:
                    piece = u[offset : offset + n].view_as(p)
                    if momentum != 0.0:
                        buf = self._momentum_buffer(p).mul_(momentum)
                        buf.add_(piece.to(buf.dtype), alpha=1.0 - momentum)
                        p.add_(buf, alpha=-lr)
                    else:
                        p.add_(piece.to(p.dtype), alpha=-lr)
                offset += n

    @torch.no_grad()
    def consolidate_state_dict(self, to: int = 0) -> None:
        """Collect the sharded window on rank ``to`` for :meth:`state_dict` (a collective:
        call it on every rank). A no-op without sharding.

        Sends the window in row blocks of about 4 M numbers per rank (all-gathered; the
        ranks other than ``to`` drop them), so only rank ``to`` holds the ``m x d`` copy.
        """
        window = self._window
        if window is None or self._world == 1:
            return
        dim = sum(p.numel() for p in self._params())
        keep = distributed.rank() == to
        full = window.grads.new_empty(window.ngrads, dim) if keep else None
        rows = max(1, (1 << 22) // window.dim)
        for start in range(0, window.ngrads, rows):
            parts = distributed.all_gather(window.grads[start : start + rows])
            if keep:
                block = torch.cat(parts, dim=1)
                full[start : start + rows] = block[:, :dim]
        self._consolidated = full

    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim.Optimizer``; sharded, the whole window collected by
        :meth:`consolidate_state_dict` (raises ``RuntimeError`` if it was not called on every
        rank since the last step)."""
        if self._window is not None:
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
        instead of casting them to the parameter dtype."""
        state_dict = dict(state_dict)
        saved_state = dict(state_dict["state"])
        first_id = state_dict["param_groups"][0]["params"][0]
        kept: dict[str, torch.Tensor] = {}
        if first_id in saved_state:
            first_state = dict(saved_state[first_id])
            for key in (*_WINDOW_KEYS, "skipped_steps"):
                if key in first_state:
                    kept[key] = first_state.pop(key)
            saved_state[first_id] = first_state
        state_dict["state"] = saved_state
        super().load_state_dict(state_dict)
        first = self._params()[0]
        for key, value in kept.items():
            big = key in ("window_grads", "window_gram", "window_inverse")
            self.state[first][key] = value.to(device=first.device) if big else value.cpu()
        self._window, self._consolidated = None, None
        if kept:
            self._get_window()


def _addmv(out: torch.Tensor, block: torch.Tensor, x: torch.Tensor, alpha: float) -> None:
    """``out += alpha * block @ x`` in place; fused when ``out`` is contiguous in the
    window dtype, else through a temporary of ``out``'s size."""
    if out.dtype == block.dtype and out.is_contiguous():
        out.view(-1).addmv_(block, x, alpha=alpha)
    else:
        out.add_(torch.mv(block, x).view_as(out).to(out.dtype), alpha=alpha)

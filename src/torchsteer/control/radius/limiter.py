"""The softmax step-radius limiter :class:`RadiusLimiter` (theory: :mod:`.radius`).

Cost of :class:`RadiusLimiter`: one exact JVP of the batch and one copy of the optimized
parameters (P numbers, kept between the snapshot and the correction) per step, and the update
``p`` (a second P; both kept as flat buffers from step to step,
:mod:`torchsteer.control.radius._buffers`). The JVP is taken where the training forward just
ran, so for a chain of Linear / LayerNorm / elementwise modules only its tangent is computed,
from the activations that forward recorded (:mod:`torchsteer.control.radius._tangent`);
otherwise one forward-mode pass runs, on CPUs with eval-mode BatchNorm folded into the
convolution before it and convolutions in channels-last (:mod:`torchsteer.control.radius.measure`).
Measured on the digits models at one thread: about 1.6x a plain Adam step
(``benchmarks/radius.py``).

References:
    P. Sao, "Ghosts of Softmax: Complex Singularities That Limit Safe Step Sizes in
    Cross-Entropy", arXiv:2603.13552 (2026), Prop. 5.2 / Eq. 19.
"""

from __future__ import annotations

import contextlib
import math
import operator
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from torchsteer.control.radius._buffers import FlatBuffers, TensorBuffers
from torchsteer.control.radius._checks import check_settings
from torchsteer.control.radius._linear_reuse import LinearRecorder
from torchsteer.control.radius._masked import device_scale, gradients_finite
from torchsteer.control.radius._pending import PendingNegGrad, PendingUpdate
from torchsteer.control.radius._record import Tally
from torchsteer.control.radius._slots import CopyableLimiter, Slot
from torchsteer.control.radius._tangent import ActivationRecorder
from torchsteer.control.radius.measure import METHODS, LogitsFn, worst_spread
from torchsteer.jacobian import unwrap_model

__all__ = ["RadiusLimiter"]

_MODES = ("limit", "rho_set", "monitor")
_DIRECTIONS = ("update", "neg_grad")


class RadiusLimiter(CopyableLimiter):
    r"""Caps every optimizer step at a fraction ``r_max`` of the softmax radius.

    .. math::

        p = \theta_{new} - \theta_{old}, \quad r = \max_x \Delta_a(x; p) / \pi, \quad
        \theta \leftarrow \theta_{old} + \min(1, r_{max} / r)\, p

    Usage in any loop (the optimizer steps inside)::

        limiter = RadiusLimiter(model, r_max=1.0)
        loss = loss_fn(model(x), y); loss.backward()
        limiter.step(optimizer, x)

    Modes: ``"limit"`` (the controller above), ``"rho_set"`` (``s = r_max / r``: every step
    has length ``r_max * rho_a``, the learning rate picked by the radius), ``"monitor"``
    (measure only; the parameters are the optimizer's). Directions: ``"update"`` (the actual
    update p, the paper's method) or ``"neg_grad"`` (the released code's variant: the radius
    along -g, and ``r = Delta_a(lr g) / pi`` limits ``lr |g|`` by scaling every group's
    learning rate for this step; momentum and Adam's preconditioning are not measured).

    Args:
        model: the module whose logits are measured (DDP-wrapped is fine).
        r_max: the allowed normalized step (a target ``r_t < 1`` is stricter).
        logits_fn: ``logits_fn(model, inputs) -> logits`` when the forward is not ``model(x)``.
        mode: ``"limit"``, ``"rho_set"`` or ``"monitor"``.
        direction: ``"update"`` or ``"neg_grad"``.
        eval_mode: measure in eval mode (BatchNorm running statistics unchanged, no dropout).
        temperature: T when the loss uses ``logits / T`` (radius ``pi T / Delta_a``).
        method: ``"jvp"`` (exact) or the approximate ``"fd"`` (central finite difference,
            two forwards, relative error of r about 1e-4) and ``"fd1"`` (one-sided, one
            forward when the training forward's logits can be reused as with
            ``reuse_forward``, else two; error O(fd_eps)). With either the guarantee
            ``r <= r_max`` becomes approximate (``benchmarks/results/radius.md`` has the
            measured errors).
        fd_eps: the finite-difference step length (see
            :func:`~torchsteer.control.radius.measure.logit_derivative`).
        nonfinite: when a gradient, r or the update is NaN/Inf: ``"raise"`` (restore
            theta_old and the optimizer's state, then ValueError) or ``"skip"`` (restore
            both, count the step as skipped). The gradients present at :meth:`before_step`
            are checked on the device, the optimizer's state is snapshotted, and a bad step
            is undone after the optimizer's step with ``torch.where`` (``"skip"``: no host
            sync; ``"raise"``: one read per step; :mod:`~torchsteer.control.radius._masked`),
            so a bad batch never stays in the optimizer's state (Adam's moments). With
            ``"neg_grad"`` a non-finite gradient always raises, before the optimizer steps.
        reuse_forward: with ``method="jvp"`` and no ``logits_fn``, keep (by forward hooks) the
            activations of the model's latest forward and, when that forward is exactly the
            measured one (same batch object, same parameters, a chain of Linear, LayerNorm
            and elementwise modules; see :mod:`torchsteer.control.radius._tangent`), compute
            only the tangent from them: the same exact ``J_z p`` without the primal pass.
            Otherwise the general JVP runs; on a non-chain (a transformer) with each Linear's
            primal from that forward (:mod:`._linear_reuse`). ``reused`` counts both paths.
        channels_last: the general JVP on CPUs with 4-d weights in channels-last (``"jvp"``).
        fold: the general JVP with eval-mode BatchNorm folded into the convolution before it
            (``"jvp"``, no ``logits_fn``). Both give the same ``r`` to rounding, faster; off
            only to measure what they save (``benchmarks/radius.py``).

    Memory: one copy of the optimized parameters and the update (2 P numbers) and one of the
    optimizer's state (2 P for Adam), kept from step to step so the snapshot is a copy into
    the same buffers; with ``reuse_forward`` the
    latest forward's activations are kept until the step (autograd keeps them until the
    backward anyway) and the tangent pass keeps its buffers (about one tensor per recorded
    module, the size of that module's output) between steps: no allocation (and no page
    faults) per step. Parameters the model does not hold are rescaled with the rest but not
    measured; frozen parameters (``requires_grad=False``) are left alone.

    Several optimizers in one step (a GAN's two under Lightning's manual optimization):
    :meth:`before_step` for each before it steps, one :meth:`after_step` after the last; the
    combined update ``p = p_1 + p_2`` of this step is measured (one JVP) and every
    optimizer's part is rescaled by the same ``s``, so the step actually taken has
    ``r <= r_max`` (``"update"`` only; ``"neg_grad"`` raises). Failures: an exception in the
    optimizer's step or in the measurement restores theta_old and the optimizer's state
    before it propagates (see :meth:`abort`). The forward hooks of
    ``reuse_forward`` are removed when the limiter is garbage collected (or by
    :meth:`remove_hooks`).
    """

    def __init__(
        self,
        model: nn.Module,
        r_max: float = 1.0,
        logits_fn: LogitsFn | None = None,
        mode: str = "limit",
        direction: str = "update",
        eval_mode: bool = True,
        temperature: float = 1.0,
        method: str = "jvp",
        fd_eps: float | None = None,
        nonfinite: str = "raise",
        reuse_forward: bool = True,
        channels_last: bool = True,
        fold: bool = True,
    ):
        check_settings(
            r_max,
            temperature,
            fd_eps,
            dict(mode=(mode, _MODES), direction=(direction, _DIRECTIONS),
                 method=(method, METHODS), nonfinite=(nonfinite, ("raise", "skip"))),
            dict(eval_mode=eval_mode, reuse_forward=reuse_forward,
                 channels_last=channels_last, fold=fold),
        )  # fmt: skip
        self.channels_last, self.fold = channels_last, fold
        self.model, self.r_max, self.logits_fn = model, float(r_max), logits_fn
        self.mode, self.direction, self.eval_mode = mode, direction, eval_mode
        self.temperature, self.method = float(temperature), method
        self.fd_eps, self.nonfinite = fd_eps, nonfinite
        self.reused = 0
        self._tally = Tally()  # steps; limited, skipped and the last signals (device tensors)
        self._names: dict[torch.Tensor, str] = {}
        # per optimizer: theta_old (flat buffers when possible), reused from step to step
        self._slots: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._slot = Slot()  # the latest optimizer's (also for one without weak references)
        self._pending: PendingUpdate | PendingNegGrad | None = None
        self._recorder: ActivationRecorder | None = None
        self._reuse_ok = False
        if reuse_forward and method in ("jvp", "fd1") and logits_fn is None:
            root = unwrap_model(model)
            self._recorder = ActivationRecorder(root)
            self._prefix = {m: (n + "." if n else "") for n, m in root.named_modules()}
            if not self._recorder.supported:  # not a chain: the Linear primals only
                self._recorder = LinearRecorder(root) if method == "jvp" else None
            if self._recorder is not None and not self._recorder.supported:
                self._recorder = None  # (an unsupported recorder installs no hooks)
            if self._recorder is not None:  # a dropped limiter leaves no hooks on the model
                weakref.finalize(self, self._recorder.remove)

    @property
    def steps(self) -> int:
        return self._tally.steps

    @property
    def limited(self) -> int:
        """Steps limited so far (reading it moves the device count to the host)."""
        return self._tally.counts()[0]

    @property
    def skipped(self) -> int:
        return self._tally.counts()[1]

    @property
    def last(self) -> dict[str, float]:
        """The last step's signals (see :attr:`signals`; reading them is one transfer)."""
        return self._tally.last

    @property
    def _flat(self) -> FlatBuffers | None:
        return self._slot.flat

    @property
    def _buffers(self) -> list[torch.Tensor]:
        return self._slot.buffers

    # -- the step -----------------------------------------------------------------------------
    def step(self, optimizer: torch.optim.Optimizer, inputs: Any, closure=None):
        """Snapshot, ``optimizer.step(closure)``, measure and rescale; returns the closure's loss.

        With ``direction="neg_grad"`` the gradients must be present before the call (a closure
        is then evaluated once more by the optimizer, as usual). Without a closure the
        gradients are checked (on the device) before ``optimizer.step()``: a step with a
        NaN/Inf one is undone (parameters and optimizer state) and raises or
        (``nonfinite="skip"``) is skipped. If the optimizer's step raises, theta_old and the
        optimizer's state are restored before the error propagates.
        """
        self.before_step(optimizer, inputs, check_gradients=closure is None)
        try:
            loss = optimizer.step(closure) if closure is not None else optimizer.step()
        except BaseException:
            self.abort()
            raise
        self.after_step(inputs)
        return loss

    def before_step(
        self, optimizer: torch.optim.Optimizer, inputs: Any = None, check_gradients: bool = True
    ) -> None:
        """Snapshot theta_old (``"update"``), or measure along -g and scale the lr.

        ``"update"``: with ``check_gradients`` the gradients present are checked first (see
        ``nonfinite``; pass False under a ``GradScaler``, which skips overflow steps itself).
        Called again, for another optimizer, before :meth:`after_step`: that optimizer joins
        this step (its theta_old is taken now, before it steps); for an optimizer already in
        this step it starts the step over.
        """
        pending = self._pending
        if pending is not None and pending.has(optimizer):
            self.cancel()  # a new step for the same optimizer: start over
            pending = None
        if pending is not None and (self.direction == "neg_grad" or self._shares(optimizer)):
            self.abort()
            raise ValueError(
                "Invalid optimizer: direction='neg_grad' measures one optimizer per step; "
                "use direction='update' to limit several"
                if self.direction == "neg_grad"
                else "Invalid optimizer: it shares parameters with an optimizer already "
                "stepped in this step"
            )
        slot = self._slot_for(optimizer)
        named = self._named_params(optimizer, slot)
        rec = self._recorder
        if pending is None:
            self._reuse_ok = rec is not None and inputs is not None and rec.usable(inputs)
        else:  # the first optimizer has stepped: the record is no longer at theta_old alone
            self._reuse_ok = False
        if self.direction == "update":
            grads_ok = gradients_finite(named) if check_gradients else None  # (device)
            bufs = self._flat_buffers(named, slot)
            if bufs is not None:
                bufs.snapshot()
            else:
                bufs = TensorBuffers(named, self._snapshot(named, slot))
            slot.snapshot.take(optimizer, [p for _, p in named])
            if pending is None:
                self._pending = PendingUpdate((optimizer,), (bufs,), (slot.snapshot,), grads_ok)
            else:
                self._pending = pending.joined(optimizer, bufs, slot.snapshot, grads_ok)
            return
        if inputs is None:
            raise ValueError("Invalid inputs: direction='neg_grad' measures before the step")
        lrs = tuple(g["lr"] for g in optimizer.param_groups)
        d = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = self._names.get(p)
                if name is not None and p.grad is not None:
                    d[name] = -group["lr"] * p.grad.detach()
        reused = self.reused
        r, rho, tau = torch.stack(self._measure(inputs, d)).tolist()  # (one transfer)
        s = self._scale(r, tau)
        if s is None:  # non-finite gradient: nothing has stepped yet; an error, not counted
            self.reused = reused
            raise ValueError("Invalid gradient: the radius along -g is NaN or Inf")
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * s
        self._pending = PendingNegGrad(optimizer, lrs, r, rho, tau, s)

    def after_step(self, inputs: Any = None) -> dict[str, float]:
        """Measure the update and rescale it (``"update"``) or restore the lr (``"neg_grad"``)."""
        if self._pending is None:
            raise RuntimeError("after_step called without before_step")
        pending, self._pending = self._pending, None
        if isinstance(pending, PendingNegGrad):
            pending.restore_lrs()
            self._record(pending.r, pending.rho, pending.tau, pending.scale)
            return self._tally._last
        parts = pending.buffers  # FlatBuffers or TensorBuffers: theta_old, and p once taken
        reused = self.reused  # (a refused step counts nothing)
        with torch.no_grad():
            try:
                if len(parts) == 1:
                    norm = parts[0].take_update()
                    point, direction = parts[0].point, parts[0].direction
                else:  # several optimizers: their combined update (|p| from the parts)
                    norm = None
                    for bufs in parts:
                        bufs.take_update()
                    point = {k: v for bufs in parts for k, v in bufs.point.items()}
                    direction = {k: v for bufs in parts for k, v in bufs.direction.items()}
                r, rho, tau = self._measure(inputs, direction, point, norm=norm)
            except BaseException:  # no unlimited step survives a failed measurement
                pending.restore()
                self.reused = reused
                raise
            s = device_scale(self.mode, self.r_max, r)
            ok, bad_g = r.isfinite() & tau.isfinite(), torch.zeros_like(r, dtype=torch.bool)
            if pending.grads_ok is not None:  # a NaN/Inf gradient: r, rho, tau are NaN
                bad_g = ~pending.grads_ok.to(r.device)
                ok = ok & ~bad_g
                r, rho, tau = (torch.where(bad_g, math.nan, t) for t in (r, rho, tau))
            limited = ok & (s < 1.0) if self.mode == "limit" else torch.zeros_like(ok)
            s = torch.where(ok, s, 0.0)
            flags = torch.stack([limited, ~ok, bad_g]).to(r.dtype)
            record = self._tally.add(torch.cat([torch.stack([r, rho, tau, s]), flags]))
            if self.nonfinite == "raise" or not pending.state_unchanged():
                self._decide_on_host(pending, record, reused)  # one transfer
            else:  # every decision on the device: no host synchronization
                keep = ok & (s == 1.0)
                for bufs in parts:
                    bufs.apply_masked(s, ok, keep)
                for snap in pending.snapshots:
                    snap.restore_where(ok)
        return record

    def _decide_on_host(self, pending: PendingUpdate, record, reused: int) -> None:
        """Read the step's signals (one transfer) and apply them: the path of ``"raise"``
        and of a step that changed the optimizer's state structure (its first)."""
        s = record["scale"]
        if record["skipped"]:
            pending.restore()
            if self.nonfinite == "raise":  # a refused step is not counted
                self._tally.undo()
                self.reused = reused
                raise ValueError(
                    "Invalid gradient: NaN or Inf (the optimizer's parameters and state are "
                    "restored as they were before the step)"
                    if record.bad_gradient
                    else "Invalid update: the step or its radius is NaN or Inf"
                )
        elif s != 1.0:
            for bufs in pending.buffers:
                bufs.apply_scaled(s)

    # -- helpers ------------------------------------------------------------------------------
    def _slot_for(self, optimizer) -> Slot:
        try:
            slot = self._slots.get(optimizer)
            if slot is None:
                slot = self._slots[optimizer] = Slot()
        except TypeError:  # not weakly referenceable: one shared slot
            slot = self._slot
        self._slot = slot
        return slot

    def _shares(self, optimizer) -> bool:
        """``optimizer`` holds a parameter of an optimizer already in the pending step."""
        mine = {id(p) for g in optimizer.param_groups for p in g["params"]}
        pending = self._pending.optimizers if isinstance(self._pending, PendingUpdate) else ()
        return any(id(p) in mine for o in pending for g in o.param_groups for p in g["params"])

    def _flat_buffers(self, named, slot: Slot) -> FlatBuffers | None:
        """The flat theta_old / update buffers for these parameters, or None (see
        :mod:`torchsteer.control.radius._buffers`)."""
        flat = slot.flat
        if flat is not None and flat.matches(named):
            slot.buffers = flat.old_views
            return flat
        names, params = [n for n, _ in named], [p for _, p in named]
        if not FlatBuffers.applies(names, params):
            slot.flat = None
            return None
        slot.flat = FlatBuffers(names, params, source=named)
        slot.buffers = slot.flat.old_views
        return slot.flat

    def _named_params(self, optimizer, slot: Slot) -> list[tuple[str | None, torch.Tensor]]:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        cached = slot.named_cache  # the same parameter objects as last step: same names
        if cached is not None and len(cached[0]) == len(params):
            if all(map(operator.is_, cached[0], params)):
                return cached[1]
        if any(p not in self._names for p in params):
            self._names = {
                p: n for n, p in unwrap_model(self.model).named_parameters() if p.requires_grad
            }
        named = [(self._names.get(p), p) for p in params]
        slot.named_cache = (params, named)
        return named

    def _snapshot(self, named, slot: Slot) -> list[torch.Tensor]:
        """theta_old, copied into buffers kept from step to step (no allocation)."""
        params = [p.detach() for _, p in named]
        bufs = slot.buffers
        if len(bufs) != len(params) or any(
            b.shape != p.shape
            or b.stride() != p.stride()
            or (b.dtype, b.device) != (p.dtype, p.device)
            for b, p in zip(bufs, params)
        ):
            bufs = slot.buffers = [p.clone() for p in params]
        else:
            torch._foreach_copy_(bufs, params)
        return bufs

    def _measure(self, inputs, d, point=None, norm=None) -> tuple[torch.Tensor, ...]:
        """``(r, rho_a, |p|)`` of the direction ``d`` at ``point``, 0-d float64 tensors on
        the device (no transfer); ``norm``: ``|p|`` when already computed."""
        if not d:
            zero = torch.zeros((), dtype=torch.float64)
            return zero, zero + math.inf, zero
        tangent, extra, answer = None, {}, contextlib.nullcontext()
        if self._reuse_ok:
            self._reuse_ok = False
            rec = self._recorder
            if isinstance(rec, LinearRecorder):  # the general JVP, the Linear primals reused
                if rec.usable(inputs, check_params=False):
                    answer = rec.answering(point, self._names)
            elif self.method == "jvp":  # (tangent() runs under no_grad itself)
                tangent = rec.tangent(inputs, point or {}, d, self._prefix, check_params=False)
                self.reused += int(tangent is not None)
            elif rec.usable(inputs, check_params=False):  # "fd1": the forward's logits
                extra = {"primal": rec.root_output.detach()}
                self.reused += 1
            rec.clear()  # the activations are not needed any more
            if rec.structural_failure:  # operations between modules: the Linear primals only
                self.remove_hooks()
                if self.method == "jvp":  # (its hooks go with the limiter, as the first's)
                    self._recorder = LinearRecorder(unwrap_model(self.model))
                    weakref.finalize(self, self._recorder.remove)
        with answer:
            worst = worst_spread(
                self.model,
                inputs,
                d,
                tangent=tangent,  # (neg_grad: at the live parameters, the subset d names)
                params=point
                if point is not None
                else {n: p for p, n in self._names.items() if n in d},
                logits_fn=self.logits_fn,
                eval_mode=self.eval_mode,
                method=self.method,
                fd_eps=self.fd_eps,
                channels_last=self.channels_last,
                fold=self.fold,
                **extra,
            )
        self.reused += int(getattr(answer, "hits", 0) > 0)
        if norm is None:  # |p| from the per-tensor norms, in float64
            norms = torch._foreach_norm(list(d.values()))
            if len({(t.dtype, t.device) for t in (worst, *norms)}) > 1:  # mixed
                worst, *norms = (t.double().cpu() for t in (worst, *norms))
            norm = torch.linalg.vector_norm(torch.stack(norms).double())
        r = worst.to(norm) / (math.pi * self.temperature)
        rho = torch.where(r > 0, norm / r, math.inf)
        return r, rho, norm

    def _scale(self, r: float, tau: float) -> float | None:
        if not (math.isfinite(r) and math.isfinite(tau)):
            return None
        if self.mode == "monitor" or r == 0.0:
            return 1.0
        if self.mode == "rho_set":
            return self.r_max / r
        return 1.0 if r <= self.r_max else self.r_max / r

    def _record(self, r, rho, tau, s, skipped=False) -> None:
        """A step decided on the host (``"neg_grad"``)."""
        limited = (not skipped) and self.mode == "limit" and s < 1.0
        values = [r, rho, tau, s, float(limited), float(skipped), float(skipped)]
        self._tally.add(torch.tensor(values, dtype=torch.float64))

    def remove_hooks(self) -> None:
        """Detach the forward hooks of ``reuse_forward`` from the model (the limiter then
        measures by the general JVP); for a limiter that is being replaced."""
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None

    def cancel(self) -> None:
        """Drop a pending :meth:`before_step` (the optimizer did not step); in the
        ``"neg_grad"`` direction the learning rates it scaled are restored."""
        pending, self._pending = self._pending, None
        if isinstance(pending, PendingNegGrad):
            pending.restore_lrs()

    def abort(self) -> None:
        """Undo a pending step after a failure between :meth:`before_step` and
        :meth:`after_step`: theta_old and the optimizer's state (Adam's moments, its step)
        are restored (``"update"``), the learning rates in ``"neg_grad"``
        (its step was already limited). Nothing is recorded; a no-op when nothing is pending."""
        pending, self._pending = self._pending, None
        if isinstance(pending, PendingNegGrad):
            pending.restore_lrs()
        elif pending is not None:
            pending.restore()

    @property
    def pending(self) -> bool:
        """True between :meth:`before_step` and :meth:`after_step`."""
        return self._pending is not None

    def pending_for(self, optimizer: torch.optim.Optimizer) -> bool:
        """True when ``optimizer`` is in the pending step (its theta_old is taken)."""
        return self._pending is not None and self._pending.has(optimizer)

    @property
    def signals(self) -> dict[str, float]:
        """The last step's ``r``, ``rho_a``, ``tau`` (|p|), ``scale``, ``limited`` and the
        running ``fraction_limited``."""
        return dict(self.last)

    def state_dict(self) -> dict[str, Any]:
        limited, skipped = self._tally.counts()
        return {
            "steps": self.steps,
            "limited": limited,
            "skipped": skipped,
            "reused": self.reused,
            "last": self._tally.last,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._tally.steps = int(state.get("steps", 0))
        self._tally.set_counts(int(state.get("limited", 0)), int(state.get("skipped", 0)))
        self.reused = int(state.get("reused", 0))
        self._tally.last = dict(state.get("last", {}))

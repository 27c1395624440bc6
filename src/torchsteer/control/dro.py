"""KL-regularized distributionally robust (DRO) instance reweighting.

For per-example losses :math:`l_i` and a temperature :math:`r > 0`,

.. math::

    \\max_{w \\in \\Delta_n} \\sum_i w_i l_i - r\\,\\mathrm{KL}(w \\,\\|\\, \\mathrm{unif})
    = r \\log \\frac{1}{n} \\sum_i e^{l_i / r},
    \\qquad w^\\star = \\operatorname{softmax}(l / r).

The gradient of the right-hand side is :math:`\\sum_i w^\\star_i \\nabla l_i`, so training on
the weighted loss with the weights detached descends the robust objective. As
:math:`r \\to \\infty` the weights become uniform (plain averaging); as :math:`r \\to 0` the
largest loss takes all the weight.

References:
    Sow, Lin, Wang, Liang, "Doubly Robust Instance-Reweighted Adversarial Training",
    ICLR 2024 (arXiv 2308.00311). Sagawa et al., "Distributionally Robust Neural Networks
    for Group Shifts", ICLR 2020 (Group DRO). Levy et al., "Large-Scale Methods for
    Distributionally Robust Optimization", NeurIPS 2020.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from torchsteer import distributed as dist

__all__ = ["DROWeighting", "check_reweighting_args", "kl_dro_value", "kl_dro_weights"]


def check_reweighting_args(weighting, temperature_schedule) -> None:
    """The checks of every reweighting adapter (the Lightning and Transformers callbacks)."""
    if not isinstance(weighting, DROWeighting):
        raise ValueError(f"Invalid weighting: {type(weighting).__name__}")
    if temperature_schedule is not None and not callable(temperature_schedule):
        raise ValueError(f"Invalid temperature_schedule: {temperature_schedule!r}")


_MODES = ("batch", "streaming")


def _check_temperature(temperature: float) -> float:
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"Invalid temperature: {temperature}")
    return float(temperature)


def _check_losses(losses: torch.Tensor) -> None:
    if not isinstance(losses, torch.Tensor) or losses.ndim != 1 or losses.numel() == 0:
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses)
        raise ValueError(f"Invalid losses: expected a non-empty 1-D tensor, got {shape}")
    if not losses.is_floating_point():
        raise ValueError(f"Invalid losses: expected a floating dtype, got {losses.dtype}")


def kl_dro_weights(losses: torch.Tensor, temperature: float) -> torch.Tensor:
    """The maximizing weights :math:`w^\\star = \\operatorname{softmax}(l / r)` (sum to 1).

    Args:
        losses: per-example losses ``l``, shape ``(n,)``.
        temperature: ``r > 0``.
    """
    r = _check_temperature(temperature)
    _check_losses(losses)
    if not bool(torch.isfinite(losses).all()):
        raise ValueError("Invalid losses: contain NaN or Inf")
    return torch.softmax(losses / r, dim=0)


def kl_dro_value(losses: torch.Tensor, temperature: float) -> torch.Tensor:
    """The robust objective :math:`r \\log \\frac{1}{n} \\sum_i e^{l_i / r}` (differentiable).

    Its gradient with respect to ``losses`` is :func:`kl_dro_weights`.
    """
    r = _check_temperature(temperature)
    _check_losses(losses)
    if not bool(torch.isfinite(losses).all()):
        raise ValueError("Invalid losses: contain NaN or Inf")
    return r * (torch.logsumexp(losses / r, dim=0) - math.log(losses.numel()))


class DROWeighting:
    """KL-DRO instance weights, optionally times Group-DRO class weights.

    Called on per-example losses ``l`` (shape ``(B,)``, with the autograd graph) it returns
    the weighted mean loss :math:`\\frac{1}{B}\\sum_i w_i l_i` with the weights detached:

    * ``mode="batch"``: :math:`w = B \\operatorname{softmax}(l_B / r)` (mean weight 1);
    * ``mode="streaming"``: a running normalizer
      :math:`u \\leftarrow (1-\\gamma) u + \\gamma \\operatorname{mean}_B e^{l/r}`, kept as
      :math:`\\log u` (first call: :math:`u = \\operatorname{mean}_B e^{l/r}`), then
      :math:`w_i = e^{l_i/r} / u`. It removes the bias of the batch softmax as an estimate
      of the full-data normalizer. ``gamma`` is ``momentum``. The current batch's weights use
      this ``u`` (so they stay below ``B / gamma``), but the ``u`` carried to the next call is
      at most ``max_growth`` times the previous one: without that cap one outlier batch sets
      ``u`` to about ``gamma e^{l_max/r}``, which decays by ``1 - gamma`` per call only (a
      loss of 20 among losses near 1 at ``r = 0.1`` left every later weight near ``1e-79``
      for thousands of batches). With the default 2 the normalizer recovers from an outlier
      in about ``log 2 / -log(1 - gamma)`` calls (7 at ``gamma = 0.1``) and follows a lasting
      rise of the losses by a factor of 2 per call; ``max_growth=None`` is the plain average.
    * ``class_level=True`` (Group DRO): class weights
      :math:`q \\leftarrow q\\, e^{\\eta \\bar l_c}` normalized, with :math:`\\bar l_c` the
      batch mean loss of class ``c`` (0 for classes absent from the batch) and
      :math:`\\eta` = ``class_step``; instance weights are multiplied by :math:`C q_{y_i}`
      (batch mode renormalizes them to mean 1, i.e. :math:`w \\propto e^{l_i/r} q_{y_i}`).
      The update of ``q`` happens before the weights are formed. With
      ``class_momentum`` :math:`\\beta < 1` the step uses a running class loss instead
      of the batch's: :math:`\\hat l_c \\leftarrow (1-\\beta)\\hat l_c + \\beta \\bar l_c`
      for the classes in the batch (first sight: :math:`\\hat l_c = \\bar l_c`), and
      :math:`q \\leftarrow q\\, e^{\\eta \\hat l_c}` over those classes (absent ones: 0,
      as above); :math:`\\beta = 1` is the batch rule. With ~B / C examples per class the
      batch means are noisy; the running mean trades that noise for lag.
    * ``max_weight`` clips every weight at that value (no renormalization);
      ``warmup_steps`` calls return the plain mean (the streaming normalizer still
      tracks the losses so it is warm; class weights stay put).

    Under ``torch.distributed`` every normalizer is global (max, shifted sums, counts and
    class sums are reduced through :mod:`torchsteer.distributed`), and the returned local
    loss is scaled by ``world_size / B_global`` so that DDP's gradient average equals one
    process on the concatenated batch. Non-finite losses or out-of-range labels raise
    ``ValueError`` on every rank and leave the state unchanged.

    Args:
        temperature: ``r > 0`` (settable: ``weighting.temperature = ...``).
        mode: ``"batch"`` or ``"streaming"``.
        momentum: ``gamma`` in (0, 1] of the streaming normalizer.
        class_level: multiply in Group-DRO class weights (needs ``labels``).
        num_classes: ``C``, required with ``class_level``.
        class_step: ``eta >= 0`` of the exponentiated-gradient class update.
        class_momentum: ``beta`` in (0, 1] of the running class losses (1: batch means).
        max_weight: clip the weights at this value (finite, > 0), or ``None``.
        warmup_steps: calls of plain averaging before reweighting starts.
        max_growth: the most the carried streaming normalizer may grow in one call
            (``> 1``), or ``None`` for no cap.
        nonfinite: a weighted loss that is NaN/Inf (NaN/Inf losses, or ``l / r``
            overflowing): ``"raise"`` (``ValueError``, the state unchanged; the check reads
            the loss: one host sync per call) or ``"skip"`` (decided on the device, no host
            sync: the state update is masked, so the state stays as it was, and the call
            returns a zero loss with zero weights).

    Host synchronization: the streaming normalizer is a device tensor (``log_normalizer``
    reads it), so a call syncs only for the ``"raise"`` check; under ``torch.distributed``
    the validity all-reduce is read once per call as well.

    References:
        Sow et al., ICLR 2024 (arXiv 2308.00311); Sagawa et al., ICLR 2020 (Group DRO).
    """

    def __init__(
        self,
        temperature: float = 1.0,
        mode: str = "batch",
        momentum: float = 0.1,
        class_level: bool = False,
        num_classes: int | None = None,
        class_step: float = 0.01,
        class_momentum: float = 1.0,
        max_weight: float | None = None,
        warmup_steps: int = 0,
        max_growth: float | None = 2.0,
        nonfinite: str = "raise",
    ):
        if mode not in _MODES:
            raise ValueError(f"Invalid mode: {mode!r}; expected one of {_MODES}")
        if isinstance(momentum, bool) or not (
            isinstance(momentum, (int, float)) and 0.0 < momentum <= 1.0
        ):
            raise ValueError(f"Invalid momentum: {momentum}")
        if class_level and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):
            raise ValueError(f"Invalid num_classes: {num_classes}")
        if isinstance(class_step, bool) or not (
            isinstance(class_step, (int, float)) and math.isfinite(class_step) and class_step >= 0
        ):
            raise ValueError(f"Invalid class_step: {class_step}")
        if isinstance(class_momentum, bool) or not (
            isinstance(class_momentum, (int, float)) and 0.0 < class_momentum <= 1.0
        ):
            raise ValueError(f"Invalid class_momentum: {class_momentum}")
        if max_weight is not None and (
            isinstance(max_weight, bool)
            or not (isinstance(max_weight, (int, float)) and 0 < max_weight < math.inf)
        ):
            raise ValueError(f"Invalid max_weight: {max_weight}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"Invalid warmup_steps: {warmup_steps}")
        if max_growth is not None and (
            isinstance(max_growth, bool)
            or not isinstance(max_growth, (int, float))
            or not 1.0 < max_growth < math.inf
        ):
            raise ValueError(f"Invalid max_growth: {max_growth}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"Invalid nonfinite: {nonfinite!r}; expected 'raise' or 'skip'")
        self.nonfinite = nonfinite
        self._temperature = _check_temperature(temperature)
        self.mode = mode
        self.momentum = float(momentum)
        self.class_level = bool(class_level)
        self.num_classes = num_classes
        self.class_step = float(class_step)
        self.class_momentum = float(class_momentum)
        self.max_weight = None if max_weight is None else float(max_weight)
        self.warmup_steps = warmup_steps
        self.max_growth = None if max_growth is None else float(max_growth)
        self.step = 0
        self._log_u: torch.Tensor | None = None  # log u, streaming mode (NaN: not yet set)
        self.log_class_weights: torch.Tensor | None = None  # log q, class level
        self.class_losses: torch.Tensor | None = None  # running class losses (NaN: unseen)
        if self.class_level:
            self.log_class_weights = torch.full(
                (num_classes,), -math.log(num_classes), dtype=torch.float64
            )
            self.class_losses = torch.full((num_classes,), math.nan, dtype=torch.float64)
        self._coeffs: torch.Tensor | None = None  # w * scale of the last batch
        self._scale = 1.0

    # -- hyperparameters ---------------------------------------------------------------
    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = _check_temperature(value)

    @property
    def log_normalizer(self) -> float | None:
        """``log u`` of the streaming mode (``None`` before the first call; a host read)."""
        v = None if self._log_u is None else float(self._log_u)
        return None if v is None or math.isnan(v) else v

    @log_normalizer.setter
    def log_normalizer(self, value: float | None) -> None:
        self._log_u = None if value is None else torch.tensor(float(value), dtype=torch.float64)

    @property
    def class_weights(self) -> torch.Tensor | None:
        """Group-DRO class weights ``q`` (sum to 1), or ``None`` without class level."""
        return None if self.log_class_weights is None else self.log_class_weights.exp()

    # -- the step ------------------------------------------------------------------------
    def __call__(self, losses: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The weighted mean of ``losses`` (weights detached); updates the state."""
        return self._step(losses, labels)

    def weights(self, losses: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The detached weights ``w`` of this batch (updates the state, as ``__call__``)."""
        self._step(losses, labels)
        return self.last_weights

    @property
    def last_weights(self) -> torch.Tensor | None:
        """The detached weights ``w`` of the last batch (``None`` before the first)."""
        return None if self._coeffs is None else self._coeffs / self._scale

    def _step(self, losses: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Compute the new state and the loss, check them, then commit the state."""
        y, error = None, None
        try:
            _check_losses(losses)
            y = self._check_labels(labels, losses) if self.class_level else None
        except ValueError as exc:
            if not dist.is_distributed():
                raise
            error = exc  # raised on every rank, after they agree
        z_max = self._validate_distributed(losses, y, error) if dist.is_distributed() else None
        z = losses.detach() / self._temperature
        counts = None if y is None else self._class_counts(y)
        n = self._global_count(z)
        scale = dist.world_size() / n  # local loss = scale * sum_i w_i l_i
        warm = self.step < self.warmup_steps
        log_u, log_q, run_l = self._log_u, self.log_class_weights, self.class_losses
        if self.mode == "streaming":
            log_u = self._updated_normalizer(self._log_mean_exp(z, z_max, n))
            log_u = log_u.to(z.device)
        if y is not None and not warm:
            log_q, run_l = self._class_update(losses.detach(), y, counts)
        if warm:
            coeffs = torch.full_like(z, scale)
        elif self.mode == "batch":
            if y is not None:  # w proportional to exp(l / r) q_y, mean 1
                z = z + log_q.to(z)[y]
            coeffs = self._batch_coeffs(z)
        else:
            coeffs = (z - (log_u - math.log(scale)).to(z.device)).exp()  # e^{l/r} / u * scale
            if y is not None:
                coeffs = coeffs * (self.num_classes * log_q.to(z)[y].exp())
        if self.max_weight is not None:
            coeffs = coeffs.clamp(max=self.max_weight * scale)
        loss = torch.dot(coeffs, losses)
        log_u = self._carried_normalizer(log_u)
        if not dist.is_distributed() and self.nonfinite == "raise":
            if not math.isfinite(float(loss.detach())):  # the one host sync of a call
                raise ValueError(
                    "Invalid losses: the weighted loss is not finite (NaN or Inf losses, or "
                    "l / r overflowing at this temperature)"
                )
        elif not dist.is_distributed():  # "skip": the state update masked on the device
            ok = loss.detach().isfinite()
            coeffs = torch.where(ok, coeffs, 0.0)
            loss = torch.dot(coeffs, torch.where(ok, losses, 0.0))
            log_u, log_q, run_l = _masked(ok, (log_u, log_q, run_l), (self._log_u, *_q(self)))
        self._log_u = log_u
        self.log_class_weights, self.class_losses = log_q, run_l
        self._coeffs, self._scale = coeffs, scale
        self.step += 1
        return loss

    def _validate_distributed(
        self, losses: torch.Tensor, y: torch.Tensor | None, error: ValueError | None
    ) -> torch.Tensor:
        """The global max of ``z = l / r``, from one all-reduce that also carries every
        rank's verdict: a rank's bad input (wrong shape or dtype, an empty batch, bad labels,
        NaN/Inf) raises ``ValueError`` on every rank, before any other collective, so no rank
        is left waiting in a reduction the others skipped."""
        f64 = torch.float64
        device = losses.device if isinstance(losses, torch.Tensor) else torch.device("cpu")
        if error is None:
            z = losses.detach().to(f64) / self._temperature
            zero = z.new_zeros(())
            bad_labels = zero if y is None else ((y < 0) | (y >= self.num_classes)).any().to(f64)
            flags = torch.stack([z.max(), (~torch.isfinite(z.sum())).to(f64), bad_labels, zero])
        else:
            flags = torch.tensor([-math.inf, 0.0, 0.0, 1.0], dtype=f64, device=device)
        glob = dist.all_reduce_max(flags)
        z_max, nonfinite, bad, failed = glob.tolist()  # one host read of every rank's verdict
        if failed:
            raise error or ValueError(
                "Invalid losses or labels on another rank (a wrong shape or dtype, an empty "
                "batch or bad labels): every rank raises, the state is unchanged"
            )
        if nonfinite or not math.isfinite(z_max):
            raise ValueError("Invalid losses: contain NaN or Inf (or overflow at this temperature)")
        if bad:
            raise ValueError(f"Invalid labels: expected values in [0, {self.num_classes})")
        return glob[0].to(losses.dtype)

    @staticmethod
    def _batch_coeffs(z: torch.Tensor) -> torch.Tensor:
        """``softmax(z)`` over the global batch, times ``world_size`` (= ``w * scale``)."""
        if not dist.is_distributed():
            return torch.softmax(z, dim=0)
        e = (z - dist.all_reduce_max(z.max())).exp()
        return e * (dist.world_size() / dist.all_reduce_sum(e.sum()))

    @staticmethod
    def _global_count(z: torch.Tensor) -> int:
        if not dist.is_distributed():
            return z.numel()
        return int(dist.all_reduce_sum(torch.tensor([z.numel()], device=z.device)))

    @staticmethod
    def _log_mean_exp(z: torch.Tensor, z_max: torch.Tensor | None, n: int) -> torch.Tensor:
        """``log mean exp(z)`` over the global batch (a 0-d float64 tensor, no host sync)."""
        if not dist.is_distributed():
            return torch.logsumexp(z, dim=0).double() - math.log(n)
        s = dist.all_reduce_sum((z - z_max).exp().sum())
        return z_max.double() + s.double().log() - math.log(n)

    def _updated_normalizer(self, batch_log_u: torch.Tensor) -> torch.Tensor:
        """``log u`` after ``u <- (1 - gamma) u + gamma u_batch`` (first call, or a NaN
        ``log u`` left by a skipped first call: ``u_batch``), in float64 on the device."""
        prev = self._log_u
        if prev is None or self.momentum == 1.0:
            return batch_log_u
        prev = prev.to(batch_log_u.device)
        a = prev + math.log1p(-self.momentum)
        b = batch_log_u + math.log(self.momentum)
        mixed = torch.where(  # a == b also when both are infinite
            a == b, a + math.log(2.0), torch.maximum(a, b) + torch.log1p(torch.exp(-(a - b).abs()))
        )
        return torch.where(prev.isnan(), batch_log_u, mixed)

    def _carried_normalizer(self, log_u: torch.Tensor | None) -> torch.Tensor | None:
        """``log u`` kept for the next call: at most ``log u_prev + log max_growth``."""
        if log_u is None or self._log_u is None or self.max_growth is None:
            return log_u
        cap = self._log_u.to(log_u.device) + math.log(self.max_growth)
        return torch.where(cap < log_u, cap, log_u)  # min(log_u, cap); a NaN cap: log_u

    def _check_labels(self, labels: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        if labels is None:
            raise ValueError("Invalid labels: None (class_level=True needs labels)")
        if not isinstance(labels, torch.Tensor) or labels.shape != losses.shape:
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels)
            raise ValueError(f"Invalid labels: expected shape {tuple(losses.shape)}, got {shape}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"Invalid labels: expected an integer dtype, got {labels.dtype}")
        return labels.to(losses.device)

    def _class_counts(self, labels: torch.Tensor) -> torch.Tensor:
        """Examples per class; checks the label range (under DDP already checked by all)."""
        msg = f"Invalid labels: expected values in [0, {self.num_classes})"
        try:
            counts = torch.bincount(labels, minlength=self.num_classes)
        except RuntimeError as exc:  # negative labels
            raise ValueError(msg) from exc
        if counts.numel() != self.num_classes:
            raise ValueError(msg)
        return counts

    def _class_update(
        self, losses: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Group-DRO exponentiated-gradient step on ``log q`` (global class statistics).

        Returns the new ``log q`` and running class losses (the state is not touched).
        """
        sums = torch.bincount(labels, weights=losses.to(torch.float64), minlength=self.num_classes)
        if dist.is_distributed():
            sums, counts = dist.all_reduce_sum(torch.stack([sums, counts.to(sums)])).unbind()
        present = counts > 0
        batch_loss = sums / counts.clamp(min=1)  # 0 for absent classes
        old = self.class_losses.to(sums)
        if self.class_momentum == 1.0:  # the batch rule
            run_l = step = batch_loss
        else:  # first sight: the batch mean; then (1 - beta) old + beta batch
            run_l = torch.where(old.isnan(), batch_loss, old).lerp(batch_loss, self.class_momentum)
            step = run_l * present
        run_l = torch.where(present, run_l, old)
        log_q = self.log_class_weights.to(sums) + self.class_step * step
        return torch.log_softmax(log_q, dim=0), run_l

    # -- signals and state ---------------------------------------------------------------
    def signals(self) -> dict[str, float]:
        """Statistics of the last weights over the global batch.

        ``ess`` (effective sample size :math:`(\\sum w)^2 / \\sum w^2`), ``ess_fraction``
        (``ess / B``), ``max_weight`` (largest weight; uniform is 1 in batch mode),
        ``weight_entropy`` (entropy in nats of :math:`w / \\sum w`; :math:`\\log B` is
        uniform), ``temperature``, and with class level ``class_weight_max`` (:math:`C \\max q`).
        Empty before the first call. Under DDP every rank must call it (it reduces).
        """
        w = self.last_weights
        if w is None:
            return {}
        w = w.to(torch.float64)
        wlogw = torch.where(w > 0, w * w.clamp(min=1e-300).log(), torch.zeros_like(w))
        sums = torch.stack([w.sum(), (w * w).sum(), wlogw.sum(), w.new_tensor(float(w.numel()))])
        s, s2, slogs, n = (float(v) for v in dist.all_reduce_sum(sums))
        out = {
            "ess": s * s / s2,
            "ess_fraction": s * s / s2 / n,
            "max_weight": float(dist.all_reduce_max(w.max())),
            "weight_entropy": math.log(s) - slogs / s,
            "temperature": self._temperature,
        }
        if self.log_class_weights is not None:
            out["class_weight_max"] = float(self.num_classes * self.log_class_weights.exp().max())
        return out

    def state_dict(self) -> dict[str, Any]:
        """The state: step, temperature, normalizer ``log u``, class ``log q`` and losses."""
        return {
            "step": self.step,
            "temperature": self._temperature,
            "log_normalizer": None
            if self.log_normalizer is None
            else self._log_u.detach().cpu().clone(),
            "log_class_weights": None
            if self.log_class_weights is None
            else self.log_class_weights.detach().cpu().clone(),
            "class_losses": None
            if self.class_losses is None
            else self.class_losses.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; missing keys keep their current values.

        Every value is checked before any is assigned: a rejected state (a bad value, or a
        key :meth:`state_dict` does not write) leaves the weighting as it was.
        """
        unknown = sorted(set(state) - set(self.state_dict()))
        if unknown:
            raise ValueError(f"Invalid DROWeighting state: unknown keys {unknown}")
        temperature = _check_temperature(state.get("temperature", self._temperature))
        step = state.get("step", self.step)
        if isinstance(step, torch.Tensor) and step.numel() == 1:
            step = step.item()
        if (
            isinstance(step, bool)
            or not isinstance(step, int | float)
            or step < 0
            or step != int(step)
        ):
            raise ValueError(f"Invalid step: {step}")
        log_u = self.log_normalizer
        if "log_normalizer" in state:
            v = state["log_normalizer"]
            log_u = None if v is None else float(v)
            if log_u is not None and (math.isnan(log_u) or log_u == math.inf):
                raise ValueError(f"Invalid log_normalizer: {log_u}")
        log_q = self._class_vector(state, "log_class_weights", self.log_class_weights)
        run_l = self._class_vector(state, "class_losses", self.class_losses)
        self._temperature, self.step, self.log_normalizer = temperature, int(step), log_u
        self.log_class_weights, self.class_losses = log_q, run_l

    def _class_vector(self, state: dict[str, Any], key: str, current):
        """``state[key]`` as a float64 vector of ``num_classes`` (``current`` when absent)."""
        if state.get(key) is None:
            return current
        v = torch.as_tensor(state[key], dtype=torch.float64)
        if self.class_level and v.shape != (self.num_classes,):
            raise ValueError(f"Invalid {key}: shape {tuple(v.shape)}")
        return v.clone()


def _q(weighting: DROWeighting):
    return weighting.log_class_weights, weighting.class_losses


def _masked(ok: torch.Tensor, new, old):
    """``where(ok, new, old)`` for each state tensor (``None`` stays ``None``; a first value
    with no old one becomes NaN where not ok: "not yet set")."""
    out = []
    for n, o in zip(new, old):
        if n is None or n is o:
            out.append(n)
        else:
            ok_n = ok.to(n.device)
            out.append(torch.where(ok_n, n, math.nan if o is None else o.to(n)))
    return out

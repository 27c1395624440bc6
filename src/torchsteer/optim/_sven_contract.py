"""Sven's side of the optimizer contract (``optim/_contract.py``), and its messages.

Every hyperparameter of Sven is a key of ``defaults`` and of every param group; ``lr``,
``momentum`` and ``maximize`` may differ per group, the others (:data:`GLOBAL`) are one value
for the optimizer. The global state lives on the first parameter (``step``,
``skipped_steps``, ``generator_state`` and the records), the heavy-ball buffer on each
parameter. A state dict is accepted only if

    every group passes :meth:`SvenContract._validate_group` (as at construction),
    the global state holds 0-d counters >= 0, 0-d records, a uint8 generator state of
        ``torch.Generator().get_state()``'s size, and the last step's path
        (``matrix_free`` 0 or 1, ``path_fraction`` in (0, 1]),
    every parameter's state is at most a floating ``momentum_buffer`` of its shape,

and only then is anything assigned (the mixin's atomic ``load_state_dict``). A run of
``nonfinite="skip"`` steps warns once when it reaches :data:`SKIP_WARNING` in a row.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from torchsteer.distributed import Shard
from torchsteer.optim._contract import (
    NONFINITE_POLICIES,
    GlobalStateMixin,
    check_choice,
    check_hyperparameter,
    user_stacklevel,
)

__all__ = ["GLOBAL", "PATH", "RECORDS", "SKIP_WARNING", "SvenContract", "explained"]

RECORDS = ("kept_rank", "sigma_max", "sigma_min", "linearized_reduction")
PATH = ("matrix_free", "path_fraction")  # the last step's path (1.0: matrix-free) and fraction
GLOBAL = (
    "rank", "rtol", "kappa", "svd", "jacobian", "oversample", "power_iters", "param_fraction",
    "microbatch_size", "nonfinite", "memory_budget", "seed", "gram_dtype", "damping",
    "max_step_norm", "foreach", "differentiable",
)  # fmt: skip
SKIP_WARNING = 5  # skipped steps in a row after which Sven warns (once per run of skips)
_GENERATOR_BYTES = torch.Generator().get_state().numel()


def explained(err: RuntimeError) -> Exception:
    """A clearer error for ``err`` (raise it ``from err``), or ``err`` itself with a hint."""
    if "sparse" in str(err).lower():
        return ValueError(
            "Invalid gradient: sparse gradients (e.g. nn.Embedding(sparse=True)) are not "
            "supported by Sven, whose Jacobian is dense; use sparse=False"
        )
    if "backward through the graph a second time" in str(err):
        err.add_note(
            "Sven differentiates the per-sample losses the closure returns: the closure must "
            "not call backward() on them (zero the gradients and return the losses)"
        )
    return err


class SvenContract(GlobalStateMixin):
    """The contract's hooks for Sven (validation, atomic loading, copies, skip warnings)."""

    global_hyperparameters = GLOBAL
    global_state_keys = ("step", "skipped_steps", "generator_state", *RECORDS, *PATH)

    def _validate_group(self, group: dict[str, Any]) -> None:
        g, check = group, check_hyperparameter
        check("lr", g["lr"], low=0.0, tensor=True)
        check("momentum", g["momentum"], low=0.0, high=1.0, high_open=True)
        check_choice("maximize", g["maximize"], (False, True))
        check("rank", g["rank"], low=1, integer=True)
        check("rtol", g["rtol"], low=0.0, high=1.0, high_open=True)
        check("kappa", g["kappa"], low=0.0, low_open=True)
        check_choice("svd", g["svd"], ("auto", "exact", "randomized"))
        check_choice("jacobian", g["jacobian"], ("auto", "dense", "matrix_free"))
        check("oversample", g["oversample"], low=0, integer=True)
        check("power_iters", g["power_iters"], low=0, integer=True)
        check("param_fraction", g["param_fraction"], low=0.0, high=1.0, low_open=True)
        if g["microbatch_size"] is not None:
            check("microbatch_size", g["microbatch_size"], low=1, integer=True)
        check_choice("nonfinite", g["nonfinite"], NONFINITE_POLICIES)
        check("memory_budget", g["memory_budget"], low=1, integer=True)
        check("seed", g["seed"], low=-(2**63), high=2**64 - 1, integer=True)
        gram_dtype = g["gram_dtype"]
        if gram_dtype is not None and not (
            isinstance(gram_dtype, torch.dtype) and gram_dtype.is_floating_point
        ):
            raise ValueError(f"Invalid gram_dtype: {gram_dtype} (a floating-point dtype or None)")
        check("damping", g["damping"], low=0.0)
        if g["max_step_norm"] is not None:
            check("max_step_norm", g["max_step_norm"], low=0.0, low_open=True)
        for key, keep in (("foreach", None), ("differentiable", False)):
            if g[key]:
                raise ValueError(
                    f"Invalid {key}: {g[key]!r}; Sven applies one flat direction through a "
                    f"truncated SVD and has no {key} implementation (leave it {keep})"
                )

    def _validate_global_state(self, state: dict[str, Any], saved_groups: list[dict]) -> None:
        """The saved global state: counters >= 0, a CPU generator state, finite records; a
        counter or record may be a 0-d tensor or a number (as ``torch.optim`` loads a
        non-tensor ``step``)."""
        for key, value in state.items():
            if key == "generator_state":
                ok = isinstance(value, torch.Tensor) and value.dtype == torch.uint8
                if not ok or tuple(value.shape) != (_GENERATOR_BYTES,):
                    raise ValueError(
                        "Invalid state_dict: generator_state must be a uint8 tensor of "
                        f"{_GENERATOR_BYTES} bytes (torch.Generator().get_state())"
                    )
            elif isinstance(value, torch.Tensor) and value.dim() == 0:
                value = float(value)
            if key in ("step", "skipped_steps", "kept_rank"):
                check_hyperparameter(f"state_dict {key}", value, low=0.0)
            elif key == "matrix_free" and value not in (0.0, 1.0):
                raise ValueError(f"Invalid state_dict: matrix_free must be 0 or 1, got {value!r}")
            elif key == "path_fraction":
                check_hyperparameter(f"state_dict {key}", value, low=0.0, high=1.0, low_open=True)
            elif key != "generator_state":  # a record: any real number (inf/NaN refused)
                check_hyperparameter(f"state_dict {key}", value)

    @property
    def jacobian_path(self) -> str | None:
        """The path the last step took, ``"dense"`` or ``"matrix_free"`` (None before one)."""
        flag = self._first_state().get("matrix_free")
        return None if flag is None else ("matrix_free" if float(flag) else "dense")

    def _validate_param_state(self, param: torch.Tensor, pstate: dict[str, Any]) -> None:
        """A parameter's saved state: only a floating ``momentum_buffer`` of its shape."""
        unknown = sorted(set(pstate) - {"momentum_buffer"})
        if unknown:
            raise ValueError(f"Invalid state_dict: unknown Sven state {unknown}")
        buf = pstate.get("momentum_buffer")
        if buf is not None and (
            not isinstance(buf, torch.Tensor)
            or not buf.is_floating_point()
            or buf.shape != param.shape
        ):
            got = f"{tuple(buf.shape)} {buf.dtype}" if isinstance(buf, torch.Tensor) else buf
            raise ValueError(
                f"Invalid state_dict: momentum_buffer is {got}, its parameter "
                f"{tuple(param.shape)} (floating point)"
            )

    def _reset_runtime(self) -> None:
        self._jac_buf: torch.Tensor | None = None  # the dense functional Jacobian's buffer
        self._skips_in_row = 0
        self._synced_generator: torch.Tensor | None = None  # rank 0's, under DDP

    def _after_load_state_dict(self) -> None:
        self._reset_runtime()
        state = self._first_state()
        if "generator_state" in state:
            state["generator_state"] = state["generator_state"].cpu()
        for key in ("step", "skipped_steps", *RECORDS, *PATH):
            if key in state and not isinstance(state[key], torch.Tensor):
                state[key] = torch.tensor(float(state[key]))

    def __setstate__(self, state: dict[str, Any]) -> None:
        """The mixin's, and ``differentiable`` (one of Sven's keys) for older groups too."""
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("differentiable", False)

    def __getstate__(self) -> dict[str, Any]:
        """Optimizer's state plus ``model`` and ``loss_fn`` (deepcopy and pickle keep them)."""
        return {**super().__getstate__(), "model": self.model, "loss_fn": self.loss_fn}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer``, validated first (a rejected state dict raises
        ``ValueError`` and changes nothing); every state tensor keeps its saved dtype (fp32
        momentum of bf16 parameters, the uint8 generator state, the counters)."""
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        for live, sgroup in zip(self.param_groups, state_dict["param_groups"], strict=True):
            for p, pid in zip(live["params"], sgroup["params"], strict=True):
                buf = saved.get(pid, {}).get("momentum_buffer")
                if buf is not None:
                    self.state[p]["momentum_buffer"] = buf.to(device=p.device, copy=True)

    def _graph_losses(self, closure, device):
        """``(losses, source, shard)`` of the graph path. Under DDP a rank that rejects its
        closure's output (a ValueError) says so in the all-gather of the row counts, the
        step's first collective, and every rank raises (issue 18 #4: none is left waiting)."""
        try:
            losses, capture = self._losses_from_closure(closure)
            source, error = self._graph_source(losses, capture), None
        except ValueError as exc:
            losses = source = None
            error = exc
        shard = Shard.create(-1 if error is not None else losses.numel(), device, error)
        return losses, source, shard

    @staticmethod
    def _check_not_empty(shard, what: str) -> None:
        """No sample on any rank: every rank knows (the row counts are global) and raises."""
        if shard.total == 0:
            raise ValueError(f"Invalid {what}: empty (0 samples); Sven needs at least one")

    def _warn_exact_path(self, reason: str) -> None:
        """Warn once that the closure path fell back to one backward per sample."""
        if getattr(self, "_warned_exact", False):
            return
        self._warned_exact = True
        text = "the closure path forms the per-sample Jacobian with one backward per sample"
        hint = "the functional path (model=, loss_fn=, step(batch=...)) or supported layers"
        msg = f"Sven: {text} (exact but slow) because {reason}; {hint} make it one backward"
        warnings.warn(msg, RuntimeWarning, stacklevel=user_stacklevel())

    def _skipped(self, what: str) -> None:
        """Count a skipped step; warn once when :data:`SKIP_WARNING` are skipped in a row."""
        self._skips_in_row += 1
        if self._skips_in_row == SKIP_WARNING:
            self._warn_skips(what)

    def _warn_skips(self, what: str) -> None:
        """The warning of :data:`SKIP_WARNING` skipped steps in a row."""
        warnings.warn(
            f"Sven skipped {SKIP_WARNING} steps in a row (nonfinite='skip'): the {what} "
            "keep holding NaN or Inf, so the parameters do not move; check the losses "
            "and the model (nonfinite='raise' shows the first bad step)",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )


for _name in GLOBAL:  # the global hyperparameters, read from the first group
    setattr(SvenContract, _name, property(lambda self, name=_name: self.param_groups[0][name]))

"""Conjugate gradient for symmetric positive-definite systems ``A x = b`` given as a product.

The public, unshifted entry to the library's one CG,
:func:`torchsteer.linalg.shifted_solvers.shifted_cg` (``lambda = 0``): same iterates, same
stopping rule, same breakdown test. It adds the checks a user call needs (a finite ``b``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from torchsteer.linalg.shifted_solvers import ShiftedCGResult, shifted_cg

__all__ = ["CGResult", "conjugate_gradient"]

CGResult = ShiftedCGResult
"""Outcome of :func:`conjugate_gradient`: ``x``, ``iterations``, ``residual_norm`` (per
column), ``converged``, ``breakdown`` (non-positive or NaN curvature was met; ``x`` is the
iterate before it), and ``Hx`` (``A x`` along the recurrence)."""


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    tol: float = 1e-6,
    maxiter: int | None = None,
    x0: torch.Tensor | None = None,
    atol: float = 0.0,
    check_every: int = 1,
) -> CGResult:
    """Solve ``A x = b`` for SPD ``A`` given only ``matvec(x) = A x``.

    Batched: ``b`` may be (n,) or (n, k); the k columns are independent systems, each with its
    own step sizes, and ``matvec`` must accept the same shape. Stops when every column has
    ``|r| <= max(tol |b|, atol)``, or at ``maxiter`` (default ``10 n``). The test runs on
    the device at every iteration and the host reads it every ``check_every`` iterations
    (one synchronization each; the iterates do not depend on ``check_every``, see
    :func:`~torchsteer.linalg.shifted_solvers.shifted_cg`).

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> res = conjugate_gradient(lambda v: A @ v, torch.tensor([1.0, 2.0], dtype=A.dtype))
        >>> torch.allclose(A @ res.x, torch.tensor([1.0, 2.0], dtype=A.dtype))
        True

    Returns:
        A :class:`CGResult`.
    """
    if not torch.isfinite(b).all():
        raise ValueError("Invalid b: contains NaN or Inf")
    return shifted_cg(matvec, b, 0.0, tol, maxiter, x0, None, check_every, atol)

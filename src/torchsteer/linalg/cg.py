"""Conjugate gradient for symmetric positive-definite systems ``A x = b`` given as a product.

The public, unshifted entry to the library's one CG,
:func:`torchsteer.linalg.shifted_solvers.shifted_cg` (``lambda = 0``): same iterates, same
stopping rule, same breakdown test. It adds the checks a user call needs, once at entry:
``b`` (n,) or (n, k) and finite, ``x0`` of b's shape, ``maxiter >= 1``, and the first
product of b's shape (shapes only: no host synchronization is added to the iterations).
"""

from __future__ import annotations

import numbers
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
    if not isinstance(b, torch.Tensor) or b.dim() not in (1, 2):
        got = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
        raise ValueError(f"Invalid b: shape {got}, expected (n,) or (n, k)")
    if x0 is not None and (not isinstance(x0, torch.Tensor) or x0.shape != b.shape):
        got = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
        raise ValueError(f"Invalid x0: shape {got}, expected b's shape {tuple(b.shape)}")
    if maxiter is not None and (
        isinstance(maxiter, bool) or not isinstance(maxiter, numbers.Integral) or maxiter < 1
    ):
        raise ValueError(f"Invalid maxiter: {maxiter!r} (an integer >= 1, or None for 10 n)")
    if not torch.isfinite(b).all():
        raise ValueError("Invalid b: contains NaN or Inf")
    return shifted_cg(_checked(matvec, b), b, 0.0, tol, maxiter, x0, None, check_every, atol)


def _checked(matvec, b: torch.Tensor):
    """``matvec`` whose first product is checked: it must take and return b's shape (a shape
    check, no tensor read; later products are ``matvec`` itself)."""
    checked = False

    def product(v: torch.Tensor) -> torch.Tensor:
        nonlocal checked
        if checked:
            return matvec(v)
        try:
            out = matvec(v)
        except RuntimeError as err:
            raise ValueError(
                f"Invalid b or matvec: matvec failed on a vector of b's shape {tuple(v.shape)} "
                "(b is (n,) or (n, k), and matvec takes that shape); its error is chained"
            ) from err
        if not isinstance(out, torch.Tensor) or out.shape != v.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"Invalid matvec: it returned shape {got} for a vector of shape "
                f"{tuple(v.shape)} (b's shape); A x must have the shape of x"
            )
        checked = True
        return out

    return product

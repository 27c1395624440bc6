"""Linear algebra of the optimizers: randomized SVD, truncated pseudoinverse, CG, M-FAC window.

Torch only; nothing here knows an optimizer exists.
"""

from torchsteer.linalg.blocked_window import BlockedGradientWindow
from torchsteer.linalg.cg import CGResult, conjugate_gradient
from torchsteer.linalg.gradient_window import GradientWindow, NonFiniteGradientError
from torchsteer.linalg.pinv import truncated_pinv_apply
from torchsteer.linalg.randomized_svd import randomized_svd, svd_small
from torchsteer.linalg.truncated import TruncatedSolution, gram_solve, truncated_solve

__all__ = [
    "BlockedGradientWindow",
    "CGResult",
    "GradientWindow",
    "NonFiniteGradientError",
    "TruncatedSolution",
    "conjugate_gradient",
    "gram_solve",
    "randomized_svd",
    "svd_small",
    "truncated_pinv_apply",
    "truncated_solve",
]

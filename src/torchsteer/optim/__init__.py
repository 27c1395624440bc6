"""Optimizers: true ``torch.optim.Optimizer`` subclasses. Never imports Lightning.

- :class:`Sven`: minimum-norm steps through a truncated-SVD pseudoinverse of the per-sample
  residual Jacobian (closure returns per-sample losses).
- :class:`MFAC`: inverse empirical Fisher over a sliding window of gradients (plain
  ``loss.backward(); opt.step()``).
- :class:`RegularizedNewton`: gradient-normalized regularized Newton with exact, Gauss-Newton
  or empirical-Fisher curvature (closure-driven, like L-BFGS).
"""

from torchsteer.optim.mfac import MFAC
from torchsteer.optim.mfac_memory import mfac_max_ngrads, mfac_window_bytes
from torchsteer.optim.regularized_newton import RegularizedNewton
from torchsteer.optim.sven import Sven

__all__ = ["MFAC", "RegularizedNewton", "Sven", "mfac_max_ngrads", "mfac_window_bytes"]

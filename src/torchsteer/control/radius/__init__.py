"""Softmax step-radius limiter ("ghosts of softmax").

Along a step theta -> theta + t v the logits move as z(x) + t a(x; v) to first order, with the
directional logit derivatives ``a(x; v) = J_z(x) v`` (C numbers per sample x, one forward-mode
JVP for the whole batch). The partition function ``F(t) = sum_k exp(z_k + a_k t)`` has complex
zeros, and cross-entropy along the line is analytic only within the distance to the nearest:

    rho*(x) >= pi / Delta_a(x; v),    Delta_a(x; v) = max_k a_k(x; v) - min_k a_k(x; v)

(binary: exactly ``sqrt(delta^2 + pi^2) / |a_1 - a_2|`` with the logit gap delta). Over a batch
S the worst sample sets the radius ``rho_a = pi / max_{x in S} Delta_a(x; v)`` (``pi T / ...``
for logits divided by a temperature T). Since Delta_a is linear in the direction, the
normalized step of an update p (any length) is

    r = |p| / rho_a(p / |p|) = max_x Delta_a(x; p) / pi.

Steps with r >= 1 are where training collapses; the limiter applies ``s p`` with
``s = min(1, r_max / r)``: direction unchanged, bit-identical to the base optimizer when
``r <= r_max``.

The sub-package:

- :mod:`.limiter`: :class:`RadiusLimiter`, the controller for any training loop.
- :mod:`.measure`: the measurement, :func:`logit_derivative`, :func:`logit_spread` and
  :func:`normalized_step`.
- ``_tangent``: the tangent-only JVP from the training forward's activations; ``_fold``:
  eval-mode BatchNorm folded into the convolution before it; ``_buffers``: theta_old and the
  update as flat buffers.

References:
    P. Sao, "Ghosts of Softmax: Complex Singularities That Limit Safe Step Sizes in
    Cross-Entropy", arXiv:2603.13552 (2026), Prop. 5.2 / Eq. 19.
"""

from torchsteer.control.radius.limiter import RadiusLimiter
from torchsteer.control.radius.measure import logit_derivative, logit_spread, normalized_step

__all__ = [
    "RadiusLimiter",
    "logit_derivative",
    "logit_spread",
    "normalized_step",
]

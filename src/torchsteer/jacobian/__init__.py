"""The shared core on ``torch.func``: JVP / VJP / per-sample Jacobian / HVP / GGN products and
the curvature operators (Hessian, Gauss-Newton, empirical Fisher).

Two ways in: the **functional** path (:mod:`.functional`, a module plus a per-sample loss
through ``functional_call``; fastest, needed for forward mode) and the **graph** path
(:mod:`.graph`, from a closure's live autograd graph). Both give the same numbers. This
package imports nothing else of torchsteer.
"""

from torchsteer.jacobian.curvature import (
    CurvatureOperator,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    graph_hvp,
)
from torchsteer.jacobian.functional import (
    ggn_vp,
    hvp,
    jacobian,
    jvp,
    model_fn,
    vjp,
)
from torchsteer.jacobian.graph import GraphJVP, graph_jacobian, graph_jvp, graph_vjp
from torchsteer.jacobian.operator import JacobianOperator
from torchsteer.jacobian.params import (
    check_finite,
    flatten,
    flatten_like,
    numel,
    param_dict,
    unflatten,
    unwrap_model,
)
from torchsteer.jacobian.per_sample import per_sample_jacobian

__all__ = [
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "GraphJVP",
    "HessianOperator",
    "JacobianOperator",
    "check_finite",
    "flatten",
    "flatten_like",
    "ggn_vp",
    "graph_hvp",
    "graph_jacobian",
    "graph_jvp",
    "graph_vjp",
    "hvp",
    "jacobian",
    "jvp",
    "model_fn",
    "numel",
    "param_dict",
    "per_sample_jacobian",
    "unflatten",
    "unwrap_model",
    "vjp",
]

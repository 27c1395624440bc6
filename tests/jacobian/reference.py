"""Dense float64 oracles built with ``torch.autograd.functional`` on a flat parameter vector."""

from torch.autograd.functional import hessian as ag_hessian
from torch.autograd.functional import jacobian as ag_jacobian
from torch.func import functional_call

from torchsteer.jacobian import flatten, param_dict, unflatten


def flat_fn(model, fn):
    """``g(theta_flat) = fn(model with parameters theta)``, and theta_0."""
    params = param_dict(model)
    bufs = dict(model.named_buffers())
    theta0 = flatten(params).detach().clone()

    def g(theta):
        return fn(lambda *a: functional_call(model, {**unflatten(theta, params), **bufs}, a))

    return g, theta0


def dense_jacobian(model, fn):
    g, theta0 = flat_fn(model, fn)
    return ag_jacobian(lambda t: g(t).reshape(-1), theta0)


def dense_hessian(model, fn):
    g, theta0 = flat_fn(model, fn)
    return ag_hessian(g, theta0)

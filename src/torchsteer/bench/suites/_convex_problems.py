"""Problems of the ``convex`` suite: torch closures for the optimizers, NumPy oracles for SciPy.

Each :class:`Problem` carries the same objective twice: as torch closures on a parameter
tensor (for :class:`~torchsteer.optim.RegularizedNewton`, ``torch.optim.LBFGS``) and as NumPy
oracles ``fg(x) -> (f, g)``, ``hessp(x, v)``, ``hess(x)`` in closed form (for SciPy and gradient
descent, which get the fastest oracle we can write). ``f_star`` comes from :func:`newton_polish`.

- :func:`logistic_synthetic`: ``f(w) = mean softplus(-y_i x_i^T w) + mu/2 |w|^2``, x_i ~ N(0, I),
  y_i ~ Bernoulli(sigmoid(x_i^T w_true)) in {-1, 1}; ``sparse=True`` draws a sparse X (for
  d = 1e5, where no P x P matrix fits).
- :func:`logistic_breast_cancer`: the same loss on scikit-learn's breast-cancer data.
- :func:`softmax_digits`: ``f(W) = mean cross-entropy(x_i^T W, y_i) + mu/2 |W|^2``, W 64 x 10.
- :func:`mlp_digits`: a small tanh MLP on digits (non-convex, torch only).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import expit, logsumexp

from torchsteer.bench import data

__all__ = [
    "Problem",
    "logistic_breast_cancer",
    "logistic_synthetic",
    "mlp_digits",
    "newton_polish",
    "softmax_digits",
]


@dataclasses.dataclass(kw_only=True)
class Problem:
    """An objective in torch and NumPy form.

    Attributes:
        name: short name (``"logreg d=100"``).
        d: number of parameters.
        make_params: fresh parameter tensors at the start point (zeros for convex problems).
        loss: ``loss(params) -> scalar``; ``losses(params) -> (n,)`` with mean ``loss``;
            ``outputs(params) -> (loss, outputs)`` for Gauss-Newton.
        fg, hessp, hess: NumPy oracles on the flat vector (None for torch-only problems).
        f_star: the optimal value (None for non-convex problems).
        convex: whether ``f_star`` is the global minimum.
    """

    name: str
    d: int
    make_params: Callable[[], list[torch.Tensor]]
    loss: Callable[[list[torch.Tensor]], torch.Tensor]
    losses: Callable[[list[torch.Tensor]], torch.Tensor]
    outputs: Callable[[list[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
    fg: Callable | None = None
    hessp: Callable | None = None
    hess: Callable | None = None
    f_star: float | None = None
    convex: bool = True
    n_samples: int = 0
    n_outputs: int = 0


def _logistic(name, X, y, mu, Xn, yn) -> Problem:
    """Logistic regression in torch (``X`` dense or sparse CSR) and NumPy (``Xn``)."""
    n, d = X.shape

    def make_params():
        return [torch.zeros(d, dtype=torch.float64, requires_grad=True)]

    def margins(p):
        return -y * (X @ p[0])

    def losses(p):
        return F.softplus(margins(p)) + 0.5 * mu * p[0].dot(p[0])

    def loss(p):
        return F.softplus(margins(p)).mean() + 0.5 * mu * p[0].dot(p[0])

    def outputs(p):
        z = X @ p[0]
        return F.softplus(-y * z).mean() + 0.5 * mu * p[0].dot(p[0]), z

    def fg(w):
        m = -yn * (Xn @ w)
        s = expit(m)
        return np.logaddexp(0, m).mean() + 0.5 * mu * w @ w, Xn.T @ (-yn * s) / n + mu * w

    def curvature_weights(w):
        s = expit(-yn * (Xn @ w))
        return s * (1 - s) / n

    def hessp(w, v):
        return Xn.T @ (curvature_weights(w) * (Xn @ v)) + mu * v

    def hess(w):
        Xd = Xn.toarray() if hasattr(Xn, "toarray") else Xn
        return (Xd.T * curvature_weights(w)) @ Xd + mu * np.eye(d)

    return Problem(
        name=name,
        d=d,
        make_params=make_params,
        loss=loss,
        losses=losses,
        outputs=outputs,
        fg=fg,
        hessp=hessp,
        hess=hess,
        n_samples=n,
        n_outputs=n,
    )


def logistic_synthetic(
    d: int,
    n: int = 2000,
    mu: float = 1e-4,
    seed: int = 0,
    sparse: bool = False,
    nnz_per_row: int = 200,
) -> Problem:
    """Synthetic L2-regularized logistic regression (sparse X: ``nnz_per_row`` N(0, 1) entries)."""
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, generator=gen, dtype=torch.float64)
    if sparse:
        import scipy.sparse as sp

        rows = torch.arange(n).repeat_interleave(nnz_per_row)
        cols = torch.randint(0, d, (n * nnz_per_row,), generator=gen)
        vals = torch.randn(n * nnz_per_row, generator=gen, dtype=torch.float64)
        Xn = sp.csr_matrix((vals.numpy(), (rows.numpy(), cols.numpy())), shape=(n, d))
        Xn.sum_duplicates()
        with warnings.catch_warnings():  # "sparse CSR support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            X = torch.sparse_csr_tensor(
                torch.as_tensor(Xn.indptr, dtype=torch.int64),
                torch.as_tensor(Xn.indices, dtype=torch.int64),
                torch.as_tensor(Xn.data),
                size=(n, d),
            )
        z = torch.as_tensor(Xn @ w_true.numpy())
    else:
        X = torch.randn(n, d, generator=gen, dtype=torch.float64)
        Xn = X.numpy()
        z = X @ w_true
    y = torch.where(torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(z), 1.0, -1.0)
    label = f"logreg d={d:g}" + (" sparse" if sparse else "")
    return _logistic(label, X, y, mu, Xn, y.numpy())


def logistic_breast_cancer(mu: float = 1e-4) -> Problem:
    """Logistic regression on the standardized breast-cancer data (569 x 30), labels in {-1, 1}."""
    X, y01 = data.breast_cancer(dtype=torch.float64)
    y = 2 * y01 - 1
    return _logistic("breast-cancer", X, y, mu, X.numpy(), y.numpy())


def softmax_digits(mu: float = 1e-4) -> Problem:
    """Softmax regression on the digits training split (1438 x 64 -> 10 classes, d = 640)."""
    X, y, _, _ = data.digits(dtype=torch.float64)
    n, k = X.shape[0], 10
    Xn, Y = X.numpy(), np.eye(k)[y.numpy()]

    def make_params():
        return [torch.zeros(X.shape[1], k, dtype=torch.float64, requires_grad=True)]

    def reg(p):
        return 0.5 * mu * (p[0] ** 2).sum()

    def losses(p):
        return F.cross_entropy(X @ p[0], y, reduction="none") + reg(p)

    def loss(p):
        return F.cross_entropy(X @ p[0], y) + reg(p)

    def outputs(p):
        z = X @ p[0]
        return F.cross_entropy(z, y) + reg(p), z

    def probs(W):
        Z = Xn @ W
        return Z, np.exp(Z - logsumexp(Z, axis=1, keepdims=True))

    def fg(w):
        W = w.reshape(-1, k)
        Z, P = probs(W)
        f = (logsumexp(Z, axis=1) - (Z * Y).sum(1)).mean() + 0.5 * mu * w @ w
        return f, (Xn.T @ (P - Y) / n + mu * W).reshape(-1)

    def hessp(w, v):
        _, P = probs(w.reshape(-1, k))
        XV = Xn @ v.reshape(-1, k)
        R = P * XV - P * (P * XV).sum(1, keepdims=True)
        return (Xn.T @ R / n).reshape(-1) + mu * v

    def hess(w):
        _, P = probs(w.reshape(-1, k))
        m = Xn.shape[1]
        H = np.empty((m, k, m, k))
        for a in range(k):
            for b in range(k):
                c = P[:, a] * ((a == b) - P[:, b]) / n
                H[:, a, :, b] = (Xn.T * c) @ Xn
        return H.reshape(m * k, m * k) + mu * np.eye(m * k)

    return Problem(
        name="digits softmax",
        d=640,
        make_params=make_params,
        loss=loss,
        losses=losses,
        outputs=outputs,
        fg=fg,
        hessp=hessp,
        hess=hess,
        n_samples=n,
        n_outputs=n * k,
    )


def mlp_digits(n: int = 500, hidden: int = 16, mu: float = 1e-4, seed: int = 0) -> Problem:
    """A tanh MLP 64-hidden-10 on the first ``n`` digits training samples (non-convex)."""
    X, y, _, _ = data.digits(dtype=torch.float64)
    X, y = X[:n], y[:n]
    gen = torch.Generator().manual_seed(seed)
    shapes = [(64, hidden), (hidden,), (hidden, 10), (10,)]
    init = [
        torch.randn(s, generator=gen, dtype=torch.float64) / (s[0] ** 0.5 if len(s) > 1 else 1)
        for s in shapes
    ]
    init[1].zero_()
    init[3].zero_()

    def make_params():
        return [t.clone().requires_grad_() for t in init]

    def forward(p):
        return torch.tanh(X @ p[0] + p[1]) @ p[2] + p[3]

    def reg(p):
        return 0.5 * mu * sum((t**2).sum() for t in p)

    def losses(p):
        return F.cross_entropy(forward(p), y, reduction="none") + reg(p)

    def loss(p):
        return F.cross_entropy(forward(p), y) + reg(p)

    def outputs(p):
        z = forward(p)
        return F.cross_entropy(z, y) + reg(p), z

    return Problem(
        name=f"digits MLP 64-{hidden}-10",
        d=sum(t.numel() for t in init),
        make_params=make_params,
        loss=loss,
        losses=losses,
        outputs=outputs,
        convex=False,
        n_samples=n,
        n_outputs=10 * n,
    )


def newton_polish(
    problem: Problem, x0: np.ndarray, gtol: float = 1e-12, maxiter: int = 50
) -> tuple[np.ndarray, float, float]:
    """Newton steps with tight CG solves from ``x0`` until ``|g| <= gtol``.

    Returns:
        (x, f, |g|) at the last iterate; a backtracking line search keeps f from increasing.
    """
    from scipy.sparse.linalg import LinearOperator, cg

    x = np.array(x0, dtype=np.float64)
    f, g = problem.fg(x)
    for _ in range(maxiter):
        if np.linalg.norm(g) <= gtol:
            break
        op = LinearOperator((x.size, x.size), matvec=lambda v, x=x: problem.hessp(x, v))
        step, _ = cg(op, -g, rtol=1e-13, atol=0.0, maxiter=20 * x.size)
        t = 1.0
        while t > 1e-12:
            f_new, g_new = problem.fg(x + t * step)
            if f_new <= f + 1e-4 * t * (g @ step) or np.linalg.norm(g_new) < np.linalg.norm(g):
                break
            t /= 2
        x, f, g = x + t * step, f_new, g_new
    return x, float(f), float(np.linalg.norm(g))

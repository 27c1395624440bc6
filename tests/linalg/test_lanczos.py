"""LanczosSolver on a plain ``MatVec`` against dense float64 solves."""

import torch

from torchsteer.linalg.lanczos import LanczosSolver

DT = torch.float64


class Dense:
    """A ``MatVec``: ``v -> H v``, counting products."""

    def __init__(self, H):
        self.H, self.calls = H, 0

    def matvec(self, v):
        self.calls += 1
        return self.H @ v


def test_lanczos_matches_dense_for_each_shift_and_reuses_the_basis():
    gen = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=DT))
    H = Q @ torch.diag(torch.linspace(0.1, 9.0, 8, dtype=DT)) @ Q.T
    g = torch.randn(8, generator=gen, dtype=DT)
    op = Dense(H)
    solver = LanczosSolver(op, g, tol=1e-12, maxiter=None)
    for lam in (0.05, 1.0, 10.0):  # growing lambda: fewer steps needed, basis kept
        sol = solver.solve(lam)
        assert sol.ok
        want = -torch.linalg.solve(H + lam * torch.eye(8, dtype=DT), g)
        torch.testing.assert_close(sol.delta, want, rtol=1e-9, atol=1e-11)
    assert op.calls == solver.k <= 8  # one product per basis vector, none for the retries


def test_lanczos_indefinite_is_a_breakdown():
    H = torch.diag(torch.tensor([-3.0, 1.0, 2.0], dtype=DT))
    g = torch.ones(3, dtype=DT)
    sol = LanczosSolver(Dense(H), g, tol=1e-12, maxiter=None).solve(0.5)
    assert not sol.ok and sol.reason == "breakdown"

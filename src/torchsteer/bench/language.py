r"""A synthetic language with an exactly known entropy rate: a sparse order-2 Markov chain.

The next symbol depends on the current symbol and on the *group* of the symbol before it
(the symbols are split into ``G`` groups), so a model has to look two tokens back:

$$
P(x_{t+1} = x \mid x_{\le t}) = Q[g(x_{t-1}),\, x_t,\, x],
\qquad Q \in [0, 1]^{G \times V \times V}.
$$

Each of the ``G V`` contexts $c = (g, b)$ allows ``successors`` symbols (drawn without
replacement) with Dirichlet(``alpha``) probabilities; every other symbol has probability 0.
The process on the states $s_t = (g(x_{t-1}), x_t)$ is a Markov chain with
$T[(g, b), (g(b), x)] = Q[g, b, x]$; its stationary distribution $\mu$ (solved exactly,
$\mu T = \mu$, $\sum \mu = 1$) gives the entropy rate

$$
H = -\sum_{g, b} \mu(g, b) \sum_x Q[g, b, x] \log Q[g, b, x]  \quad\text{(nats per token)}.
$$

:meth:`MarkovLanguage.random` redraws (deterministically) until the chain is irreducible and
aperiodic, so $\mu$ is unique and a long sample's mean negative log-likelihood tends to $H$.

Windows start in the stationary distribution: $(g(x_{-1}), x_0) \sim \mu$, then the chain runs.
A model that predicts $x_{t+1}$ from $x_0..x_t$ has the loss floor $H$ at every position
$t \ge 1$ (the past determines the state $(g(x_{t-1}), x_t)$); at $t = 0$ only $x_0$ is seen
and the floor is the larger $H(X_1 \mid X_0) = H(X_0, X_1) - H(X_0)$ under stationarity
(:meth:`MarkovLanguage.position_floor`). With ``G = 1`` the chain is an order-1 chain and
both floors are $H$.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import breadth_first_order, connected_components

__all__ = ["MarkovLanguage"]


def _entropy_rows(p: np.ndarray) -> np.ndarray:
    """-sum p log p over the last axis (0 log 0 = 0), float64."""
    logs = np.log(np.where(p > 0, p, 1.0))
    return -(p * logs).sum(-1)


class MarkovLanguage:
    """The chain ``Q`` (``(G, V, V)``, rows summing to 1) with symbol groups ``groups`` (``(V,)``).

    Args:
        transitions: ``Q[g, b, x]``, the probability of ``x`` after ``b`` when the symbol
            before ``b`` is in group ``g``.
        groups: the group of every symbol, integers in ``[0, G)``.

    Raises ValueError when ``Q`` is not a stochastic array of that shape, a group is out of
    range, or the chain on the reachable states is not irreducible and aperiodic.
    """

    def __init__(self, transitions, groups):
        q = np.asarray(transitions, dtype=np.float64)
        g = np.asarray(groups)
        if q.ndim != 3 or q.shape[1] != q.shape[2]:
            raise ValueError(f"Invalid transitions: expected (G, V, V), got {q.shape}")
        n_groups, vocab = q.shape[0], q.shape[1]
        if g.shape != (vocab,) or not np.issubdtype(g.dtype, np.integer):
            raise ValueError(f"Invalid groups: expected {vocab} integers, got {g.shape} {g.dtype}")
        if g.min() < 0 or g.max() >= n_groups:
            raise ValueError(f"Invalid groups: values must lie in [0, {n_groups})")
        if not np.isfinite(q).all() or (q < 0).any():
            raise ValueError("Invalid transitions: entries must be finite and >= 0")
        if not np.allclose(q.sum(-1), 1.0, rtol=0, atol=1e-12):
            raise ValueError("Invalid transitions: every row Q[g, b, :] must sum to 1")
        self.transitions, self.groups = q, g.astype(np.int64)
        self.n_groups, self.vocab = n_groups, vocab
        self._check_ergodic()
        self.stationary = self._solve_stationary()
        cdf = np.cumsum(q, -1)
        self._cdf = np.minimum(cdf / cdf[..., -1:], 1.0)  # last entry exactly 1

    # ------------------------------------------------------------------ the chain
    def state_matrix(self) -> np.ndarray:
        """The ``(G V) x (G V)`` transition matrix of the states ``(g(x_{t-1}), x_t)``.

        States outside the one closed class (never visited by the stationary chain) have
        ``mu = 0``.
        """
        n, v = self.n_groups, self.vocab
        t = np.zeros((n * v, n * v))
        cols = self.groups[:, None] * v + np.arange(v)[None, :]  # (b, x) -> state (g(b), x)
        for g in range(n):
            for b in range(v):
                t[g * v + b, cols[b]] += self.transitions[g, b]
        return t

    def _check_ergodic(self) -> None:
        """One closed communicating class of states (the support of mu), aperiodic."""
        graph = csr_matrix(self.state_matrix() > 0)
        _, label = connected_components(graph, directed=True, connection="strong")
        rows, cols = graph.nonzero()
        leaving = np.unique(label[rows[label[rows] != label[cols]]])
        closed = np.setdiff1d(np.unique(label), leaving)
        if len(closed) != 1:
            raise ValueError(f"Invalid chain: {len(closed)} closed classes (not irreducible)")
        keep = np.flatnonzero(label == closed[0])
        sub = graph[keep][:, keep]
        # period = gcd over edges u -> v of level(u) + 1 - level(v), levels from a BFS
        order, pred = breadth_first_order(sub, 0, directed=True, return_predecessors=True)
        level = np.zeros(len(keep), np.int64)
        for node in order[1:]:
            level[node] = level[pred[node]] + 1
        rows, cols = sub.nonzero()
        period = int(np.gcd.reduce(np.abs(level[rows] + 1 - level[cols])))
        if period != 1:
            raise ValueError(f"Invalid chain: periodic with period {period}")
        self._states = keep

    def _solve_stationary(self) -> np.ndarray:
        """``mu`` with ``mu T = mu``, ``sum mu = 1`` on the reachable states (0 elsewhere)."""
        keep = self._states
        t = self.state_matrix()[np.ix_(keep, keep)]
        a = t.T - np.eye(len(keep))
        a[-1, :] = 1.0  # replace one (redundant) balance equation by the normalization
        rhs = np.zeros(len(keep))
        rhs[-1] = 1.0
        mu = np.zeros(self.n_groups * self.vocab)
        mu[keep] = np.linalg.solve(a, rhs)
        return mu.reshape(self.n_groups, self.vocab)

    # ------------------------------------------------------------------ entropies
    @property
    def entropy_rate(self) -> float:
        """``H = -sum_s mu(s) sum_x Q[s, x] log Q[s, x]`` in nats per token."""
        return float((self.stationary * _entropy_rows(self.transitions)).sum())

    def pair_distribution(self) -> np.ndarray:
        """``pi[a, b] = P(x_{t-1} = a, x_t = b)`` under stationarity."""
        # pi(a, b) = sum_g mu(g, a) Q[g, a, b]
        return np.einsum("ga,gab->ab", self.stationary, self.transitions)

    @property
    def first_entropy(self) -> float:
        """``H(X_1 | X_0)`` under stationarity: the floor of the first position of a window."""
        pi = self.pair_distribution()
        marginal = pi.sum(1)
        joint = -(pi[pi > 0] * np.log(pi[pi > 0])).sum()
        single = -(marginal[marginal > 0] * np.log(marginal[marginal > 0])).sum()
        return float(joint - single)

    def position_floor(self, length: int) -> np.ndarray:
        """The loss floor of predicting ``x_{t+1}`` from ``x_0..x_t``, ``t = 0..length-1``."""
        floor = np.full(length, self.entropy_rate)
        floor[:1] = self.first_entropy
        return floor

    # ------------------------------------------------------------------ samples
    def sample(self, n: int, length: int, seed=0) -> np.ndarray:
        """``n`` stationary windows of ``length`` symbols, int64 ``(n, length)``.

        Deterministic for an integer ``seed`` or a sequence of them (NumPy's default
        generator, ``np.random.default_rng(seed)``; a Generator is used as it is).
        """
        if n < 1 or length < 1:
            raise ValueError(f"Invalid sample size: n={n}, length={length} (both must be >= 1)")
        rng = np.random.default_rng(seed)
        start = np.cumsum(self.stationary.ravel())
        start = np.minimum(start / start[-1], 1.0)
        state = np.minimum((start[None, :] <= rng.random(n)[:, None]).sum(1), start.size - 1)
        group, cur = state // self.vocab, state % self.vocab
        out = np.empty((n, length), np.int64)
        out[:, 0] = cur
        for t in range(1, length):
            u = rng.random(n)
            nxt = (self._cdf[group, cur] <= u[:, None]).sum(1)
            group, cur = self.groups[cur], nxt
            out[:, t] = nxt
        return out

    def nll(self, tokens) -> np.ndarray:
        """The true model's ``-log P(x_{t+1} | x_0..x_t)``, shape ``(n, length - 1)``.

        Position 0 uses the stationary ``P(x_1 | x_0)``, later ones ``Q``; a transition of
        probability 0 gives ``inf``.
        """
        x = np.asarray(tokens, dtype=np.int64)
        if x.ndim != 2 or x.shape[1] < 2:
            raise ValueError(f"Invalid tokens: expected (n, length >= 2), got {x.shape}")
        pi = self.pair_distribution()
        with np.errstate(divide="ignore"):
            first = -np.log(pi[x[:, 0], x[:, 1]] / pi[x[:, 0]].sum(-1))
            rest = -np.log(self.transitions[self.groups[x[:, :-2]], x[:, 1:-1], x[:, 2:]])
        return np.concatenate([first[:, None], rest], axis=1)

    # ------------------------------------------------------------------ construction
    @classmethod
    def random(
        cls,
        vocab: int = 64,
        groups: int = 4,
        successors: int = 8,
        alpha: float = 1.0,
        seed: int = 0,
        attempts: int = 100,
    ) -> MarkovLanguage:
        """A random sparse chain: each context ``(g, b)`` allows ``successors`` symbols.

        Symbol ``a`` is in group ``perm[a] % groups`` for a random permutation. Draws are
        repeated (same seed stream) until the chain is irreducible and aperiodic.
        """
        for name, value, low in (("vocab", vocab, 2), ("groups", groups, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"Invalid {name}: {value!r} (an int >= {low})")
        if not isinstance(successors, int) or not 1 <= successors <= vocab:
            raise ValueError(f"Invalid successors: {successors!r} (an int in [1, vocab])")
        if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"Invalid alpha: {alpha!r} (a finite number > 0)")
        rng = np.random.default_rng(seed)
        for _ in range(attempts):
            group = rng.permutation(vocab) % groups
            q = np.zeros((groups, vocab, vocab))
            for g in range(groups):
                for b in range(vocab):
                    allowed = rng.choice(vocab, size=successors, replace=False)
                    q[g, b, allowed] = rng.dirichlet(np.full(successors, float(alpha)))
            try:
                return cls(q, group)
            except ValueError:
                continue
        raise ValueError(f"No irreducible aperiodic chain in {attempts} draws; raise successors")

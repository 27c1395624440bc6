"""The synthetic language of the lm suite against closed forms and the law of large numbers."""

import math

import numpy as np
import pytest

from torchsteer.bench.language import MarkovLanguage


def _h(p):
    return -sum(v * math.log(v) for v in p if v > 0)


def two_state(p, q):
    return MarkovLanguage(np.array([[[1 - p, p], [q, 1 - q]]]), np.zeros(2, np.int64))


@pytest.mark.parametrize("p, q", [(0.3, 0.6), (0.05, 0.9), (0.5, 0.5)])
def test_two_state_chain_matches_the_closed_form(p, q):
    lang = two_state(p, q)
    pi = np.array([q, p]) / (p + q)  # the stationary distribution of a 2-state chain
    np.testing.assert_allclose(lang.stationary[0], pi, rtol=1e-13)
    expected = pi[0] * _h([p, 1 - p]) + pi[1] * _h([q, 1 - q])
    assert lang.entropy_rate == pytest.approx(expected, rel=1e-13)
    # order 1 (one group): the first position has the same floor
    assert lang.first_entropy == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(lang.position_floor(3), [expected] * 3, rtol=1e-12)


def test_order_two_chain_matches_a_hand_computed_example():
    # two symbols in two groups: after b, the symbol before b decides; x_{t+1} depends on
    # (x_{t-1}, x_t). Q[a, b] = P(next = 1 | prev = a, cur = b)
    r = np.array([[0.2, 0.7], [0.4, 0.9]])
    q = np.stack([1 - r, r], -1)
    lang = MarkovLanguage(q, np.array([0, 1]))
    # the pair chain (a, b) -> (b, x) on 4 states, solved here by brute-force power iteration
    t = np.zeros((4, 4))
    for a in range(2):
        for b in range(2):
            for x in range(2):
                t[2 * a + b, 2 * b + x] = q[a, b, x]
    mu = np.full(4, 0.25)
    for _ in range(5000):
        mu = mu @ t
    np.testing.assert_allclose(lang.stationary.ravel(), mu, rtol=1e-12)
    h = sum(mu[2 * a + b] * _h(q[a, b]) for a in range(2) for b in range(2))
    assert lang.entropy_rate == pytest.approx(h, rel=1e-12)
    pair = mu.reshape(2, 2)  # P(x_{t-1} = a, x_t = b)
    h1 = -sum(pair[a, b] * math.log(pair[a, b] / pair[a].sum()) for a in range(2) for b in range(2))
    assert lang.first_entropy == pytest.approx(h1, rel=1e-12)


@pytest.fixture(scope="module")
def suite_language():
    return MarkovLanguage.random(vocab=64, groups=4, successors=8, alpha=1.0, seed=0)


def test_stationary_distribution_is_stationary(suite_language):
    mu = suite_language.stationary.ravel()
    assert mu.min() >= 0 and mu.sum() == pytest.approx(1.0, abs=1e-14)
    np.testing.assert_allclose(mu @ suite_language.state_matrix(), mu, rtol=0, atol=1e-15)
    # a state that is visited has positive mass; the sparse chain does not visit all
    assert (mu > 0).sum() == len(suite_language._states)


def test_entropy_rate_is_the_long_run_negative_log_likelihood(suite_language):
    lang = suite_language
    x = lang.sample(2000, 101, seed=3)
    nll = lang.nll(x)
    assert np.isfinite(nll).all()  # every sampled transition is allowed
    # per-token NLL has variance ~ 1 nat^2 and tokens decorrelate fast: 2e5 tokens give an
    # error of ~ 3e-3; 5 sigma of a generous bound
    rest = nll[:, 1:]
    sigma = rest.std() / math.sqrt(rest.size)
    assert abs(rest.mean() - lang.entropy_rate) < 10 * sigma
    assert abs(nll[:, 0].mean() - lang.first_entropy) < 5 * nll[:, 0].std() / math.sqrt(2000)
    assert lang.first_entropy > 1.3 * lang.entropy_rate  # the context really matters here


def test_windows_start_in_the_stationary_distribution(suite_language):
    lang = suite_language
    x = lang.sample(40_000, 3, seed=5)
    marginal = lang.stationary.sum(0)  # P(x_t = b)
    for t in (0, 2):
        freq = np.bincount(x[:, t], minlength=64) / len(x)
        se = np.sqrt(marginal * (1 - marginal) / len(x))
        assert (np.abs(freq - marginal) <= 5 * se + 1e-12).all()


def test_sampling_is_deterministic_by_seed(suite_language):
    a = suite_language.sample(50, 20, seed=7)
    assert np.array_equal(a, suite_language.sample(50, 20, seed=7))
    assert not np.array_equal(a, suite_language.sample(50, 20, seed=8))
    other = MarkovLanguage.random(seed=0)
    np.testing.assert_array_equal(other.transitions, suite_language.transitions)
    assert other.entropy_rate == suite_language.entropy_rate
    assert MarkovLanguage.random(seed=1).entropy_rate != suite_language.entropy_rate


def test_sparse_rows(suite_language):
    support = (suite_language.transitions > 0).sum(-1)
    assert (support == 8).all()


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.ones((1, 2, 3)), np.zeros(2, np.int64)), "expected"),
        ((np.full((1, 2, 2), 0.6), np.zeros(2, np.int64)), "sum to 1"),
        ((np.full((1, 2, 2), 0.5), np.array([0, 1])), "groups"),
        ((np.array([[[np.nan, 1], [0.5, 0.5]]]), np.zeros(2, np.int64)), "finite"),
        ((np.array([[[1.0, 0], [0, 1]]]), np.zeros(2, np.int64)), "not irreducible"),
        ((np.array([[[0.0, 1], [1, 0]]]), np.zeros(2, np.int64)), "periodic"),
    ],
)
def test_bad_chains_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        MarkovLanguage(*args)


def test_bad_random_arguments():
    with pytest.raises(ValueError, match="successors"):
        MarkovLanguage.random(vocab=4, successors=5)
    with pytest.raises(ValueError, match="alpha"):
        MarkovLanguage.random(alpha=float("nan"))
    with pytest.raises(ValueError, match="sample size"):
        two_state(0.3, 0.3).sample(0, 5)

"""Relaxations: `estimator="gumbel_softmax"` and `"straight_through"` (biased by design).

What is checked: (1) the relaxed draws have the distribution they claim (the binary
concrete's closed-form CDF, Kolmogorov–Smirnov; the categorical one against draws of the
textbook construction with unconditional Gumbel noise); (2) the hard draw is exactly
`d.sample(key)`; (3) the estimate is the pathwise gradient of the relaxed program, key by
key, under jit, vmap, scan, cond and at second order; (4) its expectation is the gradient
of the relaxed objective's expectation, computed by quadrature over the noise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import scgjax as scg

N = 20000
KEYS = jax.random.split(jax.random.key(7), N)


def _quadrature_u(n=200_000):
    """Midpoints of (0, 1), float64: E_u[g(u)] for u ~ U(0, 1) to ~1e-10 for smooth g."""
    return (np.arange(n) + 0.5) / n


def test_binary_concrete_draws_follow_their_cdf():
    logit, tau = 0.7, 0.5
    est = scg.estimators.GumbelSoftmax(temperature=tau)
    y = jax.jit(jax.vmap(lambda k: scg.sample(k, dist.Bernoulli(logits=logit), estimator=est)))(
        KEYS
    )
    y = np.sort(np.asarray(y, np.float64))
    # P(y <= t) = 1 − σ(l − τ logit t)
    with np.errstate(divide="ignore", over="ignore"):  # float32 draws can round to 0 or 1
        cdf = 1 - 1 / (1 + np.exp(-(logit - tau * np.log(y / (1 - y)))))
    ks = np.max(np.maximum(np.arange(1, N + 1) / N - cdf, cdf - np.arange(N) / N))
    assert ks < 1.63 / np.sqrt(N), ks  # α = 0.01
    # and it rounds to the Bernoulli draw of the same key
    hard = jax.vmap(lambda k: dist.Bernoulli(logits=logit).sample(k))(KEYS)
    np.testing.assert_array_equal(np.sort(np.asarray(hard)), np.sort((y > 0.5).astype(int)))


def test_relaxed_draws_round_to_the_draw_of_the_same_key():
    logits = jnp.array([0.3, -1.0, 1.2, 0.0])
    d = dist.Categorical(logits=logits)
    for name in ("gumbel_softmax", "straight_through"):
        v = jax.jit(jax.vmap(lambda k: scg.sample(k, d, estimator=name)))(KEYS[:2000])
        hard = jax.jit(jax.vmap(d.sample))(KEYS[:2000])
        np.testing.assert_array_equal(jnp.argmax(v, -1), hard)
        if name == "straight_through":  # the value itself is the one-hot draw
            np.testing.assert_array_equal(v, jax.nn.one_hot(hard, 4))
    b = dist.Bernoulli(logits=jnp.array([0.4, -0.3])).expand([3, 2])
    v = jax.jit(jax.vmap(lambda k: scg.sample(k, b, estimator="straight_through")))(KEYS[:500])
    np.testing.assert_array_equal(v, jax.jit(jax.vmap(b.sample))(KEYS[:500]))


def test_categorical_relaxation_matches_unconditional_gumbel_softmax():
    logits, tau = jnp.array([0.5, -0.5, 1.0]), 0.7
    est = scg.estimators.GumbelSoftmax(temperature=tau)

    def ours(theta, k):
        y = scg.sample(k, dist.Categorical(logits=theta), estimator=est)
        return jnp.sum(y * jnp.array([1.0, -2.0, 0.5])) ** 2, y

    def textbook(theta, k):  # Jang et al.: softmax((l + g)/τ), g ~ Gumbel
        y = jax.nn.softmax((theta + jax.random.gumbel(jax.random.fold_in(k, 1), (3,))) / tau)
        return jnp.sum(y * jnp.array([1.0, -2.0, 0.5])) ** 2, y

    ga = jax.jit(jax.vmap(jax.grad(lambda t, k: ours(t, k)[0]), (None, 0)))(logits, KEYS)
    gb = jax.jit(jax.vmap(jax.grad(lambda t, k: textbook(t, k)[0]), (None, 0)))(logits, KEYS)
    ya = jax.jit(jax.vmap(lambda k: ours(logits, k)[1]))(KEYS)
    yb = jax.jit(jax.vmap(lambda k: textbook(logits, k)[1]))(KEYS)
    for a, b in [(ya, yb), (ya**2, yb**2), (ga, gb)]:
        se = np.sqrt(np.var(a, 0) / N + np.var(b, 0) / N)
        assert np.all(np.abs(a.mean(0) - b.mean(0)) < 5 * se), (a.mean(0), b.mean(0), se)
    # the scgjax estimate is the pathwise gradient of the relaxed program, key by key
    g_scg = jax.jit(jax.vmap(scg.scg_grad(lambda t, k: ours(t, k)[0]), (None, 0)))(
        logits, KEYS[:50]
    )
    np.testing.assert_allclose(g_scg, ga[:50], rtol=1e-5, atol=1e-6)


def test_gumbel_softmax_estimate_is_unbiased_for_the_relaxed_objective():
    l0, tau, target = 0.4, 0.5, 0.45
    est = scg.estimators.GumbelSoftmax(temperature=tau)

    def f(theta, key):
        y = scg.sample(key, dist.Bernoulli(logits=theta), estimator=est)
        return (y - target) ** 2

    u = _quadrature_u()

    def relaxed_objective(theta):
        y = 1 / (1 + np.exp(-(theta - np.log(u / (1 - u))) / tau))
        return np.mean((y - target) ** 2)

    h = 1e-5
    exact = (relaxed_objective(l0 + h) - relaxed_objective(l0 - h)) / (2 * h)
    g = jax.jit(jax.vmap(scg.scg_grad(f), (None, 0)))(l0, KEYS)
    se = np.std(g) / np.sqrt(N)
    # detects a bias of 5 standard errors (~2% of the gradient)
    assert abs(np.mean(g) - exact) < 5 * se, (np.mean(g), exact, se)
    assert abs(exact) > 20 * se


def test_straight_through_estimate_has_its_defining_expectation():
    l0, tau = -0.3, 1.0

    def f(theta, key):
        b = scg.sample(key, dist.Bernoulli(logits=theta), estimator="straight_through")
        return (b - 0.2) ** 3 + b * theta

    # d/dθ through the relaxed draw y = σ((l + G)/τ) at the hard value b, plus ∂f/∂θ
    u = _quadrature_u()
    p = 1 / (1 + np.exp(-l0))
    hard = (u < p).astype(float)
    y = 1 / (1 + np.exp(-(l0 - np.log(u / (1 - u))) / tau))
    exact = np.mean((3 * (hard - 0.2) ** 2 + l0) * y * (1 - y) / tau + hard)
    g = jax.jit(jax.vmap(scg.scg_grad(f), (None, 0)))(l0, KEYS)
    se = np.std(g) / np.sqrt(N)
    assert abs(np.mean(g) - exact) < 5 * se, (np.mean(g), exact, se)
    # the value the program sees is the hard draw
    v = jax.vmap(scg.surrogate(f), (None, 0))(l0, KEYS[:100])
    b = jax.vmap(lambda k: dist.Bernoulli(logits=l0).sample(k))(KEYS[:100])
    np.testing.assert_allclose(v, (b - 0.2) ** 3 + b * l0, rtol=1e-6)


def _in_scan(theta, key, est):
    def step(carry, k):
        y = scg.sample(k, dist.Categorical(logits=theta + carry), estimator=est)
        return carry + 0.3 * y, jnp.sum(y * jnp.arange(3.0)) ** 2

    return jnp.sum(jax.lax.scan(step, jnp.zeros(3), jax.random.split(key, 4))[1])


def _in_cond(theta, key, est):
    k1, k2 = jax.random.split(key)
    y = scg.sample(k1, dist.Bernoulli(logits=theta[0]), estimator=est)
    return jax.lax.cond(
        theta[1] > 0,
        lambda: jnp.sum(scg.sample(k2, dist.Bernoulli(logits=theta), estimator=est) * y),
        lambda: y * theta[2],
    )


def _under_vmap(theta, key, est):
    z = jax.vmap(lambda k, t: scg.sample(k, dist.Bernoulli(logits=t), estimator=est))(
        jax.random.split(key, 3), theta
    )
    return jnp.sum((z - 0.5) ** 2 * theta)


@pytest.mark.parametrize("program", [_in_scan, _in_cond, _under_vmap], ids=lambda f: f.__name__)
@pytest.mark.parametrize("est", ["gumbel_softmax", "straight_through"])
def test_relaxations_are_the_pathwise_gradient_in_loops_branches_and_vmap(program, est):
    def f(theta, key):
        return program(theta, key, est)

    theta = jnp.array([0.3, 0.5, -0.2])
    keys = KEYS[:3]
    np.testing.assert_allclose(
        jax.jit(jax.vmap(scg.scg_grad(f), (None, 0)))(theta, keys),
        jax.jit(jax.vmap(jax.grad(f), (None, 0)))(theta, keys),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        jax.jit(jax.hessian(scg.surrogate(f)))(theta, keys[0]),
        jax.jit(jax.hessian(f))(theta, keys[0]),
        rtol=1e-4,
        atol=1e-5,
    )
    assert np.any(jax.jit(jax.grad(f))(theta, keys[0]) != 0)


def test_describe_and_trace_name_the_relaxation():
    est = scg.estimators.GumbelSoftmax(temperature=0.3)

    def f(theta, key):
        return jnp.sum(
            scg.sample(key, dist.Categorical(logits=theta), estimator=est, name="y") * theta
        )

    theta = jnp.array([0.1, 0.2, 0.3])
    text = scg.describe(f)(theta, jax.random.key(0))
    assert "gumbel_softmax(temperature=0.3)" in text
    t = scg.trace(f)(theta, jax.random.key(0))
    assert t.sites["y"].method == "gumbel_softmax(temperature=0.3)"
    hard = dist.Categorical(logits=theta).sample(jax.random.key(0))
    np.testing.assert_allclose(t.sites["y"].log_prob, dist.Categorical(logits=theta).log_prob(hard))


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: scg.sample(
                jax.random.key(0), dist.Normal(0.0, 1.0), estimator="gumbel_softmax"
            ),
            "relaxes a Bernoulli or a Categorical.*not Normal",
        ),
        (
            lambda: scg.sample(
                jax.random.key(0), dist.Bernoulli(0.5), estimator=scg.estimators.GumbelSoftmax(0.0)
            ),
            "temperature of 'gumbel_softmax' must be a positive",
        ),
        (
            lambda: scg.sample(
                jax.random.key(0), dist.Bernoulli(0.5), estimator="straight_through", baseline=1.0
            ),
            "a baseline only applies to score-function nodes",
        ),
        (
            lambda: scg.sample(jax.random.key(0), dist.Bernoulli(0.5), estimator="gumbel"),
            "unknown estimator 'gumbel'.*'gumbel_softmax'",
        ),
        (
            lambda: scg.sample(jax.random.key(0), dist.Bernoulli(0.5), estimator=3),
            "estimator must be a name",
        ),
    ],
)
def test_bad_relaxation_requests_are_refused_clearly(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()

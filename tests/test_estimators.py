"""Statistical tests: scgjax's gradient estimators are unbiased, and Rao-Blackwellized.

Each test draws an estimator N >= 1e5 times with fixed keys and compares the Monte Carlo
mean, component by component, with an analytic or exactly enumerated gradient, within
5 standard errors computed from the draws (see ``helpers.assert_mc_close``). References
are built from probabilities (sigmoid / softmax / Gaussian moments), never from the
library or from numpyro's ``log_prob``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax import lax

import scgjax as scg

try:
    from .helpers import (
        assert_mc_close,
        assert_variance_close,
        bernoulli_pmf,
        enumerate_expectation,
        mc_draws,
    )
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from helpers import (
        assert_mc_close,
        assert_variance_close,
        bernoulli_pmf,
        enumerate_expectation,
        mc_draws,
    )

N = 100_000
B = (0, 1)  # Bernoulli support


def grad_draws(f, *args, seed, n=N, argnums=0):
    """N draws of scg_grad(f, argnums)(*args, key)."""
    return mc_draws(lambda k: scg.scg_grad(f, argnums=argnums)(*args, k), n, seed)


# ---------------------------------------------------------------------------------------
# The value: scg.sample draws what numpyro draws; the surrogate has f's value.
# ---------------------------------------------------------------------------------------


def design_f(theta, key):
    """DESIGN.md's example: a Bernoulli score node feeding a Normal pathwise node."""
    k1, k2 = jax.random.split(key)
    z = scg.sample(k1, dist.Bernoulli(logits=theta[0]))
    x = scg.sample(k2, dist.Normal(theta[1] * z, 1.0))
    return (x - 2.0) ** 2 + 0.5 * z


def design_f_expectation(theta):
    """E[design_f]: given z, x ~ N(theta1 z, 1) so E[(x-2)^2 | z] = (theta1 z - 2)^2 + 1."""

    def term(z):
        return bernoulli_pmf(z, theta[0]) * ((theta[1] * z - 2.0) ** 2 + 1.0 + 0.5 * z)

    return enumerate_expectation(term, [B])


@pytest.mark.parametrize(
    "d, sample_shape",
    [
        (dist.Bernoulli(logits=jnp.array([-1.0, 0.0, 2.0])), ()),
        (dist.Bernoulli(probs=0.3), (4,)),
        (dist.Categorical(logits=jnp.array([0.1, -0.4, 1.2])), (5,)),
        # A batched Normal with a sample_shape trips numpyro's own rank promotion under
        # jax_numpy_rank_promotion="raise", so the batch and the sample_shape are apart.
        (dist.Normal(jnp.array([0.5, -1.0]), jnp.array([2.0, 0.5])), ()),
        (dist.Normal(0.5, 2.0), (3,)),
    ],
)
@pytest.mark.parametrize("estimator", ["auto", "score"])
def test_sample_outside_transforms_draws_what_numpyro_draws(d, sample_shape, estimator):
    key = jax.random.key(7)
    got = scg.sample(key, d, sample_shape, estimator=estimator)
    want = d.sample(key, sample_shape)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_surrogate_and_value_and_grad_have_the_value_of_f():
    theta = jnp.array([0.3, 1.5])
    for seed in range(5):
        key = jax.random.key(seed)
        f_value = design_f(theta, key)
        np.testing.assert_allclose(scg.surrogate(design_f)(theta, key), f_value, rtol=1e-6)
        np.testing.assert_allclose(jax.jit(scg.surrogate(design_f))(theta, key), f_value, rtol=1e-6)
        value, grad = scg.scg_value_and_grad(design_f)(theta, key)
        np.testing.assert_allclose(value, f_value, rtol=1e-6)
        assert grad.shape == theta.shape
        np.testing.assert_allclose(grad, scg.scg_grad(design_f)(theta, key), rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Single stochastic nodes.
# ---------------------------------------------------------------------------------------


def test_bernoulli_logits_score_gradient_is_unbiased():
    theta = jnp.array([-1.0, 0.4, 1.3])
    w = jnp.array([2.0, -1.0, 3.0])

    def f(theta, key):
        z = scg.sample(key, dist.Bernoulli(logits=theta))
        return jnp.sum(w * z) + 4.0 * z[0] * z[1] - 2.0 * z[1] * z[2] + 1.0

    def expectation(theta):
        def term(z0, z1, z2):
            z = jnp.array([z0, z1, z2])
            prob = jnp.prod(bernoulli_pmf(z, theta))
            return prob * (jnp.sum(w * z) + 4.0 * z0 * z1 - 2.0 * z1 * z2 + 1.0)

        return enumerate_expectation(term, [B, B, B])

    assert_mc_close(grad_draws(f, theta, seed=1), jax.grad(expectation)(theta))


def test_bernoulli_logits_at_zero_is_unbiased():
    # numpyro's Bernoulli(logits=0).log_prob has derivative 0 (z=0) and 1 (z=1) instead
    # of -1/2 and +1/2. A cost paid only at z=0 then gets a gradient of exactly 0 in every
    # draw; the true gradient is -5 * 1/4.
    def f_zero_branch(theta, key):
        z = scg.sample(key, dist.Bernoulli(logits=theta))
        return 5.0 * (1.0 - z)

    assert_mc_close(grad_draws(f_zero_branch, jnp.float32(0.0), seed=2), -5.0 * 0.25)

    # Both branches cost something: the buggy score gives E = 1/2 * 4 = 2, not 3/4.
    def f_both(theta, key):
        z = scg.sample(key, dist.Bernoulli(logits=theta))
        return 3.0 * z + 1.0

    assert_mc_close(grad_draws(f_both, jnp.float32(0.0), seed=3), 3.0 * 0.25)

    # Exact zeros mixed with nonzero logits in one vector node.
    theta = jnp.array([0.0, 0.5, 0.0])

    def f_vec(theta, key):
        z = scg.sample(key, dist.Bernoulli(logits=theta))
        return jnp.sum(jnp.array([2.0, -1.0, 0.0]) * z) + 3.0 * (1 - z[2]) + z[0] * z[1]

    def expectation(theta):
        def term(z0, z1, z2):
            prob = jnp.prod(bernoulli_pmf(jnp.array([z0, z1, z2]), theta))
            return prob * (2.0 * z0 - z1 + 3.0 * (1 - z2) + z0 * z1)

        return enumerate_expectation(term, [B, B, B])

    assert_mc_close(grad_draws(f_vec, theta, seed=4), jax.grad(expectation)(theta))


def test_bernoulli_probs_score_gradient_is_unbiased():
    probs = jnp.array([0.2, 0.5, 0.7])

    def f(probs, key):
        z = scg.sample(key, dist.Bernoulli(probs=probs))
        return 2.0 * z[0] - 3.0 * z[1] * z[2] + z[2] + 0.5

    # E = 2 p0 - 3 p1 p2 + p2 + 0.5
    p0, p1, p2 = (float(p) for p in probs)
    expected = np.array([2.0, -3.0 * p2, -3.0 * p1 + 1.0])
    assert_mc_close(grad_draws(f, probs, seed=5), expected)


def test_categorical_score_gradient_is_unbiased():
    theta = jnp.array([0.3, -0.5, 1.0, 0.0])
    c = jnp.array([1.0, -2.0, 0.5, 3.0])

    def f(theta, key):
        z = scg.sample(key, dist.Categorical(logits=theta), (3,))
        # Costs through the sample and directly through theta (indexed by the sample).
        return jnp.sum(c[z]) + theta[z[0]] ** 2

    def expectation(theta):
        probs = jax.nn.softmax(theta)
        return 3.0 * jnp.sum(probs * c) + jnp.sum(probs * theta**2)

    assert_mc_close(grad_draws(f, theta, seed=6), jax.grad(expectation)(theta))


def test_categorical_probs_score_gradient_is_unbiased():
    probs = jnp.array([0.1, 0.2, 0.3, 0.4])
    c = jnp.array([1.0, -2.0, 0.5, 3.0])

    def f(probs, key):
        z = scg.sample(key, dist.Categorical(probs=probs))
        return c[z]

    # E = Σ_k probs_k c_k, so the gradient with respect to probs is c.
    assert_mc_close(grad_draws(f, probs, seed=7), c)


def test_normal_auto_estimator_is_pathwise():
    # d/dmu of x = mu + sigma * eps is exactly 1 in every draw: no score-function noise.
    def f(mu, key):
        return scg.sample(key, dist.Normal(mu, 2.0))

    draws = np.asarray(grad_draws(f, jnp.float32(0.7), seed=8, n=1000))
    np.testing.assert_allclose(draws, 1.0, rtol=1e-6)


def normal_f(estimator):
    def f(theta, key):
        x = scg.sample(key, dist.Normal(theta[0], jnp.exp(theta[1])), (2,), estimator=estimator)
        return jnp.sum((x - 2.0) ** 2 + 0.1 * x**3)

    return f


def normal_expectation(theta):
    # E[(x-a)^2] = (mu-a)^2 + s^2 ; E[x^3] = mu^3 + 3 mu s^2 ; two iid draws.
    mu, s = theta[0], jnp.exp(theta[1])
    return 2.0 * ((mu - 2.0) ** 2 + s**2 + 0.1 * (mu**3 + 3.0 * mu * s**2))


@pytest.mark.parametrize("estimator", ["auto", "pathwise", "score"])
def test_normal_gradient_is_unbiased(estimator):
    theta = jnp.array([0.5, -0.3])
    draws = grad_draws(normal_f(estimator), theta, seed=9)
    assert_mc_close(draws, jax.grad(normal_expectation)(theta))


def test_normal_forced_score_estimator_is_not_pathwise():
    # With estimator="score" the sample is a stopped node: d/dmu of E[x] is estimated by
    # x * (x - mu) / sigma^2, which varies from draw to draw (pathwise would give 1).
    def f(mu, key):
        return scg.sample(key, dist.Normal(mu, 1.0), estimator="score")

    draws = grad_draws(f, jnp.float32(0.7), seed=10)
    assert np.std(np.asarray(draws)) > 0.5
    assert_mc_close(draws, 1.0)


def test_legacy_uint32_keys_give_unbiased_gradient():
    theta = jnp.array([0.3, 1.5])
    keys = jax.random.split(jax.random.PRNGKey(11), N)
    assert keys.dtype == jnp.uint32
    draws = jax.jit(jax.vmap(lambda k: scg.scg_grad(design_f)(theta, k)))(keys)
    assert_mc_close(draws, jax.grad(design_f_expectation)(theta))


# ---------------------------------------------------------------------------------------
# Chains of stochastic nodes.
# ---------------------------------------------------------------------------------------


def test_mixed_score_then_pathwise_chain_is_unbiased():
    theta = jnp.array([0.3, 1.5])
    assert_mc_close(grad_draws(design_f, theta, seed=12), jax.grad(design_f_expectation)(theta))


def test_chain_of_two_score_nodes_is_unbiased():
    theta = jnp.array([0.2, -0.6, 1.1])

    def f(theta, key):
        k1, k2 = jax.random.split(key)
        z1 = scg.sample(k1, dist.Bernoulli(logits=theta[0]))
        z2 = scg.sample(k2, dist.Bernoulli(logits=theta[1] + theta[2] * z1))
        return 2.0 * z1 + 3.0 * (z1 - z2) ** 2 + z2 + theta[0] * z2

    def expectation(theta):
        def term(z1, z2):
            prob = bernoulli_pmf(z1, theta[0]) * bernoulli_pmf(z2, theta[1] + theta[2] * z1)
            return prob * (2.0 * z1 + 3.0 * (z1 - z2) ** 2 + z2 + theta[0] * z2)

        return enumerate_expectation(term, [B, B])

    assert_mc_close(grad_draws(f, theta, seed=13), jax.grad(expectation)(theta))


# ---------------------------------------------------------------------------------------
# Control flow, jit, vmap.
# ---------------------------------------------------------------------------------------

SCAN_W = jnp.array([1.0, -2.0, 3.0, 0.5])


def test_samples_inside_scan_are_unbiased():
    # A Markov chain of Bernoullis (each step's logit depends on the previous sample),
    # each with a pathwise Normal child; per-step costs leave the scan as outputs.
    theta = jnp.array([-0.3, 0.8, 0.7])

    def f(theta, key):
        def step(prev, xs):
            k, w = xs
            ka, kb = jax.random.split(k)
            z = scg.sample(ka, dist.Bernoulli(logits=theta[0] + theta[1] * prev))
            x = scg.sample(kb, dist.Normal(theta[2] * z, 1.0))
            return z.astype(jnp.float32), 0.5 * x**2 + w * z

        last, ys = lax.scan(step, jnp.float32(0.0), (jax.random.split(key, 4), SCAN_W))
        return jnp.sum(ys) + 0.3 * last

    def expectation(theta):
        def term(*zs):
            prob, cost, prev = 1.0, 0.0, 0.0
            for t, z in enumerate(zs):
                prob = prob * bernoulli_pmf(z, theta[0] + theta[1] * prev)
                cost = cost + 0.5 * (theta[2] ** 2 * z + 1.0) + SCAN_W[t] * z
                prev = z
            return prob * (cost + 0.3 * zs[-1])

        return enumerate_expectation(term, [B] * 4)

    assert_mc_close(grad_draws(f, theta, seed=14), jax.grad(expectation)(theta))


def test_samples_inside_fori_loop_are_unbiased():
    theta = jnp.array([0.4, -1.2])
    w = jnp.array([1.0, -2.0, 3.0])

    def f(theta, key):
        def body(i, carry):
            key, prev, acc = carry
            key, sub = jax.random.split(key)
            z = scg.sample(sub, dist.Bernoulli(logits=theta[0] + theta[1] * prev))
            return key, z.astype(jnp.float32), acc + w[i] * z

        _, _, acc = lax.fori_loop(0, 3, body, (key, jnp.float32(0.0), jnp.float32(0.0)))
        return acc

    def expectation(theta):
        def term(*zs):
            prob, cost, prev = 1.0, 0.0, 0.0
            for t, z in enumerate(zs):
                prob = prob * bernoulli_pmf(z, theta[0] + theta[1] * prev)
                cost = cost + w[t] * z
                prev = z
            return prob * cost

        return enumerate_expectation(term, [B] * 3)

    assert_mc_close(grad_draws(f, theta, seed=15), jax.grad(expectation)(theta))


def test_samples_inside_cond_branches_with_sampled_predicate_are_unbiased():
    theta = jnp.array([0.5, -0.4, 0.8])

    def f(theta, key):
        k1, k2 = jax.random.split(key)
        z1 = scg.sample(k1, dist.Bernoulli(logits=theta[0]))

        def bernoulli_branch(k):
            z2 = scg.sample(k, dist.Bernoulli(logits=theta[1]))
            return 3.0 * z2 + 1.0

        def normal_branch(k):
            x = scg.sample(k, dist.Normal(theta[2], 1.0))
            return x**2

        return lax.cond(z1 == 1, bernoulli_branch, normal_branch, k2) + 0.5 * z1

    def expectation(theta):
        p1, p2 = jax.nn.sigmoid(theta[0]), jax.nn.sigmoid(theta[1])
        return p1 * (3.0 * p2 + 1.0 + 0.5) + (1.0 - p1) * (theta[2] ** 2 + 1.0)

    assert_mc_close(grad_draws(f, theta, seed=16), jax.grad(expectation)(theta))


def test_samples_inside_switch_branches_with_sampled_index_are_unbiased():
    theta = jnp.array([0.2, -0.3, 0.5, 0.9, -0.7])

    def f(theta, key):
        k1, k2 = jax.random.split(key)
        i = scg.sample(k1, dist.Categorical(logits=theta[:3]))

        def b0(k):
            return 2.0 * scg.sample(k, dist.Bernoulli(logits=theta[3]))

        def b1(k):
            return scg.sample(k, dist.Normal(theta[4], 1.0)) ** 2

        def b2(k):
            return 5.0 + theta[3]

        return lax.switch(i, [b0, b1, b2], k2)

    def expectation(theta):
        probs = jax.nn.softmax(theta[:3])
        branch = jnp.stack([2.0 * jax.nn.sigmoid(theta[3]), theta[4] ** 2 + 1.0, 5.0 + theta[3]])
        return jnp.sum(probs * branch)

    assert_mc_close(grad_draws(f, theta, seed=17), jax.grad(expectation)(theta))


def test_samples_inside_inner_jit_are_unbiased():
    theta = jnp.array([-0.5, 0.6, 1.5])

    @jax.jit
    def inner(theta, key):
        k1, k2 = jax.random.split(key)
        z = scg.sample(k1, dist.Bernoulli(logits=theta[0]))
        x = scg.sample(k2, dist.Normal(theta[1] + z, 1.0))
        return x**2 + 2.0 * z, z

    def f(theta, key):
        cost, z = inner(theta, key)
        return cost + theta[2] * z

    def expectation(theta):
        def term(z):
            return bernoulli_pmf(z, theta[0]) * ((theta[1] + z) ** 2 + 1.0 + 2.0 * z + theta[2] * z)

        return enumerate_expectation(term, [B])

    assert_mc_close(grad_draws(f, theta, seed=18), jax.grad(expectation)(theta))


def test_samples_under_vmap_inside_f_are_unbiased():
    theta = jnp.array([0.3, -0.8, 1.0, 0.6])
    w = jnp.array([1.0, -1.5, 2.0])

    def f(theta, key):
        ka, kb = jax.random.split(key)
        zs = jax.vmap(lambda k, l: scg.sample(k, dist.Bernoulli(logits=l)))(
            jax.random.split(ka, 3), theta[:3]
        )
        xs = jax.vmap(lambda k, m: scg.sample(k, dist.Normal(m, 1.0)))(
            jax.random.split(kb, 3), theta[3] * zs
        )
        return jnp.sum(w * zs) + 2.0 * zs[0] * zs[1] + 0.5 * jnp.sum(xs**2)

    def expectation(theta):
        def term(z0, z1, z2):
            z = jnp.array([z0, z1, z2])
            prob = jnp.prod(bernoulli_pmf(z, theta[:3]))
            cost = jnp.sum(w * z) + 2.0 * z0 * z1 + 0.5 * jnp.sum(theta[3] ** 2 * z + 1.0)
            return prob * cost

        return enumerate_expectation(term, [B, B, B])

    assert_mc_close(grad_draws(f, theta, seed=19), jax.grad(expectation)(theta))


# ---------------------------------------------------------------------------------------
# jax.grad-like API: pytrees, argnums, has_aux.
# ---------------------------------------------------------------------------------------


def pytree_f(params, key):
    k1, k2 = jax.random.split(key)
    z = scg.sample(k1, dist.Bernoulli(logits=params["logits"]))
    x = scg.sample(k2, dist.Normal(params["loc"] * z[0], 1.0))
    return (x - 1.0) ** 2 + 2.0 * z[1] - z[0] * z[1] + jnp.sum(params["unused"]) * 0.0


def pytree_expectation(params):
    def term(z0, z1):
        prob = jnp.prod(bernoulli_pmf(jnp.array([z0, z1]), params["logits"]))
        return prob * ((params["loc"] * z0 - 1.0) ** 2 + 1.0 + 2.0 * z1 - z0 * z1)

    return enumerate_expectation(term, [B, B])


def test_pytree_parameters_are_unbiased():
    params = {
        "logits": jnp.array([0.4, -0.9]),
        "loc": jnp.float32(1.3),
        "unused": jnp.array([1.0, 2.0]),
    }
    draws = grad_draws(pytree_f, params, seed=20)
    assert jax.tree_util.tree_structure(draws) == jax.tree_util.tree_structure(params)
    assert_mc_close(draws, jax.grad(pytree_expectation)(params))


def test_argnums_tuple_is_unbiased():
    logits, loc = jnp.array([0.4, -0.9]), jnp.float32(1.3)

    def f(logits, loc, key):
        return pytree_f({"logits": logits, "loc": loc, "unused": jnp.zeros(2)}, key)

    def expectation(logits, loc):
        return pytree_expectation({"logits": logits, "loc": loc, "unused": jnp.zeros(2)})

    draws = grad_draws(f, logits, loc, seed=21, argnums=(0, 1))
    assert isinstance(draws, tuple) and len(draws) == 2
    assert_mc_close(draws, jax.grad(expectation, argnums=(0, 1))(logits, loc))

    # argnums=1 alone is the second component, not wrapped in a tuple.
    draws_loc = grad_draws(f, logits, loc, seed=21, argnums=1)
    assert draws_loc.shape == (N,)
    assert_mc_close(draws_loc, jax.grad(expectation, argnums=1)(logits, loc))


def test_has_aux_returns_f_aux_and_unbiased_gradient():
    theta = jnp.array([0.3, 1.5])

    def f(theta, key):
        k1, k2 = jax.random.split(key)
        z = scg.sample(k1, dist.Bernoulli(logits=theta[0]))
        x = scg.sample(k2, dist.Normal(theta[1] * z, 1.0))
        return (x - 2.0) ** 2 + 0.5 * z, {"z": z, "x": x}

    for seed in range(3):
        key = jax.random.key(100 + seed)
        value, aux = f(theta, key)
        g, g_aux = scg.scg_grad(f, has_aux=True)(theta, key)
        (v2, vg_aux), g2 = scg.scg_value_and_grad(f, has_aux=True)(theta, key)
        np.testing.assert_allclose(v2, value, rtol=1e-6)
        np.testing.assert_allclose(g2, g, rtol=1e-6)
        for a in (g_aux, vg_aux):
            assert a["z"] == aux["z"]
            np.testing.assert_allclose(a["x"], aux["x"], rtol=1e-6)

    draws = mc_draws(lambda k: scg.scg_grad(f, has_aux=True)(theta, k)[0], N, 22)
    assert_mc_close(draws, jax.grad(design_f_expectation)(theta))


# ---------------------------------------------------------------------------------------
# Second derivatives (DiCE).
# ---------------------------------------------------------------------------------------


def test_second_derivative_of_score_bernoulli_objective_matches_closed_form():
    # E[a z + b], z ~ Bernoulli(sigmoid(theta)): d2/dtheta2 = a s (1 - s) (1 - 2 s).
    a, b, theta = 3.0, 1.0, -0.7

    def f(theta, key):
        z = scg.sample(key, dist.Bernoulli(logits=theta))
        return a * z + b

    s = 1.0 / (1.0 + math.exp(-theta))
    expected = a * s * (1.0 - s) * (1.0 - 2.0 * s)
    draws = mc_draws(lambda k: jax.hessian(scg.surrogate(f))(jnp.float32(theta), k), N, 23)
    assert_mc_close(draws, expected)


def hessian_bernoulli_f(theta, key):
    z = scg.sample(key, dist.Bernoulli(logits=theta))
    return 3.0 * z[0] + 2.0 * z[0] * z[1] - z[1] + 1.0 + theta[0] ** 2 * z[1]


def hessian_bernoulli_expectation(theta):
    def term(z0, z1):
        prob = jnp.prod(bernoulli_pmf(jnp.array([z0, z1]), theta))
        return prob * (3.0 * z0 + 2.0 * z0 * z1 - z1 + 1.0 + theta[0] ** 2 * z1)

    return enumerate_expectation(term, [B, B])


@pytest.mark.parametrize(
    "theta", [[0.6, -0.4], [0.0, 0.0]], ids=["generic_logits", "logits_at_zero"]
)
def test_hessian_of_score_bernoulli_objective_is_unbiased(theta):
    theta = jnp.array(theta)
    draws = mc_draws(lambda k: jax.hessian(scg.surrogate(hessian_bernoulli_f))(theta, k), N, 24)
    assert_mc_close(draws, jax.hessian(hessian_bernoulli_expectation)(theta))


def test_mixed_second_derivative_via_jacfwd_of_grad_is_unbiased():
    theta = jnp.array([0.3, 1.5])
    draws = mc_draws(lambda k: jax.jacfwd(jax.grad(scg.surrogate(design_f)))(theta, k), N, 25)
    assert_mc_close(draws, jax.hessian(design_f_expectation)(theta))


# ---------------------------------------------------------------------------------------
# Rao-Blackwellization: a score node is weighted only by the costs that depend on it.
# ---------------------------------------------------------------------------------------

RB_THETA = jnp.array([0.3, -0.2])
RB_N = 200_000


def _rb_samples(theta, key):
    k1, k2 = jax.random.split(key)
    z1 = scg.sample(k1, dist.Bernoulli(logits=theta[0]))
    z2 = scg.sample(k2, dist.Bernoulli(logits=theta[1]))
    return z1, z2


def rb_plain(theta, key):
    z1, z2 = _rb_samples(theta, key)
    return 3.0 * z1 + 10.0 * z2


def rb_sub_neg_scale_reduce_sum(theta, key):
    z1, z2 = _rb_samples(theta, key)
    # 2 * (0.75 * sum([z1, z1]) - (-(5 z2))) = 3 z1 + 10 z2
    return 2.0 * (0.75 * jnp.sum(z1 * jnp.ones(2)) - (-(5.0 * z2)))


def rb_through_jit(theta, key):
    z1, z2 = _rb_samples(theta, key)
    return jax.jit(lambda a, b: 3.0 * a + 10.0 * b)(z1, z2)


def rb_through_scan_outputs(theta, key):
    z1, z2 = _rb_samples(theta, key)

    def body(carry, x):
        return carry, (3.0 * z1 * x, 10.0 * z2 * x)

    _, (a, b) = lax.scan(body, jnp.float32(0.0), jnp.full((2,), 0.5))
    return jnp.sum(a) + jnp.sum(b)


def rb_through_cond_outputs(theta, key):
    z1, z2 = _rb_samples(theta, key)
    # The predicate depends on theta only, not on a sample.
    a, b = lax.cond(
        jnp.sum(theta) > -100.0,
        lambda: (3.0 * z1, 10.0 * z2),
        lambda: (3.0 * z1 + 1.0, 10.0 * z2 - 1.0),
    )
    return a + b


@pytest.mark.parametrize(
    "f",
    [
        rb_plain,
        rb_sub_neg_scale_reduce_sum,
        rb_through_jit,
        rb_through_scan_outputs,
        rb_through_cond_outputs,
    ],
    ids=lambda f: f.__name__,
)
def test_rao_blackwellization_weights_each_score_node_by_its_own_costs(f):
    theta = RB_THETA
    draws = np.asarray(grad_draws(f, theta, seed=26, n=RB_N), dtype=np.float64)
    p = 1.0 / (1.0 + np.exp(-np.asarray(theta, dtype=np.float64)))
    q = 1.0 - p
    scale = np.array([3.0, 10.0])

    # Unbiased: d/dtheta_i E[3 z1 + 10 z2] = scale_i p_i q_i.
    assert_mc_close(draws, scale * p * q)

    for i in range(2):
        # The single-term estimator (z_i - p_i) * scale_i * z_i equals a * z_i with
        # a = scale_i * q_i: variance a^2 p q, fourth central moment a^4 p q (1 - 3 p q).
        a = scale[i] * q[i]
        pq = p[i] * q[i]
        var_rb = a**2 * pq
        mu4_rb = a**4 * pq * (1.0 - 3.0 * pq)
        assert_variance_close(draws[:, i], var_rb, mu4_rb)

        # The whole-sum REINFORCE estimator (z_i - p_i) * (3 z1 + 10 z2), enumerated.
        mean_whole = scale[i] * pq
        var_whole = 0.0
        for z1 in (0, 1):
            for z2 in (0, 1):
                z = np.array([z1, z2])
                prob = np.prod(np.where(z == 1, p, q))
                var_whole += prob * ((z[i] - p[i]) * (3.0 * z1 + 10.0 * z2)) ** 2
        var_whole -= mean_whole**2
        if i == 1:
            continue  # z2's own cost 10 z2 dominates its whole-sum variance anyway.
        assert draws[:, i].var() < 0.25 * var_whole, (
            f"theta[{i}] gradient variance {draws[:, i].var():.4g} is not much smaller "
            f"than whole-sum REINFORCE's {var_whole:.4g} (Rao-Blackwellized: {var_rb:.4g})"
        )


def test_rao_blackwellized_gradient_equals_hand_written_single_term_estimator_per_key():
    # Same keys, same samples: scg's theta_1 component is (z1 - p1) * 3 z1 draw by draw.
    theta = RB_THETA
    keys = jax.random.split(jax.random.key(27), 1000)
    g = jax.jit(jax.vmap(lambda k: scg.scg_grad(rb_plain)(theta, k)))(keys)

    def hand_written(k):
        k1, k2 = jax.random.split(k)
        z1 = dist.Bernoulli(logits=theta[0]).sample(k1)
        z2 = dist.Bernoulli(logits=theta[1]).sample(k2)
        p = jax.nn.sigmoid(theta)
        return jnp.stack([(z1 - p[0]) * 3.0 * z1, (z2 - p[1]) * 10.0 * z2])

    want = jax.vmap(hand_written)(keys)
    np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-5, atol=1e-6)

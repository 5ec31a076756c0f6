"""`scg.sample` outside the transforms: it is `d.sample`, under jit, vmap and jvp."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import scgjax as scg
from scgjax._sample import sample_p

DISTRIBUTIONS = {
    "normal": lambda: dist.Normal(jnp.arange(3.0), 2.0),
    "bernoulli_logits": lambda: dist.Bernoulli(logits=jnp.array([-1.0, 0.0, 2.0])),
    "bernoulli_probs": lambda: dist.Bernoulli(probs=0.3),
    "categorical": lambda: dist.Categorical(logits=jnp.array([0.1, -0.3, 1.2])),
    "binomial": lambda: dist.Binomial(5, probs=0.4),
    "poisson": lambda: dist.Poisson(3.0),
    "gamma": lambda: dist.Gamma(2.0, 1.5),
    "beta": lambda: dist.Beta(2.0, 3.0),
    "dirichlet": lambda: dist.Dirichlet(jnp.ones(4)),
    "mvn": lambda: dist.MultivariateNormal(jnp.zeros(2), jnp.eye(2)),
    "independent": lambda: dist.Normal(jnp.zeros(3), 1.0).to_event(1),
    "expanded": lambda: dist.Bernoulli(logits=0.5).expand((4,)),
    "relaxed_bernoulli": lambda: dist.RelaxedBernoulliLogits(0.5, logits=0.2),
}


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize("sample_shape", [(), (2,)])
def test_sample_draws_what_the_distribution_draws(name, sample_shape, any_key):
    d = DISTRIBUTIONS[name]()
    expected = d.sample(any_key, sample_shape)
    got = scg.sample(any_key, d, sample_shape)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_sample_under_jit_matches_jitted_distribution(name, any_key):
    d = DISTRIBUTIONS[name]()
    got = jax.jit(lambda k: scg.sample(k, d))(any_key)
    expected = jax.jit(lambda k: d.sample(k))(any_key)
    np.testing.assert_array_equal(got, expected)


def test_vmap_over_keys_matches_distribution(any_key):
    keys = jax.random.split(any_key, 5)
    d = dist.Bernoulli(logits=jnp.array([0.0, 1.0]))
    got = jax.vmap(lambda k: scg.sample(k, d))(keys)
    np.testing.assert_array_equal(got, jax.vmap(d.sample)(keys))


def test_vmap_over_parameters_with_shared_key_matches_distribution():
    key = jax.random.key(3)
    locs = jnp.arange(4.0)
    got = jax.vmap(lambda m: scg.sample(key, dist.Normal(m, 1.0)))(locs)
    expected = jax.vmap(lambda m: dist.Normal(m, 1.0).sample(key))(locs)
    np.testing.assert_array_equal(got, expected)


def test_nested_vmap_with_nonzero_axes_matches_distribution():
    keys = jax.random.split(jax.random.key(1), 3)
    locs = jnp.arange(8.0).reshape(2, 4)

    def draw(sampler):
        inner = jax.vmap(sampler, in_axes=(0, None))  # over keys
        return jax.vmap(inner, in_axes=(None, 1))(keys, locs)  # over columns of locs

    got = draw(lambda k, m: scg.sample(k, dist.Normal(m, 1.0)))
    expected = draw(lambda k, m: dist.Normal(m, 1.0).sample(k))
    assert got.shape == (4, 3, 2)
    np.testing.assert_array_equal(got, expected)


def test_vmap_keeps_the_sample_primitive_visible():
    keys = jax.random.split(jax.random.key(0), 3)
    jaxpr = jax.make_jaxpr(jax.vmap(lambda k: scg.sample(k, dist.Bernoulli(0.2))))(keys)
    (eqn,) = [e for e in jaxpr.jaxpr.eqns if e.primitive is sample_p]
    assert eqn.params["n_batch"] == 1


def test_grad_outside_transforms_is_pathwise_for_reparameterized_draws():
    key = jax.random.key(0)
    eps = dist.Normal(0.0, 1.0).sample(key)
    g = jax.grad(lambda s: scg.sample(key, dist.Normal(1.0, s)))(2.0)
    np.testing.assert_allclose(g, eps, rtol=1e-6)


def test_grad_outside_transforms_is_zero_for_score_draws():
    key = jax.random.key(0)
    g = jax.grad(lambda m: scg.sample(key, dist.Normal(m, 1.0), estimator="score"))(2.0)
    assert g == 0.0


def test_auto_estimator_resolution():
    key = jax.random.key(0)
    jaxpr = jax.make_jaxpr(
        lambda: (scg.sample(key, dist.Normal(0.0, 1.0)), scg.sample(key, dist.Bernoulli(0.5)))
    )()
    estimators = [e.params["estimator"] for e in jaxpr.jaxpr.eqns if e.primitive is sample_p]
    assert estimators == ["pathwise", "score"]


def test_non_distribution_is_a_type_error():
    with pytest.raises(TypeError, match="numpyro.distributions.Distribution"):
        scg.sample(jax.random.key(0), jnp.zeros(3))


def test_unknown_estimator_is_a_value_error():
    with pytest.raises(ValueError, match="unknown estimator 'reinforce'"):
        scg.sample(jax.random.key(0), dist.Normal(0.0, 1.0), estimator="reinforce")


def test_pathwise_without_rsample_names_the_distribution():
    with pytest.raises(ValueError, match="BernoulliProbs has no rsample"):
        scg.sample(jax.random.key(0), dist.Bernoulli(probs=0.5), estimator="pathwise")


def test_batch_of_keys_is_a_type_error_that_suggests_vmap():
    with pytest.raises(TypeError, match="jax.vmap"):
        scg.sample(jax.random.split(jax.random.PRNGKey(0), 3), dist.Normal(0.0, 1.0))


def test_non_key_is_a_type_error():
    with pytest.raises(TypeError, match="PRNG key"):
        scg.sample(jnp.zeros(2), dist.Normal(0.0, 1.0))

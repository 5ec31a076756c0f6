"""`scg.iwae`: the importance-weighted bound with VIMCO's leave-one-out baselines.

With K particles of a proposal with a finite support, `E[L]` and the estimator's
expectation are finite sums over the K particles' joint draws (each particle replayed
with `draws=`): the estimate's expectation must be the exact gradient and Hessian of
`E[L]` in float64, with and without VIMCO's baselines.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import scgjax as scg


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


X = np.array([1.0, 0.0, 1.0])


def _log_joint(z, W, c):
    """log p(x, z): a Bernoulli(σ(c)) prior per latent, x | z ~ Bernoulli(z·W)."""
    zf = z.astype(W.dtype)
    return jnp.sum(dist.Bernoulli(logits=zf @ W).log_prob(X)) + jnp.sum(
        dist.Bernoulli(logits=c).log_prob(zf)
    )


def _log_q(z, phi):
    zf = z.astype(phi.dtype)
    return jnp.sum(zf * jax.nn.log_sigmoid(phi) + (1 - zf) * jax.nn.log_sigmoid(-phi))


def log_weight(params, key):
    """One particle: z ~ q(z | φ) = Bernoulli(σ(φ)) (2 latents)."""
    phi, W, c = params
    z = scg.sample(key, dist.Bernoulli(logits=phi), name="z")
    return _log_joint(z, W, c) - _log_q(z, phi)


def log_weight_two_sites(params, key):
    """Two proposal sites, the second depending on the first (a structured q)."""
    phi, W, c = params
    k1, k2 = jax.random.split(key)
    z1 = scg.sample(k1, dist.Bernoulli(logits=phi[0]), name="z1")
    z2 = scg.sample(k2, dist.Bernoulli(logits=phi[1] + W[0, 0] * z1), name="z2")
    z = jnp.stack([z1, z2])
    lq = dist.Bernoulli(logits=phi[0]).log_prob(z1) + dist.Bernoulli(
        logits=phi[1] + W[0, 0] * z1
    ).log_prob(z2)
    return _log_joint(z, W, c) - lq


PARAMS = (
    np.array([0.4, -0.8]),
    np.array([[0.5, -1.0, 0.3], [1.2, 0.2, -0.7]]),
    np.array(0.3),
)


def _exact(f, names, K, baseline):
    """(∇E[L], ∇²E[L], E[∇ estimate], E[∇² estimate]) by enumerating the particles."""
    params = jax.tree.map(jnp.asarray, PARAMS)
    key = jax.random.key(0)
    n = len(names) if names != ("z",) else 2
    configs = np.array(list(itertools.product([0, 1], repeat=K * n)), np.int32).reshape(-1, K, n)

    def draws_of(c):
        if names == ("z",):
            return {"z": c}
        return {name: c[:, i] for i, name in enumerate(names)}

    def log_q_all(params, c):
        total = 0.0
        for k in range(K):
            t = scg.trace(f, draws={m: v[k] for m, v in draws_of(c).items()})(params, key)
            total = total + t.score_log_joint
        return total

    def bound(params, c):
        lw = jnp.stack(
            [
                scg.trace(f, draws={m: v[k] for m, v in draws_of(c).items()})(params, key).cost
                for k in range(K)
            ]
        )
        return jax.nn.logsumexp(lw) - jnp.log(K)

    def expected(params):
        return jnp.sum(
            jax.vmap(lambda c: jnp.exp(log_q_all(params, c)) * bound(params, c))(configs)
        )

    def expectation(fn):
        def one(c):
            w = jnp.exp(log_q_all(params, c))
            return jax.tree.map(lambda x: w * x, fn(c))

        return jax.tree.map(lambda x: jnp.sum(x, 0), jax.vmap(one)(configs))

    def surrogate(c):
        return scg.iwae(f, K, baseline=baseline, draws=draws_of(c))

    @jax.jit
    def everything():
        return (
            jax.grad(expected)(params),
            jax.hessian(expected)(params),
            expectation(lambda c: jax.grad(surrogate(c))(params, key)),
            expectation(lambda c: jax.hessian(surrogate(c))(params, key)),
            jnp.sum(jax.vmap(lambda c: jnp.exp(log_q_all(params, c)))(configs)),
        )

    return everything()


@pytest.mark.parametrize("baseline", [None, "vimco"])
@pytest.mark.parametrize(
    "f, names, K",
    [(log_weight, ("z",), 2), (log_weight, ("z",), 3), (log_weight_two_sites, ("z1", "z2"), 2)],
    ids=["one_site_K2", "one_site_K3", "two_sites_K2"],
)
def test_iwae_is_exact_at_first_and_second_order(f, names, K, baseline):
    grad, hess, est, est_hess, mass = _exact(f, names, K, baseline)
    np.testing.assert_allclose(mass, 1.0, rtol=1e-12)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad)) > 1e-3
    for a, b in zip(jax.tree.leaves(est), jax.tree.leaves(grad)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(jax.tree.leaves(est_hess), jax.tree.leaves(hess)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_vimco_reduces_the_variance_of_the_proposal_gradient():
    params = jax.tree.map(jnp.asarray, PARAMS)
    keys = jax.random.split(jax.random.key(3), 4000)

    def var(baseline):
        g = jax.jit(jax.vmap(jax.grad(scg.iwae(log_weight, 4, baseline=baseline)), (None, 0)))(
            params, keys
        )
        return np.var(g[0], 0)

    assert np.all(var("vimco") < 0.1 * var(None))


def test_the_value_is_the_bound_of_the_particles():
    params = jax.tree.map(jnp.asarray, PARAMS)
    key = jax.random.key(7)
    lw = jax.vmap(lambda k: log_weight(params, k))(jax.random.split(key, 5))
    np.testing.assert_allclose(
        jax.jit(scg.iwae(log_weight, 5))(params, key),
        jax.nn.logsumexp(lw) - jnp.log(5.0),
        rtol=1e-12,
    )
    with_aux = scg.iwae(lambda p, k: (log_weight(p, k), k), 5, has_aux=True)
    value, aux = jax.jit(with_aux)(params, key)
    assert jax.random.key_data(aux).shape[0] == 5


def test_a_pathwise_proposal_is_jax_grad_of_the_bound():
    """No score sites: the estimate is the reparameterized IWAE gradient, to the bit."""

    def lw(params, key):
        mu, log_s = params
        z = scg.sample(key, dist.Normal(mu, jnp.exp(log_s)))
        return (
            dist.Normal(0.0, 1.0).log_prob(z)
            + dist.Normal(z, 0.5).log_prob(1.3)
            - (dist.Normal(mu, jnp.exp(log_s)).log_prob(z))
        )

    def by_hand(params, key):
        mu, log_s = params
        eps = jax.vmap(lambda k: jax.random.normal(k))(jax.random.split(key, 4))
        z = mu + jnp.exp(log_s) * eps
        w = (
            dist.Normal(0.0, 1.0).log_prob(z)
            + dist.Normal(z, 0.5).log_prob(1.3)
            - (dist.Normal(mu, jnp.exp(log_s)).log_prob(z))
        )
        return jax.nn.logsumexp(w) - jnp.log(4.0)

    params, key = (jnp.asarray(0.2), jnp.asarray(-0.3)), jax.random.key(2)
    for a, b in zip(jax.grad(scg.iwae(lw, 4))(params, key), jax.grad(by_hand)(params, key)):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_under_jit_and_vmap():
    params = jax.tree.map(jnp.asarray, PARAMS)
    key = jax.random.key(5)
    grad = jax.grad(scg.iwae(log_weight, 3))
    keys = jax.random.split(key, 2)
    g = grad(params, keys[1])  # eager
    gj = jax.jit(grad)(params, keys[1])
    gv = jax.jit(jax.vmap(grad, (None, 0)))(params, keys)
    for a, b, c in zip(jax.tree.leaves(g), jax.tree.leaves(gj), jax.tree.leaves(gv)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(c[1], b, rtol=1e-12, atol=1e-15)


def test_bad_input_is_refused_clearly():
    params = jax.tree.map(jnp.asarray, PARAMS)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="num_particles must be an int >= 2"):
        scg.iwae(log_weight, 1)
    with pytest.raises(ValueError, match="unknown baseline 'loo'"):
        scg.iwae(log_weight, 2, baseline="loo")

    def enumerated(params, key):
        z = scg.sample(key, dist.Bernoulli(logits=params[0]), estimator="enum")
        return jnp.sum(z * 1.0)

    with pytest.raises(ValueError, match="evaluated at several values"):
        scg.iwae(enumerated, 2)(params, key)

    def with_baseline(params, key):
        z = scg.sample(key, dist.Bernoulli(logits=params[0]), baseline=0.5)
        return jnp.sum(z * 1.0)

    with pytest.raises(ValueError, match="baseline= on scg.sample inside a particle"):
        scg.iwae(with_baseline, 2)(params, key)

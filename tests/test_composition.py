"""The same estimate at every level of composition, for the same key: eager, `jit`,
`vmap` (with and without an `axis_name`), grad of grad, and scgjax transforms nested in
each other."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax import lax

import scgjax as scg

KEY = jax.random.key(3)


def mixed(theta, key):
    k1, k2 = jax.random.split(key)
    z = scg.sample(k1, dist.Bernoulli(logits=theta[0]))
    x = scg.sample(k2, dist.Normal(theta[1] * z, 1.0))
    return (x - 2.0) ** 2 + 0.5 * z


def plates(theta, key):
    x = jnp.linspace(-1.0, 1.0, 8).reshape(4, 2)
    z = scg.sample(key, dist.Bernoulli(logits=x * theta[:2])).astype(jnp.float32)
    return jnp.mean(jnp.sum((z - theta[2]) ** 2, axis=1) * jnp.tanh(theta[3] + z[:, 0]))


def rollout(theta, key):
    def step(s, k):
        a = scg.sample(k, dist.Bernoulli(logits=theta[0] + theta[1] * s)).astype(jnp.float32)
        s = 0.5 * s + a - theta[2]
        return s, s**2

    _, r = lax.scan(step, 0.0, jax.random.split(key, 5))
    return jnp.dot(0.9 ** jnp.arange(5.0), r)


def branches(theta, key):
    k1, k2 = jax.random.split(key)
    z = scg.sample(k1, dist.Bernoulli(logits=theta[0]))
    y = lax.cond(
        z > 0, lambda: scg.sample(k2, dist.Normal(theta[1], 1.0)) ** 2, lambda: theta[2] * 3.0
    )
    return y + theta[3] * z


def with_baseline(theta, key):
    z = scg.sample(key, dist.Bernoulli(logits=theta[:2]), baseline=theta[2]).astype(jnp.float32)
    return jnp.sum((z - theta[3]) ** 2)


PROGRAMS = [mixed, plates, rollout, branches, with_baseline]
THETA = jnp.array([0.3, -0.6, 0.2, 0.8])
KEYS = jax.random.split(KEY, 2)


def close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("f", PROGRAMS, ids=lambda f: f.__name__)
def test_eager_jit_and_vmap_agree(f):
    g = scg.scg_grad(f)
    eager = jnp.stack([g(THETA, k) for k in KEYS])
    close(jnp.stack([jax.jit(g)(THETA, k) for k in KEYS]), eager)
    close(jax.vmap(g, (None, 0))(THETA, KEYS), eager)
    close(jax.jit(jax.vmap(g, (None, 0), axis_name="particles"))(THETA, KEYS), eager)
    close(jax.vmap(jax.jit(g), (0, 0))(jnp.stack([THETA] * 2), KEYS), eager)


@pytest.mark.parametrize("f", PROGRAMS, ids=lambda f: f.__name__)
def test_every_way_of_taking_second_derivatives_agrees(f):
    # Compiled (eager and jit agree: test_eager_jit_and_vmap_agree): one XLA program
    # each, where op-by-op dispatch compiles every primitive of the Hessian on its own.
    h = jax.jit(jax.hessian(scg.surrogate(f)))(THETA, KEY)
    close(jax.jit(jax.jacfwd(scg.scg_grad(f)))(THETA, KEY), h)
    close(jax.jit(jax.jacrev(scg.scg_grad(f)))(THETA, KEY), h)
    close(jax.jit(jax.jacfwd(jax.jacrev(scg.surrogate(f))))(THETA, KEY), h)
    close(
        jax.jit(jax.vmap(jax.hessian(scg.surrogate(f)), (None, 0)))(THETA, KEYS)[0],
        jax.jit(jax.hessian(scg.surrogate(f)))(THETA, KEYS[0]),
    )


@pytest.mark.parametrize("f", PROGRAMS, ids=lambda f: f.__name__)
def test_an_scgjax_transform_around_another_gives_the_same_estimate(f):
    # The outer transform freezes the inner magic boxes and takes the inner draws as its
    # own nodes, so estimating the inner surrogate's expectation is estimating f's.
    # compiled, one XLA program each (eager and jit agree: test_eager_jit_and_vmap_agree)
    g = jax.jit(scg.scg_grad(f))(THETA, KEY)
    close(jax.jit(scg.scg_grad(scg.surrogate(f)))(THETA, KEY), g)
    close(jax.jit(scg.scg_grad(lambda t, k: scg.scg_value_and_grad(f)(t, k)[0]))(THETA, KEY), g)
    close(jax.jit(scg.scg_grad(jax.jit(scg.surrogate(f))))(THETA, KEY), g)
    v, g2 = jax.jit(scg.scg_value_and_grad(scg.surrogate(f)))(THETA, KEY)
    close(g2, g)
    np.testing.assert_allclose(v, f(THETA, KEY), rtol=1e-6)


def test_value_and_grad_and_surrogate_value_agree_with_f():
    for f in PROGRAMS:
        v, _ = scg.scg_value_and_grad(f)(THETA, KEY)
        np.testing.assert_allclose(v, f(THETA, KEY), rtol=1e-6)
        np.testing.assert_allclose(scg.surrogate(f)(THETA, KEY), f(THETA, KEY), rtol=1e-6)

"""REBAR and RELAX (`"rebar"`, `"relax"`): control variates from relaxed draws.

A REBAR site's estimate depends on two uniforms per element: `u`, behind the draw
`b = 1[u < p]` and the perturbed logits `z = logit p − logit u`, and `ũ`, behind `z̃ ~
p(z | b)`. In `u` it is smooth on each side of `p` (the draw jumps there); in `ũ` smooth
on (0, 1). The tests replace both by Gauss–Legendre nodes, `n` on [0, p], `n` on [p, 1]
for `u` and `n` on [0, 1] for `ũ`, through an estimator subclass that reads them from a
table indexed by its key, and take the expectation over the other score sites by
enumeration (`tests/exact.py`). At temperature λ = 1 (or ½) the relaxed values are
rational in the uniforms and the rule converges geometrically: with the `n` used here
the quadrature error is below 1e-12, so the estimate's expectation must be the exact
gradient (and, for the claims of every order, the exact Hessian) at rtol 1e-9 in float64,
for any η, λ and control variate. A wrong sign, a missing ⊡, a control variate taken at
the wrong relaxed value, or `z̃` not differentiated through its conditional
reparameterization each fail it (tests/MUTATION.md).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest
from exact import assert_exact

import scgjax as scg
from scgjax import estimators as E


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _row(table, key, channel, shape, dtype):
    i = jax.random.key_data(key)[..., -1]
    return jnp.asarray(table, dtype)[i, channel].reshape(shape)


@functools.cache
def _with_table(cls):
    """`cls` with its two uniforms read from `table[key_data(key)[-1]]`."""

    @dataclasses.dataclass(frozen=True)
    class Quadrature(cls):
        table: tuple = ()

        def noise(self, key, shape, dtype):
            return _row(self.table, key, 0, shape, dtype)

        def conditional_noise(self, key, shape, dtype):
            return _row(self.table, key, 1, shape, dtype)

    Quadrature.__name__ = f"Quadrature{cls.__name__}"
    return Quadrature


def _gl(n, a, b):
    x, w = np.polynomial.legendre.leggauss(n)
    return (a + b) / 2 + (b - a) / 2 * x, (b - a) / 2 * w


def _quadrature(p_calls, n, cls=E.REBAR, **fields):
    """A quadrature over the two uniforms of each element of a Bernoulli site drawn `C`
    times (scan steps, vmap elements) with probabilities `p_calls` `(C, *shape)`: (the
    estimator, keys `(M, C)`, weights `(M,)`)."""
    p = np.asarray(p_calls, np.float64)
    calls, shape = p.shape[0], p.shape[1:]
    per_element = []
    for q in p.reshape(-1):
        (u1, w1), (u2, w2), (v, wv) = _gl(n, 0, q), _gl(n, q, 1), _gl(n, 0, 1)
        u, wu = np.r_[u1, u2], np.r_[w1, w2]
        per_element.append(
            [((ui, vj), wi * wj) for (ui, wi), (vj, wj) in itertools.product(zip(u, wu), zip(v, wv))]
        )
    configs = list(itertools.product(*per_element))
    m = len(configs)
    uv = np.array([[pt for pt, _ in c] for c in configs])  # (M, C*N, 2)
    weights = np.array([np.prod([w for _, w in c]) for c in configs])
    table = np.moveaxis(uv.reshape(m, calls, *shape, 2), -1, 2).reshape(m * calls, 2, *shape)
    est = _with_table(cls)(table=_nested(table), **fields)
    data = np.zeros((m, calls, 2), np.uint32)
    data[..., 1] = np.arange(m * calls).reshape(m, calls)
    return est, jax.random.wrap_key_data(jnp.asarray(data)), weights


def _nested(a):
    return tuple(_nested(x) for x in a) if np.ndim(a) else float(a)


def _check(prog, theta, p_calls, *, n=8, single=True, hessian=True, cls=E.REBAR, **fields):
    """E[estimate] (and E[Hessian of the surrogate]) over the quadrature and the other
    score sites == ∇E[f] (and ∇²E[f])."""
    est, keys, weights = _quadrature(p_calls, n, cls, **fields)
    if single:
        keys = keys[:, 0]
    assert abs(weights.sum() - 1) < 1e-12
    assert_exact(
        functools.partial(prog, est="score"),
        theta,
        hessian=hessian,
        estimate=lambda th, key, nk: prog(th, key, est=est, nkey=nk),
        noise=(keys, weights),
    )


def sig(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


# -- Programs: the site under test draws its noise from `nkey` --------------------------


def with_neighbours(theta, key, est, nkey=None):
    """A scalar site with a reparameterized Normal downstream of it and an independent
    score site beside it, in costs that mix them and the parameters."""
    k1, k2, k3 = jax.random.split(key, 3)
    z = scg.sample(k1 if nkey is None else nkey, dist.Bernoulli(logits=theta[0]), estimator=est)
    y = scg.sample(k2, dist.Bernoulli(logits=theta[1]), name="y")
    x = scg.sample(k3, dist.Normal(theta[2] * z, 1.0), name="x")
    return (z * theta[2] - 0.499) ** 2 + jnp.sin(3.0 * z + theta[1] * y) + 0.3 * x * y


def probs_site(theta, key, est, nkey=None):
    """`probs=` parameterization; the cost is not linear in the relaxed value."""
    p = jax.nn.sigmoid(theta[0]) * 0.8 + 0.1
    z = scg.sample(key if nkey is None else nkey, dist.Bernoulli(probs=p), estimator=est)
    return jnp.exp(theta[1] * z) + (z - theta[2]) ** 2


def joint_two(theta, key, est, nkey=None):
    """A cost of both elements at once: they go together (⊡ of the summed log-probs)."""
    z = scg.sample(key if nkey is None else nkey, dist.Bernoulli(logits=theta[:2]), estimator=est)
    return (jnp.sum(z) * theta[2] - 1.0) ** 2 + jnp.sin(z[0] * z[1] * 2.0 + theta[0])


def plate_two(theta, key, est, nkey=None):
    """Per-element costs (automatic plates): each element's own relaxed values, weights."""
    z = scg.sample(key if nkey is None else nkey, dist.Bernoulli(logits=theta[:2]), estimator=est)
    return jnp.sum((z * theta[2] - jnp.array([0.2, 0.9])) ** 2)


def in_scan(theta, key, est, nkey=None):
    """One site per step of a scan; the cost of a step reads the carry (earlier draws)."""

    def step(carry, nk):
        z = scg.sample(nk, dist.Bernoulli(logits=theta[0] + carry), estimator=est)
        return carry + theta[1] * z, (z - 0.3 - carry) ** 2

    keys = jax.random.split(key, 2) if nkey is None else nkey
    _, costs = jax.lax.scan(step, 0.0, keys)
    return jnp.sum(costs)


def in_vmap(theta, key, est, nkey=None):
    """The site drawn under `jax.vmap` inside the program, per mapped element."""
    keys = jax.random.split(key, 2) if nkey is None else nkey

    def one(k, a):
        z = scg.sample(k, dist.Bernoulli(logits=theta[0] * a), estimator=est)
        return (z - theta[1]) ** 2 * a

    return jnp.sum(jax.vmap(one)(keys, jnp.array([1.0, -0.5])))


def in_cond(theta, key, est, nkey=None):
    """The site in one branch of a `cond` on a score draw upstream of it."""
    k1, k2 = jax.random.split(key)
    w = scg.sample(k1, dist.Bernoulli(logits=theta[1]), name="w")

    def yes(_):
        z = scg.sample(k2 if nkey is None else nkey, dist.Bernoulli(logits=theta[0]), estimator=est)
        return (z * theta[2] - 0.5) ** 2

    return jax.lax.cond(w > 0, yes, lambda _: theta[2] ** 2, None)


def beside_enum(theta, key, est, nkey=None):
    """With an enumerated site in the same cost."""
    k1, k2 = jax.random.split(key)
    e = scg.sample(k1, dist.Bernoulli(logits=theta[1]), estimator="enum", name="e")
    z = scg.sample(k2 if nkey is None else nkey, dist.Bernoulli(logits=theta[0]), estimator=est)
    return (z + e * theta[2] - 0.7) ** 2 + z * e


THETA = np.array([0.3, -0.4, 0.8])


# -- Exact: first and second order -------------------------------------------------------


@pytest.mark.parametrize("eta, temperature", [(1.0, 1.0), (0.3, 1.0), (-0.7, 1.0), (1.0, 0.5)])
def test_rebar_exact_every_order(eta, temperature):
    n = 8 if temperature == 1.0 else 16
    _check(with_neighbours, THETA, [sig(THETA[0])], n=n, eta=eta, temperature=temperature)


def test_rebar_exact_with_probs():
    p = sig(THETA[0]) * 0.8 + 0.1
    _check(probs_site, THETA, [p], eta=0.6, temperature=1.0)


@pytest.mark.parametrize("prog", [joint_two, plate_two], ids=["joint", "plate"])
def test_rebar_exact_two_elements(prog):
    _check(prog, THETA, [sig(THETA[:2])], n=6, hessian=False, eta=0.8, temperature=1.0)


def test_rebar_exact_in_scan():
    # theta[1] = 0 keeps step 2's probability at σ(θ0) whatever step 1 drew (so the
    # quadrature's cut at p is right at both steps); the derivatives in theta[1] still
    # reach step 2 through the carry.
    theta = np.array([0.3, 0.0, 0.0])
    _check(in_scan, theta, [sig(0.3), sig(0.3)], n=6, single=False, hessian=False, temperature=1.0)


def test_rebar_exact_in_vmap():
    p = sig(THETA[0] * np.array([1.0, -0.5]))
    _check(in_vmap, THETA, p, n=6, single=False, hessian=False, temperature=1.0)


def test_rebar_exact_in_cond():
    _check(in_cond, THETA, [sig(THETA[0])], eta=0.5, temperature=1.0)


def test_rebar_exact_beside_enum():
    _check(beside_enum, THETA, [sig(THETA[0])], eta=1.3, temperature=1.0)


def _net(params, z):
    # A function of σ(z) (rational in the uniforms, so that the quadrature stays exact;
    # `z` itself has logarithmic ends).
    s = jax.nn.sigmoid(z)
    return params["a"] * jnp.tanh(params["b"] * jnp.sum(s)) + params["c"] * jnp.sum(s**2)


NET = {"a": 0.7, "b": -1.3, "c": 0.2}


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_relax_exact_every_order(eta):
    params = jax.tree.map(jnp.asarray, NET)
    _check(
        with_neighbours,
        THETA,
        [sig(THETA[0])],
        cls=E.RELAX,
        control=_net,
        params=params,
        eta=eta,
        temperature=1.0,
    )


def test_relax_exact_joint():
    params = jax.tree.map(jnp.asarray, NET)
    _check(
        joint_two,
        THETA,
        [sig(THETA[:2])],
        n=6,
        hessian=False,
        cls=E.RELAX,
        control=_net,
        params=params,
        temperature=1.0,
    )

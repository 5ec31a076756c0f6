"""Every rule of the rewrite, proved by exact enumeration (no Monte Carlo noise).

Each program below exercises one term rule, axis rule or control-flow rule (the name
says which). `assert_exact` (tests/exact.py) sums the estimator over every joint draw of
its Bernoulli sites and compares the result with the gradient and the Hessian of the
exact expectation, in float64 at rtol 1e-9, so a wrong sign, a dropped term or a wrong
weight fails however small its effect. The parameters are chosen so that every
component of the gradient is nonzero, and some logits are exactly 0 (numpyro's kink).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax import lax

import scgjax as scg

try:
    from .exact import assert_exact
except ImportError:  # tests/ is not a package
    from exact import assert_exact


def bern(key, logits, name=None, shape=()):
    return scg.sample(key, dist.Bernoulli(logits=logits), shape, name=name).astype(
        jnp.result_type(logits)
    )


THETA = np.array([0.3, -0.7, 0.0, 1.1])


def keys(key, n):
    return jax.random.split(key, n)


# -- term rules on the cost's additive tail ------------------------------------------------


def p_add_sub_broadcast(t, key):
    k1, k2 = keys(key, 2)
    z = bern(k1, t[:3])
    w = bern(k2, t[3])
    return (z - t[0]).sum() + (t[1] - z * jnp.ones(3)).sum() - (w - z).sum() * t[2] + (z - w).mean()


def p_broadcast_of_terms(t, key):
    # a cost already split into terms, then broadcast (`c * w`, `broadcast_to`, `c + 0`)
    # (three nodes, so that the broadcast value keeps at least three distinct terms)
    k1, k2, k3 = keys(key, 3)
    z0, z1, w = bern(k1, t[0]), bern(k2, t[1]), bern(k3, t[2])
    c = z0 * t[3] + 2.0 * w - z1
    return (
        (c * jnp.array([1.0, -2.0, 0.5])).sum()
        + jnp.broadcast_to(c, (2,)).sum() * t[0]
        + (c + jnp.zeros((2, 2))).mean()
    )


def p_reshape_transpose_squeeze_cumsum_of_terms(t, key):
    # a cost split into terms of three nodes, then reshaped, transposed, squeezed and
    # accumulated before it is reduced
    k1, k2, k3 = keys(key, 3)
    z0, z1, w = bern(k1, t[0]), bern(k2, t[1]), bern(k3, t[2])
    c = z0 * jnp.array([1.0, -2.0, 0.5, 3.0]) + w * t[3] - z1 * jnp.arange(4.0)
    m = c.reshape(2, 2).T * jnp.array([[1.0, 2.0], [-1.0, 0.5]])
    s = c[None, :].squeeze(0)
    return m.sum() + (jnp.cumsum(s) * jnp.array([0.5, 1.0, -1.0, 2.0])).sum() + s.sum() * t[0]


def p_neg_mul_div(t, key):
    z = bern(key, t[:3])
    return -(z * t[3]).sum() / 2.0 + (3.0 * z / (1.0 + t[0] ** 2)).sum() - (t[1] * -z).sum()


def p_reduce_over_axes(t, key):
    z = bern(key, t[:2, None] * jnp.ones((2, 3)))
    return z.sum(0).dot(jnp.array([1.0, 2.0, 3.0])) * t[2] + z.mean(1).sum() * t[3] + z.sum()


def p_dot_general_weighted_sum(t, key):
    z = bern(key, t[:3])
    w = jnp.array([0.5, -1.0, 2.0]) * t[3]
    return jnp.dot(z * t[1], w) + jnp.einsum("i,i->", z, w * t[0])


def p_dot_general_matrix(t, key):
    z = bern(key, t[:2])
    m = jnp.outer(t[2:], jnp.ones(2)) + jnp.eye(2)
    return (m @ z).sum() + (z @ m * t[1]).sum()


def p_concat_stack_pad_slice(t, key):
    k1, k2 = keys(key, 2)
    z = bern(k1, t[:2])
    w = bern(k2, t[2:])
    s = jnp.concatenate([z * t[0], w, jnp.ones(1)])
    st = jnp.stack([z, w * t[3]])
    return s.sum() + st[1].sum() - st[:, 0].sum() + jnp.pad(z, (1, 2)).sum() * t[1]


def p_select_n_where(t, key):
    k1, k2 = keys(key, 2)
    z = bern(k1, t[:2])
    w = bern(k2, t[2])
    return jnp.where(t[:2] > 0, z * t[3], -z).sum() + jnp.where(w > 0, z[0], 2.0 * z[1]) * t[1]


def p_cumsum_both_ways(t, key):
    z = bern(key, t[:3])
    return (lax.cumsum(z * t[3], reverse=False) * jnp.array([1.0, -2.0, 0.5])).sum() + (
        lax.cumsum(z, reverse=True) * t[:3]
    ).sum()


def p_convert_reshape_transpose(t, key):
    z = bern(key, t.reshape(2, 2))
    zz = z.astype(jnp.float32).astype(jnp.float64)
    return (
        (zz.T * jnp.array([[1.0, 2.0], [3.0, 4.0]])).sum() * t[0]
        + zz.reshape(4).dot(t)
        + jnp.expand_dims(zz, 0).squeeze(0).sum()
        + z.astype(jnp.int32).sum() * t[1]
    )


# -- nonlinear costs (the whole cost depends on the node) -------------------------------


def p_nonlinear_cost(t, key):
    k1, k2 = keys(key, 2)
    z = bern(k1, t[:2])
    w = bern(k2, t[2] + z[0] - z[1])  # a node whose parameter depends on another node
    return jnp.sin(z.sum() * t[3]) + (w * t[1] - z[0]) ** 2 + jnp.exp(0.1 * t[0] * w)


def p_hand_attention(t, key):
    # log_softmax(l) * one_hot(y) written by hand: cross-entropy of a hard glimpse choice
    k1, k2 = keys(key, 2)
    z = bern(k1, t[:2])
    logits = jnp.stack([z[0] * t[2], z[1] * t[3], t[0]])
    y = jax.nn.one_hot(1, 3)
    return -(jax.nn.log_softmax(logits) * y).sum() + bern(k2, t[1]) * t[3]


def p_normal_scalar_scale(t, key):
    # a decoder with a learned scalar noise: Normal(vector_loc, scalar_scale).log_prob(x)
    z = bern(key, t[:3])
    x = jnp.array([0.2, -0.5, 1.0])
    return -dist.Normal(z * t[3], jnp.exp(t[0])).log_prob(x).sum()


def p_bernoulli_loglik_broadcast_prior(t, key):
    # a learned prior's logits broadcast against a latent vector
    z = bern(key, t[:3])
    prior = t[3]
    return -(dist.Bernoulli(logits=prior).log_prob(z)).sum() + (z * t[:3]).sum()


def p_masked_draw_reaches_cost(t, key):
    m = jnp.array([True, False, True])
    z = scg.sample(key, dist.Bernoulli(logits=t[:3]).mask(m)).astype(t.dtype)
    return (z * jnp.array([1.0, 2.0, -3.0])).sum() + (z[1] - t[3]) ** 2


# -- control flow ----------------------------------------------------------------------


def p_jit_and_checkpoint(t, key):
    @jax.jit
    def inner(t, k):
        return bern(k, t[:2]).sum() * t[2]

    @jax.checkpoint
    def remat(t, k):
        return (bern(k, t[3]) - t[0]) ** 2

    k1, k2 = keys(key, 2)
    return inner(t, k1) + remat(t, k2)


def p_scan_stacked_rewards(t, key):
    def step(c, k):
        z = bern(k, t[0] + 0.5 * c)
        return z, z * t[1] - c * t[2]

    _, r = lax.scan(step, jnp.zeros(()), keys(key, 3))
    return jnp.dot(r, jnp.array([1.0, 0.9, 0.81])) + r.sum() * t[3]


def p_scan_carry_accumulator(t, key):
    def step(c, k):
        s, total = c
        z = bern(k, t[0] - s)
        return (z, total + (z - t[1]) ** 2), None

    (_, total), _ = lax.scan(step, (jnp.zeros(()), jnp.zeros(())), keys(key, 3))
    return total * t[3]


def p_scan_discounted_reverse(t, key):
    zs = jax.vmap(lambda k, l: bern(k, l))(keys(key, 3), t[:3])

    def back(g, r):
        g = r + 0.9 * g
        return g, g

    _, returns = lax.scan(back, jnp.zeros(()), zs * t[3], reverse=True)
    return returns.sum()


def p_fori_loop(t, key):
    def body(i, c):
        s, k = c
        k, sub = jax.random.split(k)
        return s + bern(sub, t[i % 4]) * (i + 1.0), k

    s, _ = lax.fori_loop(0, 3, body, (jnp.zeros(()), key))
    return s**2 * t[3] + s


def p_nested_scan(t, key):
    def outer(c, k):
        def inner(c2, k2):
            z = bern(k2, t[0] + c2 * t[1])
            return z, z * t[2]

        c, r = lax.scan(inner, c, keys(k, 2))
        return c, r.sum()

    _, r = lax.scan(outer, jnp.zeros(()), keys(key, 2))
    return r.sum() + r[0] * t[3]


def p_cond_branches(t, key):
    k1, k2, k3 = keys(key, 3)
    z = bern(k1, t[0])
    out = lax.cond(z > 0, lambda: bern(k2, t[1]) * t[3], lambda: bern(k3, t[2]) - t[0])
    return out + z * t[1]


def p_switch_inside_scan(t, key):
    def step(c, k):
        ka, kb = jax.random.split(k)
        z = bern(ka, t[0] + c)
        r = lax.switch(z.astype(jnp.int32), [lambda: bern(kb, t[1]), lambda: t[2] * 2.0])
        return r, r * t[3]

    _, r = lax.scan(step, jnp.zeros(()), keys(key, 2))
    return r.sum()


def p_vmap_inside(t, key):
    z = jax.vmap(lambda k, l: bern(k, l))(keys(key, 3), t[:3])
    return ((z - t[3]) ** 2).sum() + jax.vmap(lambda a, b: a * b)(z, t[1:]).sum()


# -- baselines and several samples -----------------------------------------------------


def p_with_baseline(t, key):
    k1, k2 = keys(key, 2)
    z = scg.sample(k1, dist.Bernoulli(logits=t[:2]), baseline=t[2] * 3.0).astype(t.dtype)
    w = bern(k2, t[3] * z[0])
    return (z * t[:2]).sum() ** 2 + w * t[1]


def p_baseline_boxed_by_parents(t, key):
    # b on z2 depends on θ and on its parent z1: ⊡(log p(z1))·(1 − ⊡(log p(z2)))·b
    k1, k2 = keys(key, 2)
    z1 = bern(k1, t[0])
    b = t[3] * z1 - 2.0
    z2 = scg.sample(k2, dist.Bernoulli(logits=t[1] + t[2] * z1), baseline=b).astype(t.dtype)
    return (z1 + 2.0 * z2 + t[0]) ** 2 + z2 * t[3]


def p_baseline_in_scan_boxed_by_earlier_steps(t, key):
    # two agents per step; each draw's baseline comes from the state (earlier draws of
    # both), so its parents are both nodes at the earlier steps
    def step(s, k):
        ka, kb = jax.random.split(k)
        b = t[3] * s - 1.0
        a = scg.sample(ka, dist.Bernoulli(logits=t[0] + s), baseline=b).astype(t.dtype)
        o = scg.sample(kb, dist.Bernoulli(logits=t[1] - s), baseline=b).astype(t.dtype)
        r = (a - o * t[2]) ** 2 + a * o
        return 0.5 * s + a - o, r

    _, r = lax.scan(step, jnp.zeros(()), keys(key, 3))
    return (r * jnp.array([1.0, 0.9, 0.81])).sum()


def p_baseline_in_cond_branch(t, key):
    k1, k2 = keys(key, 2)
    z = bern(k1, t[0])

    def drawn():
        b = t[2] + z
        return scg.sample(k2, dist.Bernoulli(logits=t[1] * z + t[3]), baseline=b).astype(t.dtype)

    w = lax.cond(t[3] > 0, drawn, lambda: z)
    return (w * t[1] + z) ** 2


PROGRAMS = {
    name[2:]: fn for name, fn in globals().items() if name.startswith("p_") and callable(fn)
}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_rule_is_exact(name):
    assert_exact(PROGRAMS[name], THETA)


def test_logits_exactly_zero_every_order():
    # the Hessian at logits 0, in and out of a loop
    assert_exact(p_scan_stacked_rewards, np.zeros(4) + np.array([0.0, 0.5, 0.3, 0.2]))
    assert_exact(p_nonlinear_cost, np.array([0.0, 0.4, 0.0, 0.6]))


def test_leave_one_out_is_exact():
    def f(t, key):
        z = bern(key, t[:2])
        return ((z - t[2]) ** 2).sum() * t[3]

    assert_exact(f, THETA, num_samples=2, baseline="leave_one_out", hessian=False)

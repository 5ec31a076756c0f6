"""`scg.trace`, `draws=` (running a program at chosen draws) and what `describe` says."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax import lax

import scgjax as scg

KEY = jax.random.key(0)


def model(theta, key):
    k1, k2, k3 = jax.random.split(key, 3)
    z = scg.sample(k1, dist.Bernoulli(logits=theta[:2]), name="z").astype(jnp.float32)
    x = scg.sample(k2, dist.Normal(theta[2] * z.sum(), 1.0), name="x")

    def step(c, k):
        a = scg.sample(k, dist.Bernoulli(logits=theta[3] + c), name="a").astype(jnp.float32)
        return a, a * x

    _, r = lax.scan(step, jnp.zeros(()), jax.random.split(k3, 3))
    return (z.sum() - x) ** 2 + r.sum()


THETA = jnp.array([0.3, -0.2, 0.5, 0.1])


def test_trace_records_values_log_probs_and_cost():
    tr = scg.trace(model)(THETA, KEY)
    assert set(tr.sites) == {"z", "x", "a"}
    assert tr.sites["a"].value.shape == (3,)  # stacked along the scan
    assert tr.sites["z"].estimator == "score" and tr.sites["x"].estimator == "pathwise"
    np.testing.assert_allclose(tr.cost, model(THETA, KEY), rtol=1e-6)
    z = tr.sites["z"].value
    np.testing.assert_allclose(
        tr.sites["z"].log_prob, dist.Bernoulli(logits=THETA[:2]).log_prob(z), rtol=1e-6
    )
    np.testing.assert_allclose(
        tr.log_joint, sum(jnp.sum(s.log_prob) for s in tr.sites.values()), rtol=1e-6
    )
    np.testing.assert_allclose(
        tr.score_log_joint, tr.log_joint - jnp.sum(tr.sites["x"].log_prob), rtol=1e-6
    )


def test_score_log_joint_weighs_an_enumeration_next_to_a_pathwise_draw():
    # Weighted by `log_joint`, which counts the Normal's density, the "expectation" of a
    # new user's enumeration came out ~1/100 of the exact value.
    def f(th, key):
        k1, k2 = jax.random.split(key)
        z = scg.sample(k1, dist.Bernoulli(logits=th[0]), name="z").astype(th.dtype)
        x = scg.sample(k2, dist.Normal(th[1] * z, 1.0))
        return (x - 2.0) ** 2

    th = jnp.array([0.4, 0.7])
    traces = [scg.trace(f, draws={"z": v})(th, KEY) for v in (0.0, 1.0)]
    np.testing.assert_allclose(sum(jnp.exp(t.score_log_joint) for t in traces), 1.0, rtol=1e-6)
    assert abs(float(sum(jnp.exp(t.log_joint) for t in traces)) - 1.0) > 1e-2


def test_trace_is_a_pytree_through_jit_and_vmap():
    tr = jax.jit(scg.trace(model))(THETA, KEY)
    assert tr.sites["z"].source.endswith("(model)")
    many = jax.vmap(scg.trace(model), (None, 0))(THETA, jax.random.split(KEY, 4))
    assert many.sites["a"].value.shape == (4, 3) and many.cost.shape == (4,)


def test_draws_replace_the_named_sites_and_keep_the_others():
    z = jnp.array([1, 0], jnp.int32)
    a = jnp.array([0, 1, 1], jnp.int32)
    tr = scg.trace(model, draws={"z": z, "a": a})(THETA, KEY)
    np.testing.assert_array_equal(tr.sites["z"].value, z)
    np.testing.assert_array_equal(tr.sites["a"].value, a)
    # x keeps its noise from the key: same value as an unreplayed run with these draws
    free = scg.trace(model)(THETA, KEY)
    eps = free.sites["x"].value - THETA[2] * free.sites["z"].value.sum()
    np.testing.assert_allclose(tr.sites["x"].value, THETA[2] * 1.0 + eps, rtol=1e-5)
    np.testing.assert_allclose(
        scg.surrogate(model, draws={"z": z, "a": a})(THETA, KEY), tr.cost, rtol=1e-6
    )


def test_estimator_at_chosen_draws_matches_the_hand_written_score_terms():
    def f(t, key):
        z = scg.sample(key, dist.Bernoulli(logits=t), name="z").astype(t.dtype)
        return (z - 0.25) ** 2

    t = jnp.float32(0.4)
    for z in (0.0, 1.0):
        got = scg.scg_grad(f, draws={"z": z})(t, KEY)
        want = (z - jax.nn.sigmoid(t)) * (z - 0.25) ** 2
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_draws_for_cond_branches_mark_what_was_not_drawn():
    def f(t, key):
        k1, k2, k3 = jax.random.split(key, 3)
        z = scg.sample(k1, dist.Bernoulli(logits=t), name="z")
        return lax.cond(
            z > 0,
            lambda: scg.sample(k2, dist.Bernoulli(logits=t), name="yes") * 1.0,
            lambda: scg.sample(k3, dist.Bernoulli(logits=-t), name="no") * 2.0,
        )

    tr = scg.trace(f, draws={"z": 1, "yes": 1, "no": 1})(jnp.float32(0.2), KEY)
    assert bool(tr.sites["yes"].drawn) and not bool(tr.sites["no"].drawn)
    assert float(tr.cost) == 1.0


def test_draws_with_num_samples_take_a_leading_axis():
    def f(t, key):
        return (scg.sample(key, dist.Bernoulli(logits=t), name="z") - t) ** 2

    z = jnp.array([0, 1])
    v = scg.surrogate(f, num_samples=2, baseline="leave_one_out", draws={"z": z})(0.3, KEY)
    np.testing.assert_allclose(v, ((0 - 0.3) ** 2 + (1 - 0.3) ** 2) / 2, rtol=1e-6)


def test_bad_draws_are_clear_errors():
    with pytest.raises(ValueError, match="not sample sites of f.*'a', 'x', 'z'"):
        scg.trace(model, draws={"w": 1})(THETA, KEY)
    with pytest.raises(ValueError, match="pathwise"):
        scg.trace(model, draws={"x": 0.5})(THETA, KEY)
    with pytest.raises(ValueError, match="shape"):
        scg.trace(model, draws={"z": jnp.zeros(3)})(THETA, KEY)
    with pytest.raises(ValueError, match="leading axis of that length"):
        scg.trace(model, draws={"a": jnp.zeros(2)})(THETA, KEY)
    with pytest.raises(TypeError, match="dict"):
        scg.trace(model, draws=[1, 2])(THETA, KEY)


def test_draws_inside_while_loop_are_refused():
    def f(t, key):
        def body(c):
            i, s, k = c
            k, sub = jax.random.split(k)
            return i + 1, s + scg.sample(sub, dist.Bernoulli(logits=t)), k

        return lax.while_loop(lambda c: c[0] < 2, body, (0, 0, key))[1] * 1.0

    with pytest.raises(NotImplementedError, match="while_loop"):
        scg.trace(f)(0.3, KEY)


# -- describe: alignment and where it was lost ------------------------------------------


def test_describe_shows_plates_and_time_order():
    def f(W, key):
        x = jnp.ones((4, 3))
        z = scg.sample(key, dist.Bernoulli(logits=x @ W)).astype(jnp.float32)

        def step(c, r):
            return c + r, (c + r) ** 2

        _, costs = lax.scan(step, 0.0, z.sum(1))
        return costs.sum()

    def g(W, key):
        z = scg.sample(key, dist.Bernoulli(logits=W)).astype(jnp.float32)
        return jnp.sin(z).sum()

    table = scg.describe(f)(jnp.zeros((3, 2)), KEY)
    assert "0: time ≤" in table and "axis 1: every element" in table, table
    table = scg.describe(g)(jnp.zeros((4, 2)), KEY)
    assert "0: plate, 1: plate" in table and "fell back" not in table, table


def test_describe_says_where_per_row_weighting_was_lost():
    def f(W, key):
        z = scg.sample(key, dist.Bernoulli(logits=W)).astype(jnp.float32)  # (4,)
        perm = jnp.array([1, 0, 3, 2])
        return (z[perm] * jnp.arange(4.0)).sum()

    table = scg.describe(f)(jnp.zeros(4), KEY)
    assert "axis 0: every element, from gather" in table, table
    assert "test_trace.py" in table.split("from gather")[1], table


def test_describe_says_where_the_cost_stopped_splitting():
    def f(W, key):
        z = scg.sample(key, dist.Bernoulli(logits=W)).astype(jnp.float32)
        return jnp.log1p(z.sum() ** 2)

    table = scg.describe(f)(jnp.zeros(3), KEY)
    assert "the cost is one term: it is not split at log1p" in table, table


def test_describe_names_the_user_line_of_a_fallback_inside_a_library_function():
    # `jnp.take` is a `jit`: its gather has no user frame, so the fallback was reported
    # with no source line at all. (A permutation that is data mixes the draw's rows.)
    def f(W, perm, key):
        idx = scg.sample(key, dist.Categorical(logits=W))
        return (jnp.take(idx.astype(jnp.float32), perm) ** 2).sum()

    table = scg.describe(f)(jnp.zeros((3, 3)), jnp.array([2, 0, 1]), KEY)
    line = next(s for s in table.splitlines() if "from gather" in s)
    assert f"{__file__}:" in line, table

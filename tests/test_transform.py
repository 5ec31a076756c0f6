"""The transform itself: each rule fires, nothing is left behind, same-key equality with
hand-written surrogates, composition with JAX transforms, and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax import lax

import scgjax as scg
from scgjax._graph import Graph
from scgjax._sample import sample_p

KEY = jax.random.key(0)


def bern(key, logit):
    return scg.sample(key, dist.Bernoulli(logits=logit)).astype(jnp.float32)


def box(logp):
    return jnp.exp(logp - lax.stop_gradient(logp))


def _all_primitives(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn.primitive
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _all_primitives(getattr(sub, "jaxpr", sub))


def graph_of(f, *args) -> Graph:
    """The graph the interpreter records for `f(*args)`."""
    from scgjax._surrogate import _evaluate

    return _evaluate(f, args, {}, False)[2]


# -- Rao-Blackwellization: same key, same numbers as the hand-written estimator ------------


def test_independent_costs_weight_only_their_own_node():
    def f(theta, key):
        k1, k2 = jax.random.split(key)
        return 3.0 * bern(k1, theta[0]) + 10.0 * bern(k2, theta[1])

    def hand(theta, key):
        k1, k2 = jax.random.split(key)
        d1, d2 = dist.Bernoulli(logits=theta[0]), dist.Bernoulli(logits=theta[1])
        z1, z2 = d1.sample(k1), d2.sample(k2)
        lp1 = z1 * theta[0] - jax.nn.softplus(theta[0])
        lp2 = z2 * theta[1] - jax.nn.softplus(theta[1])
        return box(lp1) * 3.0 * z1 + box(lp2) * 10.0 * z2

    theta = jnp.array([0.3, -0.7])
    for k in jax.random.split(KEY, 4):
        np.testing.assert_allclose(scg.scg_grad(f)(theta, k), jax.grad(hand)(theta, k), rtol=1e-6)


def test_split_passes_through_mean_scaling_and_inner_jit():
    @jax.jit
    def cost_a(t, k):
        return jnp.stack([bern(k, t[0]), 1.0]).mean() * 2.0

    def f(theta, key):
        k1, k2 = jax.random.split(key)
        return cost_a(theta, k1) - (-bern(k2, theta[1]) / 4.0) + 7.0

    def hand(theta, key):
        k1, k2 = jax.random.split(key)
        z1 = dist.Bernoulli(logits=theta[0]).sample(k1)
        z2 = dist.Bernoulli(logits=theta[1]).sample(k2)
        lp1 = z1 * theta[0] - jax.nn.softplus(theta[0])
        lp2 = z2 * theta[1] - jax.nn.softplus(theta[1])
        return box(lp1) * z1 + box(lp2) * z2 / 4.0

    theta = jnp.array([0.3, -0.7])
    for k in jax.random.split(KEY, 4):
        np.testing.assert_allclose(scg.scg_grad(f)(theta, k), jax.grad(hand)(theta, k), rtol=1e-6)


def test_nonlinear_combination_weights_both_nodes():
    def f(theta, key):
        k1, k2 = jax.random.split(key)
        return bern(k1, theta[0]) * bern(k2, theta[1])

    def hand(theta, key):
        k1, k2 = jax.random.split(key)
        z1 = dist.Bernoulli(logits=theta[0]).sample(k1)
        z2 = dist.Bernoulli(logits=theta[1]).sample(k2)
        lp = (z1 * theta[0] - jax.nn.softplus(theta[0])) + (
            z2 * theta[1] - jax.nn.softplus(theta[1])
        )
        return box(lp) * z1 * z2

    theta = jnp.array([0.3, -0.7])
    for k in jax.random.split(KEY, 4):
        np.testing.assert_allclose(scg.scg_grad(f)(theta, k), jax.grad(hand)(theta, k), rtol=1e-6)


def test_split_passes_through_scan_stacked_outputs_and_cond_branches():
    def f(theta, key):
        k1, k2, k3 = jax.random.split(key, 3)
        _, ys = lax.scan(
            lambda c, k: (c, 2.0 * bern(k, theta[0]) + 1.0), 0.0, jax.random.split(k1, 3)
        )
        side = lax.cond(theta[1] > 0, lambda: bern(k2, theta[1]), lambda: 0.0)
        return ys.sum() + 5.0 * side + 0.0 * bern(k3, theta[0])

    graph = graph_of(f, jnp.array([0.2, 0.4]), KEY)
    assert len(graph.nodes) == 3
    from scgjax._surrogate import _evaluate

    cost, _, _ = _evaluate(f, (jnp.array([0.2, 0.4]), KEY), {}, False)
    # scan's node, cond's node, the top-level node and the constant each get a term.
    assert len(cost.terms) == 4
    assert all(len(deps) <= 1 for deps, _shape in cost.terms)


# -- Every control-flow rule fires ---------------------------------------------------------


def _node_paths(f, *args):
    return sorted(graph_of(f, *args).nodes)


def test_scan_rule_records_stacked_node():
    def f(t, key):
        c, _ = lax.scan(lambda c, k: (c + bern(k, t), None), 0.0, jax.random.split(key, 4))
        return c

    (node,) = graph_of(f, 0.1, KEY).nodes.values()
    assert node.shape == (4,) and len(node.id) == 2


def test_nested_scan_stacks_both_axes():
    def f(t, key):
        def outer(c, k):
            inner, _ = lax.scan(
                lambda c2, k2: (c2 + bern(k2, t), None), 0.0, jax.random.split(k, 2)
            )
            return c + inner, None

        c, _ = lax.scan(outer, 0.0, jax.random.split(key, 3))
        return c

    (node,) = graph_of(f, 0.1, KEY).nodes.values()
    assert node.shape == (3, 2) and len(node.id) == 3


def test_fori_loop_static_bounds_records_node():
    def f(t, key):
        return lax.fori_loop(0, 3, lambda i, c: c + bern(jax.random.fold_in(key, i), t), 0.0)

    (node,) = graph_of(f, 0.1, KEY).nodes.values()
    assert node.shape == (3,)


def test_cond_rule_records_one_node_per_branch():
    def f(t, key):
        k1, k2 = jax.random.split(key)
        z = bern(k1, t)
        return lax.switch(
            z.astype(jnp.int32), [lambda: bern(k2, 2 * t), lambda: 3.0 * bern(k2, -t)]
        )

    assert len(graph_of(f, 0.1, KEY).nodes) == 3


def test_untaken_branch_contributes_no_log_prob():
    key = jax.random.key(1)

    def f(t, key):
        return lax.cond(t > 0, lambda: bern(key, t), lambda: bern(key, -3.0 * t))

    g = graph_of(f, 0.5, key)
    lps = [graph_of(f, 0.5, key).log_probs[n] for n in sorted(g.nodes)]
    z = dist.Bernoulli(logits=0.5).sample(key)
    assert float(lps[0]) == 0.0 or float(lps[1]) == 0.0
    np.testing.assert_allclose(lps[1], dist.Bernoulli(logits=0.5).log_prob(z), rtol=1e-6)
    assert float(lps[0]) == 0.0


def test_jit_and_checkpoint_rules_keep_their_structure():
    def f(t, key):
        k1, k2 = jax.random.split(key)
        a = jax.jit(lambda t, k: bern(k, t))(t, k1)
        b = jax.checkpoint(lambda t, k: bern(k, t) * 2.0)(t, k2)
        return a + b

    jaxpr = jax.make_jaxpr(scg.scg_grad(f))(0.3, KEY)
    names = {p.name for p in _all_primitives(jaxpr.jaxpr)}
    assert {"jit", "remat2", "checkpoint"} & names
    assert "jit" in names
    assert len(graph_of(f, 0.3, KEY).nodes) == 2


def test_vmap_inside_f_records_batched_node():
    def f(t, key):
        z = jax.vmap(lambda k: bern(k, t))(jax.random.split(key, 5))
        return z.sum()

    (node,) = graph_of(f, 0.1, KEY).nodes.values()
    assert node.shape == (5,)


def test_while_loop_value_and_forward_mode_work():
    def f(t, key):
        def body(s):
            i, c = s
            return i + 1, c + bern(jax.random.fold_in(key, i), t)

        return lax.while_loop(lambda s: s[0] < 3, body, (0, 0.0))[1]

    assert scg.surrogate(f)(0.3, KEY) == f(0.3, KEY)
    (node,) = graph_of(f, 0.3, KEY).nodes.values()
    # forward mode: d/dt of the surrogate = cost · Σ_i d/dt log p(z_i)
    zs = [dist.Bernoulli(logits=0.3).sample(jax.random.fold_in(KEY, i)) for i in range(3)]
    expected = f(0.3, KEY) * sum(z - jax.nn.sigmoid(0.3) for z in zs)
    _, tangent = jax.jvp(lambda t: scg.surrogate(f)(t, KEY), (0.3,), (1.0,))
    np.testing.assert_allclose(tangent, expected, rtol=1e-5)


def test_while_loop_under_reverse_mode_is_a_clear_error():
    def f(t, key):
        def body(s):
            i, c = s
            return i + 1, c + bern(jax.random.fold_in(key, i), t)

        return lax.while_loop(lambda s: s[0] < 3, body, (0, 0.0))[1]

    with pytest.raises(ValueError, match="while_loop.*lax.scan.*fori_loop"):
        scg.scg_grad(f)(0.3, KEY)


def test_while_loop_without_samples_is_rebound_unchanged():
    def f(t, key):
        n = lax.while_loop(lambda i: i < 3, lambda i: i + 1, 0)
        return bern(key, t) * n

    g = scg.scg_grad(f)(0.3, KEY)
    z = dist.Bernoulli(logits=0.3).sample(KEY)
    np.testing.assert_allclose(g, 3 * z * (z - jax.nn.sigmoid(0.3)), rtol=1e-6)


def test_custom_jvp_next_to_a_sample_keeps_its_rule():
    @jax.custom_jvp
    def clipped(x):
        return x

    clipped.defjvp(lambda p, t: (p[0], 10.0 * t[0]))  # a deliberately unusual rule

    def f(t, key):
        return clipped(t) + bern(key, 0.0)

    assert scg.scg_grad(f)(0.3, KEY) == 10.0


def test_custom_vjp_next_to_a_sample_keeps_its_rule():
    @jax.custom_vjp
    def scaled(x):
        return x

    scaled.defvjp(lambda x: (x, None), lambda _, g: (7.0 * g,))

    def f(t, key):
        return scaled(t) + bern(key, 0.0)

    assert scg.scg_grad(f)(0.3, KEY) == 7.0


def test_custom_jvp_of_a_multi_term_cost_is_rebound():
    def f(t, key):
        k1, k2 = jax.random.split(key)
        return jax.nn.relu(bern(k1, t) + 2.0 * bern(k2, t))  # relu is a custom_jvp

    g = scg.scg_grad(f)(0.3, KEY)
    k1, k2 = jax.random.split(KEY)
    z1, z2 = (dist.Bernoulli(logits=0.3).sample(k) for k in (k1, k2))
    p = jax.nn.sigmoid(0.3)
    np.testing.assert_allclose(g, (z1 + 2.0 * z2) * (z1 - p + z2 - p), rtol=1e-5)


def test_sample_inside_custom_jvp_is_not_implemented():
    @jax.custom_jvp
    def g(t, key):
        return bern(key, t)

    g.defjvp(lambda p, t: (g(*p), 0.0))
    with pytest.raises(NotImplementedError, match="custom_jvp"):
        scg.scg_grad(lambda t, k: g(t, k))(0.3, KEY)


def test_sample_inside_unknown_higher_order_primitive_is_not_implemented():
    def f(t, key):
        def matvec(x):
            return x

        def solve(mv, b):
            return b * bern(key, t)

        return lax.custom_linear_solve(matvec, t, solve)

    with pytest.raises(NotImplementedError, match="custom_linear_solve"):
        scg.scg_grad(f)(0.3, KEY)


# -- Composition ---------------------------------------------------------------------------


def f_mixed(theta, key):
    k1, k2 = jax.random.split(key)
    z = scg.sample(k1, dist.Bernoulli(logits=theta[0]))
    x = scg.sample(k2, dist.Normal(theta[1] * z, 1.0))
    return (x - 2.0) ** 2 + 0.5 * z


def _sample_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive is sample_p:
            yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _sample_eqns(getattr(sub, "jaxpr", sub))


def test_emitted_program_keeps_one_plain_draw_per_score_site():
    # A score draw stays a `sample_p` equation (so an enclosing scgjax transform sees it),
    # once, with its baseline; pathwise draws are emitted as numpyro's rsample.
    def f(theta, key):
        k1, k2 = jax.random.split(key)
        z = scg.sample(k1, dist.Bernoulli(logits=theta[0]), baseline=theta[1])
        x = scg.sample(k2, dist.Normal(theta[1] * z, 1.0))
        return (x - 2.0) ** 2 + 0.5 * z

    theta = jnp.array([0.1, 0.2])
    cases = [
        (scg.scg_grad(f), KEY),
        (scg.surrogate(f), KEY),
        (jax.hessian(scg.surrogate(f)), KEY),
        (jax.vmap(scg.scg_grad(f), (None, 0)), jax.random.split(KEY, 2)),
    ]
    for fn, key in cases:
        eqns = list(_sample_eqns(jax.make_jaxpr(fn)(theta, key).jaxpr))
        assert len(eqns) == 1, fn
        assert eqns[0].params["estimator"] == "score"
        assert eqns[0].params["has_baseline"]


def test_surrogate_value_equals_cost(any_key):
    theta = jnp.array([0.1, 1.5])
    assert scg.surrogate(f_mixed)(theta, any_key) == f_mixed(theta, any_key)
    v, _ = scg.scg_value_and_grad(f_mixed)(theta, any_key)
    assert v == f_mixed(theta, any_key)


def test_jit_and_vmap_of_scg_grad_agree_with_eager():
    theta = jnp.array([0.1, 1.5])
    keys = jax.random.split(KEY, 4)
    eager = jnp.stack([scg.scg_grad(f_mixed)(theta, k) for k in keys])
    np.testing.assert_allclose(
        jax.jit(jax.vmap(scg.scg_grad(f_mixed), (None, 0)))(theta, keys), eager, rtol=1e-5
    )
    thetas = jnp.stack([theta, theta + 1.0])
    by_theta = jax.vmap(scg.scg_grad(f_mixed), (0, None))(thetas, KEY)
    np.testing.assert_allclose(by_theta[1], scg.scg_grad(f_mixed)(thetas[1], KEY), rtol=1e-5)


def test_legacy_keys_batched_under_vmap():
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    g = jax.vmap(scg.scg_grad(f_mixed), (None, 0))(jnp.array([0.1, 1.5]), keys)
    assert g.shape == (3, 2) and jnp.all(jnp.isfinite(g))


def test_pytrees_argnums_and_has_aux():
    def f(params, scale, key):
        z = scg.sample(key, dist.Bernoulli(logits=params["w"] @ params["x"]))
        cost = scale * z.astype(jnp.float32).sum()
        return cost, {"z": z}

    params = {"w": jnp.ones((2, 3)) * 0.1, "x": jnp.arange(3.0)}
    (g_params, g_scale), aux = scg.scg_grad(f, argnums=(0, 1), has_aux=True)(params, 2.0, KEY)
    assert jax.tree.structure(g_params) == jax.tree.structure(params)
    assert g_params["w"].shape == (2, 3) and g_scale.shape == ()
    np.testing.assert_array_equal(aux["z"], f(params, 2.0, KEY)[1]["z"])
    (v, aux2), g = scg.scg_value_and_grad(f, has_aux=True)(params, 2.0, KEY)
    assert v == f(params, 2.0, KEY)[0]


def test_static_non_array_arguments_and_keywords():
    def f(theta, key, *, mode="sum", scale=1.0):
        z = scg.sample(key, dist.Bernoulli(logits=theta))
        return scale * (z.sum() if mode == "sum" else z.mean()).astype(jnp.float32)

    g = scg.scg_grad(f)(jnp.zeros(3), KEY, mode="mean", scale=3.0)
    z = dist.Bernoulli(logits=jnp.zeros(3)).sample(KEY)
    # Automatic plates: element i of the mean is weighted by z_i's log-prob only.
    np.testing.assert_allclose(g, 3.0 * z / 3.0 * (z - 0.5), rtol=1e-6)


def test_second_derivatives_of_surrogate_compose():
    theta = jnp.array([0.1, 1.5])
    h1 = jax.hessian(scg.surrogate(f_mixed))(theta, KEY)
    h2 = jax.jacfwd(jax.grad(scg.surrogate(f_mixed)))(theta, KEY)
    np.testing.assert_allclose(h1, h2, rtol=1e-5)
    assert h1.shape == (2, 2)


# -- Errors ----------------------------------------------------------------------------------


def test_non_scalar_cost_names_scalar_and_shape():
    def f(t, key):
        return scg.sample(key, dist.Normal(t, 1.0), (3,))

    with pytest.raises(ValueError, match=r"scalar.*\(3,\)"):
        scg.scg_grad(f)(0.0, KEY)


def test_integer_cost_is_a_type_error():
    def f(t, key):
        return scg.sample(key, dist.Bernoulli(logits=t))

    with pytest.raises(TypeError, match="floating-point"):
        scg.surrogate(f)(0.0, KEY)


def test_has_aux_requires_a_pair():
    with pytest.raises(TypeError, match=r"\(cost, aux\)"):
        scg.scg_grad(lambda t, k: t * 1.0, has_aux=True)(0.0, KEY)


# -- Weighted sums through dot_general keep causality and plates -----------------------------


def _rollout(combine, horizon=5):
    def f(theta, key):
        def body(s, k):
            a = bern(k, theta * s)
            s2 = 0.5 * s + a - 0.3
            return s2, (s2 - 1.0) ** 2

        _, rewards = lax.scan(body, 0.1, jax.random.split(key, horizon))
        return combine(rewards)

    return f


@pytest.mark.parametrize(
    "combine",
    [lambda g, r: jnp.dot(g, r), lambda g, r: r @ g, lambda g, r: jnp.einsum("t,t->", r, g)],
)
def test_discounting_with_dot_keeps_reward_to_go(combine):
    discounts = 0.9 ** jnp.arange(5)
    elementwise = _rollout(lambda r: jnp.sum(discounts * r))
    dotted = _rollout(lambda r: combine(discounts, r))
    for k in jax.random.split(KEY, 3):
        np.testing.assert_allclose(
            scg.scg_grad(dotted)(0.7, k), scg.scg_grad(elementwise)(0.7, k), rtol=1e-5
        )
    # and it differs from whole-loop weighting: the reward-to-go downstream cost
    _, q = scg.scg_grad(dotted, downstream=True)(0.7, KEY)
    _, q_ref = scg.scg_grad(elementwise, downstream=True)(0.7, KEY)
    np.testing.assert_allclose(q["node0"], q_ref["node0"], rtol=1e-5)
    assert not np.allclose(q["node0"], q["node0"][0])


def test_batched_weighted_sum_with_einsum_keeps_plates():
    weights = jnp.array([1.0, 0.5, 0.25])

    def f(theta, key, use_einsum):
        z = scg.sample(key, dist.Bernoulli(logits=theta), (4,)).astype(jnp.float32)  # (4, 3)
        costs = jnp.cumsum(z, axis=1) ** 2
        if use_einsum:
            return jnp.einsum("bt,t->b", costs, weights).sum()
        return jnp.sum(costs * weights)

    for k in jax.random.split(KEY, 3):
        np.testing.assert_allclose(
            scg.scg_grad(f)(jnp.zeros(3), k, True),
            scg.scg_grad(f)(jnp.zeros(3), k, False),
            rtol=1e-5,
        )


def test_categorical_logits_keep_the_batch_plate_of_their_parents():
    n, weights = 4, jnp.array([0.2, -0.1, 0.3])

    def f(theta, key):
        k1, k2 = jax.random.split(key)
        z = scg.sample(k1, dist.Bernoulli(logits=theta), (n,)).astype(jnp.float32)
        a = scg.sample(k2, dist.Categorical(logits=z[:, None] * weights + theta))
        return jnp.sum((a == 1).astype(jnp.float32) * (z + 1.0))

    def hand(theta, key):
        k1, k2 = jax.random.split(key)
        dz = dist.Bernoulli(logits=theta)
        z = dz.sample(k1, (n,)).astype(jnp.float32)
        da = dist.Categorical(logits=z[:, None] * weights + theta)
        a = da.sample(k2)
        lp = (z * theta - jax.nn.softplus(theta)) + da.log_prob(a)  # per row b
        return jnp.sum(box(lp) * (a == 1) * (z + 1.0))

    for k in jax.random.split(KEY, 4):
        np.testing.assert_allclose(scg.scg_grad(f)(0.3, k), jax.grad(hand)(0.3, k), rtol=1e-5)


def test_baseline_that_does_not_broadcast_is_a_clear_error():
    def f(t, key):
        return jnp.sum(scg.sample(key, dist.Bernoulli(logits=t), baseline=jnp.zeros(4)) * 1.0)

    with pytest.raises(ValueError, match=r"baseline.*\(4,\).*\(3,\)"):
        scg.scg_grad(f)(jnp.zeros(3), KEY)


def test_baseline_on_a_pathwise_draw_is_a_clear_error():
    with pytest.raises(ValueError, match="only applies to score-function nodes"):
        scg.sample(KEY, dist.Normal(0.0, 1.0), baseline=0.5)


@pytest.mark.parametrize("reverse", [False, True])
def test_discounted_carry_gets_discounted_reward_to_go(reverse):
    gamma, horizon = 0.9, 5
    rollout = _rollout(lambda r: r, horizon)

    def carried(theta, key):
        rewards = rollout(theta, key)
        return lax.scan(lambda c, r: (r + gamma * c, None), 0.0, rewards, reverse=reverse)[0]

    steps_after = jnp.arange(horizon) if reverse else horizon - 1 - jnp.arange(horizon)

    def stacked(theta, key):
        return jnp.sum(gamma**steps_after * rollout(theta, key))

    for k in jax.random.split(KEY, 3):
        assert jnp.allclose(carried(0.7, k), stacked(0.7, k), rtol=1e-6)
        np.testing.assert_allclose(
            scg.scg_grad(carried)(0.7, k), scg.scg_grad(stacked)(0.7, k), rtol=1e-5
        )
    _, q = scg.scg_grad(carried, downstream=True)(0.7, KEY)
    assert not np.allclose(q["node0"], q["node0"][0])  # not the whole-loop weight


def test_discount_that_depends_on_a_draw_is_not_split():
    def f(theta, key):
        k1, k2 = jax.random.split(key)
        g = 0.5 + 0.4 * bern(k1, theta)
        rewards = _rollout(lambda r: r)(theta, k2)
        return lax.scan(lambda c, r: (g * c + r, None), 0.0, rewards)[0]

    from scgjax._surrogate import _evaluate

    cost, _, _ = _evaluate(f, (0.7, KEY), {}, False)
    assert cost.terms is None  # one term: every draw weights the whole return


def test_jit_of_scg_grad_traces_once():
    traces = []

    def f(theta, key):
        traces.append(None)
        return jnp.sum(scg.sample(key, dist.Bernoulli(logits=theta)) * theta)

    g = jax.jit(scg.scg_grad(f))
    for k in jax.random.split(KEY, 3):
        g(jnp.zeros(2), k).block_until_ready()
    assert len(traces) == 1


# -- Regressions found by review: each of these once gave a biased gradient ----------------


def _whole_node_grad(theta, key, cost_of_z):
    """Same-key REINFORCE with one box over every element of one Bernoulli node."""

    def hand(theta):
        d = dist.Bernoulli(logits=theta)
        z = d.sample(key).astype(jnp.float32)
        lp = jnp.sum(z * theta - jax.nn.softplus(theta))
        return box(lp) * cost_of_z(z)

    return jax.grad(hand)(theta)


def test_fortran_order_reshape_is_not_taken_as_aligned():
    weights = jnp.array([[1.0, 2.0], [3.0, 4.0]])

    def cost_of_z(z):
        return jnp.sum(jnp.reshape(z, (2, 2), order="F") * weights)

    def f(theta, key):
        return cost_of_z(scg.sample(key, dist.Bernoulli(logits=theta)).astype(jnp.float32))

    theta = jnp.array([[0.1, -0.4], [0.3, 0.2]])
    for k in jax.random.split(KEY, 3):
        np.testing.assert_allclose(
            scg.scg_grad(f)(theta, k), _whole_node_grad(theta, k, cost_of_z), rtol=1e-5
        )


def test_float_to_int_conversion_on_the_cost_is_not_split():
    def cost_of_z(z):
        return (0.5 * z[0] + 0.5 * z[1]).astype(jnp.int32).astype(jnp.float32)

    def f(theta, key):
        return cost_of_z(scg.sample(key, dist.Bernoulli(logits=theta)).astype(jnp.float32))

    theta = jnp.array([0.2, -0.3])
    for k in jax.random.split(KEY, 4):
        np.testing.assert_allclose(
            scg.scg_grad(f)(theta, k), _whole_node_grad(theta, k, cost_of_z), rtol=1e-5
        )


def test_integer_division_on_the_cost_is_not_split():
    def f(theta, key):
        k1, k2 = jax.random.split(key)
        z1 = scg.sample(k1, dist.Bernoulli(logits=theta[0]))
        z2 = scg.sample(k2, dist.Bernoulli(logits=theta[1]))
        return lax.div(z1 + z2, 2).astype(jnp.float32)

    from scgjax._surrogate import _evaluate

    cost, _, _ = _evaluate(f, (jnp.array([0.2, -0.3]), KEY), {}, False)
    assert cost.terms is None and len(cost.deps) == 2


def test_scalar_increment_into_a_vector_carry_is_not_an_accumulator():
    # c + x with x of rank 0 broadcasts: not split into increments (once it was, and the
    # gradient came out halved); every step's draw weights the final carry.
    def f(theta, key):
        def body(c, k):
            return c + bern(k, theta) * 2.0, None

        return lax.scan(body, jnp.zeros(2), jax.random.split(key, 3))[0].sum()

    def hand(theta, key):
        zs = jnp.stack([dist.Bernoulli(logits=theta).sample(k) for k in jax.random.split(key, 3)])
        zs = zs.astype(jnp.float32)
        return box(jnp.sum(zs * theta - jax.nn.softplus(theta))) * 4.0 * zs.sum()

    for k in jax.random.split(KEY, 3):
        np.testing.assert_allclose(scg.scg_grad(f)(0.3, k), jax.grad(hand)(0.3, k), rtol=1e-5)


@pytest.mark.parametrize("wrap", ["to_event", "mask", "expand"])
def test_logit_zero_guard_reaches_wrapped_distributions(wrap):
    weights = jnp.array([1.0, -2.0, 3.0])

    def make_dist(theta):
        d = dist.Bernoulli(logits=theta)
        if wrap == "to_event":
            return d.to_event(1)
        if wrap == "mask":
            return d.mask(jnp.array([True, True, True]))
        return dist.Bernoulli(logits=theta[0]).expand((3,))

    def f(theta, key):
        z = scg.sample(key, make_dist(theta)).astype(jnp.float32)
        return jnp.sum(weights * z)

    theta = jnp.zeros(3)
    for k in jax.random.split(KEY, 3):
        z = make_dist(theta).sample(k).astype(jnp.float32)
        score = z - 0.5  # exact d/dl log p at l = 0
        if wrap == "to_event":
            expected = jnp.sum(weights * z) * score
        elif wrap == "mask":
            expected = weights * z * score
        else:
            expected = jnp.zeros(3).at[0].set(jnp.sum(weights * z * score))
        np.testing.assert_allclose(scg.scg_grad(f)(theta, k), expected, rtol=1e-5, atol=1e-6)


# -- API edge cases found by review ----------------------------------------------------------


def test_non_jax_aux_passes_through_like_jax_grad():
    def f(t, key):
        return jnp.sum(scg.sample(key, dist.Bernoulli(logits=t)) * t), {"tag": "run-1"}

    _, aux = scg.scg_grad(f, has_aux=True)(jnp.zeros(2), KEY)
    assert aux == {"tag": "run-1"}


def test_batch_of_typed_keys_is_a_type_error():
    with pytest.raises(TypeError, match="single key"):
        scg.sample(jax.random.split(KEY, 3), dist.Normal(0.0, 1.0))


def test_key_argnum_pointing_at_a_non_key_is_a_clear_error():
    def f(t, key):
        return jnp.sum(scg.sample(key, dist.Bernoulli(logits=t)) * t)

    with pytest.raises(TypeError, match="key_argnum"):
        scg.scg_grad(f, num_samples=3)(jnp.zeros(2), key=KEY)
    with pytest.raises(TypeError, match="key_argnum"):
        scg.scg_grad(f, num_samples=3, key_argnum="key")
    with pytest.raises(ValueError, match="num_samples"):
        scg.scg_grad(f, num_samples=True)


def test_describe_accepts_static_arguments_and_names_like_downstream():
    def f(t, key, n, mode):
        k1, k2 = jax.random.split(key)
        a = scg.sample(k1, dist.Bernoulli(logits=t), (n,), name="z")
        b = scg.sample(k2, dist.Bernoulli(logits=t), (n,), name="z")
        return jnp.sum(a * b * t) if mode == "prod" else jnp.sum(a * t)

    table = scg.describe(f)(jnp.zeros(2), KEY, 3, "prod")
    _, q = scg.scg_grad(f, downstream=True)(jnp.zeros(2), KEY, 3, "prod")
    assert set(q) == {"z", "z_1"}
    assert "z_1" in table and "(3, 2)" in table


def test_low_precision_cost_keeps_its_dtype_with_baselines():
    def f(t, key):
        z = scg.sample(key, dist.Bernoulli(logits=t), baseline=0.5)
        return jnp.sum(z * t).astype(jnp.bfloat16)

    assert scg.surrogate(f)(jnp.zeros(2), KEY).dtype == jnp.bfloat16
    assert (
        scg.surrogate(f, num_samples=2, baseline="leave_one_out")(jnp.zeros(2), KEY).dtype
        == jnp.bfloat16
    )


def test_gradient_variance_drops_downstream_and_compiles_once():
    traces = []

    def f(t, key):
        traces.append(None)
        return jnp.sum(scg.sample(key, dist.Bernoulli(logits=t), name="z") * t)

    gv = scg.gradient_variance(f, num_draws=8, downstream=True)
    for _ in range(2):
        mean, var = gv(jnp.zeros(2), KEY)
        assert mean.shape == (2,) and var.shape == (2,)
    assert len(traces) == 1

"""Regressions for the silent wrong gradients users found (issue 6), each written the way
the user wrote it and checked exactly (tests/exact.py) or bit for bit against `jax.grad`.

Every test here failed before its fix: the numbers in the comments are what the old
transform gave.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import scgjax as scg

try:
    from .exact import assert_exact
except ImportError:  # tests/ is not a package
    from exact import assert_exact

KEY = jax.random.key(0)


def bern(key, logits, name=None):
    return scg.sample(key, dist.Bernoulli(logits=logits), name=name).astype(jnp.result_type(logits))


# -- 1. sign flip when a subtraction broadcasts -----------------------------------------


@pytest.mark.parametrize(
    "cost",
    [
        lambda z, t: (z - t).sum(),
        lambda z, t: (z - t).mean(),
        lambda z, t: (z - t**2).sum(),
        lambda z, t: (z - jnp.sin(t)).sum(),
        lambda z, t: (t - z).sum(),
    ],
    ids=["sum", "mean", "square", "sin", "reversed"],
)
def test_broadcast_sub_without_score_term_equals_jax_grad(cost):
    # z's distribution does not depend on t: no score term, so scg_grad is jax.grad
    # bit for bit (it gave +3 instead of -3 for the first).
    def f(t, key):
        z = scg.sample(key, dist.Bernoulli(probs=jnp.full(3, 0.3))).astype(jnp.float32)
        return cost(z, t)

    t = jnp.float32(0.7)
    for k in jax.random.split(KEY, 3):
        np.testing.assert_array_equal(scg.scg_grad(f)(t, k), jax.grad(f)(t, k))


def test_broadcast_sub_with_score_term_is_unbiased():
    # mean of 1e5 estimates was 3.707 ± 0.002; exact -2.295
    def f(t, key):
        z = bern(key, t)
        return (z * jnp.ones(3) - t).sum()

    assert_exact(f, 0.4)


def test_hand_written_cross_entropy_of_hard_attention_is_unbiased():
    # log_softmax(l) * one_hot(y) by hand: 7,574 standard errors off before
    def f(params, key):
        logits_att, w = params
        k = scg.sample(key, dist.Categorical(logits=logits_att))
        glimpses = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
        scores = glimpses[k] @ w  # (classes,)
        return -(jax.nn.log_softmax(scores) * jax.nn.one_hot(1, 2)).sum()

    params = (np.array([0.2, -0.4, 0.0]), np.array([[0.3, -0.2], [0.1, 0.4]]))
    assert_exact(f, params, supports={"node0": (0, 1, 2)})


def test_decoder_with_learned_scalar_noise_is_unbiased():
    # Normal(vector_loc, scalar_scale).log_prob(x): -3.18 vs exact -1.18 before
    def f(theta, key):
        z = bern(key, theta[:3])
        x = jnp.array([0.3, -1.0, 0.8])
        return -dist.Normal(z * 2.0 - 1.0, jnp.exp(theta[3])).log_prob(x).sum()

    assert_exact(f, np.array([0.1, -0.5, 0.3, 0.2]))


def test_learned_prior_with_broadcast_logits_is_unbiased():
    # a Bernoulli log-likelihood with broadcast prior logits had the wrong sign
    def f(theta, key):
        enc, prior = theta[:3], theta[3]
        z = bern(key, enc)
        log_q = dist.Bernoulli(logits=enc).log_prob(z)
        log_p = dist.Bernoulli(logits=prior).log_prob(z)
        return (log_q - log_p).sum()

    assert_exact(f, np.array([0.4, -0.3, 0.0, 0.5]))


# -- 2. collectives in the cost ---------------------------------------------------------

XS = np.array([0.5, -1.0, 2.0])


def _lane_cost(t, x, key):
    z = scg.sample(key, dist.Bernoulli(logits=t * x), name="z").astype(t.dtype)
    c = (z - 0.5 * x) ** 2 * t
    m = lax.pmean(c, "b")
    return c - m + m**2 + lax.psum(z * t, "b")


def _lanes_exact(t):
    """Per lane, d/dt_i E[Σ_lanes cost_lane] (JAX's semantics for vmap of grad with
    collectives), with every lane's t a separate copy; enumerated over all lanes."""

    def total(tv):
        out = 0.0
        for cfg in itertools.product((0.0, 1.0), repeat=len(XS)):
            z = jnp.array(cfg)
            p = jnp.prod(jnp.where(z == 1, jax.nn.sigmoid(tv * XS), 1 - jax.nn.sigmoid(tv * XS)))
            c = (z - 0.5 * XS) ** 2 * tv
            m = jnp.mean(c)
            out = out + p * jnp.sum(c - m + m**2 + jnp.sum(z * tv))
        return out

    return jax.grad(total)(jnp.full(len(XS), t))


def test_pmean_under_vmap_axis_name_is_exact():
    # the score part was 0.0009 against an exact 0.235
    with jax.enable_x64(True):
        t = jnp.float64(0.3)
        keys = jax.random.split(KEY, len(XS))

        @jax.jit
        def estimate(z):
            return jax.vmap(
                lambda x, k, zz: scg.scg_grad(_lane_cost, draws={"z": zz})(t, x, k), axis_name="b"
            )(jnp.asarray(XS), keys, z)

        mean = 0.0
        for cfg in itertools.product((0.0, 1.0), repeat=len(XS)):
            z = jnp.array(cfg)
            p = jnp.prod(jnp.where(z == 1, jax.nn.sigmoid(t * XS), 1 - jax.nn.sigmoid(t * XS)))
            mean = mean + p * estimate(z)
        np.testing.assert_allclose(mean, _lanes_exact(t), rtol=1e-9)


def test_pmap_and_shard_map_give_the_same_estimates_as_vmap():
    # Three of the four CPU devices every test process has (tests/conftest.py).
    devices = jax.devices("cpu")[:3]
    t = jnp.float32(0.3)
    keys = jax.random.split(jax.random.key(0), 3)
    data = jax.random.key_data(keys)
    v = jax.vmap(lambda x, k: scg.scg_grad(_lane_cost)(t, x, k), axis_name="b")(XS, keys)
    p = jax.pmap(
        lambda x, k: scg.scg_grad(_lane_cost)(t, x, jax.random.wrap_key_data(k)),
        axis_name="b",
        devices=devices,
    )(XS, data)
    mesh = Mesh(np.array(devices), ("b",))
    s = jax.shard_map(
        lambda x, k: scg.scg_grad(_lane_cost)(t, x[0], jax.random.wrap_key_data(k[0]))[None],
        mesh=mesh,
        in_specs=(P("b"), P("b")),
        out_specs=P("b"),
        check_vma=False,
    )(jnp.asarray(XS, jnp.float32), data)
    np.testing.assert_allclose(p, v, rtol=1e-6)
    np.testing.assert_allclose(s, v, rtol=1e-6)


# -- 3. nested transforms ---------------------------------------------------------------


def _inner_cost(theta, key):
    z = bern(key, theta, name="z_inner")
    return (z - 0.3) ** 2 * theta**2 + z


def test_maml_with_an_inner_scg_grad_is_exact():
    # the inner draws were invisible to the outer transform: 0.8135 ± 0.007 vs 0.4490
    def f_out(theta, key):
        k1, k2 = jax.random.split(key)
        phi = theta - 0.5 * scg.scg_grad(_inner_cost)(theta, k1)
        z2 = bern(k2, phi, name="z_outer")
        return (z2 + phi) ** 2

    assert_exact(f_out, 0.4)


@pytest.mark.parametrize("inner", ["surrogate", "value_and_grad", "leave_one_out"])
def test_other_transforms_nested_hand_their_draws_to_the_outer_one(inner):
    def f_out(theta, key):
        k1, k2 = jax.random.split(key)
        if inner == "surrogate":
            g = jax.grad(scg.surrogate(_inner_cost))(theta, k1)
        elif inner == "value_and_grad":
            v, g = scg.scg_value_and_grad(_inner_cost)(theta, k1)
            g = g + 0.1 * v
        else:
            g = scg.scg_grad(_inner_cost, num_samples=2, baseline="leave_one_out")(theta, k1)
        z2 = bern(k2, theta - 0.5 * g, name="z_outer")
        return (z2 - g) ** 2

    sites = scg.trace(f_out)(jnp.float32(0.4), KEY).sites
    assert sum(s.distribution == "BernoulliLogits" for s in sites.values()) == 2
    supports = {n: (0, 1) for n in sites}
    if inner == "leave_one_out":  # the inner site has a leading axis of 2 samples
        assert sites["z_inner"].value.shape == (2,)
    assert_exact(f_out, 0.4, supports=supports, hessian=inner != "leave_one_out")


def test_gradient_of_a_gradient_estimate_is_still_unbiased_for_the_hessian():
    # Under plain JAX transforms the inner boxes keep DiCE's derivatives: the Jacobian of
    # scg_grad is an unbiased Hessian estimate (LOLA-DiCE style).
    def f(theta, key):
        z = bern(key, theta[0])
        return (z * theta[1] - 1.0) ** 2

    with jax.enable_x64(True):
        theta = jnp.array([0.3, -0.8])
        total = 0.0
        for z in (0.0, 1.0):
            p = jnp.where(z == 1, jax.nn.sigmoid(theta[0]), 1 - jax.nn.sigmoid(theta[0]))
            total = total + p * jax.jacfwd(scg.scg_grad(f, draws={"node0": z}))(theta, KEY)

        def expected(th):
            p1 = jax.nn.sigmoid(th[0])
            return p1 * (th[1] - 1.0) ** 2 + (1 - p1)

        np.testing.assert_allclose(total, jax.hessian(expected)(theta), rtol=1e-9)


# -- 4. d.mask(m) -------------------------------------------------------------------------


def test_masked_out_draw_that_reaches_the_cost_keeps_its_score_term():
    # [0.248, 0.000, 0.958] vs exact [0.248, -0.470, 0.961]
    def f(theta, key):
        z = scg.sample(key, dist.Bernoulli(logits=theta).mask(jnp.array([True, False, True])))
        z = z.astype(theta.dtype)
        return (z * jnp.array([1.0, -2.0, 4.0])).sum() + z[1] * z[2]

    assert_exact(f, np.array([0.2, -0.4, 0.6]), supports={"node0": (0, 1)})


# -- 5. second order at logits exactly 0 inside lax.scan --------------------------------


def test_guarded_log_prob_has_the_same_hessian_in_and_out_of_scan():
    # The custom_jvp guard lost its rule inside a scan under jax.hessian (forward over
    # reverse): [[0.125, 0.75], [2.25, 3]] instead of [[0, 0.75], [0.75, 3]].
    from scgjax._logprob import score_log_prob

    def lp(l, v):
        return score_log_prob(dist.Bernoulli(logits=l), v)

    def in_scan(p, a):
        return lax.scan(lambda c, x: (c + jnp.exp(lp(p[0] * p[1], x)) * p[1] ** 2, None), 0.0, a)[0]

    def unrolled(p, a):
        return sum(jnp.exp(lp(p[0] * p[1], x)) * p[1] ** 2 for x in a)

    def reference(p, a):
        l = p[0] * p[1]
        return sum(jnp.exp(x * l - jnp.log1p(jnp.exp(l))) * p[1] ** 2 for x in a)

    with jax.enable_x64(True):
        p, a = jnp.array([0.0, 1.0]), jnp.array([1.0, 0.0, 1.0])
        want = jax.hessian(reference)(p, a)
        for fn in (in_scan, unrolled):
            for hess in (
                jax.hessian,
                lambda g: jax.jacrev(jax.jacfwd(g)),
                lambda g: jax.jacfwd(jax.jacfwd(g)),
                lambda g: jax.jacrev(jax.jacrev(g)),
            ):
                np.testing.assert_allclose(hess(fn)(p, a), want, rtol=1e-12, atol=1e-15)


def ipd_cost(theta, key, steps=3):
    """A small iterated prisoner's dilemma: two agents, logits per previous joint action
    (5 states: start + 4), payoffs of agent 0 (a cost), T steps in a scan."""
    th0, th1 = theta[:5], theta[5:]
    payoff = jnp.array([[1.0, 3.0], [0.0, 2.0]])  # cost of agent 0: (a0, a1)

    def step(state, k):
        k0, k1 = jax.random.split(k)
        a0 = scg.sample(k0, dist.Bernoulli(logits=th0[state])).astype(jnp.int32)
        a1 = scg.sample(k1, dist.Bernoulli(logits=th1[state])).astype(jnp.int32)
        return 1 + 2 * a0 + a1, payoff[a0, a1]

    _, costs = lax.scan(step, jnp.zeros((), jnp.int32), jax.random.split(key, steps))
    return jnp.dot(costs, 0.9 ** jnp.arange(steps))


def test_hessian_at_zero_logits_inside_a_scan_is_exact():
    # one logit at 0 made its Hessian column 40–180 standard errors off (LOLA defected)
    theta = np.zeros(10)
    theta[[1, 6]] = [0.3, -0.2]
    assert_exact(lambda t, k: ipd_cost(t, k, steps=2), theta)


# -- Found in review: a parameter's alignment is judged for the distribution it belongs to -


def test_expanded_categorical_whose_logits_length_equals_the_batch_is_exact():
    # `Categorical(logits (K,)).expand((B,))` with B == K: the logits' category axis was
    # taken as the batch axis, so query b was credited to gate b only.
    # E[scg_grad] was [-0.088, 0.266, -1.334] against the exact [-0.352, 0.355, -1.334].
    def f(t, key):
        k1, k2 = jax.random.split(key)
        gate = bern(k1, t[:2], name="gate")
        logits = jnp.where(gate > 0, 0.0, -2.0) + t[2] * jnp.array([1.0, -1.0])
        k = scg.sample(k2, dist.Categorical(logits=logits).expand((2,)), name="k")
        return (k.astype(t.dtype) * jnp.array([1.0, 3.0])).sum()

    assert_exact(f, np.array([0.4, -0.3, 0.2]), supports={"k": (0, 1)})


def test_mixture_whose_mixing_logits_length_equals_the_batch_is_exact():
    # MixtureSameFamily(Categorical(logits (K,)), components (B, K)) with B == K.
    def f(t, key):
        k1, k2 = jax.random.split(key)
        on = bern(k1, t, name="on")
        mixing = dist.Categorical(logits=jnp.where(on > 0, 0.0, -3.0))
        comp = dist.Bernoulli(logits=jnp.array([[2.0, -2.0], [1.5, -1.0]]))
        x = scg.sample(k2, dist.MixtureSameFamily(mixing, comp), name="x")
        return (x.astype(t.dtype) * jnp.array([1.0, 3.0])).sum()

    assert_exact(f, np.array([0.3, -0.5]), supports={"x": (0, 1)})


@pytest.mark.parametrize(
    "wrap",
    [
        lambda logits: dist.Bernoulli(logits=logits).expand((3,)),
        lambda logits: dist.Bernoulli(logits=logits).mask(jnp.array([True, False, True])),
        lambda logits: dist.ZeroInflatedDistribution(
            dist.Poisson(jnp.exp(logits)), gate_logits=-logits
        ),
        lambda logits: dist.MixtureSameFamily(
            dist.Categorical(logits=jnp.stack([logits, -logits], -1)),
            dist.Bernoulli(logits=jnp.array([[2.0, -2.0]] * 3)),
        ),
    ],
    ids=["expand-noop", "mask", "zero-inflated", "mixture"],
)
def test_wrappers_of_the_same_batch_shape_stay_aligned(wrap):
    # the sound fallback must not cost the plates their variance reduction: element i of
    # the second draw reads element i of the first only
    def f(t, key):
        k1, k2 = jax.random.split(key)
        a = bern(k1, t, name="a")
        b = scg.sample(k2, wrap(t + a), name="b").astype(t.dtype)
        return (b * jnp.arange(1.0, 4.0)).sum()

    text = scg.describe(f)(jnp.array([0.1, -0.2, 0.3]), KEY)
    row = next(line for line in text.splitlines() if line.startswith("b "))
    assert "0: plate" in row, text


# -- Found in review: softplus in other discrete log-densities, logit 0 in a scan ---------


@pytest.mark.parametrize(
    "make, support",
    [
        (lambda l: dist.Geometric(logits=l), 60),
        (lambda l: dist.NegativeBinomialLogits(2.0, l), 70),
        (lambda l: dist.ZeroInflatedDistribution(dist.Poisson(2.0), gate_logits=l), 40),
        (lambda l: dist.Binomial(3, logits=l), 4),
    ],
    ids=["geometric", "negative-binomial", "zero-inflated", "binomial"],
)
def test_softplus_log_densities_have_exact_hessians_at_logit_zero_in_a_scan(make, support):
    # A logit that depends on the carry is computed inside the scan body, where JAX 0.10's
    # forward-over-reverse differentiates softplus's kinks: a Geometric's E[hessian] was
    # -14.8 against an exact 5 at t = 0 (the first derivatives were right).
    def f(t, key):
        def step(c, k):
            a = scg.sample(k, make(t[0] * (1.0 + c) + t[1] * c), name="a").astype(t.dtype)
            return c + 1.0, a * (1.0 + c)

        return lax.scan(step, 0.0, jax.random.split(key, 2))[1].sum()

    assert_exact(f, np.zeros(2), supports={"a": tuple(range(support))})


# -- Found in review: a literal parameter under vmap ---------------------------------------


def _in_scan(draw):
    return lambda t, k: lax.scan(lambda c, kk: (c, draw(t, kk)), 0.0, jax.random.split(k, 2))[
        1
    ].sum()


@pytest.mark.parametrize(
    "f",
    [
        lambda t, k: scg.sample(k, dist.Normal(0.0, 1.0)) * t,
        jax.jit(lambda t, k: scg.sample(k, dist.Binomial(3, logits=t)).astype(t.dtype) * t),
        jax.checkpoint(lambda t, k: scg.sample(k, dist.Binomial(3, logits=t)).astype(t.dtype) * t),
        _in_scan(
            lambda t, k: scg.sample(k, dist.NegativeBinomialLogits(2.0, t)).astype(t.dtype) * t
        ),
        _in_scan(lambda t, k: scg.sample(k, dist.Normal(0.0, 1.0)) * t),
        _in_scan(lambda t, k: scg.sample(k, dist.Bernoulli(probs=0.5)) * t),
    ],
    ids=[
        "eager-normal",
        "jit-binomial",
        "checkpoint-binomial",
        "scan-negbin",
        "scan-normal",
        "scan-bernoulli",
    ],
)
def test_literal_parameters_batch_under_vmap(f):
    # A Python-scalar parameter is a literal in a jaxpr; batching `sample_p` read its
    # `.shape` and crashed every vmap of such a program (a Gaussian policy's fixed scale).
    t = jnp.float32(0.3)
    keys = jax.random.split(KEY, 2)
    one, value = jax.jit(scg.scg_grad(f)), jax.jit(f)
    got = jax.vmap(scg.scg_grad(f), (None, 0))(t, keys)
    np.testing.assert_allclose(got, jnp.stack([one(t, k) for k in keys]), rtol=1e-6)
    draws = jax.vmap(jax.jit(f), (None, 0))(t, keys)
    np.testing.assert_allclose(draws, jnp.stack([value(t, k) for k in keys]), rtol=1e-6)


# -- Found in review: guards inside mixtures, Delta, alignment under vmap --------------


@pytest.mark.parametrize("mixture", ["same-family", "general"])
def test_guarded_components_of_a_mixture_at_logit_zero_are_exact(mixture):
    # The guards only followed `base_dist`: Bernoulli components kept numpyro's kinked
    # log_prob, and E[scg_grad] was exactly twice the gradient ([1.245, 0.755] vs
    # [0.622, 0.378]) at t = 0.
    def f(t, key):
        if mixture == "same-family":
            comp = dist.Bernoulli(logits=jnp.stack([t[0] * jnp.ones(2), t[1] * jnp.ones(2)], -1))
            d = dist.MixtureSameFamily(dist.Categorical(logits=jnp.array([0.3, -0.2])), comp)
        else:
            comps = [
                dist.Bernoulli(logits=t[0] * jnp.ones(2)),
                dist.Bernoulli(logits=t[1] * jnp.ones(2)),
            ]
            d = dist.MixtureGeneral(dist.Categorical(logits=jnp.array([0.3, -0.2])), comps)
        x = scg.sample(key, d, name="x")
        return (x.astype(t.dtype) * jnp.array([1.0, 3.0])).sum() * (1 + t[0] ** 2)

    assert_exact(f, np.zeros(2), supports={"x": (0, 1)})


def test_geometric_components_of_a_mixture_in_a_scan_have_exact_hessians_at_zero():
    # E[hessian] was [[-57.6, -46.3], [-13.2, -15.6]] for an exact [[19.2, -12.1], [-12.1, -9.5]].
    def f(t, key):
        def step(c, k):
            logits = (t[0] * (1.0 + c) + t[1] * c) * jnp.array([1.0, 2.0])
            d = dist.MixtureSameFamily(
                dist.Categorical(logits=jnp.array([0.3, -0.2])), dist.Geometric(logits=logits)
            )
            return c + 1.0, scg.sample(k, d, name="a").astype(t.dtype) * (1.0 + c)

        return lax.scan(step, 0.0, jax.random.split(key, 2))[1].sum()

    assert_exact(f, np.zeros(2), supports={"a": tuple(range(60))})


def test_a_delta_draw_is_a_deterministic_value():
    # Delta's constraint is `dependent`, whose `event_dim` raises: every Delta draw crashed.
    def f(t, key):
        return (scg.sample(key, dist.Delta(2 * t)) ** 2).sum()

    np.testing.assert_allclose(scg.scg_grad(f)(jnp.array([0.5, 1.0]), KEY), [4.0, 8.0])


def test_parameters_stay_aligned_under_vmap():
    # The alignment check compared the vmapped leaf shapes with the per-example batch
    # shape, so under vmap every parameter reached every element (variance, not bias).
    def f(t, key):
        k1, k2 = jax.random.split(key)
        a = bern(k1, t, name="a")
        return (bern(k2, t + a, name="b") * jnp.arange(1.0, 4.0)).sum()

    def batched(t, key):
        return jax.vmap(f, (None, 0))(t, jax.random.split(key, 2)).sum()

    text = scg.describe(batched)(jnp.array([0.1, -0.2, 0.3]), KEY)
    row = next(line for line in text.splitlines() if line.startswith("a "))
    assert "0: plate, 1: plate" in row, text


def test_binomial_guard_keeps_the_derivative_in_total_count():
    from scgjax import _logprob

    def lp(n, fn):
        return fn(dist.Binomial(n, logits=jnp.float32(0.4)), jnp.float32(2.0))

    got = jax.grad(lambda n: lp(n, _logprob.score_log_prob))(jnp.float32(3.0))
    want = jax.grad(lambda n: lp(n, lambda d, v: d.log_prob(v)))(jnp.float32(3.0))
    np.testing.assert_allclose(got, want, rtol=1e-5)

"""Trace-time checks: a warning where a `jax.random` draw's gradient is lost, silence where
the gradient is right, and a refusal for score-function draws whose support moves with
the differentiated parameters."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from helpers import assert_mc_close, mc_draws
from jax import lax
from numpyro import handlers

import scgjax as scg

KEY = jax.random.key(0)
LostGradientWarning = scg.LostGradientWarning


def lost_gradient_message(fn, *args) -> str:
    """Runs `fn(*args)`; asserts exactly one LostGradientWarning and returns its text."""
    with pytest.warns(LostGradientWarning) as record:
        fn(*args)
    lost = [w for w in record if issubclass(w.category, LostGradientWarning)]
    assert len(lost) == 1, [str(w.message) for w in lost]
    return str(lost[0].message)


def assert_silent(fn, *args):
    """Runs `fn(*args)` with LostGradientWarning as an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", LostGradientWarning)
        return fn(*args)


def normal_site(key, t):
    """A pathwise draw, so that a program has a sample site."""
    return scg.sample(key, dist.Normal(t, 1.0))


# -- Lost gradients: draws that bypass scg.sample ------------------------------------------


def f_bernoulli(t, key):
    k1, k2 = jax.random.split(key)
    z = jax.random.bernoulli(k1, jax.nn.sigmoid(t)).astype(jnp.float32)
    return (z - 2.0) ** 2 + normal_site(k2, t)


def test_jax_random_bernoulli_with_a_differentiated_probability_warns():
    message = lost_gradient_message(scg.scg_grad(f_bernoulli), 0.0, KEY)
    assert "test_lint.py" in message and "f_bernoulli" in message
    assert "comparison lt" in message
    assert "scg.sample" in message and "dist.Bernoulli" in message


def test_jax_random_categorical_warns():
    def f(logits, key):
        k1, k2 = jax.random.split(key)
        a = jax.random.categorical(k1, logits)
        return jnp.array([1.0, 2.0, 5.0])[a] + normal_site(k2, logits[0])

    message = lost_gradient_message(scg.scg_grad(f), jnp.zeros(3), KEY)
    assert "argmax" in message and "Categorical" in message


def test_numpyro_distribution_sample_warns_naming_the_users_line():
    def f(t, key):
        z = dist.Bernoulli(logits=t).sample(key)
        return z + normal_site(key, t) * 0.0

    message = lost_gradient_message(scg.scg_grad(f), 0.3, KEY)
    assert "test_lint.py" in message and "inside numpyro" in message


def test_numpyro_sample_under_seed_warns():
    def model(t):
        return numpyro.sample("z", dist.Bernoulli(logits=t))

    def f(t, key):
        k1, k2 = jax.random.split(key)
        with handlers.seed(rng_seed=k1):
            z = model(t)
        return z * 3.0 + normal_site(k2, t)

    assert "model" in lost_gradient_message(scg.scg_grad(f), 0.3, KEY)


def test_lost_draw_inside_jit_scan_and_vmap_warns():
    @jax.jit
    def step_cost(t, key):
        return jax.random.bernoulli(key, jax.nn.sigmoid(t)).astype(jnp.float32)

    def in_jit(t, key):
        return step_cost(t, key) + normal_site(key, t)

    def in_scan(t, key):
        def body(c, k):
            return c + step_cost(t, k), None

        total, _ = lax.scan(body, 0.0, jax.random.split(key, 3))
        return total + normal_site(key, t)

    def in_vmap(t, key):
        z = jax.vmap(lambda k: jax.random.bernoulli(k, jax.nn.sigmoid(t)))(jax.random.split(key, 4))
        return z.astype(jnp.float32).sum() + normal_site(key, t)

    for f in (in_jit, in_scan, in_vmap):
        lost_gradient_message(scg.scg_grad(f), 0.3, KEY)
    keys = jax.random.split(KEY, 2)
    lost_gradient_message(jax.vmap(scg.scg_grad(f_bernoulli), (None, 0)), 0.3, keys)
    lost_gradient_message(jax.jit(scg.scg_grad(f_bernoulli)), 0.3, KEY)


def test_every_differentiation_is_seen_forward_reverse_and_batched():
    surrogate = scg.surrogate(f_bernoulli)
    for fn in (
        jax.grad(surrogate),
        jax.jacfwd(surrogate),
        jax.hessian(surrogate),
        lambda t, k: jax.jvp(lambda t: surrogate(t, k), (t,), (1.0,)),
    ):
        lost_gradient_message(fn, 0.3, KEY)
    thetas = jnp.array([0.1, 0.2])
    lost_gradient_message(jax.vmap(scg.scg_grad(f_bernoulli), (0, None)), thetas, KEY)
    lost_gradient_message(
        jax.grad(lambda ts, k: jax.vmap(surrogate, (0, None))(ts, k).sum()), thetas, KEY
    )


def test_one_warning_lists_every_site():
    def f(t, key):
        k1, k2, k3 = jax.random.split(key, 3)
        z = jax.random.bernoulli(k1, jax.nn.sigmoid(t)).astype(jnp.float32)
        a = jax.random.categorical(k2, jnp.stack([t, -t]))
        return z + a + normal_site(k3, t)

    message = lost_gradient_message(scg.scg_grad(f), 0.3, KEY)
    assert "comparison lt" in message and "argmax" in message and "random draws" in message


def test_the_warning_points_at_the_users_call_and_can_be_an_error():
    with pytest.warns(LostGradientWarning) as record:
        scg.scg_grad(f_bernoulli)(0.3, KEY)
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=scg.LostGradientWarning)
        with pytest.raises(scg.LostGradientWarning):
            scg.scg_grad(f_bernoulli)(0.3, KEY)
    assert issubclass(scg.LostGradientWarning, UserWarning)


def test_gumbel_max_trick_warns():
    def f(logits, key):
        k1, k2 = jax.random.split(key)
        a = jnp.argmax(logits + jax.random.gumbel(k1, logits.shape))
        return jax.nn.one_hot(a, 3) @ jnp.array([1.0, 2.0, 5.0]) + normal_site(k2, logits[0])

    lost_gradient_message(scg.scg_grad(f), jnp.zeros(3), KEY)


def test_thresholds_used_as_numbers_warn():
    def noisy(t, key):
        k1, k2 = jax.random.split(key)
        return t + jax.random.normal(k1, (3,)), normal_site(k2, t)

    def as_float(t, key):
        x, w = noisy(t, key)
        return (x > 1.0).astype(jnp.float32).sum() + w

    def selects_constants(t, key):
        x, w = noisy(t, key)
        return jnp.where(x > 1.0, 1.0, 0.0).sum() + w

    def selects_a_parameter(t, key):
        x, w = noisy(t, key)
        return jnp.where(x > 1.0, t, 0.0).sum() + w

    def against_a_parameter(t, key):
        x, w = noisy(t, key)
        return jnp.where(x > 2.0 * t, x, 0.0).sum() + w

    def as_an_index(t, key):
        x, w = noisy(t, key)
        return lax.select_n((x > 1.0).astype(jnp.int32), x, 2.0 * x).sum() + w

    def in_cond(t, key):
        x, w = noisy(t, key)
        return lax.cond(x[0] > 1.0, lambda: 1.0, lambda: 0.0) + w

    for f in (
        as_float,
        selects_constants,
        selects_a_parameter,
        against_a_parameter,
        as_an_index,
        in_cond,
    ):
        assert "comparison gt" in lost_gradient_message(scg.scg_grad(f), 0.3, KEY)


def test_floor_round_and_integer_casts_warn():
    def make(op):
        def f(t, key):
            k1, k2 = jax.random.split(key)
            x = t * 4.0 + jax.random.normal(k1)
            return op(x) + normal_site(k2, t)

        return f

    for op, what in (
        (jnp.floor, "floor"),
        (jnp.round, "round"),
        (lambda x: x.astype(jnp.int32).astype(jnp.float32), "cast to int32"),
    ):
        assert what in lost_gradient_message(scg.scg_grad(make(op)), 0.3, KEY)


def test_a_draw_whose_parameter_is_a_pathwise_sample_warns():
    def f(t, key):
        k1, k2 = jax.random.split(key)
        x = scg.sample(k1, dist.Normal(t, 1.0))  # pathwise: differentiable in t
        return jax.random.bernoulli(k2, jax.nn.sigmoid(x)).astype(jnp.float32)

    lost_gradient_message(scg.scg_grad(f), 0.3, KEY)


def test_a_lost_draw_feeding_a_sample_site_warns():
    def f(t, key):
        k1, k2 = jax.random.split(key)
        z = jax.random.bernoulli(k1, jax.nn.sigmoid(t)).astype(jnp.float32)
        return scg.sample(k2, dist.Normal(3.0 * z, 1.0))

    lost_gradient_message(scg.scg_grad(f), 0.3, KEY)


def test_gamma_draws_keep_their_gradient_into_a_threshold():
    def f(t, key):
        k1, k2 = jax.random.split(key)
        g = jax.random.gamma(k1, jnp.exp(t))
        return (g > 1.0).astype(jnp.float32) + normal_site(k2, t)

    lost_gradient_message(scg.scg_grad(f), 0.3, KEY)


def test_a_threshold_carried_through_scan_warns():
    def f(t, key):
        def body(x, k):
            x = x + jax.random.normal(k)  # PRNG bits from the second step on
            return x, (x > 1.0).astype(jnp.float32)

        _, hits = lax.scan(body, t, jax.random.split(key, 3))
        return hits.sum() + normal_site(key, t)

    lost_gradient_message(scg.scg_grad(f), 0.3, KEY)


def test_a_while_loop_whose_trip_count_depends_on_a_lost_draw_warns():
    def f(t, key):
        def cond(s):
            return s[1] < 2.0

        def body(s):
            i, x, k = s
            k, sub = jax.random.split(k)
            return i + 1, x + t + jax.random.normal(sub), k

        steps, _, _ = lax.while_loop(cond, body, (0, 0.0, key))
        return steps.astype(jnp.float32) + normal_site(key, t)

    # Forward mode: JAX cannot reverse-differentiate a while_loop.
    lost_gradient_message(jax.jacfwd(scg.surrogate(f)), 0.3, KEY)


def test_a_program_without_sample_sites_whose_cost_is_random_warns():
    def f(t, key):
        return (jax.random.normal(key) * t) ** 2

    message = lost_gradient_message(scg.scg_grad(f), 0.3, KEY)
    assert "no scg.sample" in message


def test_both_rules_share_one_warning():
    def f(t, key):
        return jax.random.bernoulli(key, jax.nn.sigmoid(t)).astype(jnp.float32)

    message = lost_gradient_message(scg.scg_grad(f), 0.3, KEY)
    assert "comparison lt" in message and "no scg.sample" in message


# -- Lost gradients: scg.sample draws whose estimator differentiates through the value -------


def test_a_pathwise_draw_thresholded_into_a_step_warns_naming_the_draw_and_the_step():
    """E[1(x > 0)] for x ~ Normal(t, 1) has derivative phi(t); the pathwise derivative of
    the step is 0 everywhere, so scg_grad's estimate would be 0: a silent zero gradient."""

    def f(t, key):
        x = scg.sample(key, dist.Normal(t, 1.0), name="x")
        return jnp.where(x > 0, 1.0, 0.0)

    message = lost_gradient_message(scg.scg_grad(f), 0.3, KEY)
    assert "Normal (pathwise, 'x') at" in message and "test_lint.py" in message
    assert "comparison gt" in message and "estimator='score'" in message
    assert "without scg.sample" not in message  # not the raw-PRNG message


@pytest.mark.parametrize(
    "estimator, make, what",
    [
        ("rebar", lambda l: dist.Bernoulli(logits=l), "round"),
        ("relax", lambda l: dist.Bernoulli(logits=l), "cast to int32"),
        ("gumbel_softmax", lambda l: dist.Bernoulli(logits=l), "round"),
        ("straight_through", lambda l: dist.Categorical(logits=jnp.stack([l, -l])), "argmax"),
        ("rebar", lambda l: dist.Categorical(logits=jnp.stack([l, -l])), "argmax"),
    ],
)
def test_rounding_a_value_the_estimator_differentiates_through_warns(estimator, make, what):
    """REBAR/RELAX evaluate the program at relaxed values and differentiate through them:
    a rounded draw gives (1 - eta) x the score estimate (0 at eta = 1); a relaxation or
    straight-through rounded back is a zero gradient."""
    table = jnp.array([0.3, 2.0])

    def f(l, key):
        v = scg.sample(key, make(l), estimator=estimator)
        if v.ndim:  # a one-hot Categorical value
            return table[jnp.argmax(v)]
        index = jnp.round(v) if what == "round" else v.astype(jnp.int32)
        return (index - 0.45) ** 2

    message = lost_gradient_message(scg.scg_grad(f), 0.3, KEY)
    assert f"({estimator})" in message and what in message


def test_a_pathwise_draw_deciding_a_cond_warns():
    def f(t, key):
        x = scg.sample(key, dist.Normal(t, 1.0))
        return lax.cond(x > 0, lambda: 2.0, lambda: -1.0)

    assert "comparison gt" in lost_gradient_message(scg.scg_grad(f), 0.3, KEY)


def test_a_pathwise_draw_indexing_a_table_in_a_scan_under_jit_warns():
    def f(t, key):
        def step(c, k):
            x = scg.sample(k, dist.Normal(t, 1.0))
            return c + jnp.array([0.0, 1.0, 3.0])[jnp.clip(x, 0, 2).astype(jnp.int32)], None

        return lax.scan(step, 0.0, jax.random.split(key, 3))[0]

    lost_gradient_message(jax.jit(scg.scg_grad(f)), 0.3, KEY)


def test_the_same_step_with_estimator_score_is_silent_and_unbiased():
    """The fix the warning names: the score-function estimator of d/dt E[1(x > 0)] =
    phi(t). 4000 draws: the tolerance (4 standard errors, about 0.03) detects the zero
    gradient that the pathwise estimate gives."""

    def f(t, key):
        x = scg.sample(key, dist.Normal(t, 1.0), estimator="score")
        return jnp.where(x > 0, 1.0, 0.0)

    assert_silent(scg.scg_grad(f), 0.3, KEY)
    grads = mc_draws(lambda k: scg.scg_grad(f)(0.3, k), n=4000, seed=1)
    assert_mc_close(grads, jax.scipy.stats.norm.pdf(0.3), n_sigma=4.0)


def test_continuous_functions_of_a_pathwise_draw_are_silent():
    """Piecewise but continuous (ReLU, leaky ReLU, clipping, abs, max), a numerical guard,
    and a step under stop_gradient: the pathwise derivative is right."""

    def make(fn):
        def f(t, key):
            x = scg.sample(key, dist.Normal(t * jnp.linspace(-2.0, 2.0, 5), 1.0))
            return fn(x).sum()

        return f

    for fn in (
        jax.nn.relu,
        jax.nn.leaky_relu,
        lambda x: jnp.where(x > 0, x, 0.1 * x),
        lambda x: jnp.clip(x, -1.0, 1.0),
        jnp.abs,
        lambda x: jnp.maximum(x, 0.5),
        lambda x: jnp.where(jnp.isfinite(x), x**2, 0.0),
        lambda x: jnp.sort(x) * jnp.arange(5.0),
        lambda x: x * lax.stop_gradient(jnp.where(x > 0, 1.0, 0.0)),
        jax.nn.logsumexp,
    ):
        assert_silent(scg.scg_grad(make(fn)), 0.3, KEY)


def test_a_reparameterization_by_hand_of_a_fixed_draw_thresholded_warns():
    """`t + eps` with `eps ~ Normal(0, 1)` drawn by scg.sample: d/dt E[1(t + eps > 0)] =
    phi(t), the pathwise estimate 0 (found in review: only draws whose own parameters
    were differentiated were followed)."""

    def f(t, key):
        eps = scg.sample(key, dist.Normal(0.0, 1.0))
        return jnp.where(t + eps > 0, 1.0, 0.0)

    def g(t, key):
        x = scg.sample(key, dist.Normal(0.0, 1.0))
        return jnp.floor(t + x) + (x > t).astype(jnp.float32)

    lost_gradient_message(scg.scg_grad(f), 0.3, KEY)
    assert "floor" in lost_gradient_message(scg.scg_grad(g), 0.3, KEY)


def test_heaviside_of_a_pathwise_draw_warns():
    """`jnp.heaviside` guards NaN with `where(isnan(x), x, h)`: the case taken is the
    constant step, which must not pass for a function of `x`."""

    def f(t, key):
        x = scg.sample(key, dist.Normal(t, 1.0))
        return 2.0 * jnp.heaviside(x, 0.5) + x

    lost_gradient_message(scg.scg_grad(f), 0.3, KEY)


@pytest.mark.parametrize(
    "fn",
    [
        lambda x, t: (x > 0).astype(jnp.float32) * t,  # a step times a parameter
        lambda x, t: (x > 0) * 5.0 + x,  # a bonus for crossing
        lambda x, t: x * (1.0 - (x > 1.0).astype(jnp.float32)) - jnp.where(x > 0, 1.0, -1.0),
        lambda x, t: jnp.sign(x) + x,
    ],
    ids=["step_times_parameter", "bonus", "termination", "sign_plus"],
)
def test_steps_used_as_numbers_warn(fn):
    def f(t, key):
        x = scg.sample(key, dist.Normal(t, 1.0))
        return fn(x, t)

    lost_gradient_message(scg.scg_grad(f), 0.3, KEY)


@pytest.mark.parametrize(
    "fn, exact",
    [
        (lambda x: x * (x > 0), None),  # ReLU written as a mask
        (lambda x: jnp.where(x > 0, 1.0, -1.0) * x, None),  # |x|
        (lambda x: jnp.sign(x) * jnp.log1p(jnp.abs(x)), None),  # symlog (DreamerV3)
        (lambda x: lax.cond(x > 0, lambda y: y, lambda y: 0.01 * y, x), None),  # leaky ReLU
        (lambda x: jnp.linalg.solve(jnp.array([[2.0, 0.5], [0.5, 1.0]]) + x**2, jnp.ones(2)), None),
        (lambda x: jnp.linalg.det(jnp.eye(2) * x + 1.0), None),
    ],
    ids=["relu_mask", "abs_by_sign", "symlog", "cond_leaky_relu", "solve", "det"],
)
def test_continuous_programs_written_with_steps_are_silent_and_right(fn, exact):
    """Found in review: each warned, and the pathwise gradient is right. 2000 draws of the
    estimate against jax.grad of the expectation by Gauss-Hermite quadrature (5 s.e.)."""

    def f(t, key):
        x = scg.sample(key, dist.Normal(t, 1.0))
        return jnp.sum(fn(x))

    assert_silent(scg.scg_grad(f), 0.3, KEY)
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()
    expectation = lambda t: jnp.sum(  # noqa: E731
        jnp.asarray(weights) * jax.vmap(lambda z: jnp.sum(fn(t + z)))(jnp.asarray(nodes))
    )
    grads = mc_draws(lambda k: scg.scg_grad(f)(0.3, k), n=2000, seed=3)
    assert_mc_close(grads, jax.grad(expectation)(0.3), n_sigma=5.0)


def test_a_threshold_on_a_pathwise_draw_of_fixed_parameters_is_silent():
    def f(t, key):
        k1, k2 = jax.random.split(key)
        x = scg.sample(k1, dist.Normal(0.0, 1.0))  # nothing differentiated reaches it
        return jnp.where(x > 0, t, t**2) + normal_site(k2, t)

    assert_silent(scg.scg_grad(f), 0.3, KEY)


# -- No warning where the gradient is right --------------------------------------------------


def test_env_noise_on_states_reached_through_score_actions_is_silent():
    """A gymnax-like environment: its own jax.random noise and thresholds on states that
    depend on the parameters only through score-function actions."""

    def step(state, action, key):
        k1, k2 = jax.random.split(key)
        slip = jax.random.bernoulli(k1, 0.1)
        move = jnp.where(slip, 0.0, 2.0 * action - 1.0)
        state = state + move + 0.1 * jax.random.normal(k2)
        done = state > 3.0
        reward = jnp.where(done, 10.0, -jnp.abs(state)) - done.astype(jnp.float32)
        return state, reward

    def discrete(theta, state, key):
        logits = theta[0] * state + theta[1]
        return scg.sample(key, dist.Bernoulli(logits=logits)).astype(jnp.float32)

    def continuous(theta, state, key):  # REINFORCE on a Gaussian policy
        mean = jax.nn.sigmoid(theta[0] * state + theta[1])
        return scg.sample(key, dist.Normal(mean, 0.3), estimator="score")

    def make(policy):
        def f(theta, key):
            def body(state, k):
                ka, ke = jax.random.split(k)
                return step(state, policy(theta, state, ka), ke)

            s0 = jax.random.uniform(key, minval=-0.5, maxval=0.5)
            _, rewards = lax.scan(body, s0, jax.random.split(key, 5))
            return -rewards.sum()

        return f

    for policy in (discrete, continuous):
        assert_silent(scg.scg_grad(make(policy)), jnp.array([0.5, 0.1]), KEY)


def test_draws_no_differentiated_input_reaches_are_silent():
    def dropout(w, key):
        k1, k2 = jax.random.split(key)
        h = jnp.tanh(w * jnp.arange(4.0))
        mask = jax.random.bernoulli(k1, 0.9, h.shape)
        h = jnp.where(mask, h / 0.9, 0.0)
        return h.sum() + normal_site(k2, w)

    def augmentation(w, key):
        k1, k2, k3 = jax.random.split(key, 3)
        x = jnp.arange(8.0)
        x = jnp.where(jax.random.bernoulli(k1, 0.5), x[::-1], x)
        start = jax.random.randint(k2, (), 0, 4)
        crop = lax.dynamic_slice(x, (start,), (4,))
        return jnp.sum((w * crop) ** 2) + normal_site(k3, w)

    for f in (dropout, augmentation):
        assert_silent(scg.scg_grad(f), 0.3, KEY)


def test_reparameterized_draws_are_silent():
    def normal(sigma, key):
        k1, k2 = jax.random.split(key)
        return (jax.random.normal(k1) * sigma) ** 2 + normal_site(k2, sigma)

    def gamma(a, key):
        k1, k2 = jax.random.split(key)
        return jax.random.gamma(k1, jnp.exp(a)) + normal_site(k2, a)

    for f in (normal, gamma):
        assert_silent(scg.scg_grad(f), 0.3, KEY)


def test_a_fixed_threshold_on_a_draw_selecting_differentiable_cases_is_silent():
    def f(t, key):
        k1, k2 = jax.random.split(key)
        u = jax.random.uniform(k1)
        return jnp.where(u < 0.5, t**2, jnp.sin(t)) + normal_site(k2, t)

    g = assert_silent(scg.scg_grad(f), 0.3, KEY)
    u = jax.random.uniform(jax.random.split(KEY)[0])
    np.testing.assert_allclose(g, (2 * 0.3 if u < 0.5 else np.cos(0.3)) + 1.0, rtol=1e-5)


def test_piecewise_functions_of_a_noisy_value_are_silent():
    """ELU, leaky ReLU, Huber, clipping: `where(x > c, f(x), g(x))` is continuous in x."""

    def make(fn):
        def f(t, key):
            k1, k2 = jax.random.split(key)
            x = t * jnp.linspace(-2.0, 2.0, 5) + jax.random.normal(k1, (5,))
            return fn(x).sum() + normal_site(k2, t)

        return f

    huber = lambda x: jnp.where(jnp.abs(x) < 1.0, 0.5 * x**2, jnp.abs(x) - 0.5)  # noqa: E731
    for fn in (
        jax.nn.elu,
        jax.nn.leaky_relu,
        jax.nn.selu,
        jax.nn.hard_tanh,
        huber,
        lambda x: jnp.where(x > 0, x, 0.0),
        jax.nn.logsumexp,
        jax.nn.softplus,
        jnp.nan_to_num,
        lambda x: jnp.clip(x, -1.0, 1.0),
    ):
        assert_silent(scg.scg_grad(make(fn)), 0.3, KEY)


def test_numerical_guards_in_a_likelihood_are_silent():
    """numpyro's Bernoulli log_prob selects `inf * xor(y, logits > 0)` for non-finite
    logits only."""

    def f(w, key):
        k1, k2 = jax.random.split(key)
        h = w * jnp.arange(1.0, 4.0)
        h = jnp.where(jax.random.bernoulli(k1, 0.8, h.shape), h / 0.8, 0.0)  # dropout
        return -dist.Bernoulli(logits=h).log_prob(jnp.ones(3)).sum() + normal_site(k2, w)

    assert_silent(scg.scg_grad(f), 0.3, KEY)


def test_straight_through_under_stop_gradient_is_silent():
    def f(logits, key):
        k1, k2 = jax.random.split(key)
        soft = jax.nn.softmax(logits + jax.random.gumbel(k1, logits.shape))
        hard = jax.nn.one_hot(jnp.argmax(soft), 3)
        y = soft + lax.stop_gradient(hard - soft)
        return y @ jnp.array([1.0, 2.0, 5.0]) + normal_site(k2, logits[0])

    def rounded(t, key):
        k1, k2 = jax.random.split(key)
        x = t + jax.random.normal(k1)
        return x + lax.stop_gradient(jnp.round(x) - x) + normal_site(k2, t)

    assert_silent(scg.scg_grad(f), jnp.zeros(3), KEY)
    assert_silent(scg.scg_grad(rounded), 0.3, KEY)


def test_a_draw_of_a_stopped_parameter_is_silent():
    def f(t, key):
        k1, k2 = jax.random.split(key)
        z = jax.random.bernoulli(k1, jax.nn.sigmoid(lax.stop_gradient(t)))
        return z.astype(jnp.float32) + normal_site(k2, t)

    assert_silent(scg.scg_grad(f), 0.3, KEY)


def test_a_custom_derivative_rule_is_trusted():
    @jax.custom_jvp
    def straight_through_sign(x):
        return jnp.sign(x)

    straight_through_sign.defjvp(lambda p, t: (straight_through_sign(*p), t[0]))

    def f(t, key):
        k1, k2 = jax.random.split(key)
        return straight_through_sign(t + jax.random.normal(k1)) + normal_site(k2, t)

    assert_silent(scg.scg_grad(f), 0.3, KEY)


def test_nothing_is_checked_without_differentiation():
    """The surrogate's value, `describe`, and derivatives with respect to other arguments."""
    assert_silent(scg.surrogate(f_bernoulli), 0.3, KEY)
    assert_silent(jax.jit(scg.surrogate(f_bernoulli)), 0.3, KEY)
    assert_silent(scg.describe(f_bernoulli), 0.3, KEY)

    def f(t, s, key):
        z = jax.random.bernoulli(key, jax.nn.sigmoid(t)).astype(jnp.float32)
        return z * s + normal_site(key, s)

    assert_silent(scg.scg_grad(f, argnums=1), 0.3, 2.0, KEY)


def test_a_lost_draw_that_only_reaches_aux_is_silent():
    def f(t, key):
        z = jax.random.bernoulli(key, jax.nn.sigmoid(t))
        return normal_site(key, t), z

    assert_silent(scg.scg_grad(f, has_aux=True), 0.3, KEY)


def test_a_deterministic_program_without_sample_sites_is_silent():
    np.testing.assert_allclose(
        assert_silent(scg.scg_grad(lambda t, key: (t - 1.0) ** 2), 0.3, KEY), -1.4, rtol=1e-6
    )


def test_nested_transforms_are_silent():
    def inner(phi, key):
        z = scg.sample(key, dist.Bernoulli(logits=phi))
        return (z - 0.3) ** 2

    def outer(theta, key):
        k1, k2 = jax.random.split(key)
        phi = theta - 0.1 * scg.scg_grad(inner)(theta, k1)
        return inner(phi, k2)

    assert_silent(scg.scg_grad(outer), 0.3, KEY)


def test_score_function_draws_are_silent():
    def f(t, key):
        k1, k2 = jax.random.split(key)
        z = scg.sample(k1, dist.Bernoulli(logits=t))
        a = scg.sample(k2, dist.Categorical(logits=jnp.stack([t, -t])))
        return jnp.where(z > 0, 1.0, 0.0) + (a > 0).astype(jnp.float32)

    assert_silent(scg.scg_grad(f), 0.3, KEY)


# -- Supports that move with the parameters -------------------------------------------------


def uniform_score(theta, key):
    return scg.sample(key, dist.Uniform(theta[0], theta[1]), estimator="score") ** 2


def test_score_on_uniform_with_differentiated_bounds_is_refused():
    with pytest.raises(ValueError, match=r"estimator='score' on Uniform.*pathwise") as info:
        scg.scg_grad(uniform_score)(jnp.array([-1.0, 2.0]), KEY)
    assert "test_lint.py" in str(info.value)
    with pytest.raises(ValueError, match="Uniform"):
        jax.vmap(scg.scg_grad(uniform_score), (None, 0))(
            jnp.array([-1.0, 2.0]), jax.random.split(KEY, 2)
        )

    def in_scan(theta, key):
        def body(c, k):
            return c + uniform_score(theta, k), None

        return lax.scan(body, 0.0, jax.random.split(key, 2))[0]

    with pytest.raises(ValueError, match="Uniform"):
        scg.scg_grad(in_scan)(jnp.array([-1.0, 2.0]), KEY)


def test_only_one_differentiated_bound_is_enough_to_refuse():
    def f(high, key):
        return scg.sample(key, dist.Uniform(0.0, high), estimator="score")

    with pytest.raises(ValueError, match="Uniform"):
        scg.scg_grad(f)(1.0, KEY)


def test_uniform_auto_is_pathwise_and_right():
    def f(theta, key):
        return scg.sample(key, dist.Uniform(theta[0], theta[1])) ** 2

    theta = jnp.array([-1.0, 2.0])
    draws = mc_draws(lambda k: scg.scg_grad(f)(theta, k), 20_000, 31)
    # E[x²] = (l² + lh + h²)/3: d/dl = (2l + h)/3 = 0, d/dh = (l + 2h)/3 = 1.
    assert_mc_close(draws, np.array([0.0, 1.0]))


def test_score_on_uniform_with_fixed_bounds_is_accepted():
    def f(t, key):
        x = scg.sample(key, dist.Uniform(0.0, 1.0), estimator="score")
        return (x - t) ** 2

    np.testing.assert_allclose(
        scg.scg_grad(f)(0.3, KEY), -2 * (dist.Uniform(0.0, 1.0).sample(KEY) - 0.3), rtol=1e-5
    )


def test_truncated_normal_is_refused_for_its_bounds_and_accepted_for_its_loc():
    def bounds(low, key):
        d = dist.TruncatedNormal(0.0, 1.0, low=low, high=2.0)
        return scg.sample(key, d, estimator="score") ** 2

    def loc(mu, key):
        d = dist.TruncatedNormal(mu, 1.0, low=-1.0, high=2.0)
        return scg.sample(key, d, estimator="score") ** 2

    with pytest.raises(ValueError, match="TwoSidedTruncatedDistribution.*pathwise"):
        scg.scg_grad(bounds)(-1.0, KEY)
    assert np.isfinite(assert_silent(scg.scg_grad(loc), 0.3, KEY))


def test_pareto_is_refused_for_its_scale_and_accepted_for_its_shape():
    def scale(s, key):
        return scg.sample(key, dist.Pareto(s, 3.0), estimator="score")

    def shape(a, key):
        return scg.sample(key, dist.Pareto(1.0, a), estimator="score")

    with pytest.raises(ValueError, match="Pareto.*pathwise"):
        scg.scg_grad(scale)(1.0, KEY)
    assert np.isfinite(scg.scg_grad(shape)(3.0, KEY))


def test_a_moving_discrete_support_is_refused_without_suggesting_pathwise():
    def f(high, key):
        return scg.sample(key, dist.DiscreteUniform(0.0, high)).astype(jnp.float32)

    with pytest.raises(ValueError, match="no reparameterized sampler"):
        scg.scg_grad(f)(3.0, KEY)


def test_support_is_not_checked_without_differentiation():
    assert np.isfinite(scg.surrogate(uniform_score)(jnp.array([-1.0, 2.0]), KEY))

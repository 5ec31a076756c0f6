"""`estimator="enum"`: sites summed out exactly over their finite support.

Each program is written twice: `f(..., "score")` draws every site with the score
function and gives the exact reference by enumeration (`tests/exact.py`); `f(..., "enum")`
sums some sites out, and its estimator's exact expectation over the remaining score sites
must be the exact gradient (and Hessian) in float64. Where every site is enumerated the
estimate itself is exact: no variance, the same for every key.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from exact import assert_exact

import scgjax as scg


@pytest.fixture(autouse=True)
def _x64():
    """Every test here in float64 (exact comparisons), without changing the worker's
    global setting for the other test modules."""
    with jax.enable_x64(True):
        yield


def _both(f, theta, *, hessian=True, supports=None, extra_args=()):
    assert_exact(
        functools.partial(f, est="score"),
        theta,
        hessian=hessian,
        supports=supports,
        extra_args=extra_args,
        estimate=functools.partial(f, est="enum"),
    )


def _exact_value(f, theta, key=None, supports=None):
    """E[f] by enumeration, from `f(..., est="score")` (the exact.py machinery)."""
    from exact import exact_moments

    with jax.enable_x64(True):
        m = exact_moments(
            functools.partial(f, est="score"),
            jnp.asarray(theta, jnp.float64),
            jax.random.key(0) if key is None else key,
            supports=supports,
        )
    return m


# -- Programs ----------------------------------------------------------------------------


def plate_with_pathwise(theta, key, est):
    """A per-element Bernoulli plate; a reparameterized Normal per element downstream."""
    k1, k2 = jax.random.split(key)
    z = scg.sample(k1, dist.Bernoulli(logits=theta[:3]), estimator=est, name="z")
    x = scg.sample(k2, dist.Normal(theta[3] * z + 0.2, 1.0), name="x")
    return jnp.sum((x - 1.5) ** 2 * jax.nn.sigmoid(theta[4]) + 0.5 * z * theta[4])


def joint_cost(theta, key, est):
    """The cost depends on the sum of the elements: enumerated jointly (2^3)."""
    z = scg.sample(key, dist.Bernoulli(logits=theta[:3]), estimator=est, name="z")
    return (jnp.sum(z) * theta[3] - 1.0) ** 2 + jnp.sin(jnp.sum(z * theta[:3]))


def enum_then_score(theta, key, est):
    """An enumerated site feeds the logits of a score site; the cost uses both."""
    k1, k2 = jax.random.split(key)
    z = scg.sample(k1, dist.Bernoulli(logits=theta[:2]), estimator=est, name="z")
    y = scg.sample(k2, dist.Bernoulli(logits=theta[2] * z - 0.3), name="y")
    return jnp.sum((y + z * theta[3] - 0.8) ** 2)


def score_then_enum(theta, key, est):
    """A score site feeds an enumerated one (whose weights then carry its score term)."""
    k1, k2 = jax.random.split(key)
    y = scg.sample(k1, dist.Bernoulli(logits=theta[0]), name="y")
    z = scg.sample(k2, dist.Bernoulli(logits=theta[1:3] + y * theta[3]), estimator=est, name="z")
    return jnp.sum(z * (y + theta[3]) ** 2) + y * theta[1]


def two_enumerated_chain(theta, key, est):
    """Two enumerated sites, the second's logits depend on the first, per element."""
    k1, k2 = jax.random.split(key)
    a = scg.sample(k1, dist.Bernoulli(logits=theta[:2]), estimator=est, name="a")
    b = scg.sample(k2, dist.Bernoulli(logits=theta[2] * (2 * a - 1)), estimator=est, name="b")
    return jnp.sum((a * theta[3] + b - 0.6) ** 2)


def categorical_plate(theta, key, est):
    """Categorical rows (a VAE-style latent per data point) with a per-row cost."""
    logits = jnp.stack([theta[:3], theta[1:4], -theta[:3]])
    z = scg.sample(key, dist.Categorical(logits=logits), estimator=est, name="z")
    table = jnp.array([0.5, -1.0, 2.0])
    return jnp.sum((table[z] * theta[4] - jnp.arange(3.0)) ** 2)


def to_event_and_expand(theta, key, est):
    """`to_event` and `expand` forms, per element."""
    k1, k2 = jax.random.split(key)
    z = scg.sample(k1, dist.Bernoulli(logits=theta[:2]).to_event(1), estimator=est, name="z")
    w = scg.sample(k2, dist.Bernoulli(logits=theta[2]).expand([2]), estimator=est, name="w")
    return jnp.sum((z * theta[3] + w - 0.3) ** 2)


def binomial_site(theta, key, est):
    z = scg.sample(key, dist.Binomial(3, logits=theta[:2]), estimator=est, name="z")
    return jnp.sum((z * theta[2] - 1.0) ** 2)


def in_scan(theta, key, est):
    """One draw per step, the step's cost depends on the step's draw only."""

    def step(carry, k):
        z = scg.sample(k, dist.Bernoulli(logits=theta[0] + carry), estimator=est, name="z")
        return carry * 0.5 + theta[1], (z * theta[2] - carry) ** 2

    _, costs = jax.lax.scan(step, 0.1, jax.random.split(key, 3))
    return jnp.sum(costs)


def in_scan_carried(theta, key, est):
    """The draws reach the carry: later costs depend on earlier draws (joint: 2^3)."""

    def step(carry, k):
        z = scg.sample(k, dist.Bernoulli(logits=theta[0] + carry), estimator=est, name="z")
        carry = carry * 0.5 + z * theta[1]
        return carry, (carry - theta[2]) ** 2

    _, costs = jax.lax.scan(step, 0.0, jax.random.split(key, 3))
    return jnp.sum(costs)


def in_cond(theta, key, est):
    """An enumerated site in a branch chosen by a score site."""
    k1, k2 = jax.random.split(key)
    c = scg.sample(k1, dist.Bernoulli(logits=theta[0]), name="c")

    def taken(_):
        z = scg.sample(k2, dist.Bernoulli(logits=theta[1]), estimator=est, name="z")
        return (z * theta[2] - 0.5) ** 2

    return jax.lax.cond(c > 0, taken, lambda _: theta[3] ** 2, None) + c * theta[2]


def returned_from_cond(theta, key, est):
    """An enumerated draw returned out of a branch and used after it: where the branch
    is not taken its log-probability is 0 for every value (weights 1/2 each, not 1)."""
    k1, k2 = jax.random.split(key)
    c = scg.sample(k1, dist.Bernoulli(logits=theta[0]), name="c")
    z = jax.lax.cond(
        c > 0,
        lambda: scg.sample(k2, dist.Bernoulli(logits=theta[1]), estimator=est, name="z") * 1.0,
        lambda: theta[2],
    )
    return (z - theta[3]) ** 2


def under_vmap(theta, key, est):
    """`jax.vmap` inside the program, per-row costs."""
    keys = jax.random.split(key, 3)

    def row(k, l):
        return scg.sample(k, dist.Bernoulli(logits=l), estimator=est, name="z")

    z = jax.vmap(row)(keys, theta[:3])
    return jnp.sum((z - theta[3]) ** 2 * jnp.exp(theta[:3] / 4))


def transposed_plate(theta, key, est):
    """A (2, 3) site used transposed: per-element weights laid out in the term's order."""
    logits = jnp.outer(theta[:2], theta[2:5])
    z = scg.sample(key, dist.Bernoulli(logits=logits), estimator=est, name="z")
    w = jnp.arange(1.0, 7.0).reshape(3, 2)
    return jnp.sum((z.T * w - theta[0]) ** 2)


THETA = np.array([0.3, -0.4, 0.8, 0.6, -0.2])  # float64 inside the tests
# `enum_then_score` is checked by Monte Carlo below: its score site is downstream of the
# enumerated one, and a replayed value (how exact.py enumerates) cannot follow the
# alternatives (refused, see test_replaying_a_site_downstream_of_an_enumerated_one...).
PROGRAMS = [
    plate_with_pathwise,
    joint_cost,
    score_then_enum,
    two_enumerated_chain,
    categorical_plate,
    to_event_and_expand,
    binomial_site,
    in_scan,
    in_scan_carried,
    in_cond,
    returned_from_cond,
    under_vmap,
    transposed_plate,
]
SUPPORTS = {
    transposed_plate: {"z": (0, 1)},
    binomial_site: {"z": (0, 1, 2, 3)},
    to_event_and_expand: {"z": (0, 1), "w": (0, 1)},
}


@pytest.mark.parametrize("f", PROGRAMS, ids=lambda f: f.__name__)
def test_enumerated_estimator_is_exact(f):
    hessian = f in (plate_with_pathwise, score_then_enum, in_scan)
    _both(f, THETA, supports=SUPPORTS.get(f), hessian=hessian)


_CONFIGS = np.array(list(itertools.product((0.0, 1.0), repeat=4)))  # (a0, a1, b0, b1)


def _two_chain_expectation(theta):
    """E[two_enumerated_chain] by brute force over its 16 joint draws."""
    a, b = _CONFIGS[:, :2], _CONFIGS[:, 2:]
    la, lb = theta[:2], theta[2] * (2 * a - 1)
    log_p = jnp.sum(
        jnp.where(a > 0, jax.nn.log_sigmoid(la), jax.nn.log_sigmoid(-la))
        + jnp.where(b > 0, jax.nn.log_sigmoid(lb), jax.nn.log_sigmoid(-lb)),
        axis=1,
    )
    return jnp.sum(jnp.exp(log_p) * jnp.sum((a * theta[3] + b - 0.6) ** 2, axis=1))


def test_every_site_enumerated_gives_the_exact_gradient_with_no_variance():
    theta = jnp.asarray(THETA)
    f = functools.partial(two_enumerated_chain, est="enum")
    keys = jax.random.split(jax.random.key(3), 4)
    grads = jax.jit(jax.vmap(scg.scg_grad(f), (None, 0)))(theta, keys)
    exact = jax.jit(jax.grad(_two_chain_expectation))(theta)
    assert np.all(np.abs(exact[:4]) > 1e-3)
    for g in grads:
        np.testing.assert_allclose(g, exact, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        jax.jit(jax.hessian(scg.surrogate(f)))(theta, keys[0]),
        jax.jit(jax.hessian(_two_chain_expectation))(theta),
        rtol=1e-9,
        atol=1e-12,
    )
    # its value is the expected cost
    np.testing.assert_allclose(
        jax.jit(scg.surrogate(f))(theta, keys[0]), _two_chain_expectation(theta), rtol=1e-12
    )


def test_per_element_enumeration_evaluates_k_alternatives_not_k_to_the_n():
    def f(theta, key):
        z = scg.sample(key, dist.Bernoulli(logits=theta), estimator="enum")
        return jnp.sum((z - 0.3) ** 2 * theta)

    theta = jnp.linspace(-1.0, 1.0, 40)  # 2^40 joint configurations: refused if joint

    def expected(t):
        p = jax.nn.sigmoid(t)
        return jnp.sum((p * 0.49 + (1 - p) * 0.09) * t)

    g = scg.scg_grad(f)(theta, jax.random.key(0))
    np.testing.assert_allclose(g, jax.grad(expected)(theta), rtol=1e-10)


def test_enumeration_under_jit_and_vmap_over_keys_and_in_scan_with_num_samples():
    f = functools.partial(enum_then_score, est="enum")
    m = _exact_value(enum_then_score, THETA)
    keys = jax.random.split(jax.random.key(1), 20000)
    grads = jax.jit(jax.vmap(scg.scg_grad(f, num_samples=2), (None, 0)))(THETA, keys)
    mean, se = grads.mean(0), grads.std(0) / np.sqrt(len(keys))
    # detects a bias of ~5 standard errors (here ~0.01) per entry
    assert np.all(np.abs(mean - m["grad"]) < 5 * se + 1e-12), (mean, m["grad"], se)


def test_enumeration_removes_the_variance_of_the_summed_site():
    f_score = functools.partial(plate_with_pathwise, est="score")
    f_enum = functools.partial(plate_with_pathwise, est="enum")
    key = jax.random.key(2)
    _, v_score = scg.gradient_variance(f_score, num_draws=4000)(THETA, key)
    _, v_enum = scg.gradient_variance(f_enum, num_draws=4000)(THETA, key)
    # the logits' gradients: score-function noise gone, only the Normal's remains
    assert np.all(v_enum[:3] < 0.2 * v_score[:3]), (v_enum, v_score)


# -- Refusals ------------------------------------------------------------------------------


def test_enum_on_a_continuous_distribution_is_refused():
    with pytest.raises(ValueError, match="estimator='enum' sums a finite support out.*not Normal"):
        scg.sample(jax.random.key(0), dist.Normal(0.0, 1.0), estimator="enum")


def test_too_many_joint_alternatives_are_refused_with_the_site_and_the_fix():
    def f(theta, key):
        z = scg.sample(key, dist.Bernoulli(logits=theta), estimator="enum", name="z")
        return jnp.sum(z * 1.0) ** 2

    with pytest.raises(
        ValueError, match=r"'z'.*2\^20 alternatives, more than max_joint=4096.*Enum\(max_joint"
    ):
        scg.scg_grad(f)(jnp.zeros(20), jax.random.key(0))
    # raising the limit (or making the cost per element) is the way out
    g = scg.scg_grad(
        lambda t, k: (
            jnp.sum(
                1.0
                * scg.sample(
                    k, dist.Bernoulli(logits=t), estimator=scg.estimators.Enum(max_joint=16)
                )
            )
            ** 2
        )
    )(jnp.zeros(4), jax.random.key(0))
    # E[(Σz)²] = Σ p(1 − p) + (Σ p)²: at logits 0 each partial is (1 − 2p + 2Σp)·p(1 − p) = 1
    np.testing.assert_allclose(g, jnp.ones(4), rtol=1e-12)


def test_a_carried_site_over_many_steps_is_refused():
    def f(theta, key):
        def step(carry, k):
            z = scg.sample(k, dist.Bernoulli(logits=theta), estimator="enum", name="z")
            return carry + z, carry**2

        return jnp.sum(jax.lax.scan(step, 0.0, jax.random.split(key, 20))[1])

    with pytest.raises(ValueError, match="'z'.*so 20 of them go together"):
        scg.scg_grad(f)(0.3, jax.random.key(0))


def test_replaying_an_enumerated_site_is_refused():
    f = functools.partial(plate_with_pathwise, est="enum")
    with pytest.raises(
        ValueError, match=r"draws= replays \['z'\], which are evaluated at several values"
    ):
        scg.scg_grad(f, draws={"z": jnp.zeros(3)})(THETA, jax.random.key(0))


def test_replaying_a_site_downstream_of_an_enumerated_one_is_refused():
    f = functools.partial(enum_then_score, est="enum")
    with pytest.raises(ValueError, match="'y'.*depends on a site evaluated at several"):
        scg.scg_grad(f, draws={"y": jnp.zeros(2)})(THETA, jax.random.key(0))


def test_enum_with_leave_one_out_or_downstream_is_refused_clearly():
    f = functools.partial(enum_then_score, est="enum")
    with pytest.raises(
        ValueError, match="not supported yet with sites evaluated at several values"
    ):
        scg.scg_grad(f, num_samples=2, baseline="leave_one_out")(THETA, jax.random.key(0))


def test_baseline_on_an_enumerated_site_is_refused():
    with pytest.raises(ValueError, match="a baseline only applies to score-function nodes"):
        scg.sample(jax.random.key(0), dist.Bernoulli(0.5), estimator="enum", baseline=1.0)


def test_binomial_with_a_traced_total_count_is_refused():
    def f(theta, n, key):
        z = scg.sample(key, dist.Binomial(n, logits=theta), estimator="enum")
        return z * theta

    with pytest.raises(ValueError, match="total_count known while tracing"):
        scg.scg_grad(f)(0.3, jnp.array(3), jax.random.key(0))

"""The antithetic (`"arm"`, `"disarm"`) and measure-valued (`"measure_valued"`) estimators.

They evaluate what depends on a site at a few alternative values of it, built from
continuous noise (uniforms for a Bernoulli; Rayleigh, Maxwell and uniform variates for a
Normal). For a Bernoulli the estimate is, in each element's uniform `u`, constant on the
three intervals cut at `p` and `1 − p` (ARM's coefficient `u − ½` is linear there), so
its expectation over `u` is exact with one point per interval: its midpoint, weighted by
its length. The tests replace the uniforms by those midpoints (`_quadrature`: an
estimator subclass that reads them from a table, indexed by its key) and take the
expectation over the other score sites by enumeration (`tests/exact.py`): the first
derivative must be the exact gradient in float64. The Normal's measure-valued estimate is
checked by Monte Carlo against closed forms. Second derivatives through these sites are
refused; in directions that do not move a site's parameters they stay exact.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from exact import assert_exact

import scgjax as scg
from scgjax import estimators as E

BERNOULLI = ("arm", "disarm", "measure_valued")
CLASSES = {"arm": E.ARM, "disarm": E.DisARM, "measure_valued": E.MeasureValued}


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


@functools.cache
def _with_table(cls):
    """`cls` with its noise read from `table[key_data(key)[-1]]`: the uniforms of a
    Bernoulli estimator (`noise`), or the Gumbels added to the log-probabilities of a
    without-replacement one (`perturbed`)."""

    def row(table, key, shape, dtype):
        i = jax.random.key_data(key)[..., -1]
        return jnp.asarray(table, dtype)[i].reshape(shape)

    @dataclasses.dataclass(frozen=True)
    class Quadrature(cls):
        table: tuple = ()

        def noise(self, key, shape, dtype):
            return row(self.table, key, shape, dtype)

        def perturbed(self, d, key, sample_shape, log_p):
            return log_p + row(self.table, key, log_p.shape, log_p.dtype)

    Quadrature.__name__ = f"Quadrature{cls.__name__}"
    return Quadrature


def _quadrature(name: str, p_calls):
    """An exact quadrature over the uniforms of a Bernoulli site drawn `C` times (scan
    steps, vmap elements) with probabilities `p_calls` `(C, *shape)`: (the estimator,
    keys `(M, C)`, weights `(M,)`). Each element's interval [0, 1] is cut at `p` and
    `1 − p`; the configurations are every element's interval."""
    table, keys, weights = _uniform_cases(p_calls)
    return _with_table(CLASSES[name])(table=_nested(table)), keys, weights


def _uniform_cases(p_calls):
    """The quadrature's uniforms `(M·C, *shape)` (row `m·C + c` for call `c` of
    configuration `m`), keys `(M, C)` indexing them, weights `(M,)`."""
    p = np.asarray(p_calls, np.float64)
    calls, shape = p.shape[0], p.shape[1:]
    flat = p.reshape(-1)
    lo, hi = np.minimum(flat, 1 - flat), np.maximum(flat, 1 - flat)
    cuts = np.stack([np.zeros_like(lo), lo, hi, np.ones_like(lo)], 1)
    mids, lengths = (cuts[:, 1:] + cuts[:, :-1]) / 2, cuts[:, 1:] - cuts[:, :-1]
    configs = np.array(list(itertools.product(range(3), repeat=flat.size)))
    idx = np.arange(flat.size)
    u = mids[idx, configs]  # (M, C * n)
    weights = np.prod(lengths[idx, configs], axis=1)
    m = len(configs)
    table = u.reshape(m * calls, *shape)
    data = np.zeros((m, calls, 2), np.uint32)
    data[..., 1] = np.arange(m * calls).reshape(m, calls)
    keys = jax.random.wrap_key_data(jnp.asarray(data))
    return table, keys, weights


def _nested(a):
    return tuple(_nested(x) for x in a) if np.ndim(a) else float(a)


def _check(prog, theta, name, p_calls, *, single=True, **kw):
    """E[estimate] over the quadrature and the other score sites == ∇E[f]."""
    _check_quadrature(prog, theta, _quadrature(name, p_calls), single=single, **kw)


def _check_quadrature(prog, theta, quadrature, *, single=True, **kw):
    """`_check` for an estimator with its quadrature `(est, keys (M, C), weights)`."""
    est, keys, weights = quadrature
    if single:
        keys = keys[:, 0]
    assert abs(weights.sum() - 1) < 1e-12
    assert_exact(
        functools.partial(prog, est="score"),
        theta,
        hessian=False,
        estimate=lambda th, key, nk: prog(th, key, est=est, nkey=nk),
        noise=(keys, weights),
        **kw,
    )


def sig(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


# -- Programs: the site under test draws its noise from `nkey` --------------------------


def plate_with_downstream(theta, key, est, nkey=None):
    """Per element: a reparameterized Normal downstream of each, an independent score
    site beside it (a score site downstream cannot be replayed: `test_mc_*`)."""
    k1, k2, k3 = jax.random.split(key, 3)
    z = scg.sample(k1 if nkey is None else nkey, dist.Bernoulli(logits=theta[:3]), estimator=est)
    y = scg.sample(k2, dist.Bernoulli(logits=theta[3] - 0.2 * jnp.arange(3)), name="y")
    x = scg.sample(k3, dist.Normal(theta[4] * z, 1.0), name="x")
    return jnp.sum((y + z * theta[4] - 0.7) ** 2 + 0.3 * x * y)


def joint_cost(theta, key, est, nkey=None):
    """A cost of several elements at once (coupled for ARM/DisARM, one at a time for
    measure-valued)."""
    z = scg.sample(key if nkey is None else nkey, dist.Bernoulli(logits=theta[:3]), estimator=est)
    return (jnp.sum(z) * theta[3] - 1.0) ** 2 + jnp.sin(jnp.sum(z * theta[:3]))


def beside_score_and_enum(theta, key, est, nkey=None):
    """With an independent score site and an enumerated site in the same costs."""
    k1, k2, k3 = jax.random.split(key, 3)
    w = scg.sample(k1, dist.Bernoulli(logits=theta[0]), name="w")
    e = scg.sample(k2, dist.Bernoulli(logits=theta[3]), estimator="enum", name="e")
    z = scg.sample(k3 if nkey is None else nkey, dist.Bernoulli(logits=theta[1:3]), estimator=est)
    return (w * z[0] + z[1] * e - theta[4]) ** 2 + e * z[0] * theta[0]


def probs_expanded(theta, key, est, nkey=None):
    """`probs=`, `expand` and `to_event`, with a pathwise dependence of the cost."""
    d = dist.Bernoulli(probs=jax.nn.sigmoid(theta[:2])).expand([2, 2]).to_event(1)
    z = scg.sample(key if nkey is None else nkey, d, estimator=est, name="z")
    return jnp.sum((z - jnp.array([0.2, 0.9])) ** 2 * theta[2:4]) + z[0, 0] * z[1, 1]


def in_scan(theta, key, est, nkey=None):
    """One draw per step of a `scan` (its keys are the loop's xs), costs per step."""
    keys = jax.random.split(key, 3) if nkey is None else nkey

    def step(carry, xs):
        k, t = xs
        z = scg.sample(k, dist.Bernoulli(logits=theta[t]), estimator=est)
        return carry + (z - 0.3 * t) ** 2 * theta[3], z

    total, zs = jax.lax.scan(step, 0.0, (keys, jnp.arange(3)))
    return total + jnp.sum(zs) * theta[4]


def in_cond(theta, key, est, nkey=None):
    """A site in a branch chosen by another (score) draw."""
    k1, k2 = jax.random.split(key)
    c = scg.sample(k1, dist.Bernoulli(logits=theta[0]), name="c")

    def yes(k):
        z = scg.sample(k, dist.Bernoulli(logits=theta[1:3]), estimator=est)
        return jnp.sum((z - 0.4) ** 2 * theta[3])

    return jax.lax.cond(c > 0, yes, lambda k: theta[4] ** 2, k2 if nkey is None else nkey)


def under_vmap(theta, key, est, nkey=None):
    """`jax.vmap` inside the program, over the site's keys and logits."""
    keys = jax.random.split(key, 3) if nkey is None else nkey
    z = jax.vmap(lambda k, l: scg.sample(k, dist.Bernoulli(logits=l), estimator=est))(
        keys, theta[:3]
    )
    return jnp.sum((z - theta[3]) ** 2) + z[0] * z[2] * theta[4]


THETA = jnp.array([0.4, -0.9, 1.3, 0.6, -0.5])


@pytest.mark.parametrize("name", BERNOULLI)
@pytest.mark.parametrize(
    "prog, p_of",
    [
        (plate_with_downstream, lambda t: sig(t[:3])[None]),
        (joint_cost, lambda t: sig(t[:3])[None]),
        (beside_score_and_enum, lambda t: sig(t[1:3])[None]),
        (probs_expanded, lambda t: np.broadcast_to(sig(t[:2]), (2, 2))[None]),
    ],
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_first_derivative_is_exact(prog, p_of, name):
    _check(prog, THETA, name, p_of(np.asarray(THETA)), supports={"z": (0, 1)})


@pytest.mark.parametrize("name", BERNOULLI)
@pytest.mark.parametrize(
    "prog, p_of",
    [
        (in_scan, lambda t: sig(t[:3])[:, None]),
        (under_vmap, lambda t: sig(t[:3])[:, None]),
    ],
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_first_derivative_is_exact_in_scan_and_vmap(prog, p_of, name):
    p = p_of(np.asarray(THETA)).reshape(3)  # three calls of a scalar site
    est, keys, weights = _quadrature(name, p.reshape(3))
    assert_exact(
        functools.partial(prog, est="score"),
        THETA,
        hessian=False,
        estimate=lambda th, key, nk: prog(th, key, est=est, nkey=nk),
        noise=(keys, weights),
    )


@pytest.mark.parametrize("name", BERNOULLI)
def test_first_derivative_is_exact_in_a_branch(name):
    _check(in_cond, THETA, name, sig(np.asarray(THETA)[1:3])[None])


def rows(theta, key, est, nkey=None):
    """A (rows, latents) site, a cost per row that mixes the row's latents (a sigmoid
    belief net's shape): plates along the rows, jointly along the latents."""
    z = scg.sample(
        key if nkey is None else nkey,
        dist.Bernoulli(logits=jnp.reshape(theta[:4], (2, 2))),
        estimator=est,
        name="z",
    )
    per_row = (z[:, 0] * theta[4] + z[:, 1] - 0.5) ** 2 * jnp.array([1.0, 2.0])
    return jnp.sum(per_row) + jnp.sum(jnp.sin(z @ theta[:2]))


ROWS_THETA = jnp.array([0.4, -0.9, 1.3, 0.6, -0.5])


@pytest.mark.parametrize("name", BERNOULLI)
def test_plates_along_some_axes_jointly_along_others_is_exact(name):
    _check(
        rows, ROWS_THETA, name, sig(np.reshape(ROWS_THETA[:4], (1, 2, 2))), supports={"z": (0, 1)}
    )


def test_enum_plates_along_rows_jointly_along_latents_is_exact():
    assert_exact(
        functools.partial(rows, est="score"),
        ROWS_THETA,
        estimate=functools.partial(rows, est="enum"),
        supports={"z": (0, 1)},
    )


@pytest.mark.parametrize(
    "est, fits, too_small",
    [
        (E.Enum, 4, 3),  # 2^2 per row, not 2^4
        (E.MeasureValued, 5, 4),  # 1 + 2·2 per row, not 1 + 2·4
    ],
)
def test_joint_along_the_latents_only_counts_their_alternatives(est, fits, too_small):
    theta, key = jnp.asarray(ROWS_THETA, jnp.float64), jax.random.key(0)
    scg.scg_grad(functools.partial(rows, est=est(max_joint=fits)))(theta, key)
    with pytest.raises(ValueError, match=r"along axes \(1,\) \(per element along the others\)"):
        scg.scg_grad(functools.partial(rows, est=est(max_joint=too_small)))(theta, key)


# -- Monte Carlo: the Normal, and score sites downstream ---------------------------------

A = jnp.array([1.0, 0.5])


def normal_plate(params, key, est="measure_valued"):
    mu, log_sigma = params
    x = scg.sample(key, dist.Normal(mu, jnp.exp(log_sigma)), estimator=est)
    return jnp.sum((x - A) ** 2 + 0.3 * x**3 + mu * x)


def normal_plate_exact(params):
    mu, log_sigma = params
    s2 = jnp.exp(2 * log_sigma)
    # E (x − a)² = (μ − a)² + σ², E x³ = μ³ + 3μσ², E μx = μ²
    return jnp.sum((mu - A) ** 2 + s2 + 0.3 * (mu**3 + 3 * mu * s2) + mu**2)


def normal_joint(params, key, est="measure_valued"):
    mu, log_sigma = params
    d = dist.Normal(mu, jnp.exp(log_sigma)).to_event(1)
    x = scg.sample(key, d, estimator=est)
    return (x[0] * x[1] - 1.0) ** 2


def normal_joint_exact(params):
    mu, log_sigma = params
    s2 = jnp.exp(2 * log_sigma)
    return (mu[0] ** 2 + s2[0]) * (mu[1] ** 2 + s2[1]) - 2 * mu[0] * mu[1] + 1


def _mc(f, params, n, seed):
    keys = jax.random.split(jax.random.key(seed), n)
    g = jax.jit(jax.vmap(scg.scg_grad(f), (None, 0)))(params, keys)
    return [(np.mean(x, 0), np.std(x, 0) / np.sqrt(n)) for x in g]


@pytest.mark.parametrize(
    "f, exact", [(normal_plate, normal_plate_exact), (normal_joint, normal_joint_exact)]
)
def test_measure_valued_normal_matches_the_closed_form(f, exact):
    """Location and scale derivatives, per element (5 evaluations) and with a cost of
    both elements (1 + 4·2); 40000 draws, 5 standard errors (detects a bias of ~1% of
    these gradients, e.g. a scale coefficient off by 2%)."""
    params = (jnp.array([0.3, -0.7]), jnp.array([0.1, -0.4]))
    truth = jax.grad(exact)(params)
    for (mean, se), t in zip(_mc(f, params, 40000, 3), truth):
        assert np.all(np.abs(mean - np.asarray(t)) < 5 * se + 1e-9), (mean, t, se)
        assert np.all(se < 0.02 * np.abs(np.asarray(t)) + 0.01)


def test_measure_valued_normal_has_lower_variance_than_the_score_function():
    params = (jnp.array([0.3, -0.7]), jnp.array([0.1, -0.4]))
    keys = jax.random.split(jax.random.key(5), 4000)

    def var(est):
        g = jax.jit(jax.vmap(scg.scg_grad(lambda p, k: normal_plate(p, k, est)), (None, 0)))(
            params, keys
        )
        return [np.var(x, 0) for x in g]

    for v_mvd, v_score in zip(var("measure_valued"), var("score")):
        assert np.all(v_mvd < 0.5 * v_score), (v_mvd, v_score)


def downstream_score(theta, key, est):
    """A score site downstream of the site under test, per element. (No pathwise site:
    the reference conditions on a pathwise site's noise, the Monte Carlo mean does not.)"""
    k1, k2 = jax.random.split(key)
    z = scg.sample(k1, dist.Bernoulli(logits=theta[:3]), estimator=est)
    y = scg.sample(k2, dist.Bernoulli(logits=theta[3] * z - 0.2))
    return jnp.sum((y + z * theta[4] - 0.7) ** 2 + 0.3 * y * z * theta[3])


@pytest.mark.parametrize("name", BERNOULLI)
def test_score_sites_downstream_by_monte_carlo(name):
    """The exact gradient from the all-score program by enumeration; the estimate's mean
    over 20000 draws within 5 standard errors (|z| < 5 per entry)."""
    from exact import exact_moments

    theta = THETA
    truth = exact_moments(
        functools.partial(downstream_score, est="score"), theta, jax.random.key(0), hessian=False
    )["grad"]
    keys = jax.random.split(jax.random.key(11), 20000)
    g = jax.jit(jax.vmap(scg.scg_grad(functools.partial(downstream_score, est=name)), (None, 0)))(
        theta, keys
    )
    z = (np.mean(g, 0) - np.asarray(truth)) / (np.std(g, 0) / np.sqrt(len(keys)))
    assert np.all(np.abs(z) < 5), z


# -- Variance, values, composition -------------------------------------------------------


def toy(theta, key, est):
    """The REBAR/RELAX toy: E[(b − 0.499)²], one Bernoulli per element."""
    b = scg.sample(key, dist.Bernoulli(logits=theta), estimator=est)
    return jnp.sum((b - 0.499) ** 2)


def test_antithetic_and_measure_valued_have_lower_variance_than_score():
    theta = jnp.array([0.0, 1.0, -2.0])
    keys = jax.random.split(jax.random.key(2), 4000)
    v = {}
    for name in ("score", *BERNOULLI):
        g = jax.jit(jax.vmap(scg.scg_grad(functools.partial(toy, est=name)), (None, 0)))(
            theta, keys
        )
        v[name] = np.var(g, 0)
    assert np.all(v["arm"] < v["score"]) and np.all(v["disarm"] < v["arm"]), v
    # measure-valued is exact here: one site, per-element costs
    assert np.allclose(v["measure_valued"], 0.0, atol=1e-20)


@pytest.mark.parametrize("name", BERNOULLI)
def test_value_is_the_average_of_the_alternatives(name):
    """The surrogate's value: (f(b) + f(b'))/2 for the antithetic pair, f(b) for the
    measure-valued estimator, b the draw `d.sample(key)`; the program outside the
    transforms sees `d.sample(key)`."""
    theta, key = jnp.array([0.3, -1.0, 2.0]), jax.random.key(4)
    d = dist.Bernoulli(logits=theta)
    b = d.sample(key)
    np.testing.assert_array_equal(scg.sample(key, d, estimator=name), b)
    u = jax.random.uniform(key, (3,), jnp.float64)
    assert np.array_equal(u < jax.nn.sigmoid(theta), b)
    value = scg.surrogate(functools.partial(toy, est=name))(theta, key)
    cost = lambda b: jnp.sum((b - 0.499) ** 2)
    partner = (u > 1 - jax.nn.sigmoid(theta)).astype(jnp.float64)
    expect = cost(b) if name == "measure_valued" else (cost(b) + cost(partner)) / 2
    np.testing.assert_allclose(value, expect, rtol=1e-12)


@pytest.mark.parametrize("name", BERNOULLI)
def test_under_jit_vmap_and_with_num_samples(name):
    """Eager, jit and vmap over keys give the same estimates; num_samples=K is the mean
    of K single-sample ones with split keys."""
    f = functools.partial(plate_with_downstream, est=name)
    key = jax.random.key(9)
    THETA = jnp.asarray(globals()["THETA"], jnp.float64)
    one = jax.jit(scg.scg_grad(f))
    keys = jax.random.split(key, 4)
    np.testing.assert_allclose(one(THETA, keys[1]), scg.scg_grad(f)(THETA, keys[1]), atol=1e-15)
    gv = jax.jit(jax.vmap(scg.scg_grad(f), (None, 0)))(THETA, keys)
    for i in (0, 3):
        np.testing.assert_allclose(gv[i], one(THETA, keys[i]), rtol=1e-12, atol=1e-15)
    g4 = jax.jit(scg.scg_grad(f, num_samples=4))(THETA, key)
    np.testing.assert_allclose(g4, jnp.mean(gv, 0), rtol=1e-12, atol=1e-15)


# -- First order only ----------------------------------------------------------------------


SECOND_ORDER = {
    "hessian": lambda f, t, k: jax.hessian(scg.surrogate(f))(t, k),
    "grad_of_grad": lambda f, t, k: jax.grad(lambda t: jnp.sum(scg.scg_grad(f)(t, k)))(t),
    "jacfwd_of_jacfwd": lambda f, t, k: jax.jacfwd(jax.jacfwd(scg.surrogate(f)))(t, k),
    "maml": lambda f, t, k: jax.grad(
        lambda t: scg.surrogate(f)(t - 0.1 * jax.jit(scg.scg_grad(f))(t, k), k)
    )(t),
    "scgjax_around_scg_grad": lambda f, t, k: scg.scg_grad(
        lambda t, k: jnp.sum(scg.scg_grad(f)(t, k) ** 2)
    )(t, k),
}


# The refusal is one mechanism (`_weights.scaled_p`): every way for one estimator, one way
# for the others.
@pytest.mark.parametrize(
    "name, how",
    [("disarm", how) for how in SECOND_ORDER] + [("arm", "hessian"), ("measure_valued", "maml")],
)
def test_second_derivatives_through_the_site_are_refused(name, how):
    f = functools.partial(joint_cost, est=name)
    with pytest.raises(ValueError, match=f"estimator='{name}', which estimates first"):
        SECOND_ORDER[how](f, THETA, jax.random.key(0))


def test_second_derivatives_that_do_not_move_the_site_are_exact():
    """The Hessian in θ[3:] (the cost's own parameters): the estimators are linear in the
    costs, so E[∂²] is the exact ∂² there (the quadrature of the first-order tests)."""

    def prog(theta, key, est, nkey=None, c=None):
        z = scg.sample(
            key if nkey is None else nkey,
            dist.Bernoulli(logits=jnp.array([0.4, -0.9])),
            estimator=est,
        )
        return (z[0] * theta[0] + z[1] * theta[1] ** 2 - 1.0) ** 2

    from exact import exact_moments

    theta = jnp.array([0.7, -1.2])
    ref = exact_moments(functools.partial(prog, est="score"), theta, jax.random.key(0))
    for name in BERNOULLI:
        est, keys, weights = _quadrature(name, sig([[0.4, -0.9]]))
        hs = jax.vmap(
            lambda nk: jax.hessian(scg.surrogate(lambda t, k, nk: prog(t, k, est, nk)))(
                theta, jax.random.key(0), nk
            )
        )(keys[:, 0])
        np.testing.assert_allclose(np.tensordot(weights, hs, 1), ref["hess"], rtol=1e-9)


def test_an_outer_scgjax_transform_sees_the_first_derivative():
    """`scg_grad(surrogate(f))` is `scg_grad(f)` (first order throughout)."""
    f = functools.partial(plate_with_downstream, est="disarm")
    key = jax.random.key(3)
    THETA = jnp.asarray(globals()["THETA"], jnp.float64)
    np.testing.assert_allclose(
        scg.scg_grad(scg.surrogate(f))(THETA, key), scg.scg_grad(f)(THETA, key), rtol=1e-12
    )


# -- Errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["arm", "disarm"])
def test_antithetic_needs_a_bernoulli(name):
    with pytest.raises(ValueError, match=f"estimator='{name}' supports Bernoulli"):
        scg.sample(jax.random.key(0), dist.Categorical(logits=jnp.zeros(3)), estimator=name)
    with pytest.raises(ValueError, match="supports Bernoulli"):
        scg.sample(jax.random.key(0), dist.Normal(0.0, 1.0), estimator=name)


def test_measure_valued_supports_bernoulli_and_normal_only():
    with pytest.raises(ValueError, match="supports Bernoulli, Normal .* not Gamma"):
        scg.sample(jax.random.key(0), dist.Gamma(2.0, 1.0), estimator="measure_valued")


def test_one_at_a_time_beyond_max_joint_is_refused():
    def f(theta, key):
        x = scg.sample(
            key, dist.Normal(theta, 1.0), estimator=E.MeasureValued(max_joint=20), name="x"
        )
        return jnp.sum(x) ** 2

    with pytest.raises(
        ValueError, match=r"'x'.*1 \+ 4x10 = 41 evaluations, more than max_joint=20"
    ):
        scg.scg_grad(f)(jnp.zeros(10), jax.random.key(0))
    assert scg.scg_grad(f)(jnp.zeros(4), jax.random.key(0)).shape == (4,)


@pytest.mark.parametrize("name", BERNOULLI)
def test_replays_baselines_and_downstream_are_refused(name):
    def f(theta, key, **kw):
        z = scg.sample(key, dist.Bernoulli(logits=theta), estimator=name, name="z", **kw)
        return jnp.sum(z * theta)

    key, theta = jax.random.key(0), jnp.zeros(2)
    with pytest.raises(ValueError, match="draws= replays \\['z'\\], which are evaluated"):
        scg.scg_grad(f, draws={"z": jnp.ones(2)})(theta, key)
    with pytest.raises(ValueError, match="a baseline only applies"):
        scg.scg_grad(functools.partial(f, baseline=0.5))(theta, key)
    with pytest.raises(
        ValueError, match="downstream=True, baseline='leave_one_out' and scg.baselines.nvil"
    ):
        scg.scg_grad(f, num_samples=2, baseline="leave_one_out")(theta, key)
    assert name in scg.describe(f)(theta, key)


# -- Without replacement (Categorical) ---------------------------------------------------

F_TABLE = np.array([[1.3, -0.4, 2.2], [0.2, 0.9, -0.5]])


def _wor_cases(cls, logits, **options):
    """Every ordered draw of k categories per element, as Gumbels that produce it, and
    its probability `Π_i p(s_i) / (1 − Σ_{j<i} p(s_j))`: (estimator, keys, weights)."""
    logits = np.asarray(logits, np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    n, K = p.shape
    k = options.get("k", 4)
    per_row = list(itertools.permutations(range(K), k))
    table, weights = [], []
    for combo in itertools.product(per_row, repeat=n):
        g = np.full((n, K), -1.0)
        w = 1.0
        for i, order in enumerate(combo):
            left = 1.0
            for rank, s in enumerate(order):
                g[i, s] = k - rank
                w *= p[i, s] / left
                left -= p[i, s]
        table.append(g - (logits - np.log(np.exp(logits).sum(-1, keepdims=True))))
        weights.append(w)
    est = _with_table(cls)(table=_nested(np.array(table)), **options)
    data = np.zeros((len(table), 2), np.uint32)
    data[:, 1] = np.arange(len(table))
    return est, jax.random.wrap_key_data(jnp.asarray(data)), np.array(weights)


def wor_plate(theta, key, est, nkey=None):
    """Two rows of a 3-way Categorical, a cost per row, a score site beside them."""
    k1, k2 = jax.random.split(key)
    logits = jnp.reshape(theta[:6], (2, 3))
    z = scg.sample(k1 if nkey is None else nkey, dist.Categorical(logits=logits), estimator=est)
    y = scg.sample(k2, dist.Bernoulli(logits=theta[6]), name="y")
    return jnp.sum(jnp.asarray(F_TABLE)[jnp.arange(2), z] * (theta[7] + y) ** 2) + jnp.sum(
        z * theta[:2]
    )


WOR_THETA = jnp.array([0.3, -0.5, 1.0, 1.0, 0.0, -1.0, 0.4, 0.7])


@pytest.mark.parametrize(
    "options", [{"k": 2}, {"k": 2, "baseline": False}, {"k": 3}], ids=["k2", "k2_nobaseline", "k3"]
)
def test_unordered_set_is_exact(options):
    est, keys, weights = _wor_cases(E.UnorderedSet, np.reshape(WOR_THETA[:6], (2, 3)), **options)
    assert abs(weights.sum() - 1) < 1e-12
    assert_exact(
        functools.partial(wor_plate, est="score"),
        WOR_THETA,
        hessian=False,
        estimate=lambda th, key, nk: wor_plate(th, key, est=est, nkey=nk),
        noise=(keys, weights),
        supports={"node0": (0, 1, 2)},
    )


@pytest.mark.parametrize("k", [2, 3])
def test_score_wor_by_monte_carlo(k):
    """κ (the (k+1)-th perturbed log-probability) is continuous: 20000 draws, 5 s.e."""
    from exact import exact_moments

    truth = exact_moments(
        functools.partial(wor_plate, est="score"),
        WOR_THETA,
        jax.random.key(0),
        hessian=False,
        supports={"node0": (0, 1, 2)},
    )["grad"]
    f = functools.partial(wor_plate, est=E.ScoreWOR(k=k))
    keys = jax.random.split(jax.random.key(13), 20000)
    g = jax.jit(jax.vmap(scg.scg_grad(f), (None, 0)))(jnp.asarray(WOR_THETA, jnp.float64), keys)
    z = (np.mean(g, 0) - np.asarray(truth)) / (np.std(g, 0) / np.sqrt(len(keys)))
    assert np.all(np.abs(z) < 5), z


def test_without_replacement_reduces_variance_and_is_exact_at_k_equal_K():
    """Costs with a large mean (where a baseline matters): the total variance of the
    logits' gradient, 4000 draws."""
    theta = jnp.asarray(WOR_THETA, jnp.float64)
    keys = jax.random.split(jax.random.key(1), 4000)

    def per_row(theta, key, est):
        logits = jnp.reshape(theta[:6], (2, 3))
        z = scg.sample(key, dist.Categorical(logits=logits), estimator=est)
        return jnp.sum((jnp.asarray(F_TABLE)[jnp.arange(2), z] + 3.0) ** 2)

    def var(est):
        g = jax.jit(jax.vmap(scg.scg_grad(functools.partial(per_row, est=est)), (None, 0)))(
            theta, keys
        )
        return float(np.sum(np.var(g, 0)[:6]))

    v = {str(e): var(e) for e in ("score", "unordered_set", "score_wor")}
    v["no baseline"] = var(E.UnorderedSet(baseline=False, k=2))
    v["k=2"] = var(E.UnorderedSet(k=2))
    assert v["k=2"] < 0.6 * v["no baseline"] < 0.6 * v["score"], v
    assert v["score_wor"] < 0.1 * v["score"], v
    assert v["unordered_set"] < 1e-20, v  # k = 4 ≥ 3 categories: every category, exact


@pytest.mark.parametrize(
    "d, est",
    [
        (
            dist.Categorical(logits=jnp.array([[0.3, -0.5, 1.0, 0.2], [1.0, 0.0, -1.0, 0.1]])),
            "unordered_set",
        ),
        (dist.Categorical(probs=jnp.array([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])), "score_wor"),
        (dist.Bernoulli(probs=jnp.array([0.2, 0.7, 0.5])), "arm"),
        (dist.Bernoulli(logits=jnp.array([0.2, -0.7, 0.0])), "disarm"),
        (dist.Bernoulli(logits=jnp.array([0.2, -0.7, 0.0])), "measure_valued"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_the_first_alternative_is_the_draw(d, est):
    """Inside the transforms (the alternatives are aux's leading axis) the first value is
    what `d.sample(key)` draws, as the program sees outside them."""

    def f(key):
        z = scg.sample(key, d, estimator=est)
        return jnp.sum(z * 1.0), z

    surrogate = jax.jit(scg.surrogate(f, has_aux=True, key_argnum=0))
    for key in jax.random.split(jax.random.key(0), 5):
        _, z = surrogate(key)
        np.testing.assert_array_equal(z[0], d.sample(key))
        np.testing.assert_array_equal(scg.sample(key, d, estimator=est), d.sample(key))


def test_without_replacement_refuses_joint_costs_and_bad_k():
    def joint(theta, key):
        z = scg.sample(
            key, dist.Categorical(logits=jnp.zeros((2, 3)) + theta), estimator="score_wor"
        )
        return jnp.sin(jnp.sum(z * theta))

    with pytest.raises(ValueError, match="needs each cost element\n?.*to depend on one element"):
        scg.scg_grad(joint)(jnp.float64(0.3), jax.random.key(0))
    with pytest.raises(ValueError, match=r"UnorderedSet\(k=...\) must be an int between 1 and"):
        scg.sample(
            jax.random.key(0), dist.Categorical(logits=jnp.zeros(3)), estimator=E.UnorderedSet(k=5)
        )
    with pytest.raises(ValueError, match="estimator='unordered_set' supports Categorical"):
        scg.sample(jax.random.key(0), dist.Bernoulli(logits=0.0), estimator="unordered_set")


def test_without_replacement_is_finite_when_one_category_has_almost_all_the_mass():
    """A trained categorical: p ≈ 1 for one class, in float32. The set probabilities are
    computed in log space over the categories left (no 1 − Σp), so nothing is 0/0; with
    k = K the estimate is the exact gradient."""
    with jax.enable_x64(False):
        logits = jnp.array([[30.0, 0.0, -2.0, 1.0], [0.5, 0.2, 0.1, -0.3]], jnp.float32)
        table = jnp.array([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 0.0]], jnp.float32)

        def f(l, key, est):
            z = scg.sample(key, dist.Categorical(logits=l), estimator=est)
            return jnp.sum(table[jnp.arange(2), z] ** 2)

        keys = jax.random.split(jax.random.key(0), 50)
        exact = jax.grad(lambda l: jnp.sum(jax.nn.softmax(l) * table**2))(logits)
        for est in (E.UnorderedSet(k=2), E.UnorderedSet(k=3), E.ScoreWOR(k=2)):
            g = jax.jit(jax.vmap(scg.scg_grad(functools.partial(f, est=est)), (None, 0)))(
                logits, keys
            )
            assert bool(jnp.all(jnp.isfinite(g))), est
        g = jax.jit(scg.scg_grad(functools.partial(f, est=E.UnorderedSet(k=4))))(logits, keys[0])
        np.testing.assert_allclose(g, exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("masked", [0, 1])
@pytest.mark.parametrize(
    "est",
    [E.ScoreWOR(k=1), E.ScoreWOR(k=2), E.ScoreWOR(k=3), E.UnorderedSet(k=2), E.UnorderedSet(k=3)],
    ids=str,
)
def test_without_replacement_with_masked_categories(est, masked):
    """A masked category (logit −inf, e.g. an illegal action): weight 0, never NaN; when
    the k take every allowed category the estimate is the exact gradient."""
    values = jnp.array([1.0, 2.0, 3.0])
    logits = jnp.array([0.2, 0.0, 0.5]).at[masked].set(-jnp.inf)

    def f(l, key):
        return values[scg.sample(key, dist.Categorical(logits=l), estimator=est)] ** 2

    exact = jax.grad(lambda l: jnp.sum(jax.nn.softmax(l) * values**2))(logits)
    keys = jax.random.split(jax.random.key(4), 4000)
    g = jax.jit(jax.vmap(scg.scg_grad(f), (None, 0)))(logits, keys)
    assert bool(jnp.all(jnp.isfinite(g)))
    if est.k >= 2:  # the two allowed categories: exact for every key
        np.testing.assert_allclose(g, jnp.broadcast_to(exact, g.shape), rtol=1e-9, atol=1e-12)
    else:
        se = np.std(g, 0) / np.sqrt(len(keys))
        assert np.all(np.abs(np.mean(g, 0) - exact) < 5 * se + 1e-12)


def test_unordered_set_refuses_a_k_too_large_to_sum_over_its_orders():
    with pytest.raises(ValueError, match=r"UnorderedSet\(k=6\) sums over the k! orders"):
        scg.sample(
            jax.random.key(0), dist.Categorical(logits=jnp.zeros(8)), estimator=E.UnorderedSet(k=6)
        )


# -- Categorical antithetic (ARSM) -------------------------------------------------------
#
# With two categories, `π ~ Dirichlet(1, 1)` is `(u, 1 − u)` for a uniform `u`: the draw
# is 0 iff `u < p_0`, its swap is 0 iff `u > 1 − p_0`, and ARSM's coefficients `1 − 2π_j`
# are linear in `u`: the quadrature of the Bernoulli tests (midpoints of the intervals
# cut at `p_0` and `1 − p_0`) is exact, with Gumbels `G = (−log u, −log(1 − u))`. With
# more categories the estimate is checked by Monte Carlo.

ARSM_OPTIONS = [{}, {"reference": 0}, {"reference": 1}]


def _arsm_quadrature(p0_calls, **options):
    u, keys, weights = _uniform_cases(p0_calls)
    g = np.stack([-np.log(u), -np.log1p(-u)], -1)
    return _with_table(E.ARSM)(table=_nested(g), **options), keys, weights


def two_way(l):
    """A two-category Categorical with `p_0 = σ(l)`."""
    return dist.Categorical(logits=jnp.stack([l, jnp.zeros_like(l)], -1))


def cat_plate(theta, key, est, nkey=None):
    """Per element, a Normal downstream of each, a score site beside them."""
    k1, k2, k3 = jax.random.split(key, 3)
    c = scg.sample(k1 if nkey is None else nkey, two_way(theta[:3]), estimator=est, name="z")
    y = scg.sample(k2, dist.Bernoulli(logits=theta[3] - 0.2 * jnp.arange(3)), name="y")
    x = scg.sample(k3, dist.Normal(theta[4] * c, 1.0), name="x")
    table = jnp.array([[0.3, -1.1], [2.0, 0.4], [-0.6, 1.5]])
    return jnp.sum(table[jnp.arange(3), c] * (y + theta[4]) + 0.3 * x * y)


def cat_joint(theta, key, est, nkey=None):
    """A cost of every element at once (they swap together)."""
    p0 = jax.nn.sigmoid(theta[:3])
    d = dist.Categorical(probs=jnp.stack([p0, 1 - p0], -1))
    c = scg.sample(key if nkey is None else nkey, d, estimator=est, name="z")
    return (jnp.sum(c) * theta[3] - 1.0) ** 2 + jnp.sin(jnp.sum(c * theta[:3]))


def cat_expanded(theta, key, est, nkey=None):
    """`expand` and `to_event`: elements that go together along the event axis."""
    d = two_way(theta[:2]).expand([2, 2]).to_event(1)
    c = scg.sample(key if nkey is None else nkey, d, estimator=est, name="z")
    return jnp.sum((c - jnp.array([0.2, 0.9])) ** 2 * theta[2:4]) + c[0, 0] * c[1, 1]


def cat_scan(theta, key, est, nkey=None):
    keys = jax.random.split(key, 3) if nkey is None else nkey

    def step(carry, xs):
        k, t = xs
        c = scg.sample(k, two_way(theta[t]), estimator=est, name="z")
        return carry + (c - 0.3 * t) ** 2 * theta[3], c

    total, cs = jax.lax.scan(step, 0.0, (keys, jnp.arange(3)))
    return total + jnp.sum(cs) * theta[4]


def cat_vmap(theta, key, est, nkey=None):
    keys = jax.random.split(key, 3) if nkey is None else nkey
    c = jax.vmap(lambda k, l: scg.sample(k, two_way(l), estimator=est, name="z"))(keys, theta[:3])
    return jnp.sum((c - theta[3]) ** 2) + c[0] * c[2] * theta[4]


def cat_cond(theta, key, est, nkey=None):
    k1, k2 = jax.random.split(key)
    b = scg.sample(k1, dist.Bernoulli(logits=theta[0]), name="b")

    def yes(k):
        c = scg.sample(k, two_way(theta[1:3]), estimator=est, name="z")
        return jnp.sum((c - 0.4) ** 2 * theta[3])

    return jax.lax.cond(b > 0, yes, lambda k: theta[4] ** 2, k2 if nkey is None else nkey)


P0_OF = {
    cat_plate: (lambda t: sig(t[:3])[None], True),
    cat_joint: (lambda t: sig(t[:3])[None], True),
    cat_expanded: (lambda t: np.broadcast_to(sig(t[:2]), (2, 2))[None], True),
    cat_cond: (lambda t: sig(t[1:3])[None], True),
    cat_scan: (lambda t: sig(t[:3]), False),
    cat_vmap: (lambda t: sig(t[:3]), False),
}


@pytest.mark.parametrize(
    "prog, options",
    [(p, {}) for p in P0_OF]
    + [(cat_joint, o) for o in ARSM_OPTIONS[1:]]
    + [(cat_plate, ARSM_OPTIONS[2])],
    ids=lambda x: getattr(x, "__name__", str(x)),
)
def test_arsm_is_exact_with_two_categories(prog, options):
    p0_of, single = P0_OF[prog]
    quadrature = _arsm_quadrature(p0_of(np.asarray(THETA)), **options)
    _check_quadrature(prog, THETA, quadrature, single=single, supports={"z": (0, 1)})


CAT4_TABLE = np.array([[0.3, -1.2, 2.0, 0.7], [1.0, 0.1, -0.8, 2.5]])
CAT4_THETA = jnp.array([0.2, -0.5, 1.0, 0.1, -1.0, 0.4, 0.3, 0.8, 0.7])


def cat4(theta, key, est, joint=False):
    """Two rows of a 4-way Categorical (logits θ[:8]): a cost per row, or one cost of
    both rows (they swap together), and a score site beside them."""
    k1, k2 = jax.random.split(key)
    c = scg.sample(k1, dist.Categorical(logits=jnp.reshape(theta[:8], (2, 4))), estimator=est)
    y = scg.sample(k2, dist.Bernoulli(logits=theta[8]), name="y")
    f = jnp.asarray(CAT4_TABLE)[jnp.arange(2), c]
    if joint:
        return jnp.prod(f + 1.5) * (1.0 + y)
    return jnp.sum(f**2 * (1.0 + y))


@pytest.mark.parametrize("joint", [False, True], ids=["per_row", "joint"])
@pytest.mark.parametrize("est", [E.ARSM(), E.ARSM(reference=2)], ids=str)
def test_arsm_by_monte_carlo_with_four_categories(est, joint):
    """`π` is continuous on the simplex: 40000 draws against the exact gradient, 5
    standard errors (about 0.01 here: a missing factor `1/C` or a wrong swap is many
    times that)."""
    from exact import exact_moments

    f = functools.partial(cat4, joint=joint)
    truth = exact_moments(
        functools.partial(f, est="score"),
        CAT4_THETA,
        jax.random.key(0),
        hessian=False,
        supports={"node0": (0, 1, 2, 3)},
    )["grad"]
    keys = jax.random.split(jax.random.key(21), 40000)
    g = jax.jit(jax.vmap(scg.scg_grad(functools.partial(f, est=est)), (None, 0)))(
        jnp.asarray(CAT4_THETA, jnp.float64), keys
    )
    z = (np.mean(g, 0) - np.asarray(truth)) / (np.std(g, 0) / np.sqrt(len(keys)))
    assert np.all(np.abs(z) < 5), z


def test_arsm_has_lower_variance_than_the_score_function():
    keys = jax.random.split(jax.random.key(5), 4000)

    def var(est):
        g = jax.jit(jax.vmap(scg.scg_grad(functools.partial(cat4, est=est)), (None, 0)))(
            jnp.asarray(CAT4_THETA, jnp.float64), keys
        )
        return float(np.sum(np.var(g, 0)[:8]))

    v = {str(e): var(e) for e in ("score", "arsm")}
    assert v["arsm"] < 0.5 * v["score"], v


@pytest.mark.parametrize("mask", [-np.inf, -1e9], ids=["inf", "1e9"])
def test_arsm_with_a_masked_category_is_finite_and_unbiased(mask):
    """A logit of −inf, or −1e9 (whose probability underflows: the Gumbel given the draw
    is −inf there, and was NaN in log π)."""
    values = jnp.array([1.0, 2.0, 3.0, -1.0])
    logits = jnp.array([0.2, mask, 0.5, 0.0])

    def f(l, key):
        return values[scg.sample(key, dist.Categorical(logits=l), estimator="arsm")] ** 2

    exact = jax.grad(lambda l: jnp.sum(jax.nn.softmax(l) * values**2))(logits)
    keys = jax.random.split(jax.random.key(4), 20000)
    g = jax.jit(jax.vmap(scg.scg_grad(f), (None, 0)))(logits, keys)
    assert bool(jnp.all(jnp.isfinite(g)))
    se = np.std(g, 0) / np.sqrt(len(keys))
    assert np.all(np.abs(np.mean(g, 0) - exact) < 5 * se + 1e-12), (np.mean(g, 0), exact)
    assert float(jnp.max(jnp.abs(g[:, 1]))) == 0.0  # the masked category gets nothing


def test_arsm_first_alternative_is_the_draw_and_it_refuses_what_it_cannot_do():
    d = dist.Categorical(logits=jnp.array([[0.3, -0.5, 1.0, 0.2], [1.0, 0.0, -1.0, 0.1]]))

    def f(key):
        z = scg.sample(key, d, estimator="arsm")
        return jnp.sum(z * 1.0), z

    surrogate = jax.jit(scg.surrogate(f, has_aux=True, key_argnum=0))
    for key in jax.random.split(jax.random.key(0), 5):
        _, z = surrogate(key)
        assert z.shape == (1 + 6, 2)  # the draw and the 6 swaps of 4 categories
        np.testing.assert_array_equal(z[0], d.sample(key))
    with pytest.raises(ValueError, match="estimator='arsm' supports Categorical"):
        scg.sample(jax.random.key(0), dist.Bernoulli(logits=0.0), estimator="arsm")
    with pytest.raises(ValueError, match=r"ARSM\(reference=...\) must be a category"):
        scg.sample(jax.random.key(0), d, estimator=E.ARSM(reference=4))
    with pytest.raises(ValueError, match="estimator='arsm', which estimates first"):
        SECOND_ORDER["hessian"](
            functools.partial(cat_joint, est="arsm"), jnp.asarray(THETA), jax.random.key(0)
        )

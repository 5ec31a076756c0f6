"""Exact expectations of scgjax's estimators, by enumerating every joint draw.

For a program whose score-function sites have small finite supports, the estimator's
expectation is a finite sum,

    E[ĝ] = Σ_z p(z; θ) · ĝ(θ, z),

where `ĝ(θ, z) = scg_grad(f, draws=z)(θ, key)` is the estimator evaluated at the draws
`z` and `p(z; θ) = exp(trace(f, draws=z)(θ, key).score_log_joint)`. The exact objective is
`E[f](θ) = Σ_z p(z; θ) · f(θ, z)`, and its gradient and Hessian come from `jax.grad` /
`jax.hessian` of that sum. `assert_exact` compares them in float64 at rtol 1e-9: no Monte
Carlo noise, so a wrong sign, a dropped term or a misaligned weight fails at once, however
small its effect.

Pathwise sites are left to the key: conditional on their noise, the identity still holds
(a reparameterized draw is a deterministic function of θ, z and the noise).

The probabilities come from the traced log-densities; `assert_exact` checks that they sum
to 1 with zero gradient and Hessian, which holds only if their values and derivatives are
right, so the reference does not rest on the code it checks.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import scgjax as scg

RTOL = 1e-9
ATOL = 1e-12

# Finite supports by distribution class name (element values).
SUPPORTS = {
    "BernoulliLogits": (0, 1),
    "BernoulliProbs": (0, 1),
    "MaskedDistribution": (0, 1),  # of a Bernoulli in these tests
    "CategoricalLogits": (0, 1, 2),  # three categories in these tests
}


def _support(site, supports: dict) -> Sequence:
    if site.name in supports:
        return supports[site.name]
    if site.distribution in SUPPORTS:
        return SUPPORTS[site.distribution]
    raise ValueError(
        f"no finite support known for site {site.name!r} "
        f"({site.distribution}); pass supports={{{site.name!r}: (...)}}"
    )


def enumerate_draws(
    f: Callable,
    args: tuple,
    supports: dict | None = None,
    max_configs: int = 1 << 14,
    copies: int = 1,
):
    """Every joint configuration of `f`'s score sites: (names, stacked draws dict with a
    leading configuration axis, per-site number of support values). With `copies=K`
    (for `num_samples=K`) each site gets a leading axis of K independent copies."""
    supports = supports or {}
    traced = jax.eval_shape(scg.trace(f), *args)  # shapes and site metadata only
    sites = {n: s for n, s in traced.sites.items() if s.estimator == "score"}
    names = sorted(sites)
    per_site = []
    total = 1
    for n in names:
        values = np.asarray(_support(sites[n], supports))
        shape = ((copies,) if copies > 1 else ()) + tuple(sites[n].value.shape)
        size = int(np.prod(shape, dtype=int))
        total *= len(values) ** size
        if total > max_configs:
            raise ValueError(f"{total} joint configurations exceed max_configs={max_configs}")
        configs = np.array(list(itertools.product(values, repeat=size)))
        per_site.append(configs.reshape((-1,) + shape).astype(sites[n].value.dtype))
    grids = np.meshgrid(*[np.arange(len(c)) for c in per_site], indexing="ij")
    draws = {n: c[g.ravel()] for n, c, g in zip(names, per_site, grids)}
    ks = {n: len(_support(sites[n], supports)) for n in names}
    return names, draws, ks


def _log_weight(tr, ks: dict) -> jax.Array:
    """log p(z): sites drawn get their log-density; elements of a site that were not
    drawn (a `cond` branch not taken) weigh 1/K each, so summing over their values
    counts the configuration once."""
    total = 0.0
    for name, site in tr.sites.items():
        if site.estimator != "score":
            continue
        total = total + jnp.sum(jnp.where(site.drawn, site.log_prob, -jnp.log(ks[name])))
    return total


def exact_moments(
    f: Callable,
    theta,
    key,
    *,
    argnums: int = 0,
    supports: dict | None = None,
    hessian: bool = True,
    extra_args: tuple = (),
    estimate: Callable | None = None,
    noise: tuple | None = None,
    **options,
):
    """A dict of exact quantities in float64, by enumeration (one compiled program):
    `mass` (Σ_z p(z)), `mass_grad`, `mass_hess`, `value` (E[f]), `grad` (∇E[f]),
    `hess` (∇²E[f]), `est` (E[scg_grad]) and `est_hess` (E[hessian(surrogate)]).

    `options` go to `scg_grad` / `surrogate` (e.g. `baseline=`, `num_samples=`); with
    `num_samples=K` every site is enumerated in K independent copies. `extra_args` come
    after θ and before the key.

    `estimate`: the program whose estimator is measured, when it is not `f`: the same
    sites (by name), some of them summed out by their estimator (`estimator="enum"`).
    `f` draws every site with the score function and gives the reference; the estimate's
    expectation is taken over `f`'s draws, replaying in `estimate` only the sites it
    draws with the score function.

    `noise`: `(keys, weights)` for an estimate whose alternatives estimators draw
    continuous noise (`"arm"`, `"disarm"`, `"measure_valued"`): `estimate` then takes one
    more argument after the key, and its expectation is the `weights`-weighted sum over
    `keys` (a quadrature that is exact for it, `tests/test_alternatives.py`).
    """
    copies = int(options.get("num_samples", 1))
    names, draws, ks = enumerate_draws(f, (theta, *extra_args, key), supports, copies=copies)
    g = f if estimate is None else estimate
    if estimate is None:
        replayed = names
    else:
        extra = () if noise is None else (noise[0][0],)
        traced = jax.eval_shape(scg.trace(estimate), theta, *extra_args, key, *extra)
        replayed = [
            n
            for n, s in traced.sites.items()
            if s.estimator == "score" and s.method.split("(")[0] == "score"
        ]
        assert set(replayed) <= set(names), (replayed, names)

    def sub(z):
        return {n: z[n] for n in replayed}

    def log_weight(th, z):
        a = (th, *extra_args, key)
        if copies == 1:
            return _log_weight(scg.trace(f, draws=z)(*a), ks)
        per_copy = jax.vmap(lambda zk: _log_weight(scg.trace(f, draws=zk)(*a), ks))(z)
        return jnp.sum(per_copy)

    def cost(th, z):  # f at the first copy's draws
        z1 = z if copies == 1 else jax.tree.map(lambda x: x[0], z)
        return scg.trace(f, draws=z1)(th, *extra_args, key).cost

    def mass(th):
        return jnp.sum(jax.vmap(lambda z: jnp.exp(log_weight(th, z)))(draws))

    def expected_cost(th):
        return jnp.sum(jax.vmap(lambda z: jnp.exp(log_weight(th, z)) * cost(th, z))(draws))

    def expectation_of(estimate):
        def one(z):
            w = jnp.exp(log_weight(theta, z))
            return jax.tree.map(lambda x: w * x, estimate(z))

        return jax.tree.map(lambda x: jnp.sum(x, 0), jax.vmap(one)(draws))

    def averaged(estimate):
        if noise is None:
            return estimate()
        keys, weights = noise
        each = jax.vmap(estimate)(keys)
        w = jnp.asarray(weights, jnp.float64)
        return jax.tree.map(lambda x: jnp.tensordot(w, x, axes=1), each)

    def everything(th):
        out = {
            "mass": mass(th),
            "mass_grad": jax.grad(mass)(th),
            "value": expected_cost(th),
            "grad": jax.grad(expected_cost)(th),
            "est": expectation_of(
                lambda z: averaged(
                    lambda *nk: scg.scg_grad(g, argnums=argnums, draws=sub(z), **options)(
                        th, *extra_args, key, *nk
                    )
                )
            ),
        }
        if hessian:
            out["mass_hess"] = jax.hessian(mass)(th)
            out["hess"] = jax.hessian(expected_cost)(th)
            out["est_hess"] = expectation_of(
                lambda z: averaged(
                    lambda *nk: jax.hessian(
                        scg.surrogate(g, draws=sub(z), **options), argnums=argnums
                    )(th, *extra_args, key, *nk)
                )
            )
        return out

    return jax.jit(everything)(theta)


def assert_exact(
    f: Callable,
    theta,
    key=None,
    *,
    hessian: bool = True,
    supports: dict | None = None,
    extra_args: tuple = (),
    estimate: Callable | None = None,
    noise: tuple | None = None,
    **options,
) -> None:
    """The estimator's exact expectation equals the exact gradient (and, with `hessian`,
    the DiCE Hessian's expectation equals the exact Hessian), in float64 at rtol 1e-9.

    Also checked: the total probability Σ_z p(z; θ) is 1 and its gradient (and Hessian)
    are 0. That holds only if the traced log-densities are right in value *and* in their
    derivatives (a score term that used a wrong log-prob derivative, as numpyro's at
    logit 0, would be consistent between the two sides of the main check but fails
    here), and it also fails if a site's log-density missed elements (a mask). Finally the
    exact gradient must not be zero, so that the test can fail.
    """
    with jax.enable_x64(True):
        key = jax.random.key(0) if key is None else key
        theta = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), theta)
        extra_args = jax.tree.map(
            lambda x: (
                jnp.asarray(x, jnp.float64)
                if jnp.issubdtype(jnp.result_type(x), jnp.floating)
                else x
            ),
            extra_args,
        )
        m = exact_moments(
            f,
            theta,
            key,
            supports=supports,
            hessian=hessian,
            extra_args=extra_args,
            estimate=estimate,
            noise=noise,
            **options,
        )
        np.testing.assert_allclose(
            float(m["mass"]), 1.0, rtol=1e-12, err_msg="total probability of the enumerated draws"
        )
        for what in ("mass_grad", "mass_hess") if hessian else ("mass_grad",):
            for g in jax.tree.leaves(m[what]):
                np.testing.assert_allclose(
                    np.asarray(g),
                    0.0,
                    atol=1e-12,
                    err_msg=f"{what}: derivative of the total probability",
                )
        assert any(float(jnp.max(jnp.abs(g))) > 1e-6 for g in jax.tree.leaves(m["grad"])), (
            "degenerate test: the exact gradient is zero"
        )
        for (path, g_est), g in zip(
            jax.tree_util.tree_leaves_with_path(m["est"]), jax.tree.leaves(m["grad"])
        ):
            np.testing.assert_allclose(
                np.asarray(g_est),
                np.asarray(g),
                rtol=RTOL,
                atol=ATOL,
                err_msg=f"E[scg_grad] vs the gradient of E[f] {jax.tree_util.keystr(path)}",
            )
        if hessian:
            for h_est, h in zip(jax.tree.leaves(m["est_hess"]), jax.tree.leaves(m["hess"])):
                np.testing.assert_allclose(
                    np.asarray(h_est),
                    np.asarray(h),
                    rtol=RTOL,
                    atol=ATOL,
                    err_msg="E[hessian(surrogate)] vs the Hessian of E[f]",
                )

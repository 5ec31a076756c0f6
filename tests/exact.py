"""Exact expectations of scgjax's estimators, by enumerating every joint draw.

For a program whose score-function sites have small finite supports, the estimator's
expectation is a finite sum,

    E[ĝ] = Σ_z p(z; θ) · ĝ(θ, z),

where `ĝ(θ, z) = scg_grad(f, draws=z)(θ, key)` is the estimator evaluated at the draws
`z` and `p(z; θ) = exp(trace(f, draws=z)(θ, key).log_joint)`. The exact objective is
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
}


def _support(site, supports: dict) -> Sequence:
    if site.name in supports:
        return supports[site.name]
    if site.distribution in SUPPORTS:
        return SUPPORTS[site.distribution]
    raise ValueError(f"no finite support known for site {site.name!r} "
                     f"({site.distribution}); pass supports={{{site.name!r}: (...)}}")


def enumerate_draws(f: Callable, args: tuple, supports: dict | None = None,
                    max_configs: int = 1 << 14):
    """Every joint configuration of `f`'s score sites: (names, stacked draws dict with a
    leading configuration axis, per-site number of support values)."""
    supports = supports or {}
    sites = {n: s for n, s in scg.trace(f)(*args).sites.items() if s.estimator == "score"}
    names = sorted(sites)
    per_site = []
    total = 1
    for n in names:
        values = np.asarray(_support(sites[n], supports))
        shape = np.shape(sites[n].value)
        size = int(np.prod(shape, dtype=int))
        total *= len(values) ** size
        if total > max_configs:
            raise ValueError(f"{total} joint configurations exceed max_configs={max_configs}")
        configs = np.array(list(itertools.product(values, repeat=size)))
        per_site.append(configs.reshape((-1,) + shape).astype(np.asarray(sites[n].value).dtype))
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


def exact_moments(f: Callable, theta, key, *, argnums: int = 0, supports: dict | None = None,
                  hessian: bool = True, extra_args: tuple = (), **options):
    """(E[f], ∇E[f], ∇²E[f], E[ĝ], E[Ĥ]) in float64, exactly, by enumeration.

    `options` go to `scg_grad` / `surrogate` (e.g. `baseline=`); `extra_args` come after
    θ and before the key.
    """
    args = (theta, *extra_args, key)
    names, draws, ks = enumerate_draws(f, args, supports)

    def at(z):
        return lambda *a: scg.trace(f, draws=z)(*a)

    def weight(th, z):
        a = (th, *extra_args, key)
        return jnp.exp(_log_weight(at(z)(*a), ks))

    def expected_cost(th):
        def one(z):
            a = (th, *extra_args, key)
            return jnp.exp(_log_weight(at(z)(*a), ks)) * at(z)(*a).cost
        return jnp.sum(jax.vmap(one)(draws))

    def estimator_mean(th):
        def one(z):
            a = (th, *extra_args, key)
            g = scg.scg_grad(f, argnums=argnums, draws=z, **options)(*a)
            return jax.tree.map(lambda x: jax.lax.stop_gradient(weight(th, z)) * x, g)
        return jax.tree.map(lambda x: jnp.sum(x, 0), jax.vmap(one)(draws))

    def hessian_mean(th):
        def one(z):
            a = (th, *extra_args, key)
            h = jax.hessian(scg.surrogate(f, draws=z, **options), argnums=argnums)(*a)
            return jax.tree.map(lambda x: jax.lax.stop_gradient(weight(th, z)) * x, h)
        return jax.tree.map(lambda x: jnp.sum(x, 0), jax.vmap(one)(draws))

    value = expected_cost(theta)
    grad = jax.grad(expected_cost)(theta)
    est = estimator_mean(theta)
    if not hessian:
        return value, grad, None, est, None
    return value, grad, jax.hessian(expected_cost)(theta), est, hessian_mean(theta)


def assert_exact(f: Callable, theta, key=None, *, hessian: bool = True,
                 supports: dict | None = None, extra_args: tuple = (), **options) -> None:
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
            lambda x: jnp.asarray(x, jnp.float64)
            if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, extra_args)
        args = (theta, *extra_args, key)
        names, draws, ks = enumerate_draws(f, args, supports)

        def mass(th):
            a = (th, *extra_args, key)
            return jnp.sum(jax.vmap(
                lambda z: jnp.exp(_log_weight(scg.trace(f, draws=z)(*a), ks)))(draws))

        np.testing.assert_allclose(float(mass(theta)), 1.0, rtol=1e-12,
                                   err_msg="total probability of the enumerated draws")
        for g in jax.tree.leaves(jax.grad(mass)(theta)):
            np.testing.assert_allclose(np.asarray(g), 0.0, atol=1e-12,
                                       err_msg="gradient of the total probability")
        if hessian:
            for h in jax.tree.leaves(jax.hessian(mass)(theta)):
                np.testing.assert_allclose(np.asarray(h), 0.0, atol=1e-12,
                                           err_msg="Hessian of the total probability")
        value, grad, hess, est, est_h = exact_moments(
            f, theta, key, supports=supports, hessian=hessian, extra_args=extra_args, **options)
        assert any(float(jnp.max(jnp.abs(g))) > 1e-6 for g in jax.tree.leaves(grad)), \
            "degenerate test: the exact gradient is zero"
        for (path, g_est), g in zip(jax.tree_util.tree_leaves_with_path(est), jax.tree.leaves(grad)):
            np.testing.assert_allclose(
                np.asarray(g_est), np.asarray(g), rtol=RTOL, atol=ATOL,
                err_msg=f"E[scg_grad] vs the gradient of E[f] {jax.tree_util.keystr(path)}")
        if hessian:
            for h_est, h in zip(jax.tree.leaves(est_h), jax.tree.leaves(hess)):
                np.testing.assert_allclose(np.asarray(h_est), np.asarray(h), rtol=RTOL, atol=ATOL,
                                           err_msg="E[hessian(surrogate)] vs the Hessian of E[f]")

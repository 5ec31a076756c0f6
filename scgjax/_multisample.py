"""Multi-sample objectives: the IWAE bound, with VIMCO's leave-one-out baselines.

`iwae(f, num_particles=K)` runs `f` (a program returning one particle's log-weight
`log w_k = log p(x, z_k) − log q(z_k)`) `K` times under `vmap`, with keys split from its
key argument, and returns the surrogate of the bound

    L = log (1/K) Σ_k w_k.

`L` is a nonlinear function of all the particles, so each particle's score nodes are
weighted by the whole of it: the surrogate is DiCE's for one cost that depends on every
particle, `⊡(Σ_k τ_k)·L`, with `τ_k` the log-probabilities of the score-node elements that
`log w_k` depends on, and `L` differentiated through `log w_k` (pathwise sites and the
densities' parameters). VIMCO (Mnih & Rezende 2016) adds, per particle, the baseline

    b_k = L with log w_k replaced by the mean of the other particles' log-weights,

as `Σ_k (1 − ⊡(τ_k))·b_k` (Mao et al. 2019): `b_k` does not depend on particle `k`'s
draws, so the derivatives of every order stay unbiased, and the first derivative is
VIMCO's, `Σ_k (L − b_k)·∇τ_k + ∇L`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _enumerate, _estimators, _graph
from . import _surrogate as S

BASELINES = (None, "vimco")


def iwae(
    f: Callable,
    num_particles: int,
    *,
    baseline: str | None = "vimco",
    has_aux: bool = False,
    key_argnum: int = -1,
    draws: dict | None = None,
) -> Callable:
    """The surrogate of the importance-weighted bound (IWAE, Burda et al. 2016).

    Args:
      f: a stochastic program that draws one particle with `scgjax.sample` (the
        proposal's sites) and returns its log-weight, a floating-point scalar
        (`log p(x, z) − log q(z)`), or `(log_weight, aux)` with `has_aux`.
      num_particles: `K ≥ 2` (`K = 1` is the ELBO: use `scg.surrogate`).
      baseline: `"vimco"` (default): each particle's score terms get VIMCO's
        leave-one-out baseline; `None`: none.
      has_aux: whether `f` returns `(log_weight, aux)`; aux values get a leading axis
        of the K particles.
      key_argnum: the position of `f`'s key argument; the particles' keys are split
        from it.
      draws: site name → values with a leading axis of the K particles, to evaluate the
        estimator at chosen draws (as `surrogate(f, draws=...)`).

    Returns:
      A function with `f`'s signature whose value is the bound `L` for these particles
      and whose derivatives of every order are unbiased estimates of those of `E[L]`
      (maximise it; `jax.grad(lambda *a: -iwae(f, K)(*a))` for a loss). With `has_aux`
      it returns `(L, aux)`.

    Example:
      >>> bound = scg.iwae(log_weight, num_particles=8)(params, x, key)
      >>> grads = jax.grad(lambda p: -scg.iwae(log_weight, 8)(p, x, key))(params)
    """
    if baseline not in BASELINES:
        raise ValueError(f"scgjax.iwae: unknown baseline {baseline!r}; choose 'vimco' or None.")
    if (
        isinstance(num_particles, bool)
        or not isinstance(num_particles, (int, np.integer))
        or num_particles < 2
    ):
        raise ValueError(
            f"scgjax.iwae: num_particles must be an int >= 2, got {num_particles!r} "
            "(one particle is the ELBO: use scg.surrogate)."
        )
    K = int(num_particles)

    def particle(args, kwargs, particle_draws):
        closed, dyn_leaves, rebuild_aux = S._prepare(f, args, kwargs, has_aux)
        if _enumerate.has_enumerated_sites(closed):
            raise ValueError(
                "scgjax.iwae: a particle draws a site evaluated at several values "
                f"(estimator {_estimators.several_values()}); the bound is a "
                "nonlinear function of each particle's single draw. Use 'score' or "
                "'pathwise' for the proposal's sites."
            )
        ids = None
        if particle_draws:
            ids = S._draws_by_id(S._abstract_pass(closed, dyn_leaves), particle_draws)
        cost, aux, graph = S._interpret_program(closed, dyn_leaves, rebuild_aux, ids)
        if graph.has_baselines or graph.baseline_terms:
            raise ValueError(
                "scgjax.iwae: baseline= on scg.sample inside a particle: the bound's "
                "baselines are VIMCO's (baseline='vimco'). Drop the per-site baselines."
            )
        whole = cost.collapsed()
        if whole.deps:
            tau = _graph.weighted_term(
                whole.deps, jnp.ones((), whole.value.dtype), graph.log_probs, {}, boxed=False
            )
        else:
            tau = jnp.zeros((), whole.value.dtype)
        return whole.value, tau, aux

    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        keys = jax.random.split(S._key_at(args, key_argnum), K)
        log_w, tau, aux = jax.vmap(
            lambda k, d: particle(S._with_key(args, key_argnum, k), kwargs, d)
        )(keys, draws)
        bound = jax.nn.logsumexp(log_w) - jnp.log(K).astype(log_w.dtype)
        value = _graph.magic_box(jnp.sum(tau)) * bound
        if baseline == "vimco":
            lw = lax.stop_gradient(log_w)
            others = (jnp.sum(lw) - lw) / (K - 1)  # mean of the other log-weights
            replaced = jnp.where(jnp.eye(K, dtype=bool), others[:, None], lw[None, :])
            b = jax.nn.logsumexp(replaced, axis=1) - jnp.log(K).astype(lw.dtype)
            value = value + jnp.sum((1 - _graph.magic_box(tau)) * b)
        value = lax.stop_gradient(bound) + (value - lax.stop_gradient(value))
        return (value, aux) if has_aux else value

    return wrapped

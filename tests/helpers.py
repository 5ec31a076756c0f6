"""Statistical test helpers: Monte Carlo draws of an estimator and exact references.

Every statistical test in this suite has the same shape: draw an estimator ``N`` times
with fixed keys (one batched, jitted computation), then compare the per-component Monte
Carlo mean with an analytic or exactly enumerated expectation, within a multiple of the
standard error that the draws themselves give. The tolerance is set by the data, so a
biased estimator fails once ``N`` is large enough, and a silent zero gradient fails
always.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def mc_draws(estimator: Callable[[jax.Array], object], n: int, seed: int):
    """``n`` independent draws of ``estimator(key)``, stacked along a leading axis.

    The keys are ``jax.random.split(jax.random.key(seed), n)``: fixed, so a test always
    sees the same draws.
    """
    keys = jax.random.split(jax.random.key(seed), n)
    return jax.jit(jax.vmap(estimator))(keys)


def _as_f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def assert_mc_close(draws, expected, n_sigma: float = 5.0) -> None:
    """Assert that the Monte Carlo mean of ``draws`` matches ``expected``.

    Args:
      draws: a pytree of arrays, each with a leading axis of Monte Carlo draws.
      expected: a pytree of the same structure, without the leading axis (the exact
        expectation, e.g. an analytic or enumerated gradient).
      n_sigma: tolerance per component, in standard errors ``std / sqrt(N)``.

    A component whose draws have zero standard error must equal its expectation exactly,
    and a zero standard error where the expectation is nonzero fails outright: a
    gradient that is silently zero (or constant) in every draw is never accepted.
    """
    draws_leaves, draws_def = jax.tree_util.tree_flatten_with_path(draws)
    expected_leaves, expected_def = jax.tree_util.tree_flatten(expected)
    assert draws_def.num_leaves == expected_def.num_leaves and (
        jax.tree_util.tree_structure(draws) == expected_def
    ), f"pytree mismatch: draws {jax.tree_util.tree_structure(draws)} vs expected {expected_def}"
    failures = []
    for (path, d), e in zip(draws_leaves, expected_leaves):
        name = jax.tree_util.keystr(path) or "<root>"
        d = _as_f64(d)
        e = _as_f64(e)
        n = d.shape[0]
        assert n >= 2, f"{name}: need at least two draws, got {n}"
        assert d.shape[1:] == e.shape, (
            f"{name}: draw shape {d.shape[1:]} != expected shape {e.shape}"
        )
        assert np.all(np.isfinite(d)), f"{name}: non-finite draws"
        mean = d.mean(axis=0)
        se = d.std(axis=0, ddof=1) / np.sqrt(n)
        for idx in np.ndindex(e.shape):
            m, s, x = mean[idx], se[idx], e[idx]
            where = f"{name}{list(idx) if idx else ''}"
            if s == 0.0:
                if x != 0.0:
                    failures.append(
                        f"{where}: every draw is {m!r} (standard error 0) but the "
                        f"expectation is {x!r}"
                    )
                elif m != 0.0:
                    failures.append(f"{where}: every draw is {m!r}, expected exactly 0")
            elif abs(m - x) > n_sigma * s:
                failures.append(
                    f"{where}: MC mean {m:.6g} vs expected {x:.6g}; "
                    f"|diff| = {abs(m - x):.3g} = {abs(m - x) / s:.1f} standard errors "
                    f"(se {s:.3g}, N={n}, allowed {n_sigma})"
                )
    assert not failures, "Monte Carlo mean differs from the exact expectation:\n  " + (
        "\n  ".join(failures)
    )


def assert_variance_close(
    draws, expected_var: float, expected_mu4: float, n_sigma: float = 5.0
) -> None:
    """Assert that the empirical variance of 1-D ``draws`` matches ``expected_var``.

    The standard error of a sample variance is ``sqrt((mu4 - sigma^4) / N)``, with
    ``mu4`` the fourth central moment of one draw.
    """
    d = _as_f64(draws)
    assert d.ndim == 1
    n = d.shape[0]
    emp = d.var(ddof=1)
    se = np.sqrt((expected_mu4 - expected_var**2) / n)
    assert se > 0
    assert abs(emp - expected_var) <= n_sigma * se, (
        f"empirical variance {emp:.6g} vs expected {expected_var:.6g}: "
        f"{abs(emp - expected_var) / se:.1f} standard errors (se {se:.3g}, N={n})"
    )


# ---------------------------------------------------------------------------------------
# Exact references. They use probabilities (sigmoid/softmax), never numpyro's log_prob,
# so they are independent of the code under test and of numpyro's derivative at logit 0.
# ---------------------------------------------------------------------------------------


def bernoulli_pmf(z, logits):
    """P(z) for z in {0, 1} under Bernoulli(logits), differentiable in logits."""
    p = jax.nn.sigmoid(logits)
    return jnp.where(z == 1, p, 1.0 - p)


def enumerate_expectation(
    weighted_cost: Callable[..., jax.Array], supports: Sequence[Iterable[int]]
) -> jax.Array:
    """Σ over the product of finite ``supports`` of ``weighted_cost(*config)``.

    ``weighted_cost`` returns probability(config) * E[cost | config] (the inner
    expectation may be a closed form over continuous variables).
    """
    total = 0.0
    for config in itertools.product(*supports):
        total = total + weighted_cost(*config)
    return total


# ---------------------------------------------------------------------------------------
# Hand-written estimators and exact moments (variance-reduction tests).
# ---------------------------------------------------------------------------------------


def magic_box(tau):
    """DiCE's ⊡(τ) = exp(τ − ⊥τ): value 1, derivative ⊡(τ)·∇τ (Foerster et al. 2018)."""
    return jnp.exp(tau - jax.lax.stop_gradient(tau))


def bernoulli_logits_log_prob(v, logits):
    """log q(v) for Bernoulli(logits=l), written out by hand: v·l − softplus(l)."""
    return v * logits - jax.nn.softplus(logits)


def binary_configs(n: int) -> np.ndarray:
    """Every configuration of ``n`` binary variables, as a float32 ``(2**n, n)`` array."""
    return np.array(list(itertools.product((0, 1), repeat=n)), dtype=np.float32)


def discrete_moments(values, probs):
    """Mean, variance and fourth central moment (float64, per component) of a random
    vector that takes ``values[j]`` with probability ``probs[j]`` (leading axis j)."""
    v = _as_f64(values)
    p = _as_f64(probs)
    assert abs(p.sum() - 1.0) < 1e-6, f"probabilities sum to {p.sum()}"
    p = p.reshape(p.shape + (1,) * (v.ndim - 1))
    mean = (p * v).sum(0)
    centred = v - mean
    return mean, (p * centred**2).sum(0), (p * centred**4).sum(0)


def assert_trees_allclose(
    got, want, rtol: float = 1e-4, atol: float = 1e-5, err_msg: str = ""
) -> None:
    """Leaf-by-leaf ``np.testing.assert_allclose`` of two pytrees of the same structure."""
    got_def = jax.tree_util.tree_structure(got)
    want_def = jax.tree_util.tree_structure(want)
    assert got_def == want_def, f"pytree mismatch: {got_def} vs {want_def}"
    for (path, g), w in zip(
        jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_leaves(want)
    ):
        g, w = _as_f64(g), _as_f64(w)
        assert g.shape == w.shape, f"{jax.tree_util.keystr(path)}: {g.shape} vs {w.shape}"
        np.testing.assert_allclose(
            g,
            w,
            rtol=rtol,
            atol=atol,
            err_msg=f"{jax.tree_util.keystr(path) or '<root>'} {err_msg}",
        )


def assert_variance_ratio_below(draws_a, draws_b, ratio: float, n_sigma: float = 5.0) -> None:
    """Assert ``Var[a] < ratio · Var[b]``, significant at ``n_sigma`` standard errors.

    ``draws_a`` and ``draws_b`` are 1-D with the same length, paired (same keys) or
    independent. The statistic is the mean of ``(a − ā)² − ratio·(b − b̄)²`` per draw, whose
    standard error the draws give; it must lie more than ``n_sigma`` standard errors
    below zero.
    """
    a, b = _as_f64(draws_a), _as_f64(draws_b)
    assert a.ndim == b.ndim == 1 and a.shape == b.shape
    d = (a - a.mean()) ** 2 - ratio * (b - b.mean()) ** 2
    se = d.std(ddof=1) / np.sqrt(d.shape[0])
    assert d.mean() + n_sigma * se < 0.0, (
        f"variance {a.var():.6g} is not below {ratio} x {b.var():.6g} = "
        f"{ratio * b.var():.6g} by {n_sigma} standard errors (statistic "
        f"{d.mean():.4g}, se {se:.3g}, N={a.shape[0]})"
    )


def assert_variance_below(draws, bound: float, n_sigma: float = 5.0) -> None:
    """Assert that the variance of 1-D ``draws`` is below ``bound`` (an exact number, e.g.
    a coarser estimator's enumerated variance) by ``n_sigma`` standard errors of the
    sample variance (estimated from the draws' fourth central moment)."""
    d = _as_f64(draws)
    assert d.ndim == 1
    n = d.shape[0]
    c = d - d.mean()
    var = (c**2).mean()
    se = np.sqrt(max((c**4).mean() - var**2, 0.0) / n)
    assert var + n_sigma * se < bound, (
        f"variance {var:.6g} (se {se:.3g}, N={n}) is not below {bound:.6g} by "
        f"{n_sigma} standard errors"
    )

"""Automatic plates and causality through the indexing idioms people write (issue 7).

Each program below draws one score-function site per row (or per step) and reaches the
cost through one idiom: gathers (`x[jnp.arange(B), k]`, `take_along_axis`, `jnp.take`,
a `vmap`ped index, `mu[z]`, labels picked out of a `log_softmax`), `one_hot`, a
scatter-add, `segment_sum`, `sort`/`top_k`/`cumsum` along the other axis, reshapes that
merge other axes, a convolution, `xs[t]` and `buf.at[t].set(c)` at a loop counter, and distributions
with event axes (`MultivariateNormal`, `Dirichlet`, `Multinomial`, `Independent`).

Two checks per program:

* **Same key, same estimator.** `scg_grad(f)` equals the hand-written per-row (or
  reward-to-go) DiCE estimator `∇ Σ_i ⊡(τ_i)·c_i` at the same draws, to float32
  rounding; and it differs from the whole-batch estimator `∇ ⊡(Σ log p)·Σ c` by far more
  than that, so a rule that fell back to "every element" fails here.
* **Unbiased.** Where the sites have finite supports, the estimator's exact expectation
  (enumerating every joint draw, float64) equals the exact gradient: a rule that claimed
  more alignment than the program has would be biased and fail there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax import lax

import scgjax as scg

try:
    from .exact import assert_exact
except ImportError:  # tests/ is not a package
    from exact import assert_exact

B, K, T = 3, 3, 3
THETA = np.linspace(-1.2, 0.9, B * K).reshape(B, K).astype(np.float32)
X = jnp.array([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7], [-0.4, 0.8, 1.1]], np.float32)
OBS = jnp.array([0.4, -0.9, 1.3], np.float32)
LABELS = np.array([2, 0, 1], np.int32)
CAT = {"k": (0, 1, 2)}


def box(tau):
    return jnp.exp(tau - lax.stop_gradient(tau))


def cat(key, th):
    return scg.sample(key, dist.Categorical(logits=th), name="k")


def cat_lp(th, k):
    return jnp.take_along_axis(jax.nn.log_softmax(th), k[:, None], axis=1)[:, 0]


def bern(key, logits):
    return scg.sample(key, dist.Bernoulli(logits=logits), name="k").astype(jnp.float32)


def bern_lp(logits, z):
    return z * jax.nn.log_sigmoid(logits) + (1 - z) * jax.nn.log_sigmoid(-logits)


def rows_of(k, th):
    """A (B, K) array that depends on row i's draw only."""
    return X + jax.nn.one_hot(k, K) * th


# -- The programs: f(θ, *extra, key), and by hand: (τ per cost element, costs) ----------


def gather_arange(th, key):
    k = cat(key, th)
    return jnp.sum((X[jnp.arange(B), k] - th[:, 0]) ** 2)


def gather_arange_hand(th, z):
    return cat_lp(th, z["k"]), (X[np.arange(B), z["k"]] - th[:, 0]) ** 2


def take_along(th, key):
    k = cat(key, th)
    return jnp.sum((jnp.take_along_axis(X, k[:, None], axis=1)[:, 0] - th[:, 0]) ** 2)


def take(th, key):
    k = cat(key, th)
    mu = 2.0 * th[0]
    return jnp.sum((jnp.take(mu, k) - OBS) ** 2)


def take_hand(th, z):
    return cat_lp(th, z["k"]), (2.0 * th[0][z["k"]] - OBS) ** 2


def vmap_index(th, key):
    k = cat(key, th)
    picked = jax.vmap(lambda xi, ki: xi[ki])(X + th, k)
    return jnp.sum(picked**2)


def vmap_index_hand(th, z):
    return cat_lp(th, z["k"]), (X + th)[np.arange(B), z["k"]] ** 2


def mixture_mean(th, key):
    k = cat(key, th)
    mu = 2.0 * th[0]
    return -jnp.sum(dist.Normal(mu[k], 1.0).log_prob(OBS))


def mixture_mean_hand(th, z):
    # -log N(obs; mu, 1) without its constant, a cost term of its own that no score
    # weights (scgjax splits it off).
    return cat_lp(th, z["k"]), 0.5 * (OBS - 2.0 * th[0][z["k"]]) ** 2


def label_nll(th, labels, key):
    z = bern(key, th[:, 0])
    logits = z[:, None] * th + X
    return -jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(B), labels])


def label_nll_take_along(th, labels, key):
    z = bern(key, th[:, 0])
    logits = z[:, None] * th + X
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


def label_nll_hand(th, z, labels):
    logits = z["k"][:, None] * th + X
    nll = -jax.nn.log_softmax(logits)[np.arange(B), labels]
    return bern_lp(th[:, 0], z["k"]), nll


PERMUTATION = jnp.array([2, 0, 1])


def gather_constant_permutation(th, key):
    """An index known while tracing that is not `arange`: row b reads draw perm[b]."""
    k = cat(key, th)
    c = (X[jnp.arange(B), k] - th[:, 0]) ** 2
    return jnp.sum(c[PERMUTATION] * jnp.array([1.0, 2.0, 3.0]))


def one_hot(th, key):
    k = cat(key, th)
    return jnp.sum((jnp.sum(X * jax.nn.one_hot(k, K), -1) - th[:, 0]) ** 2)


def scatter_add(th, key):
    k = cat(key, th)
    m = jnp.zeros((B, K)).at[jnp.arange(B), k].add(th[:, 0])
    return jnp.sum(jnp.sum(m * X, -1) ** 2)


def scatter_add_hand(th, z):
    return cat_lp(th, z["k"]), (th[:, 0] * X[np.arange(B), z["k"]]) ** 2


def dynamic_slice_columns(th, start, key):
    """Columns from a start that is data: the rows (taken whole) stay aligned."""
    v = rows_of(cat(key, th), th)
    return jnp.sum(jnp.sum(lax.dynamic_slice(v, (start * 0, start), (B, 2)), -1) ** 2)


def dynamic_slice_columns_hand(th, z, start):
    return cat_lp(th, z["k"]), jnp.sum(rows_of(z["k"], th)[:, start : start + 2], -1) ** 2


def vmap_scatter_add(th, key):
    k = cat(key, th)
    m = jax.vmap(lambda ki, v: jnp.zeros(K).at[ki].add(v))(k, th[:, 0])  # batching dims
    return jnp.sum(jnp.sum(m * X, -1) ** 2)


SEGMENTS = np.array([1, 0, 1], np.int32)


def segment_sum(th, segments, key):
    k = cat(key, th)
    per_row = (X[jnp.arange(B), k] - th[:, 0]) ** 2
    return jnp.sum(jax.ops.segment_sum(per_row, segments, num_segments=2) * jnp.array([1.0, 3.0]))


def segment_sum_hand(th, z, segments):
    weight = jnp.array([1.0, 3.0])[segments]
    return cat_lp(th, z["k"]), weight * (X[np.arange(B), z["k"]] - th[:, 0]) ** 2


W = jnp.array([0.7, -0.2, 1.3], np.float32)


def sort_rows(th, key):
    return jnp.sum((jnp.sort(rows_of(cat(key, th), th), axis=1) @ W) ** 2)


def sort_rows_hand(th, z):
    return cat_lp(th, z["k"]), (jnp.sort(rows_of(z["k"], th), axis=1) @ W) ** 2


def top_k_rows(th, key):
    return jnp.sum(jnp.sum(lax.top_k(rows_of(cat(key, th), th), 2)[0], -1) ** 2)


def top_k_rows_hand(th, z):
    return cat_lp(th, z["k"]), jnp.sum(lax.top_k(rows_of(z["k"], th), 2)[0], -1) ** 2


def cumsum_rows(th, key):
    return jnp.sum(jnp.cumsum(rows_of(cat(key, th), th), axis=1) ** 2)


def cumsum_rows_hand(th, z):
    return cat_lp(th, z["k"]), jnp.sum(jnp.cumsum(rows_of(z["k"], th), axis=1) ** 2, -1)


def merge_reshape(th, key):
    v = rows_of(cat(key, th), th)
    both = jnp.stack([v, v**2], axis=1).reshape(B, 2 * K)  # (B, 2, K) -> (B, 2K)
    return jnp.sum(jnp.sum(both @ np.ones((2 * K, 2), np.float32), -1) ** 2)


def merge_reshape_hand(th, z):
    v = rows_of(z["k"], th)
    return cat_lp(th, z["k"]), (2 * jnp.sum(v + v**2, -1)) ** 2


KERNEL = jnp.array([[[0.5, -1.5]]], np.float32)  # (out channels, in channels, width)


def conv(th, key):
    v = rows_of(cat(key, th), th)[:, None, :]  # (B, 1, K): batch, channel, width
    out = lax.conv_general_dilated(v, KERNEL.astype(v.dtype), (1,), "VALID")
    return jnp.sum(out**2)


def conv_hand(th, z):
    v = rows_of(z["k"], th)
    out = 0.5 * v[:, :-1] - 1.5 * v[:, 1:]
    return cat_lp(th, z["k"]), jnp.sum(out**2, -1)


SAME_KEY = [
    (gather_arange, gather_arange_hand, ()),
    (take_along, gather_arange_hand, ()),
    (take, take_hand, ()),
    (vmap_index, vmap_index_hand, ()),
    (mixture_mean, mixture_mean_hand, ()),
    (label_nll, label_nll_hand, (LABELS,)),
    (label_nll_take_along, label_nll_hand, (LABELS,)),
    (one_hot, gather_arange_hand, ()),
    (scatter_add, scatter_add_hand, ()),
    (vmap_scatter_add, scatter_add_hand, ()),
    (dynamic_slice_columns, dynamic_slice_columns_hand, (np.int32(1),)),
    (segment_sum, segment_sum_hand, (SEGMENTS,)),
    (sort_rows, sort_rows_hand, ()),
    (top_k_rows, top_k_rows_hand, ()),
    (cumsum_rows, cumsum_rows_hand, ()),
    (merge_reshape, merge_reshape_hand, ()),
    (conv, conv_hand, ()),
]


# -- Loops: xs[t] and buf.at[t].set(c) at the loop counter --------------------------------

R = jnp.array([0.2, -0.5, 0.9], np.float32)


def _step_logit(th, t, s):
    return th[t, 0] + 0.8 * s - 0.3


def fori_buffer(th, key):
    keys = jax.random.split(key, T)

    def body(t, carry):
        buf, s = carry
        a = bern(keys[t], _step_logit(th, t, s))
        return buf.at[t].set((a - R[t]) ** 2 * th[t, 1]), s + a

    buf, _ = lax.fori_loop(0, T, body, (jnp.zeros(T), 0.0))
    return jnp.sum(buf)


def fori_update_slice(th, key):
    keys = jax.random.split(key, T)

    def body(t, carry):
        buf, s = carry
        a = bern(keys[t], _step_logit(th, t, s))
        c = (a - R[t]) ** 2 * th[t, 1]
        return lax.dynamic_update_slice(buf, c[None], (t,)), s + a

    buf, _ = lax.fori_loop(0, T, body, (jnp.zeros(T), 0.0))
    return jnp.sum(buf)


def scan_arange(th, key):
    keys = jax.random.split(key, T)
    r = jnp.asarray(R)

    def body(s, t):
        a = bern(keys[t], _step_logit(th, t, s))
        return s + a, (a - r[t]) ** 2 * th[t, 1]

    _, costs = lax.scan(body, 0.0, jnp.arange(T))
    return jnp.sum(costs)


def loop_hand(th, z):
    """Step t's cost weighted by the log-probs of steps <= t (reward-to-go)."""
    a = z["k"]
    s = jnp.concatenate([jnp.zeros(1), jnp.cumsum(a)[:-1]])
    lp = bern_lp(jnp.stack([_step_logit(th, t, s[t]) for t in range(T)]), a)
    return jnp.cumsum(lp), (a - R) ** 2 * th[:, 1]


def read_draws(th, key):
    a = bern(key, th[:, 0])  # (T,), drawn before the loop

    def body(t, buf):
        return buf.at[t].set((a[t] - R[t]) ** 2 * th[t, 1])

    return jnp.sum(lax.fori_loop(0, T, body, jnp.zeros(T)))


def read_draws_hand(th, z):
    return bern_lp(th[:, 0], z["k"]), (z["k"] - R) ** 2 * th[:, 1]


LOOPS = [
    (fori_buffer, loop_hand, ()),
    (fori_update_slice, loop_hand, ()),
    (scan_arange, loop_hand, ()),
    (read_draws, read_draws_hand, ()),
]


def scatter_by_data_permutation(th, perm, key):
    """Rows scattered to positions that are data, then squared: not aligned."""
    k = cat(key, th)
    c = X[jnp.arange(B), k] - th[:, 0]
    return jnp.sum(jnp.zeros(B).at[perm].add(c) ** 2 * jnp.array([1.0, 2.0, 3.0]))


def conv_same_padding(th, key):
    """A convolution mixes neighbouring positions: the width axis is not aligned."""
    z = bern(key, th[0])  # (K,) draws along the width
    out = lax.conv_general_dilated(z[None, None, :], KERNEL.astype(z.dtype), (1,), "SAME")
    return jnp.sum(out[0, 0] ** 2 * jnp.array([1.0, 2.0, 3.0]))


def reshape_regroups(th, key):
    """(2, 3, 5) -> (5, 3, 2) is one group: its middle axes have equal sizes, but
    element (i, j, k) of the output is not element (., j, .) of the input."""
    z = bern(key, th[1])  # (3,)
    v = jnp.broadcast_to(z[None, :, None], (2, 3, 5)) * jnp.arange(30.0).reshape(2, 3, 5)
    w = jnp.sin(jnp.arange(30.0)).reshape(5, 3, 2)
    return jnp.sum(w * v.reshape(5, 3, 2) ** 2) / 30.0


SYMMETRIC = jnp.array([[1.0, 0.3, -0.2], [0.3, 2.0, 0.5], [-0.2, 0.5, 3.5]])


def eigh_mixes_rows(th, key):
    """A multi-output primitive (eigh: eigenvalues and vectors) mixes every element."""
    z = bern(key, th[0])
    m = SYMMETRIC + jnp.diag(z * jnp.array([0.7, -0.4, 0.9]))
    w, _ = jnp.linalg.eigh(m, symmetrize_input=False)
    return jnp.sum(w**2 * jnp.array([1.0, 2.0, 3.0]))


def scan_reads_next(th, key):
    """Step t reads draw t + 1: weighted by the draws after t (a cover), not by draw t."""
    a = bern(key, th[:, 0])

    def body(s, t):
        return s, (a[t + 1] - R[t]) ** 2 * th[t, 1]

    _, costs = lax.scan(body, 0.0, jnp.arange(T - 1))
    return jnp.sum(costs)


def fori_writes_next(th, key):
    """Step t writes element t + 1 (the last write is dropped): not element t's."""
    keys = jax.random.split(key, T)

    def body(t, buf):
        a = bern(keys[t], th[t, 0])
        return buf.at[t + 1].set((a - R[t]) ** 2 * th[t, 1])

    return jnp.sum(lax.fori_loop(0, T, body, jnp.full(T, 0.5)))


def counter_cast_to_bool(th, key):
    """`t.astype(bool)` is `t != 0`: step 2 reads draw 1 (found in review)."""
    a = bern(key, th[:, 0])

    def body(t, buf):
        i = t.astype(bool).astype(jnp.int32)
        return buf.at[t].set((a[i] - R[t]) ** 2 * th[t, 1])

    return jnp.sum(lax.fori_loop(0, T, body, jnp.zeros(T)))


def counter_wraps_in_uint8(th, key):
    """`(t - 1)` in uint8 wraps at t = 0: step 0 reads the last draw (found in review)."""
    a = bern(key, th[:, 0])

    def body(t, buf):
        i = (t - 1).astype(jnp.uint8).astype(jnp.int32) + 1
        return buf.at[t].set((a[i] - R[t]) ** 2 * th[t, 1])

    return jnp.sum(lax.fori_loop(0, T, body, jnp.zeros(T)))


# Offsets and casts of the loop counter: only checked to be unbiased.
OFFSETS = [
    (gather_constant_permutation, None, ()),
    (scatter_by_data_permutation, None, (np.array([2, 0, 1], np.int32),)),
    (conv_same_padding, None, ()),
    (reshape_regroups, None, ()),
    (eigh_mixes_rows, None, ()),
    (scan_reads_next, None, ()),
    (fori_writes_next, None, ()),
    (counter_cast_to_bool, None, ()),
    (counter_wraps_in_uint8, None, ()),
]


# -- Distributions with event axes ----------------------------------------------------------

M = jnp.array([[1.0, -0.5], [0.2, 0.8], [-1.1, 0.3]], np.float32)  # (K, D) means


def mvn_mixture(th, key):
    k1, k2 = jax.random.split(key)
    k = cat(k1, th)
    x = scg.sample(k2, dist.MultivariateNormal(M[k] * th[:, :1], jnp.eye(2)), name="x")
    return jnp.sum((x - OBS[:2]) ** 2)


def independent_mixture(th, key):
    k1, k2 = jax.random.split(key)
    k = cat(k1, th)
    x = scg.sample(k2, dist.Normal(M[k] * th[:, :1], 1.0).to_event(1), name="x")
    return jnp.sum((x - OBS[:2]) ** 2)


def mixture_hand(th, z):
    """x = loc(θ, k) + noise; the noise is the traced draw minus its loc at THETA."""
    noise = z["x"] - M[z["k"]] * THETA[:, :1]
    x = M[z["k"]] * th[:, :1] + noise
    return cat_lp(th, z["k"]), jnp.sum((x - OBS[:2]) ** 2, -1)


def dirichlet_rows(th, key):
    k1, k2 = jax.random.split(key)
    k = cat(k1, th)
    conc = 1.0 + jax.nn.one_hot(k, K) * jnp.exp(th)
    p = scg.sample(k2, dist.Dirichlet(conc), name="p", estimator="score")
    return jnp.sum(jnp.sum(p * X, -1) ** 2)


def dirichlet_rows_hand(th, z):
    conc = 1.0 + jax.nn.one_hot(z["k"], K) * jnp.exp(th)
    lp = cat_lp(th, z["k"]) + dist.Dirichlet(conc).log_prob(z["p"])
    return lp, jnp.sum(z["p"] * X, -1) ** 2


def multinomial_rows(th, key):
    k1, k2 = jax.random.split(key)
    k = cat(k1, th)
    n = scg.sample(k2, dist.Multinomial(3, logits=th + jax.nn.one_hot(k, K)), name="n")
    return jnp.sum(jnp.sum(n * X, -1) ** 2)


def multinomial_rows_hand(th, z):
    d = dist.Multinomial(3, logits=th + jax.nn.one_hot(z["k"], K))
    lp = cat_lp(th, z["k"]) + d.log_prob(z["n"])
    return lp, jnp.sum(z["n"] * X, -1) ** 2


EVENTS = [
    (mvn_mixture, mixture_hand, ()),
    (independent_mixture, mixture_hand, ()),
    (dirichlet_rows, dirichlet_rows_hand, ()),
    (multinomial_rows, multinomial_rows_hand, ()),
]


def _ids(cases):
    return [f.__name__ for f, _, _ in cases]


@pytest.mark.parametrize(
    "f, hand, extra", SAME_KEY + LOOPS + EVENTS, ids=_ids(SAME_KEY + LOOPS + EVENTS)
)
def test_same_key_as_the_per_row_estimator(f, hand, extra):
    key = jax.random.key(3)
    theta = jnp.asarray(THETA)
    sites = scg.trace(f)(theta, *extra, key).sites
    z = {name: site.value for name, site in sites.items()}
    got = scg.scg_grad(f)(theta, *extra, key)

    def per_row(th):
        tau, c = hand(th, z, *extra)
        return jnp.sum(box(tau) * c)

    def whole(th):  # every cost element weighted by every draw
        _, c = hand(th, z, *extra)
        score = {n: v for n, v in z.items() if sites[n].estimator == "score"}
        log_p = scg.trace(f, draws=score)(th, *extra, key).score_log_joint
        return box(log_p) * jnp.sum(c)

    want = jax.grad(per_row)(theta)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert float(jnp.max(jnp.abs(jax.grad(whole)(theta) - want))) > 1e-2, (
        "degenerate: the whole-batch estimator is the same"
    )


@pytest.mark.parametrize(
    "f, extra",
    [(f, extra) for f, _, extra in SAME_KEY + LOOPS + OFFSETS],
    ids=_ids(SAME_KEY + LOOPS + OFFSETS),
)
def test_exact(f, extra):
    binary = [g for g, _, _ in LOOPS + OFFSETS[2:]] + [label_nll, label_nll_take_along]
    discrete = f in binary
    assert_exact(f, THETA, extra_args=extra, supports=None if discrete else CAT, hessian=False)

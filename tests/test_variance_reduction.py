"""Variance reduction: automatic plates, causality in loops, baselines, leave-one-out,
downstream costs and the variance diagnostic.

Three kinds of checks:

* **Same key, same estimate.** For a fixed key, `scg.scg_grad` equals `jax.grad` of a
  DiCE surrogate written by hand at the granularity the feature promises (per row, reward
  to go, baseline subtracted, ...). The hand-written side redraws the same values with
  numpyro (`d.sample(k)` draws what `scg.sample(k, d)` draws) and uses its own
  log-probability `v·l − softplus(l)`. Where it matters, the test also checks that the
  coarser estimator differs for those keys, so that the equality is not vacuous.
* **Unbiasedness.** N >= 1e5 draws with fixed keys, compared component by component with
  an exactly enumerated gradient within 5 standard errors (`helpers.assert_mc_close`).
* **Variance.** The empirical variance of the estimator against its exact variance
  (enumerated over every configuration), with the standard error of a sample variance
  (`helpers.assert_variance_close`), and ratios against coarser estimators
  (`helpers.assert_variance_ratio_below`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax import lax

import scgjax as scg

try:
    from .helpers import (
        assert_mc_close,
        assert_trees_allclose,
        assert_variance_below,
        assert_variance_close,
        assert_variance_ratio_below,
        bernoulli_logits_log_prob,
        bernoulli_pmf,
        binary_configs,
        discrete_moments,
        magic_box,
        mc_draws,
    )
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from helpers import (
        assert_mc_close,
        assert_trees_allclose,
        assert_variance_below,
        assert_variance_close,
        assert_variance_ratio_below,
        bernoulli_logits_log_prob,
        bernoulli_pmf,
        binary_configs,
        discrete_moments,
        magic_box,
        mc_draws,
    )

N = 100_000
F32 = jnp.float32
lq = bernoulli_logits_log_prob
sg = lax.stop_gradient


def bern(key, logits):
    """What `scg.sample(key, dist.Bernoulli(logits=logits))` draws, as float32."""
    return dist.Bernoulli(logits=logits).sample(key).astype(F32)


def same_key(keys, **fns):
    """`{name: fn(key)}` for each key, stacked, in one jitted, vmapped computation."""
    return jax.jit(jax.vmap(lambda k: {n: fn(k) for n, fn in fns.items()}))(keys)


def fixed_keys(seed, n=16):
    return jax.random.split(jax.random.key(seed), n)


def assert_not_close(a, b, what):
    """The coarser estimator must differ somewhere, or an equality check is vacuous."""
    a = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(a)])
    b = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(b)])
    assert np.max(np.abs(a - b)) > 1e-2, f"test design: {what} coincide for these keys"


# =======================================================================================
# 1. Automatic plates.
# =======================================================================================

PX = jnp.array([[0.5, -1.0, 0.3], [1.2, 0.4, -0.7], [-0.6, 0.9, 1.1], [0.2, -0.3, -1.4]])
PW1 = jnp.array([[0.8, -0.5], [0.3, 0.9], [-0.6, 0.4]])
PW2 = jnp.array([[1.0, -0.7, 0.5], [-0.4, 0.8, 1.2]])
PB, PH = 4, 2
P_PARAMS = (PW1, PW2)


def rows_cost(z, W2, x):
    """c_i = Σ_p (tanh(z_i @ W2)_p − x_ip)²: a nonlinear function of the whole row z_i."""
    return jnp.sum((jnp.tanh(z @ W2) - x) ** 2, axis=-1)


def plate_vectorized(params, key):
    W1, W2 = params
    z = scg.sample(key, dist.Bernoulli(logits=PX @ W1))  # (B, H)
    return rows_cost(z.astype(F32), W2, PX).mean()


def plate_vmapped(params, key):
    W1, W2 = params

    def row(k, x):
        z = scg.sample(k, dist.Bernoulli(logits=x @ W1))  # (H,)
        return jnp.sum((jnp.tanh(z.astype(F32) @ W2) - x) ** 2)

    return jax.vmap(row)(jax.random.split(key, PB), PX).mean()


def plate_hand(params, key, *, vmapped, whole=False):
    """Σ_i ⊡(Σ_h log q(z_ih))·c_i / B (or the whole-node ⊡(Σ_ih log q(z_ih))·Σ_i c_i / B)."""
    W1, W2 = params
    if vmapped:
        logits = jax.vmap(lambda x: x @ W1)(PX)
        z = jax.vmap(bern)(jax.random.split(key, PB), logits)
    else:
        logits = PX @ W1
        z = bern(key, logits)
    lp = lq(sg(z), logits)
    tau = jnp.sum(lp) if whole else jnp.sum(lp, axis=-1)
    return jnp.mean(magic_box(tau) * rows_cost(sg(z), W2, PX))


def plate_expectation(params):
    W1, W2 = params
    logits = PX @ W1
    zs = jnp.asarray(binary_configs(PB * PH)).reshape(-1, PB, PH)
    prob = jnp.prod(bernoulli_pmf(zs, logits), axis=(1, 2))
    cost = jax.vmap(lambda z: rows_cost(z, W2, PX).mean())(zs)
    return jnp.sum(prob * cost)


@pytest.mark.parametrize("vmapped", [False, True], ids=["vectorized", "vmapped"])
def test_plates_same_key_equal_per_row_hand_written_estimator(vmapped):
    program = plate_vmapped if vmapped else plate_vectorized
    out = same_key(
        fixed_keys(1),
        got=lambda k: scg.scg_value_and_grad(program)(P_PARAMS, k),
        value=lambda k: program(P_PARAMS, k),
        rows=lambda k: jax.grad(plate_hand)(P_PARAMS, k, vmapped=vmapped),
        whole=lambda k: jax.grad(plate_hand)(P_PARAMS, k, vmapped=vmapped, whole=True),
    )
    assert_not_close(out["rows"], out["whole"], "per-row and whole-node estimators")
    assert_trees_allclose(out["got"][1], out["rows"])
    np.testing.assert_allclose(out["got"][0], out["value"], rtol=1e-5)


@pytest.mark.parametrize("vmapped", [False, True], ids=["vectorized", "vmapped"])
def test_plates_are_unbiased(vmapped):
    program = plate_vmapped if vmapped else plate_vectorized
    draws = mc_draws(lambda k: scg.scg_grad(program)(P_PARAMS, k), N, 2 + vmapped)
    assert_mc_close(draws, jax.jit(jax.grad(plate_expectation))(P_PARAMS))


PM = jnp.array([[1.5, -2.0], [0.5, 3.0], [-1.0, 1.0], [2.5, -0.5]])
PQ = jnp.array([[0.9, -1.3, 0.4], [1.7, 0.6, -0.8]])


def plate_split_program(params, key):
    """c = Σ_i tanh(z_i @ v)² + Σ_ih M_ih z_ih: rows through a dot, elements through a
    product; the second sum splits per element."""
    W1, W2 = params
    z = scg.sample(key, dist.Bernoulli(logits=PX @ W1)).astype(F32)
    return jnp.sum(jnp.tanh(z @ W2[:, 0]) ** 2) + jnp.sum(PM * z)


def plate_split_hand(params, key):
    W1, W2 = params
    logits = PX @ W1
    z = sg(bern(key, logits))
    lp = lq(z, logits)
    rows = magic_box(jnp.sum(lp, axis=-1)) * jnp.tanh(z @ W2[:, 0]) ** 2
    elems = magic_box(lp) * PM * z
    return jnp.sum(rows) + jnp.sum(elems)


def plate_broadcast_program(params, key):
    """numpy-style broadcasting (size-1 axes in elementwise ops):
    c = Σ_ihp sin(z_ih Q_hp) + Σ_id tanh((Σ_h z_ih)·x_id)."""
    W1, _ = params
    z = scg.sample(key, dist.Bernoulli(logits=PX @ W1)).astype(F32)
    return jnp.sum(jnp.sin(z[:, :, None] * PQ[None])) + jnp.sum(
        jnp.tanh(jnp.sum(z, axis=-1, keepdims=True) * PX)
    )


def plate_broadcast_hand(params, key):
    W1, _ = params
    logits = PX @ W1
    z = sg(bern(key, logits))
    lp = lq(z, logits)
    elems = magic_box(lp) * jnp.sum(jnp.sin(z[:, :, None] * PQ[None]), -1)
    rows = magic_box(jnp.sum(lp, -1)) * jnp.sum(jnp.tanh(jnp.sum(z, -1, keepdims=True) * PX), -1)
    return jnp.sum(elems) + jnp.sum(rows)


def test_plates_split_additive_tail_at_the_finest_grain():
    out = same_key(
        fixed_keys(4),
        got=lambda k: scg.scg_grad(plate_split_program)(P_PARAMS, k),
        want=lambda k: jax.grad(plate_split_hand)(P_PARAMS, k),
    )
    assert_trees_allclose(out["got"], out["want"])


def test_plates_through_numpy_broadcasting():
    out = same_key(
        fixed_keys(41),
        got=lambda k: scg.scg_grad(plate_broadcast_program)(P_PARAMS, k),
        want=lambda k: jax.grad(plate_broadcast_hand)(P_PARAMS, k),
    )
    assert_trees_allclose(out["got"], out["want"])


def sorted_program(params, key):
    """Every cost element depends on every sample element (sort across rows)."""
    W1, W2 = params
    z = scg.sample(key, dist.Bernoulli(logits=PX @ W1)).astype(F32)
    s = jnp.sort(jnp.tanh(z @ W2), axis=0)
    return jnp.sum((s - PX) ** 2) / PB


def sorted_hand_whole(params, key):
    W1, W2 = params
    logits = PX @ W1
    z = sg(bern(key, logits))
    s = jnp.sort(jnp.tanh(z @ W2), axis=0)
    return magic_box(jnp.sum(lq(z, logits))) * jnp.sum((s - PX) ** 2) / PB


def test_mixing_rows_falls_back_to_the_whole_node():
    out = same_key(
        fixed_keys(5),
        got=lambda k: scg.scg_grad(sorted_program)(P_PARAMS, k),
        want=lambda k: jax.grad(sorted_hand_whole)(P_PARAMS, k),
    )
    assert_trees_allclose(out["got"], out["want"])


def test_mixing_rows_is_unbiased():
    def expectation(params):
        W1, W2 = params
        logits = PX @ W1
        zs = jnp.asarray(binary_configs(PB * PH)).reshape(-1, PB, PH)
        prob = jnp.prod(bernoulli_pmf(zs, logits), axis=(1, 2))
        cost = jax.vmap(lambda z: jnp.sum((jnp.sort(jnp.tanh(z @ W2), axis=0) - PX) ** 2) / PB)(zs)
        return jnp.sum(prob * cost)

    draws = mc_draws(lambda k: scg.scg_grad(sorted_program)(P_PARAMS, k), N, 6)
    assert_mc_close(draws, jax.jit(jax.grad(expectation))(P_PARAMS))


def test_transposed_plate_is_unbiased():
    """Cost element h depends on column h of z (through z.T): aligned along H, mixing
    along B. Either column plates or the whole node is sound; row plates would bias."""
    Y = jnp.array([[0.3, -0.2, 0.5], [-0.6, 0.1, 0.4]])
    V = jnp.array([[0.7, -0.4, 1.1], [0.2, 0.9, -1.3], [-0.5, 0.6, 0.8], [1.2, -0.9, 0.3]])

    def cost(z, W2):
        return jnp.sum((jnp.tanh(z.T @ V) * W2 - Y) ** 2)

    def f(params, key):
        W1, W2 = params
        z = scg.sample(key, dist.Bernoulli(logits=PX @ W1)).astype(F32)
        return cost(z, W2)

    @jax.jit
    def exact(params):
        def expectation(params):
            W1, W2 = params
            zs = jnp.asarray(binary_configs(PB * PH)).reshape(-1, PB, PH)
            prob = jnp.prod(bernoulli_pmf(zs, PX @ W1), axis=(1, 2))
            return jnp.sum(prob * jax.vmap(lambda z: cost(z, W2))(zs))

        return jax.grad(expectation)(params)

    draws = mc_draws(lambda k: scg.scg_grad(f)(P_PARAMS, k), N, 40)
    assert_mc_close(draws, exact(P_PARAMS))


# Ops whose output element i depends on sample elements other than i. Assuming "aligned
# one-to-one" for any of them would weight a cost element by the wrong sample element
# and bias the gradient; a sound library proves the right relation or falls back.
MIX_THETA = jnp.array([0.7, -0.4, 1.1, -0.9, 0.2, 0.5])
MIX_A = jnp.array([2.0, -1.5, 3.0, 1.0, -2.5, 1.5])
MIX_S = jnp.array([1.3, -0.8, 0.6, 1.7, -1.1, 0.9])
MIX_B = jnp.array([-0.2, 0.4, -0.6, 0.1, 0.3, -0.5])
MIXING_OPS = {
    "roll": lambda z: jnp.roll(z, 1),
    "reverse": lambda z: z[::-1],
    "reshape_transpose": lambda z: z.reshape(2, 3).T.reshape(-1),
    "static_permutation_gather": lambda z: z[jnp.array([3, 0, 5, 1, 4, 2])],
    "cumsum": lambda z: jnp.cumsum(z),
    "reverse_cumsum": lambda z: jnp.cumsum(z[::-1])[::-1],
    "sort": lambda z: jnp.sort(z * MIX_S),
    "conv": lambda z: jnp.convolve(z, jnp.array([1.0, -0.5, 0.25]), mode="same"),
    "pad_slice_shift": lambda z: jnp.pad(z, (2, 0))[:6],
    "broadcast_sum": lambda z: jnp.sum(z[None, :] * jnp.eye(6)[::-1], axis=1),
}


def mixing_cost(u):
    return jnp.sum(MIX_A * jnp.tanh(MIX_S * u + MIX_B))


@pytest.mark.parametrize("op", list(MIXING_OPS), ids=list(MIXING_OPS))
def test_non_aligned_ops_are_unbiased(op):
    mix = MIXING_OPS[op]

    def f(theta, key):
        z = scg.sample(key, dist.Bernoulli(logits=theta)).astype(F32)
        return mixing_cost(mix(z))

    def expectation(theta):
        zs = jnp.asarray(binary_configs(6))
        prob = jnp.prod(bernoulli_pmf(zs, theta), axis=1)
        return jnp.sum(prob * jax.vmap(lambda z: mixing_cost(mix(z)))(zs))

    draws = mc_draws(lambda k: scg.scg_grad(f)(MIX_THETA, k), N, 7)
    assert_mc_close(draws, jax.jit(jax.grad(expectation))(MIX_THETA))


def test_gather_with_sampled_index_is_unbiased():
    theta = jnp.array([0.4, -0.8, 1.2, -0.3, 0.5, -0.2, 0.9, 0.1])
    a = jnp.array([2.0, -3.0, 1.5, 4.0])

    def f(theta, key):
        k1, k2 = jax.random.split(key)
        z = scg.sample(k1, dist.Bernoulli(logits=theta[:4])).astype(F32)
        j = scg.sample(k2, dist.Categorical(logits=theta[4:]))
        return a[j] * z[j] + 0.5 * jnp.sum(z)

    def expectation(theta):
        zs = jnp.asarray(binary_configs(4))
        pz = jnp.prod(bernoulli_pmf(zs, theta[:4]), axis=1)  # (16,)
        pj = jax.nn.softmax(theta[4:])  # (4,)
        cost = a[None, :] * zs + 0.5 * jnp.sum(zs, axis=1, keepdims=True)  # (16, 4)
        return jnp.sum(pz[:, None] * pj[None, :] * cost)

    draws = mc_draws(lambda k: scg.scg_grad(f)(theta, k), N, 8)
    assert_mc_close(draws, jax.jit(jax.grad(expectation))(theta))


# Eight rows, one Bernoulli and its own cost each.
V_THETA = jnp.array([-1.0, -0.6, -0.2, 0.1, 0.3, 0.7, 1.0, 1.4])
V_A = jnp.array([3.0, -2.0, 4.0, 1.5, -3.5, 2.5, 5.0, -1.0])
V_T = jnp.array([0.2, 0.8, -0.5, 1.5, 0.3, -1.0, 0.6, 2.0])


def per_row_program(theta, key):
    z = scg.sample(key, dist.Bernoulli(logits=theta), name="z").astype(F32)
    return jnp.sum(V_A * (z - V_T) ** 2)


def per_row_estimator_moments(theta):
    """Exact mean/variance/mu4 of the plate estimator (z_i − p_i)·c_i and the variance of
    the whole-node estimator (z_i − p_i)·Σ_j c_j, by enumerating all 2^8 configurations."""
    th = np.asarray(theta, np.float64)
    p = 1.0 / (1.0 + np.exp(-th))
    zs = binary_configs(8).astype(np.float64)
    prob = np.prod(np.where(zs == 1, p, 1 - p), axis=1)
    c = np.asarray(V_A, np.float64) * (zs - np.asarray(V_T, np.float64)) ** 2
    plate = (zs - p) * c
    whole = (zs - p) * c.sum(axis=1, keepdims=True)
    return discrete_moments(plate, prob), discrete_moments(whole, prob)


def test_plate_estimator_has_much_lower_variance_than_whole_node():
    (mean, var_plate, mu4_plate), (mean_w, var_whole, _) = per_row_estimator_moments(V_THETA)
    np.testing.assert_allclose(mean, mean_w, rtol=1e-9)  # both unbiased
    # Design: the plate estimator is exactly (much) better.
    assert np.all(var_plate < 0.25 * var_whole), var_plate / var_whole

    draws = np.asarray(
        mc_draws(lambda k: scg.scg_grad(per_row_program)(V_THETA, k), N, 9), np.float64
    )
    assert_mc_close(draws, mean)
    for i in range(8):
        assert_variance_close(draws[:, i], var_plate[i], mu4_plate[i])
        n = draws.shape[0]
        se = np.sqrt((mu4_plate[i] - var_plate[i] ** 2) / n)
        assert draws[:, i].var(ddof=1) + 5 * se < 0.25 * var_whole[i], (
            f"theta[{i}]: variance {draws[:, i].var():.4g} is not much below the "
            f"whole-node estimator's {var_whole[i]:.4g}"
        )


def test_per_row_same_key_and_downstream_per_element():
    keys = fixed_keys(10)

    def lib(k):
        return scg.scg_grad(per_row_program, downstream=True)(V_THETA, k)

    def hand(k):
        z = bern(k, V_THETA)
        p = jax.nn.sigmoid(V_THETA)
        c = V_A * (z - V_T) ** 2
        return (z - p) * c, c

    out = same_key(keys, lib=lib, hand=hand)
    (g, ds), (g_want, c_want) = out["lib"], out["hand"]
    assert_trees_allclose(g, g_want)
    assert set(ds) == {"z"}
    assert ds["z"].shape == (16, 8)
    assert_trees_allclose(ds["z"], c_want)


# =======================================================================================
# 2. Causality in loops.
# =======================================================================================

T = 4
CW = jnp.array([0.5, -1.0, 1.5, 0.2])
C_THETA = jnp.array([0.3, -1.2, 0.8])


def policy_logits(theta, s):
    return theta[0] + theta[1] * s


def policy_step(theta, s, a, w):
    """Next state and reward: s' = s/2 + a, r = (s' − w)² + θ2·a (r_t depends on a_≤t)."""
    s = 0.5 * s + a
    return s, (s - w) ** 2 + theta[2] * a


def scan_ys_program(theta, key):
    def step(s, xs):
        k, w = xs
        a = scg.sample(k, dist.Bernoulli(logits=policy_logits(theta, s)), name="a")
        return policy_step(theta, s, a.astype(F32), w)

    _, r = lax.scan(step, jnp.float32(0.0), (jax.random.split(key, T), CW))
    return jnp.sum(r)


def scan_carry_program(theta, key):
    def step(carry, xs):
        s, total = carry
        k, w = xs
        a = scg.sample(k, dist.Bernoulli(logits=policy_logits(theta, s)), name="a")
        s, r = policy_step(theta, s, a.astype(F32), w)
        return (s, total + r), None

    (_, total), _ = lax.scan(
        step, (jnp.float32(0.0), jnp.float32(0.0)), (jax.random.split(key, T), CW)
    )
    return total


def fori_program(theta, key):
    def body(i, carry):
        key, s, total = carry
        key, sub = jax.random.split(key)
        a = scg.sample(sub, dist.Bernoulli(logits=policy_logits(theta, s)))
        s, r = policy_step(theta, s, a.astype(F32), CW[i])
        return key, s, total + r

    return lax.fori_loop(0, T, body, (key, jnp.float32(0.0), jnp.float32(0.0)))[2]


def scan_keys(key):
    return jax.random.split(key, T)


def fori_keys(key):
    def step(key, _):
        key, sub = jax.random.split(key)
        return key, sub

    return lax.scan(step, key, None, length=T)[1]


def policy_actions(theta, keys):
    """The actions the programs draw with these (stacked) per-step keys."""

    def step(s, k):
        a = bern(k, policy_logits(theta, s))
        return 0.5 * s + a, a

    return lax.scan(step, jnp.float32(0.0), keys)[1]


def rollout(theta, actions, w):
    """Per-step log π(a_t), the trajectory's probability and the rewards r_t, for fixed
    actions."""

    def step(s, xs):
        a, wt = xs
        l = policy_logits(theta, s)
        s, r = policy_step(theta, s, a, wt)
        return s, (lq(a, l), bernoulli_pmf(a, l), r)

    _, (lp, prob, r) = lax.scan(step, jnp.float32(0.0), (actions, w))
    return lp, jnp.prod(prob), r


def dice_loop(theta, actions, w, mode):
    """Σ_t ⊡(τ_t)·r_t with τ_t = Σ_{s≤t} log π(a_s) ("causal") or Σ_s ("whole")."""
    lp, _, r = rollout(theta, sg(actions), w)
    tau = jnp.cumsum(lp) if mode == "causal" else jnp.broadcast_to(jnp.sum(lp), lp.shape)
    return jnp.sum(magic_box(tau) * r)


@functools.partial(jax.jit, static_argnums=1)
def policy_expectation_grad(theta, nested=False):
    """∇ E[Σ_t r_t], enumerated over every trajectory."""
    w = NW.reshape(-1) if nested else CW
    acts = jnp.asarray(binary_configs(w.shape[0]))

    def expectation(theta):
        def weighted(a):
            _, prob, r = rollout(theta, a, w)
            return prob * jnp.sum(r)

        return jnp.sum(jax.vmap(weighted)(acts))

    return jax.grad(expectation)(theta)


LOOP_PROGRAMS = {
    "scan_ys": (scan_ys_program, scan_keys),
    "scan_carry": (scan_carry_program, scan_keys),
    "fori_loop": (fori_program, fori_keys),
}


@pytest.mark.parametrize("name", list(LOOP_PROGRAMS))
def test_loop_same_key_equals_reward_to_go_estimator(name):
    program, keys_of = LOOP_PROGRAMS[name]

    def hand(k, mode):
        acts = policy_actions(C_THETA, keys_of(k))
        return jax.grad(dice_loop)(C_THETA, acts, CW, mode)

    out = same_key(
        fixed_keys(11),
        got=lambda k: scg.scg_value_and_grad(program)(C_THETA, k),
        value=lambda k: program(C_THETA, k),
        causal=lambda k: hand(k, "causal"),
        whole=lambda k: hand(k, "whole"),
    )
    assert_not_close(out["causal"], out["whole"], "reward-to-go and whole-loop estimators")
    assert_trees_allclose(out["got"][1], out["causal"])
    np.testing.assert_allclose(out["got"][0], out["value"], rtol=1e-5)


@pytest.mark.parametrize("name", list(LOOP_PROGRAMS))
def test_loop_causal_estimator_is_unbiased(name):
    program, _ = LOOP_PROGRAMS[name]
    draws = mc_draws(lambda k: scg.scg_grad(program)(C_THETA, k), N, 12)
    assert_mc_close(draws, policy_expectation_grad(C_THETA))


@jax.jit
def loop_estimator_moments_table():
    """Per trajectory (all 2^T): its probability and the reward-to-go and whole-loop
    estimates."""
    acts = jnp.asarray(binary_configs(T))
    probs = jax.vmap(lambda a: rollout(C_THETA, a, CW)[1])(acts)
    causal = jax.vmap(lambda a: jax.grad(dice_loop)(C_THETA, a, CW, "causal"))(acts)
    whole = jax.vmap(lambda a: jax.grad(dice_loop)(C_THETA, a, CW, "whole"))(acts)
    return probs, causal, whole


def test_loop_causal_estimator_has_its_exact_variance():
    """Its variance is the reward-to-go estimator's, enumerated over the 2^T
    trajectories, and well below the whole-loop estimator's."""
    probs, causal, whole = loop_estimator_moments_table()
    mean_c, var_c, mu4_c = discrete_moments(causal, probs)
    mean_w, var_w, _ = discrete_moments(whole, probs)
    exact = policy_expectation_grad(C_THETA)
    np.testing.assert_allclose(mean_c, exact, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mean_w, exact, rtol=1e-4, atol=1e-5)
    assert var_c[0] < 0.6 * var_w[0] and var_c[1] < 0.6 * var_w[1], (var_c, var_w)

    draws = np.asarray(
        mc_draws(lambda k: scg.scg_grad(scan_ys_program)(C_THETA, k), N, 13), np.float64
    )
    for i in range(3):
        assert_variance_close(draws[:, i], var_c[i], mu4_c[i])


def test_loop_with_independent_steps_weights_each_reward_by_its_own_action():
    """r_t = 2(a_t − w_t)² + c_t with a sample-free carry c_t: a_s (s ≠ t) never reaches
    r_t, so only log π(a_t) weights it, and c_t is weighted by nothing."""
    theta = jnp.array([0.4, -0.7, 1.0, -0.2])

    def program(theta, key):
        def step(c, xs):
            k, l, w = xs
            a = scg.sample(k, dist.Bernoulli(logits=l)).astype(F32)
            return c + 1.0, 2.0 * (a - w) ** 2 + c

        _, r = lax.scan(step, jnp.float32(0.0), (jax.random.split(key, T), theta, CW))
        return jnp.sum(r)

    def hand(theta, key):
        a = sg(jax.vmap(bern)(jax.random.split(key, T), theta))
        own = magic_box(lq(a, theta)) * 2.0 * (a - CW) ** 2
        return jnp.sum(own) + jnp.sum(jnp.arange(T, dtype=F32))

    out = same_key(
        fixed_keys(14),
        got=lambda k: scg.scg_grad(program)(theta, k),
        want=lambda k: jax.grad(hand)(theta, k),
    )
    assert_trees_allclose(out["got"], out["want"])


def test_loop_downstream_of_in_loop_node_is_reward_to_go():
    def hand(k):
        acts = policy_actions(C_THETA, scan_keys(k))
        _, _, r = rollout(C_THETA, acts, CW)
        return jnp.cumsum(r[::-1])[::-1]

    out = same_key(
        fixed_keys(15),
        got=lambda k: scg.scg_grad(scan_ys_program, downstream=True)(C_THETA, k),
        grad=lambda k: scg.scg_grad(scan_ys_program)(C_THETA, k),
        want=hand,
    )
    g, ds = out["got"]
    assert set(ds) == {"a"}
    assert ds["a"].shape == (16, T)
    assert_trees_allclose(ds["a"], out["want"])
    assert_trees_allclose(g, out["grad"])


E = 3


def vmapped_scan_program(theta, key):
    return jnp.mean(jax.vmap(lambda k: scan_ys_program(theta, k))(jax.random.split(key, E)))


def test_scan_under_vmap_has_per_environment_causality():
    def hand(theta, key):
        def env(k):
            return dice_loop(theta, policy_actions(theta, scan_keys(k)), CW, "causal")

        return jnp.mean(jax.vmap(env)(jax.random.split(key, E)))

    out = same_key(
        fixed_keys(16),
        got=lambda k: scg.scg_grad(vmapped_scan_program)(C_THETA, k),
        want=lambda k: jax.grad(hand)(C_THETA, k),
    )
    assert_trees_allclose(out["got"], out["want"])

    draws = mc_draws(lambda k: scg.scg_grad(vmapped_scan_program)(C_THETA, k), N, 17)
    assert_mc_close(draws, policy_expectation_grad(C_THETA))


T2, U = 3, 2
NW = jnp.array([[0.5, -1.0], [1.5, 0.2], [-0.4, 0.9]])


def nested_program(theta, key):
    def outer_step(s, xs):
        k, w = xs

        def inner(s, ys):
            ku, wu = ys
            a = scg.sample(ku, dist.Bernoulli(logits=policy_logits(theta, s)))
            return policy_step(theta, s, a.astype(F32), wu)

        return lax.scan(inner, s, (jax.random.split(k, U), w))

    _, r = lax.scan(outer_step, jnp.float32(0.0), (jax.random.split(key, T2), NW))
    return jnp.sum(r)  # r: (T2, U)


def nested_keys(key):
    """The per-draw keys of `nested_program`, in flattened time order (t, u)."""
    return jax.vmap(lambda k: jax.random.split(k, U))(jax.random.split(key, T2)).reshape(T2 * U)


def nested_dice(theta, actions, mode):
    """Reward (t, u) weighted by the draws before it in flattened time order
    ("causal"), by every draw at outer steps ≤ t ("outer", coarser but sound), or by
    every draw ("whole")."""
    if mode != "outer":
        return dice_loop(theta, actions, NW.reshape(-1), mode)
    lp, _, r = rollout(theta, sg(actions), NW.reshape(-1))
    tau = jnp.repeat(jnp.cumsum(lp.reshape(T2, U).sum(1)), U)
    return jnp.sum(magic_box(tau) * r)


NESTED_MODES = ("causal", "outer", "whole")


@jax.jit
def nested_estimator_table():
    """Per trajectory (all 2^6): its probability and the three estimates."""
    acts = jnp.asarray(binary_configs(T2 * U))
    probs = jax.vmap(lambda a: rollout(C_THETA, a, NW.reshape(-1))[1])(acts)
    return probs, {
        m: jax.vmap(lambda a: jax.grad(nested_dice)(C_THETA, a, m))(acts) for m in NESTED_MODES
    }


def test_nested_scans_same_key_equal_flattened_time_order_estimator():
    """Reward (t, u) is weighted by the draws at outer steps < t and, at outer step t, by
    inner steps ≤ u (the inner scan of step t runs after all of step t − 1)."""

    def hand(k, mode):
        return jax.grad(nested_dice)(C_THETA, policy_actions(C_THETA, nested_keys(k)), mode)

    out = same_key(
        fixed_keys(18),
        got=lambda k: scg.scg_grad(nested_program)(C_THETA, k),
        **{m: functools.partial(hand, mode=m) for m in NESTED_MODES},
    )
    assert_not_close(out["causal"], out["outer"], "flattened and outer-step estimators")
    matches = {m: bool(np.allclose(out["got"], out[m], rtol=1e-4, atol=1e-5)) for m in NESTED_MODES}
    assert_trees_allclose(
        out["got"], out["causal"], err_msg=f"(which hand-written estimator matches: {matches})"
    )


def test_nested_scans_are_unbiased_and_finer_than_whole_loop_weighting():
    probs, table = nested_estimator_table()
    moments = {m: discrete_moments(table[m], probs) for m in NESTED_MODES}
    exact = policy_expectation_grad(C_THETA, True)
    for m in NESTED_MODES:
        np.testing.assert_allclose(moments[m][0], exact, rtol=1e-4, atol=1e-5)
    var_whole = moments["whole"][1]
    # Design: both finer estimators are well below whole-loop weighting for θ0, θ1.
    assert np.all(moments["outer"][1][:2] < 0.8 * var_whole[:2]), moments

    draws = np.asarray(
        mc_draws(lambda k: scg.scg_grad(nested_program)(C_THETA, k), N, 19), np.float64
    )
    assert_mc_close(draws, exact)
    for i in range(2):
        assert_variance_below(draws[:, i], var_whole[i])


# =======================================================================================
# 3. Baselines.
# =======================================================================================

BL_THETA = jnp.array([0.3, -0.5, 0.8, 0.6])


def chain_cost(theta, z1, z2):
    return 2.0 * z1 + 3.0 * (z1 - z2) ** 2 + (theta[3] ** 2 + theta[0]) * z2


def chain_baseline_1(kind, theta):
    """z1's baseline: none, a constant, or computed from θ (upstream of z1)."""
    return {None: None, "constant": 2.0, "upstream": 1.0 + theta[3]}[kind]


def chain_baseline_2(kind, theta, z1):
    """z2's baseline: none, a constant, or computed from θ and the upstream draw z1."""
    if kind == "upstream":
        return 0.5 + theta[3] * z1 + theta[0] ** 2 * (1.0 - z1)
    return {None: None, "constant": 1.0}[kind]


def chain_program(kind):
    def f(theta, key):
        k1, k2 = jax.random.split(key)
        b1 = chain_baseline_1(kind, theta)
        z1 = scg.sample(k1, dist.Bernoulli(logits=theta[0]), baseline=b1, name="z1").astype(F32)
        b2 = chain_baseline_2(kind, theta, z1)
        z2 = scg.sample(
            k2, dist.Bernoulli(logits=theta[1] + theta[2] * z1), baseline=b2, name="z2"
        ).astype(F32)
        return chain_cost(theta, z1, z2)

    f.__name__ = f"chain_{kind}"
    return f


def chain_draw(theta, key):
    k1, k2 = jax.random.split(key)
    z1 = bern(k1, theta[0])
    z2 = bern(k2, theta[1] + theta[2] * z1)
    return z1, z2


def chain_downstream(theta, z1, z2):
    """Q1 (every cost term: z2 depends on z1) and Q2 (the terms that depend on z2)."""
    return chain_cost(theta, z1, z2), 3.0 * (z1 - z2) ** 2 + (theta[3] ** 2 + theta[0]) * z2


def chain_hand_grad(theta, key, kind):
    """∇log p(z1)·(Q1 − b1) + ∇log p(z2)·(Q2 − b2) + the pathwise part."""
    z1, z2 = chain_draw(theta, key)
    b1 = chain_baseline_1(kind, theta)
    b2 = chain_baseline_2(kind, theta, z1)
    q1, q2 = chain_downstream(theta, z1, z2)
    g1 = jax.grad(lambda th: lq(z1, th[0]))(theta)
    g2 = jax.grad(lambda th: lq(z2, th[1] + th[2] * z1))(theta)
    pathwise = jax.grad(chain_cost)(theta, z1, z2)
    return (
        g1 * (q1 - (0.0 if b1 is None else b1)) + g2 * (q2 - (0.0 if b2 is None else b2)) + pathwise
    )


def chain_expectation(theta):
    total = 0.0
    for z1 in (0.0, 1.0):
        for z2 in (0.0, 1.0):
            prob = bernoulli_pmf(z1, theta[0]) * bernoulli_pmf(z2, theta[1] + theta[2] * z1)
            total = total + prob * chain_cost(theta, z1, z2)
    return total


@jax.jit
def chain_exact():
    """(gradient, Hessian) of E[chain_cost] at BL_THETA, enumerated."""
    return jax.grad(chain_expectation)(BL_THETA), jax.hessian(chain_expectation)(BL_THETA)


@pytest.mark.parametrize("kind", ["constant", "upstream"])
def test_baseline_keeps_value_and_gives_hand_written_gradient(kind):
    f = chain_program(kind)
    out = same_key(
        fixed_keys(20),
        value=lambda k: chain_program(None)(BL_THETA, k),
        f_value=lambda k: f(BL_THETA, k),
        surrogate=lambda k: scg.surrogate(f)(BL_THETA, k),
        got=lambda k: scg.scg_value_and_grad(f)(BL_THETA, k),
        want=lambda k: chain_hand_grad(BL_THETA, k, kind),
        no_baseline=lambda k: chain_hand_grad(BL_THETA, k, None),
    )
    np.testing.assert_allclose(out["f_value"], out["value"])
    np.testing.assert_allclose(out["surrogate"], out["value"], rtol=1e-5)
    np.testing.assert_allclose(out["got"][0], out["value"], rtol=1e-5)
    assert_not_close(out["want"], out["no_baseline"], "with and without baseline")
    assert_trees_allclose(out["got"][1], out["want"])


@pytest.mark.parametrize("kind", ["constant", "upstream"])
def test_baseline_first_order_is_unbiased(kind):
    draws = mc_draws(lambda k: scg.scg_grad(chain_program(kind))(BL_THETA, k), N, 21)
    assert_mc_close(draws, chain_exact()[0])


@pytest.mark.parametrize("kind", ["constant", "upstream"])
def test_baseline_second_order_is_unbiased(kind):
    f = chain_program(kind)
    draws = mc_draws(lambda k: jax.hessian(scg.surrogate(f))(BL_THETA, k), N, 22)
    assert_mc_close(draws, chain_exact()[1])


VR_THETA = jnp.float32(0.4)


def offset_program(baseline):
    """c = (z + 3)² (one cost term, 9 + 7z), with an optional baseline b(θ)."""

    def f(theta, key):
        b = None if baseline is None else baseline(theta)
        z = scg.sample(key, dist.Bernoulli(logits=theta), baseline=b).astype(F32)
        return (z + 3.0) ** 2

    return f


def test_good_baseline_reduces_variance_to_its_exact_value():
    p = float(jax.nn.sigmoid(VR_THETA))
    zs = np.array([0.0, 1.0])
    probs = np.array([1 - p, p])
    # Without baseline: (z − p)(z + 3)²; with b = E[c] = 9 + 7p: 7(z − p)².
    m_plain, var_plain, mu4_plain = discrete_moments((zs - p) * (zs + 3) ** 2, probs)
    m_base, var_base, mu4_base = discrete_moments(7 * (zs - p) ** 2, probs)
    assert abs(m_plain - m_base) < 1e-9
    assert var_base < 0.02 * var_plain  # design: exactly 0.0137

    plain = mc_draws(lambda k: scg.scg_grad(offset_program(None))(VR_THETA, k), N, 23)
    based = mc_draws(
        lambda k: scg.scg_grad(offset_program(lambda th: 9.0 + 7.0 * jax.nn.sigmoid(th)))(
            VR_THETA, k
        ),
        N,
        23,
    )
    assert_mc_close(based, m_base)
    assert_variance_close(np.asarray(plain), var_plain, mu4_plain)
    assert_variance_close(np.asarray(based), var_base, mu4_base)
    assert_variance_ratio_below(based, plain, 0.03)


def test_vector_and_scalar_baselines_apply_per_element():
    theta = jnp.array([0.5, -0.3, 1.2, -0.8])
    a = jnp.array([2.0, -1.0, 3.0, 0.5])
    t = jnp.array([0.3, 1.2, -0.4, 0.9])
    baselines = {"vector": jnp.array([0.5, 1.0, -2.0, 0.25]), "scalar": jnp.float32(1.5)}

    def program(b):
        def f(theta, key):
            z = scg.sample(key, dist.Bernoulli(logits=theta), baseline=b).astype(F32)
            return jnp.sum(a * (z - t) ** 2)

        return f

    def hand(k, b):
        z = bern(k, theta)
        return (z - jax.nn.sigmoid(theta)) * (a * (z - t) ** 2 - b)

    fns = {}
    for name, b in baselines.items():
        fns[name] = functools.partial(lambda k, b: scg.scg_grad(program(b))(theta, k), b=b)
        fns[name + "_hand"] = functools.partial(hand, b=b)
    out = same_key(fixed_keys(24), **fns)
    for name in baselines:
        assert_trees_allclose(out[name], out[name + "_hand"], err_msg=name)


SB_THETA = jnp.array([0.3, -1.2, 0.8, 0.7])


def scan_baseline_program(theta, key):
    """The policy loop with a per-step baseline b_t = θ3·s_t + 1 from the state s_t
    (upstream of a_t: it depends on earlier actions only)."""

    def step(s, xs):
        k, w = xs
        a = scg.sample(
            k, dist.Bernoulli(logits=policy_logits(theta, s)), baseline=theta[3] * s + 1.0, name="a"
        )
        return policy_step(theta, s, a.astype(F32), w)

    _, r = lax.scan(step, jnp.float32(0.0), (jax.random.split(key, T), CW))
    return jnp.sum(r)


def test_baseline_inside_scan_subtracts_per_step():
    """Σ_t ∇log π(a_t)·(G_t − b_t) + pathwise, G_t the reward to go; the downstream cost
    (the regression target of a learned baseline) is G_t itself."""

    def hand(k):
        acts = policy_actions(SB_THETA, scan_keys(k))
        s = jnp.concatenate(
            [
                jnp.zeros(1),
                lax.scan(lambda s, a: (0.5 * s + a, 0.5 * s + a), jnp.float32(0.0), acts)[1][:-1],
            ]
        )
        b = SB_THETA[3] * s + 1.0
        reinforce = jax.grad(dice_loop)(SB_THETA, acts, CW, "causal")
        minus_b = jax.grad(lambda th: jnp.sum(lq(acts, policy_logits(th, s)) * b))(SB_THETA)
        _, _, r = rollout(SB_THETA, acts, CW)
        return reinforce - minus_b, jnp.cumsum(r[::-1])[::-1]

    out = same_key(
        fixed_keys(37),
        got=lambda k: scg.scg_grad(scan_baseline_program, downstream=True)(SB_THETA, k),
        value=lambda k: scg.surrogate(scan_baseline_program)(SB_THETA, k),
        f_value=lambda k: scan_baseline_program(SB_THETA, k),
        hand=hand,
    )
    (g, ds), (g_want, togo) = out["got"], out["hand"]
    np.testing.assert_allclose(out["value"], out["f_value"], rtol=1e-5)
    assert_trees_allclose(g, g_want)
    assert_trees_allclose(ds["a"], togo)

    draws = mc_draws(lambda k: scg.scg_grad(scan_baseline_program)(SB_THETA, k), N, 38)
    # θ3 only enters the baseline: the true gradient is 0 and so is every estimate.
    assert_mc_close(draws, jnp.append(policy_expectation_grad(SB_THETA[:3]), 0.0))


def box(t):
    return jnp.exp(t - sg(t))


# Mao et al. 2019: a baseline term is boxed by the node's parents, ⊡(τ_W)·(1 − ⊡(lp))·b,
# so that at second order it also subtracts b from the products of the node's score with
# its parents' scores (the terms that DiCE's ⊡(τ_c)·c has for a cost downstream of both).

MAO_THETA = jnp.array([0.3, -0.4, 0.7, 0.5])
MAO_T = 3


def mao_chain(theta, key):
    k1, k2 = jax.random.split(key)
    z1 = scg.sample(k1, dist.Bernoulli(logits=theta[0])).astype(F32)
    b = theta[2] * z1 + 0.5
    z2 = scg.sample(k2, dist.Bernoulli(logits=theta[1] + theta[2] * z1), baseline=b)
    return (z1 + 2.0 * z2.astype(F32) + theta[0]) ** 2


def mao_chain_hand(theta, key, boxed=True):
    k1, k2 = jax.random.split(key)
    z1 = bern(k1, theta[0])
    z2 = bern(k2, theta[1] + theta[2] * z1)
    l1, l2 = lq(z1, theta[0]), lq(z2, theta[1] + theta[2] * z1)
    b = theta[2] * z1 + 0.5
    parents = box(l1) if boxed else 1.0
    return box(l1 + l2) * (z1 + 2.0 * z2 + theta[0]) ** 2 + parents * (1.0 - box(l2)) * b


def mao_game(theta, key):
    """Two agents a (θ0, θ3) and o (θ1) for MAO_T rounds; one baseline from the state
    for both draws of a round."""

    def step(s, k):
        ka, kb = jax.random.split(k)
        b = theta[3] * s - 1.0
        a = scg.sample(ka, dist.Bernoulli(logits=theta[0] + s), baseline=b).astype(F32)
        o = scg.sample(kb, dist.Bernoulli(logits=theta[1] - s), baseline=b).astype(F32)
        return 0.5 * s + a - o, (a - o * theta[2]) ** 2 + a * o

    _, r = lax.scan(step, F32(0.0), jax.random.split(key, MAO_T))
    return jnp.sum(r)


def mao_game_hand(theta, key, boxed=True):
    keys = jax.random.split(key, MAO_T)
    s, lp_a, lp_o, rewards, bs = F32(0.0), [], [], [], []
    for t in range(MAO_T):
        ka, kb = jax.random.split(keys[t])
        a, o = bern(ka, theta[0] + s), bern(kb, theta[1] - s)
        lp_a.append(lq(a, theta[0] + s))
        lp_o.append(lq(o, theta[1] - s))
        bs.append(theta[3] * s - 1.0)
        rewards.append((a - o * theta[2]) ** 2 + a * o)
        s = 0.5 * s + a - o
    total, before = 0.0, 0.0
    for t in range(MAO_T):
        parents = box(before) if boxed else 1.0
        total = total + parents * ((1.0 - box(lp_a[t])) + (1.0 - box(lp_o[t]))) * bs[t]
        before = before + lp_a[t] + lp_o[t]
        total = total + box(before) * rewards[t]
    return total


@pytest.mark.parametrize("name", ["chain", "scan"])
def test_baseline_term_is_boxed_by_the_nodes_parents(name):
    f, hand = {"chain": (mao_chain, mao_chain_hand), "scan": (mao_game, mao_game_hand)}[name]
    out = same_key(
        fixed_keys(39),
        got=lambda k: jax.hessian(scg.surrogate(f))(MAO_THETA, k),
        grad=lambda k: scg.scg_grad(f)(MAO_THETA, k),
        want=lambda k: jax.hessian(hand)(MAO_THETA, k),
        want_grad=lambda k: jax.grad(hand)(MAO_THETA, k),
        unboxed=lambda k: jax.hessian(functools.partial(hand, boxed=False))(MAO_THETA, k),
        value=lambda k: scg.surrogate(f)(MAO_THETA, k),
        f_value=lambda k: f(MAO_THETA, k),
    )
    np.testing.assert_allclose(out["value"], out["f_value"], rtol=1e-5)
    assert_trees_allclose(out["grad"], out["want_grad"])
    assert_trees_allclose(out["got"], out["want"])
    # (the unboxed term, (1 − ⊡(lp))·b, has the same first derivative but not the second)
    assert_not_close(out["want"], out["unboxed"], "boxed and unboxed baseline terms")


def test_boxed_baseline_reduces_the_variance_of_mixed_second_derivatives():
    """∂²/∂θ0∂θ1 of E[(z1 + z2 + 4)²] (z1 from θ0, z2 from θ1 + z1): DiCE's mixed term
    (c − b)·s1·s2 with the boxed baseline b = (z1 + 4.5)² ≈ E[c | z1] on z2, against
    c·s1·s2 without it. Exact variances by enumerating the four joint draws (float64);
    the unboxed term (1 − ⊡(lp2))·b has no mixed derivative, so the ratio it gives is
    1."""
    theta = jnp.array([0.4, -0.3])

    def program(with_baseline):
        def f(t, key):
            k1, k2 = jax.random.split(key)
            z1 = scg.sample(k1, dist.Bernoulli(logits=t[0]), name="z1").astype(t.dtype)
            b = (z1 + 4.5) ** 2 if with_baseline else None
            z2 = scg.sample(k2, dist.Bernoulli(logits=t[1] + z1), baseline=b, name="z2").astype(
                t.dtype
            )
            return (z1 + z2 + 4.0) ** 2

        return f

    with jax.enable_x64(True):
        t64 = theta.astype(jnp.float64)
        zs = jnp.array([[0, 0], [0, 1], [1, 0], [1, 1]])

        def moments(f):
            def one(z):
                draws = {"z1": z[0], "z2": z[1]}
                h = jax.hessian(scg.surrogate(f, draws=draws))(t64, jax.random.key(0))[0, 1]
                lp = scg.trace(f, draws=draws)(t64, jax.random.key(0)).score_log_joint
                return jnp.exp(lp), h

            p, h = jax.vmap(one)(zs)
            mean = jnp.sum(p * h)
            return float(mean), float(jnp.sum(p * (h - mean) ** 2))

        exact = float(
            jax.hessian(
                lambda t: sum(
                    jax.nn.sigmoid((2 * z1 - 1) * t[0])
                    * jax.nn.sigmoid((2 * z2 - 1) * (t[1] + z1))
                    * (z1 + z2 + 4.0) ** 2
                    for z1 in (0, 1)
                    for z2 in (0, 1)
                )
            )(t64)[0, 1]
        )
        m_plain, v_plain = moments(program(False))
        m_based, v_based = moments(program(True))
    np.testing.assert_allclose([m_plain, m_based], [exact, exact], rtol=1e-9)
    assert abs(exact) > 1e-2
    assert v_based < 0.05 * v_plain, (v_based, v_plain)


def test_a_baseline_is_not_boxed_by_its_own_element():
    """The parents of a draw inside a loop keep its own earlier steps (strictly before)
    and drop a relation that could include its own element (a rule's fallback ALL):
    ⊡(lp_i)·(1 − ⊡(lp_i))·b would bias the second derivatives."""
    from scgjax import _deps, _interpret

    node, other = (0, 1), (0, 0)
    strict = (_deps.Loop(0, "lt"), _deps.Axis(0))
    loose = (_deps.ALL, _deps.Axis(0))
    deps = _deps.Deps._of({node: [strict], other: [loose]})
    assert _interpret._strict_parents(deps, node, (3,), (0,)) == deps
    deps = _deps.Deps._of({node: [loose], other: [loose]})
    assert _interpret._strict_parents(deps, node, (3,), (0,)) == _deps.Deps._of({other: [loose]})
    same_step = (_deps.Loop(0, "eq"), _deps.Axis(0, "lt"))
    deps = _deps.Deps._of({node: [same_step]})
    assert _interpret._strict_parents(deps, node, (3,), (0,)) == deps
    transposed = (_deps.Loop(0, "eq"), _deps.Axis(1, "lt"))
    deps = _deps.Deps._of({node: [transposed]})
    assert _interpret._strict_parents(deps, node, (3, 3), (0,)) == _deps.EMPTY


# ---------------------------------------------------------------------------------------
# Leave-one-out and num_samples.
# ---------------------------------------------------------------------------------------

K = 4
LOO_THETA = jnp.array([0.4, 0.7])
LOO = dict(num_samples=K, baseline="leave_one_out")


def loo_program(theta, key):
    """c = (z + 3)² + θ1²·z: both terms depend on z; the second also pathwise on θ1."""
    z = scg.sample(key, dist.Bernoulli(logits=theta[0]), name="z").astype(F32)
    return (z + 3.0) ** 2 + theta[1] ** 2 * z


def loo_expectation(theta):
    return 9.0 + jax.nn.sigmoid(theta[0]) * (7.0 + theta[1] ** 2)


def loo_hand(theta, key):
    """The value and 1/K Σ_k ∇log p(z_k)·(c_k − mean_{j≠k} c_j) + the pathwise part."""
    z = jax.vmap(lambda k: bern(k, theta[0]))(jax.random.split(key, K))
    c = (z + 3.0) ** 2 + theta[1] ** 2 * z
    others = (jnp.sum(c) - c) / (K - 1)
    p = jax.nn.sigmoid(theta[0])
    g0 = jnp.mean((z - p) * (c - others))
    g1 = jnp.mean(2.0 * theta[1] * z)
    return jnp.mean(c), jnp.stack([g0, g1])


def loo_exact_moments():
    """Exact moments of the θ0 component of the LOO and the plain K-sample estimators,
    over all 2^K configurations."""
    th0, th1 = (float(x) for x in LOO_THETA)
    p = 1.0 / (1.0 + np.exp(-th0))
    zs = binary_configs(K).astype(np.float64)
    probs = np.prod(np.where(zs == 1, p, 1 - p), axis=1)
    c = (zs + 3.0) ** 2 + th1**2 * zs
    others = (c.sum(1, keepdims=True) - c) / (K - 1)
    loo = discrete_moments(((zs - p) * (c - others)).mean(1), probs)
    plain = discrete_moments(((zs - p) * c).mean(1), probs)
    return loo, plain


def test_leave_one_out_value_and_same_key_gradient():
    out = same_key(
        fixed_keys(25),
        mean_cost=lambda k: jnp.mean(
            jax.vmap(lambda kk: loo_program(LOO_THETA, kk))(jax.random.split(k, K))
        ),
        hand=lambda k: loo_hand(LOO_THETA, k),
        value_and_grad=lambda k: scg.scg_value_and_grad(loo_program, **LOO)(LOO_THETA, k),
        grad=lambda k: scg.scg_grad(loo_program, **LOO)(LOO_THETA, k),
        surrogate=lambda k: scg.surrogate(loo_program, **LOO)(LOO_THETA, k),
    )
    want_v, want_g = out["hand"]
    np.testing.assert_allclose(out["mean_cost"], want_v, rtol=1e-6)
    np.testing.assert_allclose(out["value_and_grad"][0], out["mean_cost"], rtol=1e-5)
    np.testing.assert_allclose(out["surrogate"], out["mean_cost"], rtol=1e-5)
    assert_trees_allclose(out["value_and_grad"][1], want_g)
    assert_trees_allclose(out["grad"], want_g)


def test_num_samples_alone_averages_k_estimates():
    def manual(k):
        ks = jax.random.split(k, K)
        costs = jax.vmap(lambda kk: loo_program(LOO_THETA, kk))(ks)
        grads = jax.vmap(lambda kk: scg.scg_grad(loo_program)(LOO_THETA, kk))(ks)
        return jnp.mean(costs), jnp.mean(grads, axis=0)

    out = same_key(
        fixed_keys(26),
        got=lambda k: scg.scg_value_and_grad(loo_program, num_samples=K)(LOO_THETA, k),
        want=manual,
    )
    np.testing.assert_allclose(out["got"][0], out["want"][0], rtol=1e-5)
    assert_trees_allclose(out["got"][1], out["want"][1])


def test_key_argnum_selects_the_key_argument():
    def f(key, theta):
        return loo_program(theta, key)

    out = same_key(
        fixed_keys(27),
        got=lambda k: scg.scg_grad(f, argnums=1, key_argnum=0, **LOO)(k, LOO_THETA),
        want=lambda k: scg.scg_grad(loo_program, **LOO)(LOO_THETA, k),
    )
    assert_trees_allclose(out["got"], out["want"])


def test_leave_one_out_is_unbiased_and_has_its_exact_variance():
    loo = mc_draws(lambda k: scg.scg_grad(loo_program, **LOO)(LOO_THETA, k), N, 28)
    plain = mc_draws(lambda k: scg.scg_grad(loo_program, num_samples=K)(LOO_THETA, k), N, 28)
    exact = jax.grad(loo_expectation)(LOO_THETA)
    assert_mc_close(loo, exact)
    assert_mc_close(plain, exact)

    (_, var_loo, mu4_loo), (_, var_plain, mu4_plain) = loo_exact_moments()
    assert var_loo < 0.1 * var_plain  # design: exactly 0.078
    assert_variance_close(np.asarray(loo)[:, 0], var_loo, mu4_loo)
    assert_variance_close(np.asarray(plain)[:, 0], var_plain, mu4_plain)
    assert_variance_ratio_below(np.asarray(loo)[:, 0], np.asarray(plain)[:, 0], 0.15)


def test_leave_one_out_on_a_chain_is_unbiased_first_and_second_order():
    f = chain_program(None)
    grad, hess = chain_exact()
    assert_mc_close(mc_draws(lambda k: scg.scg_grad(f, **LOO)(BL_THETA, k), N, 29), grad)
    assert_mc_close(
        mc_draws(lambda k: jax.hessian(scg.surrogate(f, **LOO))(BL_THETA, k), N, 30), hess
    )


def test_leave_one_out_on_a_chain_uses_each_nodes_own_downstream_costs():
    """z1's baseline is the mean of the other samples' Q1, z2's of their Q2."""
    f = chain_program(None)

    def hand(k):
        z1, z2 = jax.vmap(lambda kk: chain_draw(BL_THETA, kk))(jax.random.split(k, K))
        q1, q2 = jax.vmap(lambda a, b: chain_downstream(BL_THETA, a, b))(z1, z2)
        b1 = (q1.sum() - q1) / (K - 1)
        b2 = (q2.sum() - q2) / (K - 1)
        g1 = jax.vmap(lambda a: jax.grad(lambda th: lq(a, th[0]))(BL_THETA))(z1)
        g2 = jax.vmap(lambda a, b: jax.grad(lambda th: lq(b, th[1] + th[2] * a))(BL_THETA))(z1, z2)
        pw = jax.vmap(lambda a, b: jax.grad(chain_cost)(BL_THETA, a, b))(z1, z2)
        return jnp.mean(g1 * (q1 - b1)[:, None] + g2 * (q2 - b2)[:, None] + pw, axis=0)

    out = same_key(fixed_keys(31), got=lambda k: scg.scg_grad(f, **LOO)(BL_THETA, k), want=hand)
    assert_trees_allclose(out["got"], out["want"])


def test_leave_one_out_and_num_samples_accept_legacy_keys():
    key = jax.random.PRNGKey(39)
    assert key.dtype == jnp.uint32
    v, g = scg.scg_value_and_grad(loo_program, **LOO)(LOO_THETA, key)
    want_v, want_g = loo_hand(LOO_THETA, key)
    np.testing.assert_allclose(v, want_v, rtol=1e-5)
    assert_trees_allclose(g, want_g)
    mean, var = scg.gradient_variance(loo_program, num_draws=8, **LOO)(LOO_THETA, key)
    assert mean.shape == var.shape == (2,)


# ---------------------------------------------------------------------------------------
# Downstream costs.
# ---------------------------------------------------------------------------------------

DS_THETA = jnp.array([0.3, -0.2])


def two_node_program(theta, key):
    k1, k2 = jax.random.split(key)
    z1 = scg.sample(k1, dist.Bernoulli(logits=theta[0]), name="z1").astype(F32)
    z2 = scg.sample(k2, dist.Bernoulli(logits=theta[1]), name="z2").astype(F32)
    return 3.0 * z1 + 10.0 * z2


def test_downstream_costs_of_independent_nodes():
    def draws(k):
        k1, k2 = jax.random.split(k)
        return bern(k1, DS_THETA[0]), bern(k2, DS_THETA[1])

    out = same_key(
        fixed_keys(32),
        got=lambda k: scg.scg_grad(two_node_program, downstream=True)(DS_THETA, k),
        grad=lambda k: scg.scg_grad(two_node_program)(DS_THETA, k),
        z=draws,
    )
    g, ds = out["got"]
    z1, z2 = out["z"]
    assert set(ds) == {"z1", "z2"}
    assert ds["z1"].shape == ds["z2"].shape == (16,)
    assert_trees_allclose(ds["z1"], 3.0 * z1)
    assert_trees_allclose(ds["z2"], 10.0 * z2)
    assert_trees_allclose(g, out["grad"])


def test_downstream_costs_carry_no_gradient():
    # Regression targets: differentiating through them gives exactly zero.
    key = jax.random.key(0)
    for name in ("z1", "z2"):
        d = jax.grad(lambda th: scg.scg_grad(two_node_program, downstream=True)(th, key)[1][name])(
            DS_THETA
        )
        np.testing.assert_array_equal(d, 0.0)


def test_downstream_with_has_aux():
    def f(theta, key):
        return two_node_program(theta, key), {"twice": 2.0 * theta}

    key = jax.random.key(33)
    g, (aux, ds) = scg.scg_grad(f, has_aux=True, downstream=True)(DS_THETA, key)
    g_plain, ds_plain = scg.scg_grad(two_node_program, downstream=True)(DS_THETA, key)
    np.testing.assert_allclose(aux["twice"], 2.0 * DS_THETA)
    assert_trees_allclose(g, g_plain)
    assert_trees_allclose(ds, ds_plain)


# =======================================================================================
# 4. The variance diagnostic.
# =======================================================================================

GV_C = 3.0
GV_THETA = jnp.float32(0.6)


def gv_program(theta, key):
    z = scg.sample(key, dist.Bernoulli(logits=theta)).astype(F32)
    return GV_C * z


def test_gradient_variance_matches_exact_moments():
    # The estimator is c·z·(z − p) = c(1 − p)·z.
    p = float(jax.nn.sigmoid(GV_THETA))
    m, var, mu4 = discrete_moments(np.array([0.0, GV_C * (1 - p)]), np.array([1 - p, p]))
    mean, variance = scg.gradient_variance(gv_program, num_draws=N)(GV_THETA, jax.random.key(34))
    assert np.shape(mean) == np.shape(variance) == ()
    assert abs(float(mean) - m) <= 5 * np.sqrt(var / N), (float(mean), m)
    se_var = np.sqrt((mu4 - var**2) / N)
    assert abs(float(variance) - var) <= 5 * se_var, (float(variance), var, se_var)


def test_gradient_variance_equals_mean_and_var_of_the_same_draws():
    params = {"logit": jnp.array([0.6, -0.4]), "scale": jnp.float32(1.5)}

    def f(params, key):
        z = scg.sample(key, dist.Bernoulli(logits=params["logit"])).astype(F32)
        return params["scale"] * jnp.sum(jnp.array([3.0, -2.0]) * z)

    key, n = jax.random.key(35), 1000

    @jax.jit
    def both(params, key):
        draws = jax.vmap(scg.scg_grad(f), (None, 0))(params, jax.random.split(key, n))
        return scg.gradient_variance(f, num_draws=n)(params, key), draws

    (mean, variance), draws = both(params, key)
    assert_trees_allclose(mean, jax.tree_util.tree_map(lambda d: np.mean(d, 0), draws))
    assert_trees_allclose(variance, jax.tree_util.tree_map(lambda d: np.var(d, 0), draws))


def test_gradient_variance_passes_estimator_options_argnums_and_key_argnum():
    def f(key, theta, unused):
        return loo_program(theta, key) + 0.0 * unused

    key, n, one = jax.random.key(36), 500, jnp.float32(1.0)

    @jax.jit
    def run(key):
        loo = scg.gradient_variance(f, argnums=1, num_draws=n, key_argnum=0, **LOO)(
            key, LOO_THETA, one
        )
        draws = jax.vmap(
            lambda k: scg.scg_grad(f, argnums=1, key_argnum=0, **LOO)(k, LOO_THETA, one)
        )(jax.random.split(key, n))
        plain = scg.gradient_variance(f, argnums=1, num_draws=n, key_argnum=0, num_samples=K)(
            key, LOO_THETA, one
        )
        both = scg.gradient_variance(f, argnums=(1, 2), num_draws=n, key_argnum=0)(
            key, LOO_THETA, one
        )
        return loo, draws, plain, both

    (mean, variance), draws, (_, var_plain), both = run(key)
    assert_trees_allclose(mean, np.mean(draws, 0))
    assert_trees_allclose(variance, np.var(draws, 0))
    # Lower than without a baseline: exactly var_loo / var_plain = 0.078 (see
    # test_leave_one_out_is_unbiased_and_has_its_exact_variance); with 500 draws each
    # the empirical ratio stays far below 0.5.
    assert variance[0] < 0.5 * var_plain[0], (variance, var_plain)

    assert isinstance(both, tuple) and len(both) == 2
    for part in both:
        assert isinstance(part, tuple) and len(part) == 2
        assert part[0].shape == (2,) and part[1].shape == ()

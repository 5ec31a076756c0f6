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


def per_key(fn, keys):
    """`fn(key)` for each key, stacked (jitted, vmapped)."""
    return jax.jit(jax.vmap(fn))(keys)


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
    keys = fixed_keys(1)
    got = per_key(lambda k: scg.scg_grad(program)(P_PARAMS, k), keys)
    want = per_key(lambda k: jax.grad(plate_hand)(P_PARAMS, k, vmapped=vmapped), keys)
    whole = per_key(
        lambda k: jax.grad(plate_hand)(P_PARAMS, k, vmapped=vmapped, whole=True), keys)
    assert_not_close(want, whole, "per-row and whole-node estimators")
    assert_trees_allclose(got, want)
    # The value is the program's.
    values = per_key(lambda k: scg.surrogate(program)(P_PARAMS, k), keys)
    np.testing.assert_allclose(values, per_key(lambda k: program(P_PARAMS, k), keys),
                               rtol=1e-5)


@pytest.mark.parametrize("vmapped", [False, True], ids=["vectorized", "vmapped"])
def test_plates_are_unbiased(vmapped):
    program = plate_vmapped if vmapped else plate_vectorized
    draws = mc_draws(lambda k: scg.scg_grad(program)(P_PARAMS, k), N, 2 + vmapped)
    assert_mc_close(draws, jax.grad(plate_expectation)(P_PARAMS))


PM = jnp.array([[1.5, -2.0], [0.5, 3.0], [-1.0, 1.0], [2.5, -0.5]])


def plate_split_program(params, key):
    """c = Σ_i tanh(z_i @ v)² + Σ_ih M_ih z_ih: the second sum splits per element."""
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


def test_plates_split_additive_tail_at_the_finest_grain():
    keys = fixed_keys(4)
    got = per_key(lambda k: scg.scg_grad(plate_split_program)(P_PARAMS, k), keys)
    want = per_key(lambda k: jax.grad(plate_split_hand)(P_PARAMS, k), keys)
    assert_trees_allclose(got, want)


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
    keys = fixed_keys(5)
    got = per_key(lambda k: scg.scg_grad(sorted_program)(P_PARAMS, k), keys)
    want = per_key(lambda k: jax.grad(sorted_hand_whole)(P_PARAMS, k), keys)
    assert_trees_allclose(got, want)


def test_mixing_rows_is_unbiased():
    def expectation(params):
        W1, W2 = params
        logits = PX @ W1
        zs = jnp.asarray(binary_configs(PB * PH)).reshape(-1, PB, PH)
        prob = jnp.prod(bernoulli_pmf(zs, logits), axis=(1, 2))
        cost = jax.vmap(lambda z: jnp.sum(
            (jnp.sort(jnp.tanh(z @ W2), axis=0) - PX) ** 2) / PB)(zs)
        return jnp.sum(prob * cost)

    draws = mc_draws(lambda k: scg.scg_grad(sorted_program)(P_PARAMS, k), N, 6)
    assert_mc_close(draws, jax.grad(expectation)(P_PARAMS))


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
    assert_mc_close(draws, jax.grad(expectation)(MIX_THETA))


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
    assert_mc_close(draws, jax.grad(expectation)(theta))


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
    (mean, var_plate, mu4_plate), (mean_w, var_whole, _) = per_row_estimator_moments(
        V_THETA)
    np.testing.assert_allclose(mean, mean_w, rtol=1e-9)  # both unbiased
    # Design: the plate estimator is exactly (much) better.
    assert np.all(var_plate < 0.25 * var_whole), var_plate / var_whole

    draws = np.asarray(mc_draws(lambda k: scg.scg_grad(per_row_program)(V_THETA, k),
                                N, 9), np.float64)
    assert_mc_close(draws, mean)
    for i in range(8):
        assert_variance_close(draws[:, i], var_plate[i], mu4_plate[i])
        n = draws.shape[0]
        se = np.sqrt((mu4_plate[i] - var_plate[i] ** 2) / n)
        assert draws[:, i].var(ddof=1) + 5 * se < 0.25 * var_whole[i], (
            f"theta[{i}]: variance {draws[:, i].var():.4g} is not much below the "
            f"whole-node estimator's {var_whole[i]:.4g}")


def test_per_row_same_key_and_downstream_per_element():
    keys = fixed_keys(10)

    def lib(k):
        return scg.scg_grad(per_row_program, downstream=True)(V_THETA, k)

    def hand(k):
        z = bern(k, V_THETA)
        p = jax.nn.sigmoid(V_THETA)
        c = V_A * (z - V_T) ** 2
        return (z - p) * c, c

    (g, ds), (g_want, c_want) = per_key(lib, keys), per_key(hand, keys)
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

    (_, total), _ = lax.scan(step, (jnp.float32(0.0), jnp.float32(0.0)),
                             (jax.random.split(key, T), CW))
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
    return list(jax.random.split(key, T))


def fori_keys(key):
    keys = []
    for _ in range(T):
        key, sub = jax.random.split(key)
        keys.append(sub)
    return keys


def policy_actions(theta, keys):
    """The actions the programs draw with these per-step keys."""
    s, acts = jnp.float32(0.0), []
    for k in keys:
        a = bern(k, policy_logits(theta, s))
        s = 0.5 * s + a
        acts.append(a)
    return jnp.stack(acts)


def rollout(theta, actions, w):
    """Per-step log π(a_t), probability π(a_t) and reward r_t for fixed actions."""
    s, lps, probs, rs = jnp.float32(0.0), [], [], []
    for t in range(actions.shape[0]):
        l = policy_logits(theta, s)
        lps.append(lq(actions[t], l))
        probs.append(bernoulli_pmf(actions[t], l))
        s, r = policy_step(theta, s, actions[t], w[t])
        rs.append(r)
    return jnp.stack(lps), jnp.prod(jnp.stack(probs)), jnp.stack(rs)


def dice_loop(theta, actions, w, mode):
    """Σ_t ⊡(τ_t)·r_t with τ_t = Σ_{s≤t} log π(a_s) ("causal") or Σ_s ("whole")."""
    lp, _, r = rollout(theta, sg(actions), w)
    tau = jnp.cumsum(lp) if mode == "causal" else jnp.broadcast_to(jnp.sum(lp), lp.shape)
    return jnp.sum(magic_box(tau) * r)


def policy_expectation(theta, w=CW):
    acts = jnp.asarray(binary_configs(w.shape[0]))

    def weighted(a):
        _, prob, r = rollout(theta, a, w)
        return prob * jnp.sum(r)

    return jnp.sum(jax.vmap(weighted)(acts))


LOOP_PROGRAMS = {
    "scan_ys": (scan_ys_program, scan_keys),
    "scan_carry": (scan_carry_program, scan_keys),
    "fori_loop": (fori_program, fori_keys),
}


@pytest.mark.parametrize("name", list(LOOP_PROGRAMS))
def test_loop_same_key_equals_reward_to_go_estimator(name):
    program, keys_of = LOOP_PROGRAMS[name]
    keys = fixed_keys(11)

    def hand(k, mode):
        acts = policy_actions(C_THETA, keys_of(k))
        return jax.grad(dice_loop)(C_THETA, acts, CW, mode)

    got = per_key(lambda k: scg.scg_grad(program)(C_THETA, k), keys)
    want = per_key(lambda k: hand(k, "causal"), keys)
    assert_not_close(want, per_key(lambda k: hand(k, "whole"), keys),
                     "reward-to-go and whole-loop estimators")
    assert_trees_allclose(got, want)
    np.testing.assert_allclose(
        per_key(lambda k: scg.surrogate(program)(C_THETA, k), keys),
        per_key(lambda k: program(C_THETA, k), keys), rtol=1e-5)


@pytest.mark.parametrize("name", list(LOOP_PROGRAMS))
def test_loop_causal_estimator_is_unbiased(name):
    program, _ = LOOP_PROGRAMS[name]
    draws = mc_draws(lambda k: scg.scg_grad(program)(C_THETA, k), N, 12)
    assert_mc_close(draws, jax.grad(policy_expectation)(C_THETA))


def test_loop_causal_estimator_has_its_exact_variance():
    """Its variance is the reward-to-go estimator's, enumerated over the 2^T
    trajectories, and well below the whole-loop estimator's."""
    acts = jnp.asarray(binary_configs(T))
    probs = jax.vmap(lambda a: rollout(C_THETA, a, CW)[1])(acts)
    causal = jax.vmap(lambda a: jax.grad(dice_loop)(C_THETA, a, CW, "causal"))(acts)
    whole = jax.vmap(lambda a: jax.grad(dice_loop)(C_THETA, a, CW, "whole"))(acts)
    mean_c, var_c, mu4_c = discrete_moments(causal, probs)
    mean_w, var_w, _ = discrete_moments(whole, probs)
    np.testing.assert_allclose(mean_c, mean_w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mean_c, jax.grad(policy_expectation)(C_THETA), rtol=1e-4,
                               atol=1e-5)
    assert var_c[0] < 0.6 * var_w[0] and var_c[1] < 0.6 * var_w[1], (var_c, var_w)

    draws = np.asarray(mc_draws(lambda k: scg.scg_grad(scan_ys_program)(C_THETA, k),
                                N, 13), np.float64)
    for i in range(3):
        assert_variance_close(draws[:, i], var_c[i], mu4_c[i])


def test_loop_with_independent_steps_weights_each_reward_by_its_own_action():
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
        r = 2.0 * (a - CW) ** 2 + jnp.arange(T, dtype=F32)
        return jnp.sum(magic_box(lq(a, theta)) * r)

    keys = fixed_keys(14)
    got = per_key(lambda k: scg.scg_grad(program)(theta, k), keys)
    assert_trees_allclose(got, per_key(lambda k: jax.grad(hand)(theta, k), keys))


def test_loop_downstream_of_in_loop_node_is_reward_to_go():
    keys = fixed_keys(15)

    def lib(k):
        return scg.scg_grad(scan_ys_program, downstream=True)(C_THETA, k)

    def hand(k):
        acts = policy_actions(C_THETA, scan_keys(k))
        _, _, r = rollout(C_THETA, acts, CW)
        return jnp.cumsum(r[::-1])[::-1]

    g, ds = per_key(lib, keys)
    assert set(ds) == {"a"}
    assert ds["a"].shape == (16, T)
    assert_trees_allclose(ds["a"], per_key(hand, keys))
    assert_trees_allclose(g, per_key(lambda k: scg.scg_grad(scan_ys_program)(C_THETA, k),
                                     keys))


E = 3


def vmapped_scan_program(theta, key):
    return jnp.mean(jax.vmap(lambda k: scan_ys_program(theta, k))(jax.random.split(key, E)))


def test_scan_under_vmap_has_per_environment_causality():
    keys = fixed_keys(16)

    def hand(theta, key, mode):
        def env(k):
            acts = policy_actions(theta, scan_keys(k))
            return dice_loop(theta, acts, CW, mode)

        return jnp.mean(jax.vmap(env)(jax.random.split(key, E)))

    got = per_key(lambda k: scg.scg_grad(vmapped_scan_program)(C_THETA, k), keys)
    want = per_key(lambda k: jax.grad(hand)(C_THETA, k, "causal"), keys)
    assert_trees_allclose(got, want)

    draws = mc_draws(lambda k: scg.scg_grad(vmapped_scan_program)(C_THETA, k), N, 17)
    assert_mc_close(draws, jax.grad(policy_expectation)(C_THETA))


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
    return [ku for k in jax.random.split(key, T2) for ku in jax.random.split(k, U)]


def nested_outer_causal(theta, actions):
    """Coarser but sound: reward (t, u) weighted by every draw at outer steps ≤ t."""
    lp, _, r = rollout(theta, sg(actions), NW.reshape(-1))
    tau = jnp.repeat(jnp.cumsum(lp.reshape(T2, U).sum(1)), U)
    return jnp.sum(magic_box(tau) * r)


def test_nested_scans_same_key_equal_flattened_time_order_estimator():
    keys = fixed_keys(18)
    w = NW.reshape(-1)

    def hand(k, mode):
        acts = policy_actions(C_THETA, nested_keys(k))
        if mode == "outer":
            return jax.grad(nested_outer_causal)(C_THETA, acts)
        return jax.grad(dice_loop)(C_THETA, acts, w, mode)

    got = per_key(lambda k: scg.scg_grad(nested_program)(C_THETA, k), keys)
    want = per_key(lambda k: hand(k, "causal"), keys)
    whole = per_key(lambda k: hand(k, "whole"), keys)
    outer = per_key(lambda k: hand(k, "outer"), keys)
    assert_not_close(want, outer, "flattened-causal and outer-causal estimators")
    matches = {name: bool(np.allclose(got, x, rtol=1e-4, atol=1e-5))
               for name, x in [("whole-loop", whole), ("outer-step causal", outer)]}
    assert_trees_allclose(got, want, err_msg=f"(other estimators matched: {matches})")


def test_nested_scans_are_unbiased():
    draws = mc_draws(lambda k: scg.scg_grad(nested_program)(C_THETA, k), N, 19)
    assert_mc_close(draws, jax.grad(policy_expectation)(C_THETA, NW.reshape(-1)))


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
        z1 = scg.sample(k1, dist.Bernoulli(logits=theta[0]), baseline=b1,
                        name="z1").astype(F32)
        b2 = chain_baseline_2(kind, theta, z1)
        z2 = scg.sample(k2, dist.Bernoulli(logits=theta[1] + theta[2] * z1), baseline=b2,
                        name="z2").astype(F32)
        return chain_cost(theta, z1, z2)

    f.__name__ = f"chain_{kind}"
    return f


def chain_draw(theta, key):
    k1, k2 = jax.random.split(key)
    z1 = bern(k1, theta[0])
    z2 = bern(k2, theta[1] + theta[2] * z1)
    return z1, z2


def chain_hand_grad(theta, key, kind):
    """∇log p(z1)·(Q1 − b1) + ∇log p(z2)·(Q2 − b2) + the pathwise part."""
    z1, z2 = chain_draw(theta, key)
    b1 = chain_baseline_1(kind, theta) or 0.0
    b2 = chain_baseline_2(kind, theta, z1)
    b2 = 0.0 if b2 is None else b2
    q1 = chain_cost(theta, z1, z2)  # every cost term depends on z1
    q2 = 3.0 * (z1 - z2) ** 2 + (theta[3] ** 2 + theta[0]) * z2
    g1 = jax.grad(lambda th: lq(z1, th[0]))(theta)
    g2 = jax.grad(lambda th: lq(z2, th[1] + th[2] * z1))(theta)
    pathwise = jax.grad(chain_cost)(theta, z1, z2)
    return g1 * (q1 - b1) + g2 * (q2 - b2) + pathwise


def chain_expectation(theta):
    total = 0.0
    for z1 in (0.0, 1.0):
        for z2 in (0.0, 1.0):
            prob = bernoulli_pmf(z1, theta[0]) * bernoulli_pmf(z2, theta[1] + theta[2] * z1)
            total = total + prob * chain_cost(theta, z1, z2)
    return total


@pytest.mark.parametrize("kind", ["constant", "upstream"])
def test_baseline_keeps_value_and_gives_hand_written_gradient(kind):
    f = chain_program(kind)
    keys = fixed_keys(20)
    values = per_key(lambda k: chain_program(None)(BL_THETA, k), keys)
    np.testing.assert_allclose(per_key(lambda k: f(BL_THETA, k), keys), values)
    np.testing.assert_allclose(per_key(lambda k: scg.surrogate(f)(BL_THETA, k), keys),
                               values, rtol=1e-5)
    v, g = per_key(lambda k: scg.scg_value_and_grad(f)(BL_THETA, k), keys)
    np.testing.assert_allclose(v, values, rtol=1e-5)
    want = per_key(lambda k: chain_hand_grad(BL_THETA, k, kind), keys)
    assert_not_close(want, per_key(lambda k: chain_hand_grad(BL_THETA, k, None), keys),
                     "with and without baseline")
    assert_trees_allclose(g, want)


@pytest.mark.parametrize("kind", ["constant", "upstream"])
def test_baseline_first_order_is_unbiased(kind):
    draws = mc_draws(lambda k: scg.scg_grad(chain_program(kind))(BL_THETA, k), N, 21)
    assert_mc_close(draws, jax.grad(chain_expectation)(BL_THETA))


@pytest.mark.parametrize("kind", ["constant", "upstream"])
def test_baseline_second_order_is_unbiased(kind):
    f = chain_program(kind)
    draws = mc_draws(lambda k: jax.hessian(scg.surrogate(f))(BL_THETA, k), N, 22)
    assert_mc_close(draws, jax.hessian(chain_expectation)(BL_THETA))


VR_THETA = jnp.float32(0.4)


def offset_program(baseline):
    def f(theta, key):
        b = None if baseline is None else baseline(theta)
        z = scg.sample(key, dist.Bernoulli(logits=theta), baseline=b).astype(F32)
        return 10.0 + 3.0 * z

    return f


def test_good_baseline_reduces_variance_to_its_exact_value():
    p = float(jax.nn.sigmoid(VR_THETA))
    zs = np.array([0.0, 1.0])
    probs = np.array([1 - p, p])
    # Without baseline: (z − p)(10 + 3z); with b = E[c] = 10 + 3p: 3(z − p)².
    m_plain, var_plain, mu4_plain = discrete_moments((zs - p) * (10 + 3 * zs), probs)
    m_base, var_base, mu4_base = discrete_moments(3 * (zs - p) ** 2, probs)
    assert abs(m_plain - m_base) < 1e-9

    plain = mc_draws(lambda k: scg.scg_grad(offset_program(None))(VR_THETA, k), N, 23)
    based = mc_draws(lambda k: scg.scg_grad(
        offset_program(lambda th: 10.0 + 3.0 * jax.nn.sigmoid(th)))(VR_THETA, k), N, 23)
    assert_mc_close(based, m_base)
    assert_variance_close(np.asarray(plain), var_plain, mu4_plain)
    assert_variance_close(np.asarray(based), var_base, mu4_base)
    assert_variance_ratio_below(based, plain, 0.01)


def test_vector_baseline_broadcasts_per_element():
    theta = jnp.array([0.5, -0.3, 1.2, -0.8])
    a = jnp.array([2.0, -1.0, 3.0, 0.5])
    t = jnp.array([0.3, 1.2, -0.4, 0.9])
    keys = fixed_keys(24)

    for b in (jnp.array([0.5, 1.0, -2.0, 0.25]), jnp.float32(1.5)):
        def f(theta, key):
            z = scg.sample(key, dist.Bernoulli(logits=theta), baseline=b).astype(F32)
            return jnp.sum(a * (z - t) ** 2)

        def hand(k):
            z = bern(k, theta)
            return (z - jax.nn.sigmoid(theta)) * (a * (z - t) ** 2 - b)

        assert_trees_allclose(per_key(lambda k: scg.scg_grad(f)(theta, k), keys),
                              per_key(hand, keys))


# ---------------------------------------------------------------------------------------
# Leave-one-out and num_samples.
# ---------------------------------------------------------------------------------------

K = 4
LOO_THETA = jnp.array([0.4, 0.7])


def loo_program(theta, key):
    z = scg.sample(key, dist.Bernoulli(logits=theta[0]), name="z").astype(F32)
    return 10.0 + 3.0 * z + theta[1] ** 2 * z


def loo_expectation(theta):
    return 10.0 + jax.nn.sigmoid(theta[0]) * (3.0 + theta[1] ** 2)


def loo_hand(theta, key):
    """1/K Σ_k ∇log p(z_k)·(c_k − mean_{j≠k} c_j) + pathwise."""
    z = jax.vmap(lambda k: bern(k, theta[0]))(jax.random.split(key, K))
    c = 10.0 + 3.0 * z + theta[1] ** 2 * z
    others = (jnp.sum(c) - c) / (K - 1)
    p = jax.nn.sigmoid(theta[0])
    g0 = jnp.mean((z - p) * (c - others))
    g1 = jnp.mean(2.0 * theta[1] * z)
    return jnp.mean(c), jnp.stack([g0, g1])


def test_leave_one_out_value_and_same_key_gradient():
    keys = fixed_keys(25)
    opts = dict(num_samples=K, baseline="leave_one_out")
    mean_cost = per_key(
        lambda k: jnp.mean(jax.vmap(lambda kk: loo_program(LOO_THETA, kk))(
            jax.random.split(k, K))), keys)
    want_v, want_g = per_key(lambda k: loo_hand(LOO_THETA, k), keys)
    np.testing.assert_allclose(mean_cost, want_v, rtol=1e-6)

    v, g = per_key(lambda k: scg.scg_value_and_grad(loo_program, **opts)(LOO_THETA, k),
                   keys)
    np.testing.assert_allclose(v, mean_cost, rtol=1e-5)
    np.testing.assert_allclose(
        per_key(lambda k: scg.surrogate(loo_program, **opts)(LOO_THETA, k), keys),
        mean_cost, rtol=1e-5)
    assert_trees_allclose(g, want_g)
    assert_trees_allclose(
        per_key(lambda k: scg.scg_grad(loo_program, **opts)(LOO_THETA, k), keys), want_g)


def test_num_samples_alone_averages_k_estimates():
    keys = fixed_keys(26)
    v, g = per_key(lambda k: scg.scg_value_and_grad(loo_program, num_samples=K)(
        LOO_THETA, k), keys)

    def manual(k):
        ks = jax.random.split(k, K)
        costs = jax.vmap(lambda kk: loo_program(LOO_THETA, kk))(ks)
        grads = jax.vmap(lambda kk: scg.scg_grad(loo_program)(LOO_THETA, kk))(ks)
        return jnp.mean(costs), jnp.mean(grads, axis=0)

    want_v, want_g = per_key(manual, keys)
    np.testing.assert_allclose(v, want_v, rtol=1e-5)
    assert_trees_allclose(g, want_g)


def test_key_argnum_selects_the_key_argument():
    def f(key, theta):
        return loo_program(theta, key)

    keys = fixed_keys(27)
    opts = dict(num_samples=K, baseline="leave_one_out")
    got = per_key(lambda k: scg.scg_grad(f, argnums=1, key_argnum=0, **opts)(k, LOO_THETA),
                  keys)
    want = per_key(lambda k: scg.scg_grad(loo_program, **opts)(LOO_THETA, k), keys)
    assert_trees_allclose(got, want)


def test_leave_one_out_is_unbiased_and_has_its_exact_variance():
    opts = dict(num_samples=K, baseline="leave_one_out")
    loo = mc_draws(lambda k: scg.scg_grad(loo_program, **opts)(LOO_THETA, k), N, 28)
    plain = mc_draws(lambda k: scg.scg_grad(loo_program, num_samples=K)(LOO_THETA, k),
                     N, 28)
    exact = jax.grad(loo_expectation)(LOO_THETA)
    assert_mc_close(loo, exact)
    assert_mc_close(plain, exact)

    # Exact distribution of both θ0 components over the 2^K configurations.
    th0, th1 = (float(x) for x in LOO_THETA)
    p = 1.0 / (1.0 + np.exp(-th0))
    zs = binary_configs(K).astype(np.float64)
    probs = np.prod(np.where(zs == 1, p, 1 - p), axis=1)
    c = 10.0 + (3.0 + th1**2) * zs
    others = (c.sum(1, keepdims=True) - c) / (K - 1)
    _, var_loo, mu4_loo = discrete_moments(((zs - p) * (c - others)).mean(1), probs)
    _, var_plain, mu4_plain = discrete_moments(((zs - p) * c).mean(1), probs)
    assert var_loo < 0.05 * var_plain
    assert_variance_close(np.asarray(loo)[:, 0], var_loo, mu4_loo)
    assert_variance_close(np.asarray(plain)[:, 0], var_plain, mu4_plain)
    assert_variance_ratio_below(np.asarray(loo)[:, 0], np.asarray(plain)[:, 0], 0.05)


def test_leave_one_out_on_a_chain_is_unbiased_first_and_second_order():
    f = chain_program(None)
    opts = dict(num_samples=K, baseline="leave_one_out")
    grads = mc_draws(lambda k: scg.scg_grad(f, **opts)(BL_THETA, k), N, 29)
    assert_mc_close(grads, jax.grad(chain_expectation)(BL_THETA))
    hess = mc_draws(lambda k: jax.hessian(scg.surrogate(f, **opts))(BL_THETA, k), N, 30)
    assert_mc_close(hess, jax.hessian(chain_expectation)(BL_THETA))


def test_leave_one_out_on_a_chain_uses_each_nodes_own_downstream_costs():
    """z1's baseline is the mean of the other samples' Q1, z2's of their Q2."""
    f = chain_program(None)
    keys = fixed_keys(31)

    def hand(k):
        ks = jax.random.split(k, K)
        z1, z2 = jax.vmap(lambda kk: chain_draw(BL_THETA, kk))(ks)
        q1 = jax.vmap(lambda a, b: chain_cost(BL_THETA, a, b))(z1, z2)
        q2 = 3.0 * (z1 - z2) ** 2 + (BL_THETA[3] ** 2 + BL_THETA[0]) * z2
        b1 = (q1.sum() - q1) / (K - 1)
        b2 = (q2.sum() - q2) / (K - 1)
        g1 = jax.vmap(lambda a: jax.grad(lambda th: lq(a, th[0]))(BL_THETA))(z1)
        g2 = jax.vmap(lambda a, b: jax.grad(lambda th: lq(b, th[1] + th[2] * a))(
            BL_THETA))(z1, z2)
        pw = jax.vmap(lambda a, b: jax.grad(chain_cost)(BL_THETA, a, b))(z1, z2)
        return jnp.mean(g1 * (q1 - b1)[:, None] + g2 * (q2 - b2)[:, None] + pw, axis=0)

    got = per_key(lambda k: scg.scg_grad(f, num_samples=K, baseline="leave_one_out")(
        BL_THETA, k), keys)
    assert_trees_allclose(got, per_key(hand, keys))


# ---------------------------------------------------------------------------------------
# Downstream costs.
# ---------------------------------------------------------------------------------------


def two_node_program(theta, key):
    k1, k2 = jax.random.split(key)
    z1 = scg.sample(k1, dist.Bernoulli(logits=theta[0]), name="z1").astype(F32)
    z2 = scg.sample(k2, dist.Bernoulli(logits=theta[1]), name="z2").astype(F32)
    return 3.0 * z1 + 10.0 * z2


def test_downstream_costs_of_independent_nodes():
    theta = jnp.array([0.3, -0.2])
    keys = fixed_keys(32)
    g, ds = per_key(lambda k: scg.scg_grad(two_node_program, downstream=True)(theta, k),
                    keys)
    z = per_key(lambda k: jnp.stack([bern(kk, theta[i]) for i, kk in
                                     enumerate(jax.random.split(k))]), keys)
    assert set(ds) == {"z1", "z2"}
    assert ds["z1"].shape == ds["z2"].shape == (16,)
    assert_trees_allclose(ds["z1"], 3.0 * z[:, 0])
    assert_trees_allclose(ds["z2"], 10.0 * z[:, 1])
    assert_trees_allclose(g, per_key(lambda k: scg.scg_grad(two_node_program)(theta, k),
                                     keys))
    # Downstream costs are regression targets: no gradient flows through them.
    d = jax.grad(lambda th: scg.scg_grad(two_node_program, downstream=True)(
        th, keys[0])[1]["z1"])(theta)
    np.testing.assert_array_equal(d, 0.0)


def test_downstream_with_has_aux():
    theta = jnp.array([0.3, -0.2])

    def f(theta, key):
        return two_node_program(theta, key), {"twice": 2.0 * theta}

    key = jax.random.key(33)
    g, (aux, ds) = scg.scg_grad(f, has_aux=True, downstream=True)(theta, key)
    g_plain, ds_plain = scg.scg_grad(two_node_program, downstream=True)(theta, key)
    np.testing.assert_allclose(aux["twice"], 2.0 * theta)
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
    mean, variance = scg.gradient_variance(gv_program, num_draws=N)(GV_THETA,
                                                                     jax.random.key(34))
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
    mean, variance = jax.jit(scg.gradient_variance(f, num_draws=n))(params, key)
    draws = jax.vmap(scg.scg_grad(f), (None, 0))(params, jax.random.split(key, n))
    assert_trees_allclose(mean, jax.tree_util.tree_map(lambda d: np.mean(d, 0), draws))
    assert_trees_allclose(variance, jax.tree_util.tree_map(lambda d: np.var(d, 0), draws))


def test_gradient_variance_passes_estimator_options_and_argnums():
    def f(key, theta, unused):
        return loo_program(theta, key) + 0.0 * unused

    key, n = jax.random.key(36), 500
    opts = dict(num_samples=K, baseline="leave_one_out")
    mean, variance = scg.gradient_variance(f, argnums=1, num_draws=n, key_argnum=0,
                                           **opts)(key, LOO_THETA, jnp.float32(1.0))
    draws = jax.vmap(lambda k: scg.scg_grad(f, argnums=1, key_argnum=0, **opts)(
        k, LOO_THETA, jnp.float32(1.0)))(jax.random.split(key, n))
    assert_trees_allclose(mean, np.mean(draws, 0))
    assert_trees_allclose(variance, np.var(draws, 0))

    # Lower than without a baseline, as the exact variances say (see the LOO test).
    _, var_plain = scg.gradient_variance(f, argnums=1, num_draws=n, key_argnum=0,
                                         num_samples=K)(key, LOO_THETA, jnp.float32(1.0))
    assert variance[0] < 0.2 * var_plain[0]

    both = scg.gradient_variance(f, argnums=(1, 2), num_draws=n, key_argnum=0)(
        key, LOO_THETA, jnp.float32(1.0))
    assert isinstance(both, tuple) and len(both) == 2
    assert isinstance(both[0], tuple) and len(both[0]) == 2
    assert both[0][0].shape == (2,) and both[1][1].shape == ()

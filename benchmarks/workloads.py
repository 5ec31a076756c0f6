"""Pieces shared by ``overhead.py`` and ``variance.py``: not a script of its own.

* ``magic_box`` -- DiCE's magic box, for the hand-written surrogates;
* the discrete-VAE model: the linear Bernoulli encoder and decoder, their random
  init, the single-sample negative ELBO and its pieces as the hand-written
  surrogates see them (each script draws its own data);
* the policy-gradient workload: the environment and policy (``rl_problem``), the
  transition, the stochastic ``lax.scan`` rollout and its hand-written surrogates
  (no Rao-Blackwellization, and causality);
* ``parse_cases`` (the ``--cases`` option), ``time_runs`` (interleaved median timing)
  and ``fmt_t`` (times as text).

Functions here take ``(params, data, key)``, key last; ``overhead.py`` wraps them in
its ``(params, key, data)`` order.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

# Let the benchmarks run from a checkout without installing the package.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from jax import lax  # noqa: E402

import scgjax as scg  # noqa: E402


def magic_box(tau):
    """DiCE's magic box: value 1, d/dtau box(tau) = box(tau)."""
    return jnp.exp(tau - lax.stop_gradient(tau))


# --------------------------------------------------------------------------
# discrete VAE / sigmoid belief net: x [B, P] binary, z [B, L] Bernoulli latents
# --------------------------------------------------------------------------
def vae_init_params(keys, pixels, latents):
    """Linear encoder and decoder drawn from the 4 keys `keys[0..3]`."""
    # Random (nonzero) init: numpyro 0.22's Bernoulli(logits).log_prob has a wrong
    # derivative at exactly logits == 0 (DESIGN.md, sharp edges); NumPyro's own
    # surrogate and the hand-written ones use that log_prob.
    return {
        "enc_w": 0.1 * jax.random.normal(keys[0], (pixels, latents)),
        "enc_b": 0.1 * jax.random.normal(keys[1], (latents,)),
        "dec_w": 0.1 * jax.random.normal(keys[2], (latents, pixels)),
        "dec_b": 0.1 * jax.random.normal(keys[3], (pixels,)),
    }


def vae_encoder(params, x):
    """q(z | x) = Bernoulli(logits = x @ W_enc + b_enc), batch shape [B, L]."""
    return dist.Bernoulli(logits=x @ params["enc_w"] + params["enc_b"])


def vae_neg_elbo(params, x, q, z):
    """Single-sample negative ELBO with a Bernoulli(0.5) prior, mean over the batch."""
    px = dist.Bernoulli(logits=z @ params["dec_w"] + params["dec_b"])
    prior = dist.Bernoulli(probs=0.5)
    log_ratio = jnp.sum(q.log_prob(z) - prior.log_prob(z), axis=-1)
    recon = jnp.sum(px.log_prob(x), axis=-1)
    return jnp.mean(log_ratio - recon)


def vae_cost(params, x, key):
    """The stochastic program: z drawn with scg.sample (score function)."""
    q = vae_encoder(params, x)
    z = scg.sample(key, q)
    return vae_neg_elbo(params, x, q, z)


def vae_parts(params, x, key):
    """(log q(z) [B, L], log p(z) [B, L], recon [B]) for the z scg.sample draws."""
    q = vae_encoder(params, x)
    z = lax.stop_gradient(q.sample(key))  # what scg.sample draws for this key
    lq = q.log_prob(z)
    lp = dist.Bernoulli(probs=0.5).log_prob(z)
    px = dist.Bernoulli(logits=z @ params["dec_w"] + params["dec_b"])
    recon = jnp.sum(px.log_prob(x), axis=-1)
    return lq, lp, recon


# --------------------------------------------------------------------------
# policy gradient: a lax.scan rollout of a linear categorical policy
# --------------------------------------------------------------------------
RL_HORIZON, RL_STATE, RL_ACTIONS = 200, 8, 4


def rl_problem(seed=1, state=RL_STATE, actions=RL_ACTIONS):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    # An orthogonal matrix scaled below 1: stable, mixing linear dynamics.
    a_mat = 0.9 * jnp.linalg.qr(jax.random.normal(ks[0], (state, state)))[0]
    env = {
        "A": a_mat,
        "B": jax.random.normal(ks[1], (actions, state)),  # effect of each action
        "goal": 0.5 * jax.random.normal(ks[2], (state,)),
        "s0": jax.random.normal(ks[3], (state,)),
    }
    params = {
        "w": 0.3 * jax.random.normal(ks[4], (actions, state)),
        "b": 0.1 * jax.random.normal(ks[5], (actions,)),
    }
    return params, env


def rl_policy(params, s):
    return dist.Categorical(logits=params["w"] @ s + params["b"])


def rl_transition(env, s, a):
    s_next = jnp.tanh(env["A"] @ s + env["B"][a])
    reward = -jnp.sum((s_next - env["goal"]) ** 2)  # state-dependent reward
    return s_next, reward


def rl_cost(params, env, key, horizon=RL_HORIZON):
    """The stochastic program: scg.sample inside the scan body, cost = -(total reward)."""

    def step(s, k):
        a = scg.sample(k, rl_policy(params, s))
        return rl_transition(env, s, a)

    _, rewards = lax.scan(step, env["s0"], jax.random.split(key, horizon))
    return -jnp.sum(rewards)


def rl_parts(params, env, key, horizon=RL_HORIZON):
    """(log pi(a_t) [T], reward_t [T]) for the actions scg.sample draws."""

    def step(s, k):
        pi = rl_policy(params, s)
        a = lax.stop_gradient(pi.sample(k))  # what scg.sample draws for this key
        s_next, reward = rl_transition(env, s, a)
        return s_next, (pi.log_prob(a), reward)

    _, (logp, rewards) = lax.scan(step, env["s0"], jax.random.split(key, horizon))
    return logp, rewards


def rl_hand_whole(params, env, key, horizon=RL_HORIZON):
    # REINFORCE on the whole program: without causality every step's reward depends
    # (through the state) on all actions: one box of Σ_t log π(a_t) times the total cost.
    logp, rewards = rl_parts(params, env, key, horizon)
    return magic_box(jnp.sum(logp)) * (-jnp.sum(rewards))


def rl_hand_causal(params, env, key, horizon=RL_HORIZON):
    # Causality: the reward of step t is boxed with the log-probs of steps <= t.
    logp, rewards = rl_parts(params, env, key, horizon)
    return jnp.sum(magic_box(jnp.cumsum(logp)) * (-rewards))


# --------------------------------------------------------------------------
# command line and timing
# --------------------------------------------------------------------------
def parse_cases(parser, text, known):
    """The comma-separated case names in `text`; parser.error() on one not in `known`."""
    cases = [c.strip() for c in text.split(",") if c.strip()]
    for c in cases:
        if c not in known:
            parser.error(f"unknown case {c!r}; choose from {sorted(known)}")
    return cases


def time_runs(fns, args, reps, inner, ref=None):
    """Median seconds per call, and the median over repetitions of each function's
    time divided by `ref`'s time in the same repetition (a paired ratio, robust to
    load that drifts during the run; {} without `ref`). The functions alternate, order
    flipped every rep; every call is followed by block_until_ready."""
    for fn in fns.values():  # compile + warm up
        for _ in range(3):
            jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    order = list(fns)
    for r in range(reps):
        for name in order if r % 2 == 0 else order[::-1]:
            fn = fns[name]
            t0 = time.perf_counter()
            for _ in range(inner):
                jax.block_until_ready(fn(*args))
            times[name].append((time.perf_counter() - t0) / inner)
    med = {name: statistics.median(t) for name, t in times.items()}
    ratio = {}
    if ref in times:
        ratio = {
            name: statistics.median(a / b for a, b in zip(t, times[ref]))
            for name, t in times.items()
        }
    return med, ratio


def fmt_t(s):
    """Seconds as text (s, ms or µs, 3 significant digits); "—" for None."""
    if s is None:
        return "—"
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"

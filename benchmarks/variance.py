"""Gradient variance and time per step of scgjax's estimators, against hand-written
surrogates and NumPyro's ``TraceGraph_ELBO``.

Four workloads:

* ``vae`` -- a discrete VAE: batch 128 of 8x8 binary "digit" images (procedurally
  drawn from a 5x7 digit font with random shifts, stroke thickening and pixel noise;
  deterministic, no data set download), 256 Bernoulli latents
  ``z ~ Bernoulli(logits = x @ W_enc + b_enc)`` drawn with ``scg.sample`` (score
  function), decoder ``x ~ Bernoulli(logits = z @ W_dec + b_dec)``, prior
  Bernoulli(0.5), cost = mean over the batch of the single-sample negative ELBO.
* ``rl`` -- a 200-step ``lax.scan`` rollout of a linear categorical policy
  (state dim 8, 4 actions) with ``scg.sample`` inside the scan body, a deterministic
  action-dependent transition and a state-dependent reward per step,
  cost = -(total reward).
* ``attention`` -- hard attention: 256 rows, each chooses one of 5 glimpses (8
  features) with ``Categorical(glimpses @ w)``, picks it with ``x[jnp.arange(B), k]``
  and classifies it (3 classes; labels picked out of the ``log_softmax`` the same way);
  cost = mean cross-entropy.
* ``gmm`` -- a Gaussian mixture (K=4, 256 points) with an amortised
  ``q(z | x) = Categorical(x·w + b)`` and the likelihood written ``Normal(mu[z], 1)``;
  cost = mean negative ELBO with a uniform prior.

For each estimator the script draws ``--draws`` independent gradient estimates at fixed
parameters and reports, per parameter group, the mean over the group's entries of the
per-entry variance across draws, and the median wall time of one jitted gradient step.
Estimators (rows):

* ``REINFORCE (whole, hand)``  -- ⊡(Σ all log-probs)·total cost: no Rao-Blackwellization;
* ``hand per-row`` / ``hand per-element`` / ``hand causal`` -- hand-written DiCE
  surrogates with plates (vae) or reward-to-go (rl); the one that gives the same
  gradient as the scgjax default is the time reference (target: ≤ 1.05×);
* ``scgjax default``  -- ``scg.scg_grad(f)`` (automatic plates, causality in scan);
* ``scgjax LOO K=4/8`` -- ``scg_grad(f, num_samples=K, baseline="leave_one_out")``:
  the mean of K estimates, so it costs about K× a plain step;
* ``scgjax moving avg`` -- ``scg.sample(..., baseline=b, name=...)`` with ``b`` an
  exponential moving average of the node's downstream cost (from
  ``scg_grad(..., downstream=True)``), averaged over the batch axis, kept as explicit
  state and warmed up before measuring; its step includes the state update;
* ``NumPyro TraceGraph_ELBO`` (vae only) -- the same model and guide written with
  ``numpyro.plate`` (over the batch, and over batch × latents), gradient of
  ``TraceGraph_ELBO().loss`` (whose value is the loss and whose gradient is NumPyro's
  surrogate) with the parameters substituted through ``param_map``.

``z²`` column: a bias check. For every entry, (mean − reference mean)² / (s.e.² + s.e.²
of the reference), averaged over all entries; the reference is an independent run of
the lowest-variance hand-written estimator. About 1 means "no detectable bias"; values
far above 1 mean the estimator's mean differs from the reference's.

Run:  python benchmarks/variance.py            (about a minute on 2 CPU cores)
      python benchmarks/variance.py --quick    (rough numbers, ~30 s)
      python benchmarks/variance.py --help
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import lax
from numpyro.infer import TraceGraph_ELBO

# The pieces shared with overhead.py; importing them also puts the checkout's scgjax
# on sys.path, so the script runs without installing the package.
if __package__:  # imported as a package module, e.g. `python -m benchmarks.variance`
    from . import workloads as wl
else:  # run as `python benchmarks/variance.py` (sys.path[0] is benchmarks/) or loaded by path
    if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import workloads as wl

import scgjax as scg  # noqa: E402

magic_box = wl.magic_box
RUN_TARGET = 1.05


# --------------------------------------------------------------------------
# (a) discrete VAE on digit-like 8x8 binary images
# --------------------------------------------------------------------------
VAE_BATCH, VAE_SIDE, VAE_LATENTS = 128, 8, 256
VAE_PIXELS = VAE_SIDE * VAE_SIDE

_FONT = [  # 5x7 bitmaps of 0..9
    ["01110", "10001", "10011", "10101", "11001", "10001", "01110"],
    ["00100", "01100", "00100", "00100", "00100", "00100", "01110"],
    ["01110", "10001", "00001", "00010", "00100", "01000", "11111"],
    ["11111", "00010", "00100", "00010", "00001", "10001", "01110"],
    ["00010", "00110", "01010", "10010", "11111", "00010", "00010"],
    ["11111", "10000", "11110", "00001", "00001", "10001", "01110"],
    ["00110", "01000", "10000", "11110", "10001", "10001", "01110"],
    ["11111", "00001", "00010", "00100", "01000", "01000", "01000"],
    ["01110", "10001", "10001", "01110", "10001", "10001", "01110"],
    ["01110", "10001", "10001", "01111", "00001", "00010", "01100"],
]


def digit_images(n=VAE_BATCH, seed=0, flip=0.03):
    """n deterministic 8x8 binary digit-like images, float32 [n, 64].

    Digit i % 10 from a 5x7 font, shifted by a random offset inside the 8x8 frame,
    thickened horizontally with probability 0.3, then each pixel flipped w.p. `flip`.
    """
    rng = np.random.RandomState(seed)
    out = np.zeros((n, VAE_SIDE, VAE_SIDE), np.float32)
    for i in range(n):
        glyph = np.array([[c == "1" for c in row] for row in _FONT[i % 10]], np.float32)
        if rng.rand() < 0.3:  # a bolder stroke
            glyph = np.maximum(glyph, np.pad(glyph, ((0, 0), (1, 0)))[:, :-1])
        r, c = rng.randint(0, VAE_SIDE - 7 + 1), rng.randint(0, VAE_SIDE - 5 + 1)
        out[i, r : r + 7, c : c + 5] = glyph
    noise = rng.rand(*out.shape) < flip
    out = np.where(noise, 1.0 - out, out)
    return jnp.asarray(out.reshape(n, VAE_PIXELS))


def vae_problem(seed=0):
    x = digit_images(VAE_BATCH, seed)
    ks = jax.random.split(jax.random.PRNGKey(seed + 100), 4)
    return wl.vae_init_params(ks, VAE_PIXELS, VAE_LATENTS), x


VAE_GROUPS = [("enc W", "enc_w"), ("enc b", "enc_b"), ("dec W", "dec_w"), ("dec b", "dec_b")]


vae_cost = wl.vae_cost  # the stochastic program: single-sample negative ELBO, batch mean


def vae_cost_ma(params, state, x, key):
    """Same program, with a per-latent baseline for z taken from `state`."""
    q = wl.vae_encoder(params, x)
    z = scg.sample(key, q, baseline=state["z"], name="z")
    return wl.vae_neg_elbo(params, x, q, z)


def vae_ma_init(params, x):
    return {"z": jnp.zeros((VAE_LATENTS,), jnp.float32)}


def _vae_parts(params, x, key):
    lq, lp, recon = wl.vae_parts(params, x, key)
    return lq, recon, lq - lp  # log q [B, L], recon [B], log q - log p [B, L]


def vae_hand_whole(params, x, key):
    # REINFORCE on the whole program: one box of every log-prob times the whole cost.
    lq, recon, ratio = _vae_parts(params, x, key)
    cost = jnp.mean(jnp.sum(ratio, axis=-1) - recon)
    return magic_box(jnp.sum(lq)) * cost


def vae_hand_row(params, x, key):
    # Plates over the batch axis: example b's cost is boxed with log q(z_b).
    lq, recon, ratio = _vae_parts(params, x, key)
    cost_b = jnp.sum(ratio, axis=-1) - recon
    return jnp.mean(magic_box(jnp.sum(lq, axis=-1)) * cost_b)


def vae_hand_element(params, x, key):
    # Plates over both axes: the log-ratio element (b, j) depends on z_bj only.
    lq, recon, ratio = _vae_parts(params, x, key)
    per_b = magic_box(jnp.sum(lq, axis=-1)) * (-recon) + jnp.sum(magic_box(lq) * ratio, axis=-1)
    return jnp.mean(per_b)


# NumPyro: the same model and guide, with plates declared.
def _np_model_batch(x):
    dec_w, dec_b = numpyro.param("dec_w"), numpyro.param("dec_b")
    with numpyro.plate("batch", x.shape[0]):
        z = numpyro.sample("z", dist.Bernoulli(probs=jnp.full((VAE_LATENTS,), 0.5)).to_event(1))
        numpyro.sample("x", dist.Bernoulli(logits=z @ dec_w + dec_b).to_event(1), obs=x)


def _np_guide_batch(x):
    enc_w, enc_b = numpyro.param("enc_w"), numpyro.param("enc_b")
    with numpyro.plate("batch", x.shape[0]):
        numpyro.sample("z", dist.Bernoulli(logits=x @ enc_w + enc_b).to_event(1))


def _np_model_nested(x):
    dec_w, dec_b = numpyro.param("dec_w"), numpyro.param("dec_b")
    with numpyro.plate("batch", x.shape[0], dim=-2):
        with numpyro.plate("latent", VAE_LATENTS, dim=-1):
            z = numpyro.sample("z", dist.Bernoulli(probs=0.5))  # [B, L]
        logits = (z @ dec_w + dec_b)[:, None, :]  # batch shape [B, 1]
        numpyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x[:, None, :])


def _np_guide_nested(x):
    enc_w, enc_b = numpyro.param("enc_w"), numpyro.param("enc_b")
    with numpyro.plate("batch", x.shape[0], dim=-2):
        with numpyro.plate("latent", VAE_LATENTS, dim=-1):
            numpyro.sample("z", dist.Bernoulli(logits=x @ enc_w + enc_b))


def make_numpyro_grad(model, guide):
    """jax.grad of TraceGraph_ELBO().loss / B w.r.t. the substituted params.

    TraceGraph_ELBO.loss returns -ELBO + Σ_w (log q(w)·⊥Q̂_w − ⊥(...)): its value is the
    loss and its gradient is NumPyro's Rao-Blackwellized surrogate gradient (this is
    what numpyro.infer.SVI differentiates). NumPyro's loss sums over the batch; the
    scgjax cost is a mean, hence the 1/B.
    """
    elbo = TraceGraph_ELBO()

    def loss(params, x, key):
        return elbo.loss(key, params, model, guide, x) / x.shape[0]

    return jax.grad(loss)


# --------------------------------------------------------------------------
# (b) policy gradient: 200-step lax.scan rollout
# --------------------------------------------------------------------------
# The workload (rl_problem, the rollout rl_cost, the hand-written surrogates
# rl_hand_whole and rl_hand_causal) is in workloads.py.
RL_HORIZON, RL_STATE, RL_ACTIONS = wl.RL_HORIZON, wl.RL_STATE, wl.RL_ACTIONS
RL_GROUPS = [("policy W", "w"), ("policy b", "b")]
rl_problem, rl_cost = wl.rl_problem, wl.rl_cost
rl_hand_whole, rl_hand_causal = wl.rl_hand_whole, wl.rl_hand_causal


def rl_cost_ma(params, state, env, key):
    """Same rollout as rl_cost; step t's action gets the baseline state["a"][t]."""

    def step(s, inp):
        k, b_t = inp
        a = scg.sample(k, wl.rl_policy(params, s), baseline=b_t, name="a")
        return wl.rl_transition(env, s, a)

    xs = (jax.random.split(key, RL_HORIZON), state["a"])
    _, rewards = lax.scan(step, env["s0"], xs)
    return -jnp.sum(rewards)


def rl_ma_init(params, env):
    return {"a": jnp.zeros((RL_HORIZON,), jnp.float32)}


# --------------------------------------------------------------------------
# (c) hard attention: choose one of K glimpses per row, classify it
# --------------------------------------------------------------------------
ATT_BATCH, ATT_GLIMPSES, ATT_FEATURES, ATT_CLASSES = 256, 5, 8, 3
ATT_GROUPS = [("attention w", "att_w"), ("classifier W", "cls_w")]


def attention_problem(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    glimpses = jax.random.normal(k[0], (ATT_BATCH, ATT_GLIMPSES, ATT_FEATURES))
    labels = jax.random.randint(k[1], (ATT_BATCH,), 0, ATT_CLASSES)
    params = {
        "att_w": 0.5 * jax.random.normal(k[2], (ATT_FEATURES,)),
        "cls_w": 0.5 * jax.random.normal(k[3], (ATT_FEATURES, ATT_CLASSES)),
    }
    return params, (glimpses, labels)


def attention_cost(params, data, key):
    """Written with standard indexing: x[jnp.arange(B), k] and labels picked out of the
    log_softmax."""
    glimpses, labels = data
    k = scg.sample(key, dist.Categorical(logits=glimpses @ params["att_w"]))
    picked = glimpses[jnp.arange(glimpses.shape[0]), k]
    logp = jax.nn.log_softmax(picked @ params["cls_w"])
    return -jnp.mean(logp[jnp.arange(glimpses.shape[0]), labels])


def _attention_parts(params, data, key):
    glimpses, labels = data
    logits = glimpses @ params["att_w"]
    k = dist.Categorical(logits=lax.stop_gradient(logits)).sample(key)
    lq = jnp.take_along_axis(jax.nn.log_softmax(logits), k[:, None], 1)[:, 0]
    picked = jnp.einsum("bk,bkd->bd", jax.nn.one_hot(k, ATT_GLIMPSES), glimpses)
    nll = -jnp.sum(jax.nn.log_softmax(picked @ params["cls_w"]) * jax.nn.one_hot(labels, 3), -1)
    return lq, nll


def attention_hand_whole(params, data, key):
    lq, nll = _attention_parts(params, data, key)
    return magic_box(jnp.sum(lq)) * jnp.mean(nll)


def attention_hand_row(params, data, key):
    lq, nll = _attention_parts(params, data, key)
    return jnp.mean(magic_box(lq) * nll)


# --------------------------------------------------------------------------
# (d) Gaussian mixture: amortised q(z | x), Normal(mu[z], 1) likelihood
# --------------------------------------------------------------------------
GMM_BATCH, GMM_K = 256, 4
GMM_GROUPS = [("q w", "w"), ("q b", "b"), ("means", "mu")]


def gmm_problem(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    centres = jnp.array([-3.0, -1.0, 1.0, 3.0])
    z = jax.random.randint(k[0], (GMM_BATCH,), 0, GMM_K)
    x = centres[z] + 0.5 * jax.random.normal(k[1], (GMM_BATCH,))
    params = {
        "w": 0.3 * jax.random.normal(k[2], (GMM_K,)),
        "b": jnp.zeros(GMM_K),
        "mu": jnp.array([-2.0, -0.5, 0.5, 2.0]),
    }
    return params, x


def gmm_cost(params, x, key):
    """Negative ELBO written the usual way: Normal(mu[z], 1), a uniform prior."""
    q = dist.Categorical(logits=x[:, None] * params["w"] + params["b"])
    z = scg.sample(key, q)
    log_lik = dist.Normal(params["mu"][z], 1.0).log_prob(x)
    return jnp.mean(q.log_prob(z) + jnp.log(GMM_K) - log_lik)


def _gmm_parts(params, x, key):
    logits = x[:, None] * params["w"] + params["b"]
    z = dist.Categorical(logits=lax.stop_gradient(logits)).sample(key)
    lq = jnp.take_along_axis(jax.nn.log_softmax(logits), z[:, None], 1)[:, 0]
    mu = jnp.sum(jax.nn.one_hot(z, GMM_K) * params["mu"], -1)
    # The cost without its constant log(K) + log(sqrt(2 pi)), which no score weights.
    return lq, lq + 0.5 * (x - mu) ** 2


def gmm_hand_whole(params, x, key):
    lq, cost = _gmm_parts(params, x, key)
    return magic_box(jnp.sum(lq)) * jnp.mean(cost)


def gmm_hand_row(params, x, key):
    lq, cost = _gmm_parts(params, x, key)
    return jnp.mean(magic_box(lq) * cost)


# --------------------------------------------------------------------------
# estimator rows
# --------------------------------------------------------------------------
class Row:
    """One estimator, built on first use (so that a missing API is a row, not a crash).

    `build()` returns (grad_draw, step, scg_extra):
      grad_draw(params, data, key) -> one gradient estimate (moving-average rows close
        over their warmed-up state);
      step(params, data, key) -> what one training step computes (timed);
      scg_extra: arguments that go between params and data when `scg_f` is called
        (the moving-average state).
    `scg_f`/`scg_opts`: the stochastic program and estimator options, for rows whose
    variance can come from `scg.gradient_variance`.
    """

    def __init__(self, name, build, *, scg_f=None, scg_opts=None):
        self.name, self._build = name, build
        self.scg_f, self.scg_opts = scg_f, dict(scg_opts or {})
        self.grad_draw = self.step = None
        self.scg_extra = ()

    def prepare(self):
        self.grad_draw, self.step, self.scg_extra = self._build()


def _fixed(grad_fn):
    return lambda: (grad_fn, grad_fn, ())


def _batch_mean_to(x, shape):
    """Averages leading axes of `x` until it has `shape` (the batch axis of Q̂)."""
    x = jnp.asarray(x)
    while x.ndim > len(shape):
        x = x.mean(0)
    return jnp.broadcast_to(x, shape)


def make_ma(cost_ma, init_state, params, data, decay, warmup, key):
    """A moving-average baseline with explicit state.

    state ← decay·state + (1 − decay)·batch-mean(Q̂), Q̂ from scg_grad(downstream=True).
    Warmed up for `warmup` steps at the fixed parameters; returns (warm state, step).
    """
    grad_ds = scg.scg_grad(cost_ma, downstream=True)

    def step(params, state, data, key):
        g, ds = grad_ds(params, state, data, key)
        new_state = {
            n: decay * s + (1.0 - decay) * _batch_mean_to(ds[n], s.shape) for n, s in state.items()
        }
        return g, new_state

    step = jax.jit(step)
    state = init_state(params, data)
    for k in jax.random.split(key, warmup):
        _, state = step(params, state, data, k)
    return jax.block_until_ready(state), step


def vae_rows(params, x, a):
    rows = [
        Row("REINFORCE (whole, hand)", _fixed(jax.grad(vae_hand_whole))),
        Row("hand per-row", _fixed(jax.grad(vae_hand_row))),
        Row("hand per-element", _fixed(jax.grad(vae_hand_element))),
    ]
    rows += _scg_rows(vae_cost, vae_cost_ma, vae_ma_init, params, x, a)
    rows += [
        Row(
            "NumPyro TraceGraph (plate batch)",
            lambda: _fixed(make_numpyro_grad(_np_model_batch, _np_guide_batch))(),
        ),
        Row(
            "NumPyro TraceGraph (plates batch×latent)",
            lambda: _fixed(make_numpyro_grad(_np_model_nested, _np_guide_nested))(),
        ),
    ]
    return rows


def rl_rows(params, env, a):
    rows = [
        Row("REINFORCE (whole, hand)", _fixed(jax.grad(rl_hand_whole))),
        Row("hand causal (reward-to-go)", _fixed(jax.grad(rl_hand_causal))),
    ]
    rows += _scg_rows(rl_cost, rl_cost_ma, rl_ma_init, params, env, a)
    return rows


def _indexing_rows(whole, row, cost):
    def rows(params, data, a):
        out = [
            Row("REINFORCE (whole, hand)", _fixed(jax.grad(whole))),
            Row("hand per-row", _fixed(jax.grad(row))),
            Row("scgjax default", lambda: _fixed(scg.scg_grad(cost))(), scg_f=cost),
        ]
        for k in a.loo:
            opts = dict(num_samples=k, baseline="leave_one_out", key_argnum=-1)
            out.append(
                Row(
                    f"scgjax LOO K={k}",
                    lambda opts=opts: _fixed(scg.scg_grad(cost, **opts))(),
                    scg_f=cost,
                    scg_opts=opts,
                )
            )
        return out

    return rows


def _scg_rows(cost, cost_ma, ma_init, params, data, a):
    rows = [Row("scgjax default", lambda: _fixed(scg.scg_grad(cost))(), scg_f=cost)]
    for k in a.loo:
        opts = dict(num_samples=k, baseline="leave_one_out", key_argnum=-1)
        rows.append(
            Row(
                f"scgjax LOO K={k}",
                lambda opts=opts: _fixed(scg.scg_grad(cost, **opts))(),
                scg_f=cost,
                scg_opts=opts,
            )
        )

    def build_ma():
        state, step = make_ma(
            cost_ma, ma_init, params, data, a.ma_decay, a.ma_warmup, jax.random.PRNGKey(12345)
        )
        draw = scg.scg_grad(cost_ma)  # the same estimator, with the state held fixed
        return (
            lambda p, d, k: draw(p, state, d, k),
            lambda p, d, k: step(p, state, d, k),  # timed with the EMA update
            (state,),
        )

    rows.append(Row(f"scgjax moving avg (decay {a.ma_decay:g})", build_ma, scg_f=cost_ma))
    return rows


# --------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------
def _combine(means, variances, chunk):
    """Pooled mean and (ddof=1) variance of equal-size chunks, in float64."""
    means = np.asarray(means, np.float64)
    variances = np.asarray(variances, np.float64)
    c = means.shape[0]
    n = c * chunk
    mean = means.mean(0)
    ss = (chunk - 1) * variances.sum(0) + chunk * ((means - mean) ** 2).sum(0)
    return mean, ss / (n - 1)


def own_stats(row, params, data, key, num_draws, chunk):
    """(mean, variance) pytrees over num_draws independent draws of row.grad_draw."""
    n_chunks = num_draws // chunk
    keys = jax.random.split(key, n_chunks * chunk).reshape((n_chunks, chunk) + key.shape)

    @jax.jit
    def stats(params, data, keys):
        def one_chunk(ks):
            g = jax.vmap(lambda k: row.grad_draw(params, data, k))(ks)
            return (
                jax.tree.map(lambda v: v.mean(0), g),
                jax.tree.map(lambda v: v.var(0, ddof=1), g),
            )

        return lax.map(one_chunk, keys)

    means, variances = stats(params, data, keys)
    return _tree_combine(means, variances, chunk)


def scg_stats(row, params, data, key, num_draws, chunk):
    """Same, through scg.gradient_variance, chunk draws per call."""
    n_chunks = num_draws // chunk
    gv = scg.gradient_variance(
        row.scg_f,
        argnums=0,
        num_draws=chunk,
        key_argnum=-1,
        **{k: v for k, v in row.scg_opts.items() if k != "key_argnum"},
    )
    keys = jax.random.split(key, n_chunks)

    @jax.jit
    def stats(params, data, keys):
        return lax.map(lambda k: gv(params, *row.scg_extra, data, k), keys)

    means, variances = stats(params, data, keys)
    # gradient_variance returns the ddof=0 variance of its draws; pool as ddof=1.
    variances = jax.tree.map(lambda v: v * (chunk / (chunk - 1)), variances)
    return _tree_combine(means, variances, chunk)


def _tree_combine(means, variances, chunk):
    leaves_m, tree = jax.tree.flatten(means)
    leaves_v = jax.tree.leaves(variances)
    out = [_combine(m, v, chunk) for m, v in zip(leaves_m, leaves_v)]
    return (
        jax.tree.unflatten(tree, [o[0] for o in out]),
        jax.tree.unflatten(tree, [o[1] for o in out]),
    )


time_runs = wl.time_runs


def same_gradient(fn_a, fn_b, params, data, keys, rtol):
    """Max relative error between two gradient functions over keys, and whether they
    agree to rtol (np.testing.assert_allclose per leaf, atol = rtol·1e-2·max|leaf|)."""
    fa, fb = jax.jit(fn_a), jax.jit(fn_b)
    ok, worst = True, 0.0
    for k in keys:
        # Full-precision matmuls: with TF32 (GPU default) a last-bit difference in the
        # logits can flip a Bernoulli draw between the two programs.
        with jax.default_matmul_precision("highest"):
            ga, gb = fa(params, data, k), fb(params, data, k)
        for name in ga:
            a_, b_ = np.asarray(ga[name], np.float64), np.asarray(gb[name], np.float64)
            scale = float(np.max(np.abs(b_)))
            worst = max(worst, float(np.max(np.abs(a_ - b_)) / max(scale, 1e-30)))
            try:
                np.testing.assert_allclose(a_, b_, rtol=rtol, atol=rtol * 1e-2 * scale)
            except AssertionError:
                ok = False
    return ok, worst


CASES = {
    "vae": dict(
        title=(
            f"discrete VAE (B={VAE_BATCH}, {VAE_PIXELS} px digit-like, "
            f"{VAE_LATENTS} Bernoulli latents)"
        ),
        problem=vae_problem,
        rows=vae_rows,
        groups=VAE_GROUPS,
        cost=vae_cost,
        hands=["hand per-element", "hand per-row", "REINFORCE (whole, hand)"],
        reference="hand per-element",
        numpyro=True,
    ),
    "rl": dict(
        title=f"policy gradient, lax.scan T={RL_HORIZON} (state {RL_STATE}, {RL_ACTIONS} actions)",
        problem=rl_problem,
        rows=rl_rows,
        groups=RL_GROUPS,
        cost=rl_cost,
        hands=["hand causal (reward-to-go)", "REINFORCE (whole, hand)"],
        reference="hand causal (reward-to-go)",
        numpyro=False,
    ),
    "attention": dict(
        title=(
            f"hard attention (B={ATT_BATCH}, one of {ATT_GLIMPSES} glimpses per row, "
            "x[jnp.arange(B), k])"
        ),
        problem=attention_problem,
        rows=_indexing_rows(attention_hand_whole, attention_hand_row, attention_cost),
        groups=ATT_GROUPS,
        cost=attention_cost,
        hands=["hand per-row", "REINFORCE (whole, hand)"],
        reference="hand per-row",
        numpyro=False,
    ),
    "gmm": dict(
        title=f"Gaussian mixture (B={GMM_BATCH}, K={GMM_K}, Normal(mu[z], 1))",
        problem=gmm_problem,
        rows=_indexing_rows(gmm_hand_whole, gmm_hand_row, gmm_cost),
        groups=GMM_GROUPS,
        cost=gmm_cost,
        hands=["hand per-row", "REINFORCE (whole, hand)"],
        reference="hand per-row",
        numpyro=False,
    ),
}


_fmt_t = wl.fmt_t


def _fmt_v(v):
    return "—" if v is None else f"{v:.3g}"


def _version(text):
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _short_error(e):
    msg = f"{type(e).__name__}: {e}".strip().splitlines()
    return msg[0][:200] if msg else type(e).__name__


def run_case(case, a, log):
    spec = CASES[case]
    params, data = spec["problem"]()
    rows = spec["rows"](params, data, a)
    base_key = jax.random.PRNGKey(2024)
    results = []
    stats_of = {}
    for i, row in enumerate(rows):
        res = {"name": row.name, "error": None, "via": None}
        results.append(res)
        t0 = time.perf_counter()
        try:
            row.prepare()
            key = jax.random.fold_in(base_key, i)  # every row gets independent draws
            use_gv = (
                row.scg_f is not None
                and a.variance_impl != "own"
                and hasattr(scg, "gradient_variance")
            )
            if use_gv:
                try:
                    mean, var = scg_stats(row, params, data, key, a.draws, a.chunk)
                    res["via"] = "scg.gradient_variance"
                except Exception as e:  # noqa: BLE001 - report, fall back
                    if a.variance_impl == "scg":
                        raise
                    log(
                        f"  [{case}] {row.name}: scg.gradient_variance failed "
                        f"({_short_error(e)}); using own vmapped draws"
                    )
                    use_gv = False
            if not use_gv:
                mean, var = own_stats(row, params, data, key, a.draws, a.chunk)
                res["via"] = "own vmap"
            stats_of[row.name] = (mean, var)
            res["var"] = {g: float(np.mean(var[leaf])) for g, leaf in spec["groups"]}
        except Exception as e:  # noqa: BLE001 - a missing feature is a row, not a crash
            res["error"] = _short_error(e)
            if row.name.startswith("NumPyro") and _version(numpyro.__version__) < (0, 22):
                res["error"] += (
                    f" (numpyro {numpyro.__version__}'s TraceGraph_ELBO fails "
                    f"under jax {jax.__version__}; numpyro 0.22 works)"
                )
            if a.verbose:
                traceback.print_exc()
        log(
            f"  [{case}] {row.name}: "
            + (
                f"variance done ({res['via']}, {time.perf_counter() - t0:.1f} s)"
                if res["error"] is None
                else f"unavailable: {res['error']}"
            )
        )

    # Bias check: every row against the lowest-variance row (independent draws); that
    # row against the lowest-variance hand-written one.
    done = [r for r in results if r["error"] is None]

    def total_var(r):
        return sum(
            r["var"][g] / max(min(o["var"][g] for o in done), 1e-300) for g, _ in spec["groups"]
        )

    best = min(done, key=total_var)["name"] if done else None
    best_hand = min(
        (r for r in done if r["name"] in spec["hands"]), key=total_var, default={"name": None}
    )["name"]
    n = a.draws
    for res in results:
        ref_name = best_hand if res["name"] == best else best
        res["z2"], res["z2_ref"] = None, ref_name
        if res["error"] is not None or ref_name is None or ref_name == res["name"]:
            continue
        (m, v), (rm, rv) = stats_of[res["name"]], stats_of[ref_name]
        z2 = []
        for _, leaf in spec["groups"]:
            se2 = (np.asarray(v[leaf]) + np.asarray(rv[leaf])) / n
            z2.append(
                (
                    (np.asarray(m[leaf]) - np.asarray(rm[leaf])) ** 2 / np.maximum(se2, 1e-300)
                ).ravel()
            )
        res["z2"] = float(np.mean(np.concatenate(z2)))

    # Which hand-written surrogate is the scgjax default's estimator?
    scg_fn = scg.scg_grad(spec["cost"])
    by_name = {r.name: r for r in rows}
    check_keys = [jax.random.PRNGKey(k) for k in (42, 7)]
    match, match_err = None, {}
    for hand in spec["hands"]:
        try:
            ok, err = same_gradient(
                scg_fn, by_name[hand].grad_draw, params, data, check_keys, a.rtol
            )
        except Exception as e:  # noqa: BLE001
            ok, err = False, float("nan")
            log(f"  [{case}] comparing with {hand} failed: {_short_error(e)}")
        match_err[hand] = err
        if ok and match is None:
            match = hand
    if match:
        log(
            f"  [{case}] scgjax default == {match} (assert_allclose rtol={a.rtol}, "
            f"max rel err {match_err[match]:.1e})"
        )
    else:
        log(
            f"  [{case}] WARNING: scgjax default matches no hand-written estimator: "
            + ", ".join(f"{h} {e:.1e}" for h, e in match_err.items())
        )

    # Time per gradient step, all rows interleaved in one process.
    time_ref = match or spec["reference"]
    key = jax.random.PRNGKey(42)
    fns = {r.name: jax.jit(r.step) for r, res in zip(rows, results) if res["error"] is None}
    times, ratios = time_runs(fns, (params, data, key), a.reps, a.inner, ref=time_ref)
    for res in results:
        res["time"], res["time_ratio"] = times.get(res["name"]), ratios.get(res["name"])
    # The target: scgjax default against the same estimator written by hand, alone,
    # in interleaved pairs with more repetitions.
    target = None
    if "scgjax default" in fns and time_ref in fns:
        pair = {"scgjax default": fns["scgjax default"], time_ref: fns[time_ref]}
        t_pair, r_pair = time_runs(
            pair, (params, data, key), a.pair_reps, a.pair_inner, ref=time_ref
        )
        target = {
            "scg": t_pair["scgjax default"],
            "hand": t_pair[time_ref],
            "ratio": r_pair["scgjax default"],
        }
        log(
            f"  [{case}] time/step scgjax default {_fmt_t(target['scg'])} vs {time_ref} "
            f"{_fmt_t(target['hand'])}: paired ratio {target['ratio']:.3f}"
        )
    return {
        "case": case,
        "title": spec["title"],
        "groups": [g for g, _ in spec["groups"]],
        "rows": results,
        "match": match,
        "match_err": match_err,
        "time_ref": time_ref,
        "time_target": target,
        "draws": a.draws,
    }


def _abbrev(name):
    return {"REINFORCE (whole, hand)": "whole"}.get(name, name.replace("scgjax ", ""))


def print_case(out, print_=print):
    groups = out["groups"]
    print_(f"\n### {out['title']}\n")
    print_(
        "| estimator | "
        + " | ".join(f"var {g}" for g in groups)
        + f" | time/step | × {out['time_ref']} | z² vs (≈1) |"
    )
    print_("|---|" + "---|" * len(groups) + "---|---|---|")
    for r in out["rows"]:
        if r["error"] is not None:
            print_(
                f"| {r['name']} | "
                + " | ".join("n/a" for _ in groups)
                + f" | n/a | | unavailable: {r['error'][:200]} |"
            )
            continue
        ratio = "—" if r.get("time_ratio") is None else f"{r['time_ratio']:.2f}"
        z2 = "—" if r["z2"] is None else f"{r['z2']:.2f} ({_abbrev(r['z2_ref'])})"
        print_(
            f"| {r['name']} | "
            + " | ".join(_fmt_v(r["var"][g]) for g in groups)
            + f" | {_fmt_t(r['time'])} | {ratio} | {z2} |"
        )


def check_targets(out, print_=print):
    by = {r["name"]: r for r in out["rows"]}
    default = by.get("scgjax default")
    missed = []
    if default is None or default["error"] is not None:
        print_(f"- [{out['case']}] scgjax default unavailable")
        return ["default"]
    t = out.get("time_target")
    if t:
        ok = t["ratio"] <= RUN_TARGET
        print_(
            f"- [{out['case']}] time/step scgjax default / {out['time_ref']} = "
            f"{t['ratio']:.3f} ({_fmt_t(t['scg'])} vs {_fmt_t(t['hand'])}; target ≤ "
            f"{RUN_TARGET}): {'ok' if ok else 'MISSED'}"
        )
        if not ok:
            missed.append("time")
    if out["match"] is None:
        print_(
            f"- [{out['case']}] scgjax default is not the same estimator as any "
            "hand-written surrogate (see the log above): MISSED"
        )
        missed.append("estimator")
    else:
        print_(
            f"- [{out['case']}] scgjax default gives the same gradient as "
            f"{out['match']} (assert_allclose, 2 keys): ok"
        )
    hand = by.get("hand per-row")
    if out["case"] in ("attention", "gmm") and hand is not None and hand["error"] is None:
        # The per-row estimator written by hand: the same estimator (same-key check
        # above), so the ratio is 1 up to sampling noise (≈ 2·sqrt(2/N) at two s.e.).
        tol = RUN_TARGET + 2.0 * math.sqrt(2.0 / out["draws"])
        ratios = {g: default["var"][g] / hand["var"][g] for g in out["groups"]}
        worse = [g for g, r_ in ratios.items() if r_ > tol]
        print_(
            f"- [{out['case']}] variance scgjax default / hand per-row: "
            + ", ".join(f"{g} {r_:.3g}" for g, r_ in ratios.items())
            + f" (target ≤ {RUN_TARGET} + noise, {tol:.2f}): "
            + ("ok" if not worse else "MISSED for " + ", ".join(worse))
        )
        if worse:
            missed.append("variance")
    for name, r in by.items():
        if not name.startswith("NumPyro") or r["error"] is not None:
            continue
        # Sampling noise of a variance ratio from N draws per row: about 2·sqrt(2/N)
        # relative (two standard errors; heavier tails make it larger).
        tol = 1.0 + 2.0 * math.sqrt(2.0 / out["draws"])
        worse = [g for g in out["groups"] if default["var"][g] > tol * r["var"][g]]
        ratios = ", ".join(f"{g} {default['var'][g] / r['var'][g]:.3g}" for g in out["groups"])
        print_(
            f"- [{out['case']}] variance scgjax default / {name}: {ratios} "
            f"(target ≤ 1, noise tolerance {tol:.2f}): "
            f"{'ok' if not worse else 'MISSED for ' + ', '.join(worse)}"
        )
        if worse:
            missed.append(name)
    return missed


_LOAD = {}


def _loadavg(now=False):
    """1-minute load average as text (first call's value unless `now`)."""
    try:
        value = f"{os.getloadavg()[0]:.1f}"
    except (OSError, AttributeError):
        value = "n/a"
    if now:
        return value
    return _LOAD.setdefault("start", value)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--cases",
        default="vae,rl,attention,gmm",
        help="comma-separated subset of: vae,rl,attention,gmm",
    )
    p.add_argument(
        "--draws",
        type=int,
        default=1000,
        help="gradient draws per estimator for the variance (default 1000)",
    )
    p.add_argument("--chunk", type=int, default=50, help="draws vmapped at once")
    p.add_argument("--loo", default="4,8", help="K values for the leave-one-out rows")
    p.add_argument("--ma-decay", type=float, default=0.9, help="moving-average decay")
    p.add_argument("--ma-warmup", type=int, default=100, help="moving-average warm-up steps")
    p.add_argument("--reps", type=int, default=15, help="interleaved timing repetitions")
    p.add_argument("--inner", type=int, default=10, help="calls per timing repetition")
    p.add_argument(
        "--pair-reps",
        type=int,
        default=40,
        help="repetitions of the scgjax-default vs hand-written timing",
    )
    p.add_argument("--pair-inner", type=int, default=25, help="calls per pair repetition")
    p.add_argument("--rtol", type=float, default=1e-4, help="same-estimator tolerance")
    p.add_argument(
        "--variance-impl",
        choices=["auto", "scg", "own"],
        default="auto",
        help="scgjax rows: scg.gradient_variance if available (auto), always "
        "(scg), or vmapped draws here (own)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="draws=200, reps=5, inner=5, pair-reps=10, pair-inner=10",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    p.add_argument("--verbose", action="store_true", help="tracebacks for failed rows")
    a = p.parse_args(argv)
    if a.quick:
        a.draws, a.reps, a.inner, a.pair_reps, a.pair_inner = 200, 5, 5, 10, 10
    a.chunk = max(2, min(a.chunk, a.draws))
    a.draws = max(a.chunk, (a.draws // a.chunk) * a.chunk)
    a.loo = [int(k) for k in a.loo.split(",") if k.strip()]
    cases = wl.parse_cases(p, a.cases, CASES)

    dev = jax.devices()[0]
    env = {
        "jax": jax.__version__,
        "numpyro": numpyro.__version__,
        "python": platform.python_version(),
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "host_cpus": os.cpu_count(),
        "draws": a.draws,
        "reps": a.reps,
        "inner": a.inner,
        "gradient_variance": hasattr(scg, "gradient_variance"),
    }
    print("# scgjax gradient-variance benchmark\n")
    print(
        f"device: {dev.device_kind} ({dev.platform}, {jax.device_count()} device(s)), "
        f"host CPUs: {os.cpu_count()}; jax {jax.__version__}, numpyro "
        f"{numpyro.__version__}, python {env['python']}"
    )
    print(
        f"{a.draws} gradient draws per estimator (chunks of {a.chunk}); timing "
        f"{a.reps} reps x {a.inner} calls; moving average decay {a.ma_decay:g}, "
        f"warm-up {a.ma_warmup} steps\n",
        flush=True,
    )

    def log(msg):
        print(msg, flush=True)

    _loadavg()
    t_start = time.perf_counter()
    outs = [run_case(c, a, log) for c in cases]
    print(
        f"\nDevice: {dev.device_kind} ({dev.platform}); jax {jax.__version__}; "
        f"numpyro {numpyro.__version__}; host CPUs {os.cpu_count()}; {a.draws} draws"
    )
    print(
        "var X = mean over the group's entries of the per-entry variance of one "
        "gradient step's estimate (LOO K: the step averages K samples, ≈K× compute)."
    )
    for out in outs:
        print_case(out)
    print("\nTargets:")
    missed = []
    for out in outs:
        missed += check_targets(out)
    print(
        f"\ntotal benchmark time: {time.perf_counter() - t_start:.1f} s; "
        f"load average {_loadavg()} at the start, {_loadavg(now=True)} at the end "
        f"(timings assume an otherwise idle machine)"
    )
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"env": env, "cases": outs}, fh, indent=2, default=str)
    return 1 if (a.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())

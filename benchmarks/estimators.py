"""Estimators side by side on the same models: gradient variance, time per step and the
training objective reached after a fixed number of steps.

Workloads:

* ``toy`` -- the REBAR/RELAX toy (Tucker et al. 2017; Grathwohl et al. 2018): minimise
  ``E[(b − 0.499)²]`` over the logit θ of ``b ~ Bernoulli(σ(θ))``, from θ = 0. The signal
  (0.002 per unit of p) is tiny against the score function's noise.
* ``sbn`` -- a sigmoid belief net on binarized digits (scikit-learn's ``load_digits``,
  8x8, pixels > 7 set): 32 Bernoulli latents per image, amortised ``q(z | x) =
  Bernoulli(x·W + b)``, ``p(x | z) = Bernoulli(z·V + c)``, prior Bernoulli(½); cost = the
  mean negative ELBO of a minibatch of 100. Each image's cost depends on its 32 latents
  jointly, so ``enum`` (2^32 alternatives per image) is refused there.
* ``catvae`` -- a categorical VAE on the same data: one 10-way latent per image
  (``q(z | x) = Categorical(x·W + b)``, ``p(x | z) = Bernoulli(V[z])``), uniform prior.
  Each image's cost depends on its own latent only: ``enum`` sums it out per image
  (10 alternatives, not 10^100).

Rows: ``score`` (scgjax's default for discrete draws: automatic plates), ``score LOO K=4``
(``num_samples=4, baseline="leave_one_out"``: four program evaluations per step),
``enum``, ``gumbel_softmax`` (τ = 0.5) and ``straight_through`` (τ = 1), ``arm``,
``disarm`` and ``measure_valued`` (Bernoulli: refused on the categorical VAE), ``arsm``
(46 evaluations for 10 categories) and ``unordered_set`` / ``score_wor`` with k = 4
(Categorical: refused on the Bernoulli workloads), ``rebar`` with its defaults,
unlearned (its control variates, the cost at relaxed draws, are the programs' own; see
tests/test_rebar.py for RELAX learning one);
the relaxations are biased by design. The relaxed rows train the relaxed
program (the Categorical's value is then a one-hot vector or a point of the simplex; the
programs below take both).

Columns: ``log10 var`` -- log10 of the mean over parameters of the per-entry variance
of one gradient estimate at the initial parameters (``--draws`` estimates; "exact"
where only float32 rounding is left); ``bias`` -- for ``toy`` and ``catvae``, where
``enum`` gives the exact gradient, the largest |mean − exact| over the entries in units
of its standard error (the largest of many unbiased entries' |z| is about 3-4; a biased
estimator shows large values); ``ms/step`` -- median wall time of one jitted
gradient step; ``objective`` -- the *discrete* objective (exact for ``toy``; for the
models the negative ELBO of the discrete model, Monte Carlo over 20 draws per image of
the whole data set) after ``--steps`` Adam steps (learning rate 0.01 for the models,
0.05 for the toy), same seed for every row.

Peers: ``peers_storchastic.py`` (Storchastic 0.3.7, torch) and ``peers_genjax.py``
(GenJAX 1.0.14's ADEV) run the same workloads in their own environments, from the data,
initial parameters, minibatch schedule and exact gradients that ``--export`` writes;
``--evaluate`` scores the parameters they train with this script's objective. Their
results, and which of their estimators fail or look biased, are in benchmarks/README.md.

Run:  python benchmarks/estimators.py           (a few minutes on 2 CPU cores)
      python benchmarks/estimators.py --quick   (rough numbers)
      python benchmarks/estimators.py --export inputs.npz   (the peers' inputs)
      python benchmarks/estimators.py --evaluate peer_params.npz
Needs scikit-learn (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import scgjax as scg

ROWS = {
    "score": ("score", {}),
    "score LOO K=4": ("score", {"num_samples": 4, "baseline": "leave_one_out"}),
    "enum": ("enum", {}),
    "gumbel_softmax": (scg.estimators.GumbelSoftmax(temperature=0.5), {}),
    "straight_through": (scg.estimators.StraightThrough(temperature=1.0), {}),
    "arm": ("arm", {}),
    "disarm": ("disarm", {}),
    "measure_valued": ("measure_valued", {}),
    "arsm": ("arsm", {}),
    "unordered_set k=4": ("unordered_set", {}),
    "score_wor k=4": ("score_wor", {}),
    "rebar (η=1, λ=½, unlearned)": ("rebar", {}),
}


def digits():
    from sklearn.datasets import load_digits

    x = load_digits().data > 7
    return jnp.asarray(x, jnp.float32)


# -- Models ------------------------------------------------------------------------------


def toy_cost(theta, key, est):
    b = scg.sample(key, dist.Bernoulli(logits=theta), estimator=est)
    return (b - 0.499) ** 2


def toy_objective(theta):
    p = jax.nn.sigmoid(theta)
    return p * 0.501**2 + (1 - p) * 0.499**2


LATENTS, CATS = 32, 10


def sbn_init(key, pixels=64):
    k1, k2 = jax.random.split(key)
    return {
        "W": 0.01 * jax.random.normal(k1, (pixels, LATENTS)),
        "b": jnp.zeros(LATENTS),
        "V": 0.01 * jax.random.normal(k2, (LATENTS, pixels)),
        "c": jnp.zeros(pixels),
    }


def sbn_cost(params, x, key, est):
    logits_q = x @ params["W"] + params["b"]
    q = dist.Bernoulli(logits=logits_q)
    return sbn_cost_at(params, x, scg.sample(key, q, estimator=est))


def sbn_cost_at(params, x, z):
    """The SBN's minibatch cost at given latents ``z`` (``(B, 32)``, 0/1 or relaxed)."""
    logits_q = x @ params["W"] + params["b"]
    # z log σ(l) + (1 − z) log σ(−l): numpyro's Bernoulli log-density at 0 and 1, and
    # defined at relaxed values too (numpyro's log_prob is −inf off {0, 1}, with a zero
    # gradient: the relaxed rows lost the log q term before this).
    log_q = jnp.sum(z * jax.nn.log_sigmoid(logits_q) + (1 - z) * jax.nn.log_sigmoid(-logits_q), -1)
    log_prior = LATENTS * jnp.log(0.5)
    log_lik = dist.Bernoulli(logits=z @ params["V"] + params["c"]).log_prob(x).sum(-1)
    return jnp.mean(log_q - log_prior - log_lik)


def catvae_init(key, pixels=64):
    k1, k2 = jax.random.split(key)
    return {
        "W": 0.01 * jax.random.normal(k1, (pixels, CATS)),
        "b": jnp.zeros(CATS),
        "V": 0.5 * jax.random.normal(k2, (CATS, pixels)),
    }


def catvae_cost(params, x, key, est):
    q = dist.Categorical(logits=x @ params["W"] + params["b"])
    z = scg.sample(key, q, estimator=est)
    onehot = z if z.ndim == 2 else jax.nn.one_hot(z, CATS)  # relaxed: (B, K) already
    return catvae_cost_at(params, x, onehot)


def catvae_cost_at(params, x, onehot):
    """The categorical VAE's minibatch cost at given one-hot (or relaxed) latents."""
    log_q = jnp.sum(onehot * jax.nn.log_softmax(x @ params["W"] + params["b"]), -1)
    log_prior = -jnp.log(CATS)
    log_lik = dist.Bernoulli(logits=onehot @ params["V"]).log_prob(x).sum(-1)
    return jnp.mean(log_q - log_prior - log_lik)


# -- Measurements ------------------------------------------------------------------------


def gradient_fn(cost, est, options, data):
    if data is None:
        return scg.scg_grad(lambda p, k: cost(p, k, est), **options)
    return scg.scg_grad(lambda p, x, k: cost(p, x, k, est), **options)


def variance_and_bias(grad, params, data, draws, exact):
    keys = jax.random.split(jax.random.key(11), draws)
    args = (params,) if data is None else (params, data)
    g = jax.jit(jax.vmap(lambda k: grad(*args, k)))(keys)
    leaves = jax.tree.leaves(g)
    flat = jnp.concatenate([leaf.reshape(draws, -1) for leaf in leaves], axis=1)
    var = float(jnp.mean(jnp.var(flat, axis=0)))
    bias = None
    if exact is not None:
        ex = jnp.concatenate([leaf.reshape(-1) for leaf in jax.tree.leaves(exact)])
        # float32 rounding of the exact estimate (enum's spread over keys) is not bias
        floor = 1e-5 * float(jnp.max(jnp.abs(ex)))
        se = jnp.sqrt(jnp.var(flat, axis=0) / draws + floor**2)
        bias = float(jnp.max(jnp.abs(flat.mean(0) - ex) / se))
    return np.log10(max(var, 1e-300)), bias


def time_step(grad, params, data, repeats):
    args = (params,) if data is None else (params, data)
    step = jax.jit(grad)
    keys = jax.random.split(jax.random.key(5), repeats + 1)
    jax.block_until_ready(step(*args, keys[0]))
    times = []
    for k in keys[1:]:
        t = time.perf_counter()
        jax.block_until_ready(step(*args, k))
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def minibatch(key, n, batch):
    """The minibatch schedule: the key of a training step splits into (batch key, draw key)."""
    kb, kg = jax.random.split(key)
    return jax.random.choice(kb, n, (batch,), replace=False), kg


TRAIN_KEY = 3


def train(grad, params, data, steps, lr, batch, evaluate):
    opt = optax.adam(lr)
    state = opt.init(params)

    @jax.jit
    def step(params, state, key):
        if data is None:
            g = grad(params, jax.random.split(key)[1])
        else:
            idx, kg = minibatch(key, data.shape[0], batch)
            g = grad(params, data[idx], kg)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state

    keys = jax.random.split(jax.random.key(TRAIN_KEY), steps)
    for k in keys:
        params, state = step(params, state, k)
    return float(evaluate(params))


def discrete_elbo(cost, data):
    """The discrete model's negative ELBO over the data set, 20 score-function draws."""

    @jax.jit
    def evaluate(params):
        keys = jax.random.split(jax.random.key(99), 20)
        return jnp.mean(jax.vmap(lambda k: cost(params, data, k, "score"))(keys))

    return evaluate


def initial_params():
    return sbn_init(jax.random.key(0)), catvae_init(jax.random.key(0))


def export(path, steps):
    """Write what the peer scripts need to run the same workloads to ``path`` (.npz).

    The data, the initial parameters, the minibatch schedule of ``steps`` training
    steps, the exact gradients at the initial parameters on the first 100 images (toy,
    catvae), and check values: each model's cost at fixed latents (so a peer's model can
    be checked against this one to float32 rounding), the catvae's exact negative ELBO
    of the first 100 images, and the objective at the initial parameters.
    """
    data = digits()
    sbn0, cat0 = initial_params()
    batch = data[:100]
    keys = jax.random.split(jax.random.key(TRAIN_KEY), steps)
    idx = jax.vmap(lambda k: minibatch(k, data.shape[0], 100)[0])(keys)
    toy_exact = gradient_fn(toy_cost, "enum", {}, None)(jnp.asarray(0.0), jax.random.key(0))
    cat_exact = gradient_fn(catvae_cost, "enum", {}, batch)(cat0, batch, jax.random.key(0))
    rng = np.random.default_rng(0)
    check_u = rng.uniform(size=(100, LATENTS)).astype(np.float32)
    check_z = rng.integers(0, CATS, size=100)
    z_sbn = (check_u < jax.nn.sigmoid(batch @ sbn0["W"] + sbn0["b"])).astype(jnp.float32)
    q_cat = jax.nn.softmax(batch @ cat0["W"] + cat0["b"])
    # each image's cost at each of the 10 values of its latent, weighted by q
    cost_kb = jax.vmap(
        lambda k: jax.vmap(lambda x: catvae_cost_at(cat0, x[None], jax.nn.one_hot(k, CATS)[None]))(
            batch
        )
    )(jnp.arange(CATS))
    exact_cat = jnp.mean(jnp.sum(q_cat * cost_kb.T, -1))
    out = {
        "data": np.asarray(data),
        "train_idx": np.asarray(idx, np.int64),
        "toy_exact": np.asarray(toy_exact),
        "check_u": check_u,
        "check_z": check_z,
        "sbn_check_cost": np.asarray(sbn_cost_at(sbn0, batch, z_sbn)),
        "catvae_check_cost": np.asarray(catvae_cost_at(cat0, batch, jax.nn.one_hot(check_z, CATS))),
        "catvae_exact_neg_elbo": np.asarray(exact_cat),
        "sbn_objective_init": np.asarray(discrete_elbo(sbn_cost, data)(sbn0)),
        "catvae_objective_init": np.asarray(discrete_elbo(catvae_cost, data)(cat0)),
    }
    for name, tree in (("sbn", sbn0), ("catvae", cat0), ("catvae_exact", cat_exact)):
        out.update({f"{name}_{k}": np.asarray(v) for k, v in tree.items()})
    np.savez(path, **out)
    print(f"wrote {path}: " + ", ".join(f"{k} {v.shape}" for k, v in out.items()))


def evaluate_saved(path):
    """Score parameters saved by a peer script (``<workload>/<row>/<leaf>`` arrays) with
    this script's objective (same 20 keys as the scgjax rows)."""
    data = digits()
    saved = np.load(path)
    rows = {}
    for key in saved.files:
        workload, row, leaf = key.split("/")
        rows.setdefault((workload, row), {})[leaf] = jnp.asarray(saved[key])
    costs = {"sbn": sbn_cost, "catvae": catvae_cost}
    print("| workload | row | objective (scgjax's evaluation) |\n|---|---|---|")
    for (workload, row), params in rows.items():
        obj = float(discrete_elbo(costs[workload], data)(params))
        print(f"| {workload} | {row} | {obj:.4f} |")


def run(args):
    data = digits()
    workloads = {
        "toy": (toy_cost, jnp.asarray(0.0), None, 0.05, toy_objective),
        "sbn": (sbn_cost, initial_params()[0], data, 0.01, discrete_elbo(sbn_cost, data)),
        "catvae": (
            catvae_cost,
            initial_params()[1],
            data,
            0.01,
            discrete_elbo(catvae_cost, data),
        ),
    }
    print(
        f"# estimators.py on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, jax {jax.__version__}, {jax.devices()[0].platform}; "
        f"{args.draws} draws, {args.steps} steps"
    )
    for name, (cost, params, full, lr, evaluate) in workloads.items():
        batch = None if full is None else full[:100]
        exact = None
        if name in ("toy", "catvae"):
            exact = gradient_fn(cost, "enum", {}, batch)(
                *([params] if batch is None else [params, batch]), jax.random.key(0)
            )
        print(f"\n## {name}\n")
        print("| estimator | log10 var | bias (max |z|) | ms/step | objective after training |")
        print("|---|---|---|---|---|")
        for row, (est, options) in ROWS.items():
            if args.rows and not any(row.startswith(r) for r in args.rows):
                continue
            try:
                grad = gradient_fn(cost, est, options, batch)
                lv, bias = variance_and_bias(grad, params, batch, args.draws, exact)
                ms = time_step(grad, params, batch, args.repeats)
                grad_train = gradient_fn(cost, est, options, full)
                obj = train(grad_train, params, full, args.steps, lr, 100, evaluate)
                b = "-" if bias is None else f"{bias:.1f}"
                lv_s = "exact (rounding)" if lv < -12 else f"{lv:.2f}"
                print(f"| {row} | {lv_s} | {b} | {ms:.2f} | {obj:.4f} |")
            except ValueError as e:
                print(f"| {row} | refused: {str(e).splitlines()[0][:90]}... | | | |")
            sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rows", nargs="*", default=None, help="rows whose names start so")
    parser.add_argument("--export", metavar="NPZ", help="write the peers' inputs and stop")
    parser.add_argument("--evaluate", metavar="NPZ", help="score a peer's saved parameters")
    args = parser.parse_args()
    if args.export:
        return export(args.export, args.steps)
    if args.evaluate:
        return evaluate_saved(args.evaluate)
    if args.quick:
        args.draws, args.steps, args.repeats = 300, 100, 5
    run(args)


if __name__ == "__main__":
    main()

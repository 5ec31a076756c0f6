"""NVIL's learned baseline (`scg.baselines.nvil`) on the sigmoid belief net of
``estimators.py``: gradient variance and training against no baseline.

The model is ``estimators.py``'s ``sbn`` (binarized digits, 32 Bernoulli latents,
``q(z | x) = Bernoulli(x·W + b)``, the mean negative ELBO of a minibatch of 100). The
baseline network is NVIL's: an MLP of the image, 64 → 100 tanh → 1, one baseline per
image (shape ``(100, 1)``, broadcast over the image's 32 latents), trained with Adam on
the regression loss that ``update`` differentiates.

Two measurements:

1. **Variance.** At the initial parameters θ₀ and at θ_N (the parameters the NVIL run
   below reaches after ``--steps`` steps), each baseline is first fitted with θ frozen
   (``--fit`` steps of Adam on φ, the running statistics updated each step), then the
   log10 of the mean per-entry variance of one gradient estimate is taken over
   ``--draws`` estimates on one fixed minibatch, for all parameters and for the encoder
   (W, b) alone. Rows: no baseline (``scg_grad``), the running mean ``c̄`` only
   (``baseline_fn`` returns ``{}``), NVIL (``b_φ(x) + c̄``), NVIL with its variance
   normalisation (inactive here: with a minibatch mean the signal is 1/100 of an image's
   cost, √v < 1, so the scale max(1, √v) is 1; the script prints √v), NVIL with one
   baseline per latent, and leave-one-out with K = 4 for reference (4 program
   evaluations).
2. **Training.** Each estimator trains θ (and φ) for ``--steps`` Adam steps (learning
   rate 0.01 for θ, 0.003 for φ) from the same θ₀ and minibatch schedule; the table gives the
   discrete model's negative ELBO over the whole data set (20 draws per image) and the
   median time of one jitted step.

Run:  python benchmarks/nvil.py            (about a minute on 2 CPU cores)
      python benchmarks/nvil.py --quick
Needs scikit-learn and optax (``pip install -e '.[bench]'``).
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import estimators as E  # noqa: E402  (puts the checkout's scgjax on sys.path)

import scgjax as scg  # noqa: E402

BATCH, HIDDEN = 100, 100


def cost(params, x, key):
    q = dist.Bernoulli(logits=x @ params["W"] + params["b"])
    z = scg.sample(key, q, name="z").astype(x.dtype)
    return E.sbn_cost_at(params, x, z)


def mlp_init(key, pixels=64, out=1):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (pixels, HIDDEN)) / jnp.sqrt(pixels),
        "b1": jnp.zeros(HIDDEN),
        "w2": 0.01 * jax.random.normal(k2, (HIDDEN, out)),
        "b2": jnp.zeros(out),
    }


def mlp(phi, x):
    return jnp.tanh(x @ phi["w1"] + phi["b1"]) @ phi["w2"] + phi["b2"]


def learned(phi, params, x):
    del params
    return {"z": mlp(phi, x)}


def centre_only(phi, params, x):
    del phi, params, x
    return {}


VARIANTS = {  # label: (baseline_fn, nvil options, outputs of the MLP)
    "c̄ only": (centre_only, {}, 1),
    "NVIL b_φ(x) + c̄": (learned, {}, 1),
    "NVIL + normalisation": (learned, {"normalize": True}, 1),
    "NVIL, one b_φ(x) per latent (B, 32)": (learned, {}, E.LATENTS),
}
LR, LR_PHI = 1e-2, 3e-3


def nvil_step(nv, train_params):
    opt, opt_b = optax.adam(LR), optax.adam(LR_PHI)

    @jax.jit
    def step(carry, x, key):
        params, phi, state, s, s_b = carry
        g, g_phi, state, info = nv.update(phi, state, params, x, key)
        if train_params:
            u, s = opt.update(g, s)
            params = optax.apply_updates(params, u)
        u_b, s_b = opt_b.update(g_phi, s_b)
        return (params, optax.apply_updates(phi, u_b), state, s, s_b), info.loss

    def init(params, phi, state):
        return (params, phi, state, opt.init(params), opt_b.init(phi))

    return init, step


def fit_baseline(nv, params, data, steps, seed, out):
    """φ and the running statistics fitted with θ held fixed."""
    init, step = nvil_step(nv, train_params=False)
    x0 = data[:BATCH]
    phi0 = mlp_init(jax.random.key(seed), out=out)
    carry = init(params, phi0, nv.init(params, x0, jax.random.key(0)))
    for k in jax.random.split(jax.random.key(seed + 1), steps):
        idx, kg = E.minibatch(k, data.shape[0], BATCH)
        carry, _ = step(carry, data[idx], kg)
    return carry[1], carry[2]


def log10_var(grad_of_key, draws):
    g = jax.jit(jax.vmap(grad_of_key))(jax.random.split(jax.random.key(11), draws))
    out = {}
    for part, keys in (("all", ("W", "b", "V", "c")), ("encoder", ("W", "b"))):
        flat = jnp.concatenate([g[k].reshape(draws, -1) for k in keys], axis=1)
        out[part] = float(np.log10(jnp.mean(jnp.var(flat, axis=0))))
    return out


def variances(params, data, draws, fit):
    x = data[:BATCH]
    rows = {}
    plain = scg.scg_grad(cost)
    rows["no baseline"] = log10_var(lambda k: plain(params, x, k), draws)
    for label, (fn, options, n_out) in VARIANTS.items():
        nv = scg.baselines.nvil(cost, fn, **options)
        phi, state = fit_baseline(nv, params, data, fit, seed=7, out=n_out)
        rows[label] = log10_var(lambda k: nv.update(phi, state, params, x, k)[0], draws)
    loo = scg.scg_grad(cost, num_samples=4, baseline="leave_one_out", key_argnum=2)
    rows["leave-one-out K=4 (4 evaluations)"] = log10_var(lambda k: loo(params, x, k), draws)
    return rows


def median_ms(step, carry, data, repeats=50):
    idx, kg = E.minibatch(jax.random.key(0), data.shape[0], BATCH)
    x = data[idx]
    out = step(carry, x, kg)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(step(carry, x, kg))
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def train_all(params0, data, steps):
    """{label: (negative ELBO after `steps`, ms/step, final carry)}."""
    evaluate = E.discrete_elbo(E.sbn_cost, data)
    keys = jax.random.split(jax.random.key(E.TRAIN_KEY), steps)
    out = {}
    for label, options in (
        ("no baseline", {}),
        ("leave-one-out K=4 (4 evaluations)", {"num_samples": 4, "baseline": "leave_one_out"}),
    ):
        grad = scg.scg_grad(cost, key_argnum=2, **options)
        opt = optax.adam(LR)

        @jax.jit
        def step(carry, x, key, grad=grad, opt=opt):
            params, s = carry
            u, s = opt.update(grad(params, x, key), s)
            return optax.apply_updates(params, u), s

        carry = (params0, opt.init(params0))
        ms = median_ms(step, carry, data)
        for k in keys:
            idx, kg = E.minibatch(k, data.shape[0], BATCH)
            carry = step(carry, data[idx], kg)
        out[label] = (float(evaluate(carry[0])), ms, carry)
    for label, (fn, options, n_out) in VARIANTS.items():
        nv = scg.baselines.nvil(cost, fn, **options)
        init, step = nvil_step(nv, train_params=True)
        state0 = nv.init(params0, data[:BATCH], jax.random.key(0))
        carry = init(params0, mlp_init(jax.random.key(7), out=n_out), state0)
        ms = median_ms(lambda c, x, k: step(c, x, k)[0], carry, data)
        for k in keys:
            idx, kg = E.minibatch(k, data.shape[0], BATCH)
            carry, _ = step(carry, data[idx], kg)
        out[label] = (float(evaluate(carry[0])), ms, carry)
        if options.get("normalize"):
            scale = float(jnp.sqrt(carry[2].var["z"]))
            print(f"{label}: √v = {scale:.3g} after {steps} steps (the scale is max(1, √v))")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--fit", type=int, default=500)
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--lr-phi", type=float, default=LR_PHI)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    globals()["LR_PHI"] = args.lr_phi
    if args.quick:
        args.steps, args.fit, args.draws = 300, 200, 300
    dev = jax.devices()[0]
    print(
        f"jax {jax.__version__}, {dev.platform} ({dev.device_kind}), "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    data = E.digits()
    params0 = E.sbn_init(jax.random.key(0))
    trained = train_all(params0, data, args.steps)
    params_n = trained["NVIL b_φ(x) + c̄"][2][0]
    points = {"θ₀ (init)": params0, f"θ_N (NVIL, {args.steps} steps)": params_n}
    table = {p: variances(th, data, args.draws, args.fit) for p, th in points.items()}
    labels = list(next(iter(table.values())))
    head = " | ".join(f"log10 var at {p}: all / encoder" for p in points)
    print(f"\n| estimator | {head} | neg. ELBO after {args.steps} steps | ms/step |")
    print("|---|" + "---|" * (len(points) + 2))
    for label in labels:
        cells = [f"{table[p][label]['all']:.2f} / {table[p][label]['encoder']:.2f}" for p in points]
        elbo, ms, _ = trained[label] if label in trained else (float("nan"), float("nan"), None)
        print(f"| {label} | " + " | ".join(cells) + f" | {elbo:.2f} | {ms:.2f} |")
    return table, trained


if __name__ == "__main__":
    main()

"""Baselines as explicit state: a moving average, and NVIL's learned baseline with Optax.

A sigmoid belief net encodes binary data x into binary latents z ~ Bernoulli(x W + b) and
decodes them; the cost of row i is its reconstruction error. scgjax weights each latent's
score term by its own row's cost (automatic plates). A baseline b_i for row i, computed
before z is drawn, is subtracted from that cost:

* moving average: state = an exponential average of each row position's downstream cost
  (`downstream=True` returns it as the regression target), threaded in and out of the
  training step and passed to `scg.sample(..., baseline=)`: no hidden mutation;
* learned (`scg.baselines.nvil`): a linear network b_φ(x_i) of the row, plus NVIL's
  running mean of the residual, regressed on the downstream cost; `update` returns the
  model's gradient and the network's (the regression loss's), both trained with Optax.
  The program is the same `cost`, without a baseline: the helper adds it from outside.

Run: `.venv/bin/python examples/baselines.py` (add `--steps 20` for a quick run).
"""

import argparse

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
import optax

import scgjax as scg

B, D, H = 32, 16, 8


def data(key):
    """Binary rows with structure: each row repeats one of four patterns, with noise."""
    patterns = (jax.random.uniform(jax.random.key(7), (4, D)) > 0.5).astype(jnp.float32)
    k1, k2 = jax.random.split(key)
    rows = patterns[jax.random.randint(k1, (B,), 0, 4)]
    flips = jax.random.uniform(k2, (B, D)) < 0.05
    return jnp.where(flips, 1.0 - rows, rows)


def cost(params, x, key, baseline=None):
    """Mean reconstruction error; `baseline` (shape (B, 1)) is each row's baseline."""
    logits = x @ params["enc"] + params["enc_b"]
    z = scg.sample(key, dist.Bernoulli(logits=logits), baseline=baseline, name="z")
    recon = jax.nn.sigmoid(z.astype(jnp.float32) @ params["dec"] + params["dec_b"])
    return jnp.sum((recon - x) ** 2, axis=-1).mean()


def init_params(key):
    k1, k2 = jax.random.split(key)
    return {
        "enc": 0.1 * jax.random.normal(k1, (D, H)),
        "enc_b": jnp.zeros(H),
        "dec": 0.1 * jax.random.normal(k2, (H, D)),
        "dec_b": jnp.zeros(D),
    }


def baseline_net(phi, x):
    return x @ phi["w"] + phi["b"]  # (B, 1)


def baseline_fn(phi, params, x):
    """NVIL's baselines by site name, from `cost`'s arguments without the key."""
    del params
    return {"z": baseline_net(phi, x)}


def main(steps: int):
    opt = optax.adam(3e-2)
    base_opt = optax.adam(3e-2)
    params = init_params(jax.random.key(0))
    opt_state = opt.init(params)
    # Moving-average state: one value per row position, in and out of each step.
    ema = jnp.zeros((B, 1))
    # Learned baseline: φ and its optimizer state.
    phi = {"w": jnp.zeros((D, 1)), "b": jnp.zeros((1,))}
    base_state = base_opt.init(phi)
    nv = scg.baselines.nvil(cost, baseline_fn)
    nvil_state = nv.init(params, data(jax.random.key(0)), jax.random.key(0))

    @jax.jit
    def step(params, opt_state, ema, phi, base_state, nvil_state, key):
        kx, kz = jax.random.split(key)
        x = data(kx)
        g, g_phi, nvil_state, info = nv.update(phi, nvil_state, params, x, kz)
        updates, opt_state = opt.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        # The moving average's target: each latent's downstream cost, here its row's (/B).
        ema = 0.9 * ema + 0.1 * info.downstream["z"].mean(axis=-1, keepdims=True)
        updates, base_state = base_opt.update(g_phi, base_state, phi)
        phi = optax.apply_updates(phi, updates)
        return params, opt_state, ema, phi, base_state, nvil_state, info.loss

    key = jax.random.key(1)
    for _ in range(steps):
        key, sub = jax.random.split(key)
        params, opt_state, ema, phi, base_state, nvil_state, loss = step(
            params, opt_state, ema, phi, base_state, nvil_state, sub
        )
    print(f"after {steps} steps: baseline regression loss {loss:.2e}")

    # Compare the estimators' variance at the trained parameters, same data.
    x = data(jax.random.key(123))
    variance = {}
    for label, b in [("no baseline", None), ("moving average", ema)]:
        _, var = scg.gradient_variance(cost, num_draws=4000, key_argnum=2)(
            params, x, jax.random.key(5), b
        )
        variance[label] = float(jnp.mean(var["enc"]))
    keys = jax.random.split(jax.random.key(5), 4000)
    g = jax.jit(jax.vmap(lambda k: nv.update(phi, nvil_state, params, x, k)[0]["enc"]))(keys)
    variance["learned (scg.baselines.nvil)"] = float(jnp.mean(jnp.var(g, axis=0)))
    _, var = scg.gradient_variance(
        cost, num_draws=4000, num_samples=4, baseline="leave_one_out", key_argnum=2
    )(params, x, jax.random.key(5))
    variance["leave-one-out, K=4 (4x compute)"] = float(jnp.mean(var["enc"]))
    print(f"{'baseline':<34} {'mean variance of d/d enc':>26}")
    for label, v in variance.items():
        print(f"{label:<34} {v:>26.3e}")
    return variance


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    main(parser.parse_args().steps)

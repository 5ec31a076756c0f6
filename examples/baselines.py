"""Baselines as explicit state: a moving average and a learned baseline trained with Optax.

A sigmoid belief net encodes binary data x into binary latents z ~ Bernoulli(x W + b) and
decodes them; the cost of row i is its reconstruction error. scgjax weights each latent's
score term by its own row's cost (automatic plates). A baseline b_i for row i, computed
before z is drawn, is subtracted from that cost:

* moving average: state = an exponential average of each row position's downstream cost
  (`downstream=True` returns it as the regression target), threaded in and out of the
  training step: no hidden mutation;
* learned: a linear network b_φ(x_i) regressed on the downstream cost with Optax, trained
  beside the model. Its parameters get no gradient from the surrogate (the baseline term
  `(1 − ⊡(log q))·b` has value 0 and derivative 0 in φ), only from the regression loss.

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


def cost(params, x, key, baseline):
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
    grad_and_q = scg.scg_grad(cost, downstream=True)

    @jax.jit
    def step(params, opt_state, ema, phi, base_state, key):
        kx, kz = jax.random.split(key)
        x = data(kx)
        b = baseline_net(phi, x)
        g, q = grad_and_q(params, x, kz, b)
        # The regression target: each latent's downstream cost, here its row's cost (/B).
        target = q["z"].mean(axis=-1, keepdims=True)
        updates, opt_state = opt.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = 0.9 * ema + 0.1 * target
        loss, g_phi = jax.value_and_grad(lambda p: jnp.mean((baseline_net(p, x) - target) ** 2))(
            phi
        )
        updates, base_state = base_opt.update(g_phi, base_state, phi)
        phi = optax.apply_updates(phi, updates)
        return params, opt_state, ema, phi, base_state, loss

    key = jax.random.key(1)
    for _ in range(steps):
        key, sub = jax.random.split(key)
        params, opt_state, ema, phi, base_state, loss = step(
            params, opt_state, ema, phi, base_state, sub
        )
    print(f"after {steps} steps: baseline regression loss {loss:.2e}")

    # Compare the estimators' variance at the trained parameters, same data.
    x = data(jax.random.key(123))
    variance = {}
    for label, b in [
        ("no baseline", jnp.zeros((B, 1))),
        ("moving average", ema),
        ("learned (Optax)", baseline_net(phi, x)),
    ]:
        _, var = scg.gradient_variance(cost, num_draws=4000, key_argnum=2)(
            params, x, jax.random.key(5), b
        )
        variance[label] = float(jnp.mean(var["enc"]))
    _, var = scg.gradient_variance(
        cost, num_draws=4000, num_samples=4, baseline="leave_one_out", key_argnum=2
    )(params, x, jax.random.key(5), jnp.zeros((B, 1)))
    variance["leave-one-out, K=4 (4x compute)"] = float(jnp.mean(var["enc"]))
    print(f"{'baseline':<34} {'mean variance of d/d enc':>26}")
    for label, v in variance.items():
        print(f"{label:<34} {v:>26.3e}")
    return variance


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    main(parser.parse_args().steps)

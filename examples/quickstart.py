"""Quick start: the gradient of an expected cost through a discrete and a continuous draw.

    z ~ Bernoulli(sigmoid(θ0))          (score function: z is discrete)
    x ~ Normal(θ1 · z, 1)               (pathwise: x is reparameterizable)
    cost = (x − 2)² + 0.5 z

E[cost] = p ((θ1 − 2)² + 1.5) + (1 − p) · 5 with p = sigmoid(θ0), so the exact gradient is
known; scgjax's estimate is the mean of many single-sample estimates.
"""

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

import scgjax as scg


def f(theta, key):
    k1, k2 = jax.random.split(key)
    z = scg.sample(k1, dist.Bernoulli(logits=theta[0]))  # score function
    x = scg.sample(k2, dist.Normal(theta[1] * z, 1.0))  # pathwise
    return (x - 2.0) ** 2 + 0.5 * z


def expected_cost(theta):
    p = jax.nn.sigmoid(theta[0])
    return p * ((theta[1] - 2.0) ** 2 + 1.5) + (1.0 - p) * 5.0


def main():
    theta = jnp.array([0.0, 1.0])
    key = jax.random.key(0)
    n = 200_000

    print("The stochastic computation graph of f:")
    print(scg.describe(f)(theta, key))
    print()

    grads = jax.jit(jax.vmap(scg.scg_grad(f), in_axes=(None, 0)))(theta, jax.random.split(key, n))
    mean = grads.mean(0)
    stderr = grads.std(0) / n**0.5
    exact = jax.grad(expected_cost)(theta)

    print(
        f"one sample:   f(θ, key) = {f(theta, key):.4f}, "
        f"surrogate = {scg.surrogate(f)(theta, key):.4f} (equal by construction)"
    )
    print(f"{'parameter':<10} {f'estimate (mean of {n})':>24} {'± s.e.':>8} {'exact':>9}")
    for i in range(theta.shape[0]):
        print(f"{f'θ{i}':<10} {mean[i]:>24.4f} {stderr[i]:>8.4f} {exact[i]:>9.4f}")
    ok = bool(jnp.all(jnp.abs(mean - exact) < 5 * stderr))
    print("estimate agrees with the exact gradient within 5 standard errors:", ok)


if __name__ == "__main__":
    main()

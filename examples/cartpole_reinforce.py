"""REINFORCE on gymnax's CartPole with an MLP policy: automatic reward-to-go.

The rollout is a plain `lax.scan` over gymnax's `CartPole-v1` (`env.step_env`, no
auto-reset; an `alive` mask stops the rewards after the pole falls), the action drawn with
`scg.sample(key, CategoricalLogits(mlp(obs)))`, and the cost is minus the episode's
return. `scg.scg_grad` weights each action's score term only by the rewards of its own
step and later (causality in the scan), which is the reward-to-go estimator, without
writing it. The comparison is the textbook whole-episode REINFORCE surrogate, written by
hand: `sum_t log pi(a_t | s_t) * stop_gradient(return)`.

Both train the same policy with Adam; the script prints the variance of each estimator's
gradient at the initial policy and the return curves.

Measured (full run, `python examples/cartpole_reinforce.py`: 150 Adam updates, 32
episodes of at most 200 steps, 19 s on a 2-core CPU):

    estimator                          grad variance at init   final return
    reward-to-go (scgjax, automatic)   5.9e-01                 194.7
    whole-episode REINFORCE            2.4e+00                 199.5

The reward-to-go gradient has 4.1x less variance; at this size both learn to balance the
pole for (almost) the whole 200 steps, so the return curves differ little.

gymnax pins `jax<0.12`; on newer JAX this example cannot be installed (its smoke test skips).

Run: `python examples/cartpole_reinforce.py` (`--updates 20` for a quick run).
"""

import argparse
import pathlib
import time

import gymnax
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import numpyro.distributions as dist
import optax
from tqdm import tqdm

import scgjax as scg

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ENV, ENV_PARAMS = gymnax.make("CartPole-v1")


def init_mlp(key, sizes=(4, 32, 2)):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.normal(k, (m, n)) / jnp.sqrt(m), jnp.zeros(n))
        for k, m, n in zip(keys, sizes[:-1], sizes[1:])
    ]


def mlp(params, x):
    for w, b in params[:-1]:
        x = jnp.tanh(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def rollout(params, key, steps, draw):
    """One episode of at most `steps` steps; `draw(key, d)` draws the action. Returns the
    per-step rewards and the actions' log-probabilities (both 0 after the pole fell)."""
    k_reset, key = jax.random.split(key)
    obs, state = ENV.reset_env(k_reset, ENV_PARAMS)

    def step(carry, key_t):
        obs, state, alive = carry
        k_act, k_env = jax.random.split(key_t)
        d = dist.CategoricalLogits(mlp(params, obs))
        action = draw(k_act, d)
        obs, state, reward, done, _ = ENV.step_env(k_env, state, action, ENV_PARAMS)
        # Steps after the pole fell get no reward and their actions no log-probability.
        reward, log_prob = reward * alive, d.log_prob(action) * alive
        return (obs, state, alive * (1.0 - done)), (reward, log_prob)

    _, (rewards, log_probs) = jax.lax.scan(step, (obs, state, 1.0), jax.random.split(key, steps))
    return rewards, log_probs


def neg_return(params, key, *, batch, steps):
    """scgjax: minus the mean return of `batch` episodes; actions drawn with scg.sample."""
    rewards, _ = jax.vmap(lambda k: rollout(params, k, steps, scg.sample))(
        jax.random.split(key, batch)
    )
    return -rewards.sum(1).mean()


def whole_episode_surrogate(params, key, *, batch, steps):
    """The hand-written whole-episode REINFORCE surrogate (every action weighted by the
    whole return), with plain numpyro draws."""
    draw = lambda k, d: d.sample(k)
    rewards, log_probs = jax.vmap(lambda k: rollout(params, k, steps, draw))(
        jax.random.split(key, batch)
    )
    returns = jax.lax.stop_gradient(rewards.sum(1))
    return -(log_probs.sum(1) * returns).mean()


def flat_variance(grads):
    """Mean per-entry variance of a stack of gradient pytrees (leading axis: draws)."""
    leaves = jax.tree.leaves(grads)
    return float(jnp.mean(jnp.concatenate([jnp.var(g, 0).ravel() for g in leaves])))


def main(updates=150, batch=32, steps=200, lr=1e-2, seed=0, out=None, progress=True):
    """Train with both estimators; return `{"variance": {...}, "final return": {...}}`."""
    start = time.perf_counter()
    kw = dict(batch=batch, steps=steps)
    estimators = {
        "reward-to-go (scgjax, automatic)": scg.scg_grad(lambda p, k: neg_return(p, k, **kw)),
        "whole-episode REINFORCE": jax.grad(lambda p, k: whole_episode_surrogate(p, k, **kw)),
    }
    params0 = init_mlp(jax.random.key(seed))

    # Gradient variance at the initial policy, 64 independent batches each.
    keys = jax.random.split(jax.random.key(seed + 1), 64)
    variance = {
        name: flat_variance(jax.jit(jax.vmap(g, (None, 0)))(params0, keys))
        for name, g in estimators.items()
    }

    opt = optax.adam(lr)
    curves = {}
    evaluate = jax.jit(lambda p, k: -neg_return(p, k, **kw))
    for name, grad_fn in estimators.items():

        @jax.jit
        def update(params, opt_state, key, grad_fn=grad_fn):
            k_grad, k_eval = jax.random.split(key)
            updates_, opt_state = opt.update(grad_fn(params, k_grad), opt_state, params)
            return optax.apply_updates(params, updates_), opt_state, evaluate(params, k_eval)

        params, opt_state = params0, opt.init(params0)
        key, curve = jax.random.key(seed + 2), []
        for _ in tqdm(range(updates), desc=name, disable=not progress):
            key, sub = jax.random.split(key)
            params, opt_state, ret = update(params, opt_state, sub)
            curve.append(float(ret))
        curves[name] = np.array(curve)

    tail = max(1, updates // 10)
    final = {name: float(c[-tail:].mean()) for name, c in curves.items()}
    print(f"{'estimator':<34} {'grad variance at init':>22} {'final return':>13}")
    for name in estimators:
        print(f"{name:<34} {variance[name]:>22.3e} {final[name]:>13.1f}")
    print(
        f"{updates} updates, {batch} episodes of <= {steps} steps: "
        f"{time.perf_counter() - start:.0f} s"
    )

    out = pathlib.Path(out or pathlib.Path(__file__).parent / "out" / "cartpole_reinforce.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in curves.items():
        ax.plot(c, label=f"{name} (grad var {variance[name]:.2g})")
    ax.set(xlabel="update", ylabel=f"return (max {steps})", title="CartPole-v1 (gymnax)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"saved {out}")
    return {"variance": variance, "final return": final}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="REINFORCE on gymnax CartPole")
    parser.add_argument("--updates", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="PNG path (default examples/out/)")
    a = parser.parse_args()
    main(a.updates, a.batch, a.steps, seed=a.seed, out=a.out)

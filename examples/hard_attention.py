"""Hard attention over glimpses (the Schulman et al. 2015 example) on scikit-learn's digits.

Each 8x8 digit is cut into four 4x4 glimpses (its quadrants). An attention network looks
at a coarse view (each quadrant's mean intensity) and picks one glimpse,
`k ~ Categorical(logits = attend(coarse))`; a classifier sees only that glimpse (and where
it is) and predicts the digit. The cost is the classifier's cross-entropy: its parameters
get pathwise gradients, the attention network a score-function gradient through the
discrete choice, weighted per image by scgjax (the glimpse is read with
`glimpses[jnp.arange(B), k]`, which keeps the plate). Compared:

* score: REINFORCE through the choice, no baseline;
* score + leave-one-out (K=4): four choices per image, each with the others' mean cost as
  baseline;
* enum: the choice summed out exactly over the four glimpses (`estimator="enum"`).

Measured (full run, `python examples/hard_attention.py`: 2000 Adam steps of 64 images per
estimator, 27 s on a 2-core CPU; test accuracy with the most likely glimpse, variance of
the attention weights' gradient at the score-trained model, 500 draws):

    estimator                      test accuracy   var of d/d attend
    score                                  0.780             5.1e-06
    score + leave-one-out (K=4)            0.757             2.8e-06
    enum                                   0.760             0       (exact)

After 100 steps (`--steps 100`) the gaps are wider: accuracy 0.51 / 0.66 / 0.69 and
variance 1.1e-3 / 6.0e-5 / 0. Trained, the attention is almost deterministic, so every
estimator's variance is small; one quadrant of a digit gives about 76-78% accuracy.

Run: `python examples/hard_attention.py` (`--steps 100` for a quick run).
"""

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import numpyro.distributions as dist
import optax
from sklearn.datasets import load_digits
from tqdm import tqdm

import scgjax as scg

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ESTIMATORS = {
    "score": ("score", {}),
    "score + leave-one-out (K=4)": ("score", {"num_samples": 4, "baseline": "leave_one_out"}),
    "enum": ("enum", {}),
}


def glimpse_data():
    images, labels = load_digits(return_X_y=True)
    x = np.asarray(images, np.float32).reshape(-1, 2, 4, 2, 4) / 16.0
    glimpses = x.transpose(0, 1, 3, 2, 4).reshape(-1, 4, 16)  # (N, 4 quadrants, 16 pixels)
    perm = np.random.default_rng(0).permutation(len(glimpses))
    tr, te = perm[:1497], perm[1497:]
    g, y = jnp.asarray(glimpses), jnp.asarray(np.asarray(labels), jnp.int32)
    return (g[tr], y[tr]), (g[te], y[te])


def init_params(key, hidden=64):
    k1, k2 = jax.random.split(key)
    return {
        "attend": jnp.zeros((4, 4)),  # coarse view (4 means) -> logits of 4 glimpses
        "attend_b": jnp.zeros(4),
        "w1": jax.random.normal(k1, (16 + 4, hidden)) / jnp.sqrt(20.0),
        "b1": jnp.zeros(hidden),
        "w2": 0.01 * jax.random.normal(k2, (hidden, 10)),
        "b2": jnp.zeros(10),
    }


def classify(params, glimpse, where):
    h = jnp.tanh(
        jnp.concatenate([glimpse, jax.nn.one_hot(where, 4)], -1) @ params["w1"] + params["b1"]
    )
    return h @ params["w2"] + params["b2"]


def loss(params, glimpses, labels, key, estimator="score"):
    """Mean cross-entropy of the classifier on the glimpse each image's attention picks."""
    coarse = glimpses.mean(-1)  # (B, 4)
    logits = coarse @ params["attend"] + params["attend_b"]
    k = scg.sample(key, dist.CategoricalLogits(logits), estimator=estimator)
    seen = glimpses[jnp.arange(glimpses.shape[0]), k]
    logp = jax.nn.log_softmax(classify(params, seen, k))
    return -jnp.mean(logp[jnp.arange(labels.shape[0]), labels])


def accuracy(params, glimpses, labels):
    """Test accuracy with the most likely glimpse."""
    k = jnp.argmax(glimpses.mean(-1) @ params["attend"] + params["attend_b"], -1)
    seen = glimpses[jnp.arange(glimpses.shape[0]), k]
    return jnp.mean(jnp.argmax(classify(params, seen, k), -1) == labels)


def main(steps=2000, batch=64, seed=0, out=None, progress=True, names=tuple(ESTIMATORS)):
    """Returns `{"accuracy": {...}, "variance": {...}}` per estimator in `names`."""
    start = time.perf_counter()
    (gx, gy), (tx, ty) = glimpse_data()
    opt = optax.adam(1e-2)
    trained, curves = {}, {}
    for name in names:
        estimator, options = ESTIMATORS[name]
        f = lambda p, g, y, k, e=estimator: loss(p, g, y, k, e)
        grad = scg.scg_grad(f, key_argnum=3, **options)

        @jax.jit
        def step(params, state, key, grad=grad, f=f):
            kb, kg, ke = jax.random.split(key, 3)
            i = jax.random.choice(kb, gx.shape[0], (batch,))
            updates, state = opt.update(grad(params, gx[i], gy[i], kg), state, params)
            return optax.apply_updates(params, updates), state, f(params, gx[i], gy[i], ke)

        params = init_params(jax.random.key(seed))
        state, key, curve = opt.init(params), jax.random.key(seed + 1), []
        for _ in tqdm(range(steps), desc=name, disable=not progress):
            key, sub = jax.random.split(key)
            params, state, value = step(params, state, sub)
            curve.append(float(value))
        trained[name], curves[name] = params, np.array(curve)

    acc = {name: float(accuracy(p, tx, ty)) for name, p in trained.items()}
    point = trained[names[0]]
    variance = {}
    for name in names:
        estimator, options = ESTIMATORS[name]
        f = lambda p, g, y, k, e=estimator: loss(p, g, y, k, e)
        _, var = scg.gradient_variance(f, num_draws=500, key_argnum=3, **options)(
            point, gx[:batch], gy[:batch], jax.random.key(seed + 2)
        )
        variance[name] = float(jnp.mean(var["attend"]))
    print(f"{'estimator':<30} {'test accuracy':>14} {'var of d/d attend':>18}")
    for name in names:
        print(f"{name:<30} {acc[name]:>14.3f} {variance[name]:>18.3e}")
    print(f"{steps} steps of {batch} images each: {time.perf_counter() - start:.0f} s")

    out = pathlib.Path(out or pathlib.Path(__file__).parent / "out" / "hard_attention.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    w = max(1, steps // 50)
    for name, c in curves.items():
        ax.plot(np.convolve(c, np.ones(w) / w, mode="valid"), label=f"{name} (acc {acc[name]:.2f})")
    ax.set(
        xlabel="step",
        ylabel="training cross-entropy (smoothed)",
        yscale="log",
        title="Hard attention over 4 glimpses, digits",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"saved {out}")
    return {"accuracy": acc, "variance": variance}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Hard attention over glimpses")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="PNG path (default examples/out/)")
    a = parser.parse_args()
    main(a.steps, a.batch, a.seed, a.out)

"""A Gaussian mixture in NumPyro, trained with SVI: TraceSCG_ELBO against NumPyro's ELBOs.

Data: 600 points from a 1-D mixture of three unit-variance Gaussians (means -3, 0.5, 4;
weights 0.3, 0.45, 0.25). Model: mixture weights and means are parameters (point
estimates), each point's assignment `z_n ~ Categorical(weights)` is latent, in a
`numpyro.plate` subsampled to 100 points per step. Guide: one vector of assignment logits
per point, `q(z_n) = Categorical(logits_n)`, the only latent site. The ELBO's maximum over
the guide and the parameters is the log-likelihood at the maximum-likelihood mixture,
which EM finds exactly: the script runs EM as the reference.

Compared, each under `numpyro.infer.SVI` with Adam (0.05) from the same start:

* TraceGraph_ELBO: NumPyro's score-function ELBO;
* TraceSCG_ELBO, score: scgjax's, with the same draws (scgjax finds the plate by dataflow);
* TraceSCG_ELBO, leave-one-out K=4: four particles, each the others' baseline;
* TraceSCG_ELBO, enum: the guide site with `infer={"estimator": "enum"}`, summed out;
* TraceEnum_ELBO: NumPyro's exact ELBO with the guide enumerated (`config_enumerate`).

Measured: the exact ELBO on all 600 points (closed form, `Σ_n Σ_k q_nk (log w_k +
log N(x_n; μ_k, 1) − log q_nk)`) along training and at the end; the recovered means; the
median time per training step; and, at the starting parameters, over `--draws` keys: the
variance of one gradient estimate on all points (log10 of the mean over entries) and its
agreement with the exact gradient (TraceEnum_ELBO's on all points, which the smoke test
checks against the closed form), as the largest |mean − exact| over the entries in
standard errors of the mean — on all points, and with the plate subsampled as in
training (`subsampled`; "exact": the same exact gradient for every key).

Measured (full run, `python examples/gmm_svi.py`: 3000 steps, 500 draws, 50-80 s on
a loaded 2-core CPU, jax 0.10.2, numpyro 0.22.0). EM's optimum, the ELBO's maximum:
-1389.63, means -3.07, 0.48, 3.96:

    estimator                        final ELBO  means             log10 var  agreement  subsampled
    TraceGraph_ELBO                    -1410.28  -2.98  0.44  3.96      1.16        3.5         5.8
    TraceSCG_ELBO, score               -1408.07  -2.99  0.43  3.95      1.10        3.5         3.9
    TraceSCG_ELBO, leave-one-out K=4   -1393.04  -3.10  0.53  3.97      0.10        3.6         4.0
    TraceSCG_ELBO, enum                -1391.50  -3.04  0.38  3.97     -9.74      exact         3.7
    TraceEnum_ELBO                     -2834.09   0.38  0.38  0.38     -9.71      exact      > 1000

(A step costs 0.2-0.4 ms for all of them; the printed times are noisy on a loaded machine.)
On all points every estimator agrees with the exact gradient (the largest of 1806 entries
at about 3.5 standard errors, as expected of unbiased estimates). With the plate
subsampled, two of NumPyro 0.22's ELBOs are biased, and TraceSCG_ELBO is not:

* TraceGraph_ELBO multiplies its score terms by the subsampling scale twice (its
  `log_prob` of the guide site is already scaled, and so is the downstream cost it
  weights): the assignment logits' gradient is N/S = 6 times too large on average (2000
  draws at random logits: 6.10 times the exact one, projected on it). Adam, which is
  nearly invariant to a gradient's scale per parameter, hides it here; SGD would not.
* TraceEnum_ELBO with the guide's site enumerated in a subsampled plate: the model draws
  its own subsample, different from the guide's (the guide's logits are paired with other
  points' data), so its gradient is not the ELBO's, and training collapses the three
  means to one.

The enumerated estimators' variance on all points is rounding: their gradient is exact
for every key. TraceSCG_ELBO with `"estimator": "enum"` gives TraceEnum_ELBO's gradient
without funsor and subsamples correctly.

Run: `python examples/gmm_svi.py` (`--steps 300` for a quick run).
"""

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.funsor import config_enumerate
from numpyro.distributions import constraints
from numpyro.infer import SVI, TraceEnum_ELBO, TraceGraph_ELBO
from tqdm import tqdm

from scgjax.infer import TraceSCG_ELBO

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

K = 3
TRUE_LOCS = np.array([-3.0, 0.5, 4.0])
TRUE_WEIGHTS = np.array([0.3, 0.45, 0.25])
KEY = jax.random.PRNGKey(0)


def make_data(n=600, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.choice(K, size=n, p=TRUE_WEIGHTS)
    return jnp.asarray(rng.normal(TRUE_LOCS[z], 1.0), jnp.float32)


def model(data, subsample_size=None):
    # (jnp.asarray: numpyro.param is typed Optional)
    weights = jnp.asarray(numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex))
    locs = jnp.asarray(numpyro.param("locs", jnp.linspace(-1.0, 1.0, K)))
    with numpyro.plate("data", data.shape[0], subsample_size=subsample_size) as i:
        z = numpyro.sample("z", dist.CategoricalProbs(weights))
        numpyro.sample("x", dist.Normal(locs[z], 1.0), obs=data[i])


def make_guide(infer=None):
    """The guide: per-point assignment logits; `infer` goes to the site (an estimator)."""

    def guide(data, subsample_size=None):
        logits = jnp.asarray(numpyro.param("assign_logits", jnp.zeros((data.shape[0], K))))
        with numpyro.plate("data", data.shape[0], subsample_size=subsample_size) as i:
            numpyro.sample("z", dist.CategoricalLogits(logits[i]), infer=infer or {})

    return guide


def estimators():
    """name -> (loss, guide)."""
    plain = make_guide()
    return {
        "TraceGraph_ELBO": (TraceGraph_ELBO(), plain),
        "TraceSCG_ELBO, score": (TraceSCG_ELBO(), plain),
        "TraceSCG_ELBO, leave-one-out K=4": (
            TraceSCG_ELBO(num_particles=4, baseline="leave_one_out"),
            plain,
        ),
        "TraceSCG_ELBO, enum": (TraceSCG_ELBO(), make_guide({"estimator": "enum"})),
        "TraceEnum_ELBO": (TraceEnum_ELBO(), config_enumerate(plain)),
    }


def init_params(n):
    return {
        "weights": jnp.ones(K) / K,
        "locs": jnp.linspace(-1.0, 1.0, K),
        "assign_logits": jnp.zeros((n, K)),
    }


def exact_elbo(params, data):
    """The ELBO on all points in closed form (the guide's q summed out)."""
    q = jax.nn.softmax(params["assign_logits"], -1)
    log_q = jax.nn.log_softmax(params["assign_logits"], -1)
    log_joint = jnp.log(params["weights"]) + dist.Normal(params["locs"], 1.0).log_prob(
        data[:, None]
    )
    return jnp.sum(q * (log_joint - log_q))


def em(data, iterations=500):
    """EM from the same start: the maximum-likelihood mixture and the log-likelihood there,
    the ELBO's maximum (reached with q = the posterior of each assignment)."""
    w, locs = np.ones(K) / K, np.linspace(-1.0, 1.0, K)
    x = np.asarray(data, np.float64)[:, None]
    for _ in range(iterations):
        log_joint = np.log(w) - 0.5 * (x - locs) ** 2 - 0.5 * np.log(2 * np.pi)
        r = np.exp(log_joint - np.logaddexp.reduce(log_joint, axis=1, keepdims=True))
        w, locs = r.mean(0), (r * x).sum(0) / r.sum(0)
    log_joint = np.log(w) - 0.5 * (x - locs) ** 2 - 0.5 * np.log(2 * np.pi)
    return w, locs, float(np.logaddexp.reduce(log_joint, axis=1).sum())


def gradient(loss, guide, params, data, key, subsample=None):
    """One estimate of the gradient of −ELBO w.r.t. the (constrained) parameters."""
    return jax.grad(lambda p: loss.loss(key, p, model, guide, data, subsample))(params)


def measure(loss, guide, params, data, exact, draws, subsample=None, seed=1):
    """(log10 of the mean per-entry variance of one gradient estimate, the largest
    |mean − exact| over the entries in standard errors of the mean or None when the
    estimate is exact for every key, the mean) over `draws` keys."""
    keys = jax.random.split(jax.random.PRNGKey(seed), draws)
    one = jax.jit(jax.vmap(lambda k: gradient(loss, guide, params, data, k, subsample)))
    g = jax.tree.map(np.asarray, one(keys))
    mean = {k: v.mean(0) for k, v in g.items()}
    var = {k: v.var(0, ddof=1) for k, v in g.items()}
    log10_var = float(np.log10(np.concatenate([v.ravel() for v in var.values()]).mean()))
    errors = {k: np.abs(mean[k] - np.asarray(exact[k])) for k in mean}
    if max(float(e.max()) for e in errors.values()) < 1e-3:
        return log10_var, None, mean
    z = max(float(np.max(errors[k] / np.sqrt(var[k] / draws + 1e-30))) for k in mean)
    return log10_var, z, mean


def train(loss, guide, data, steps, subsample, lr, seed, desc, progress):
    """SVI with Adam; returns (params, exact ELBO per step, median ms per step)."""
    svi = SVI(model, guide, numpyro.optim.Adam(lr), loss=loss)
    state = svi.init(jax.random.PRNGKey(seed), data, subsample)

    @jax.jit
    def step(state):
        state, _ = svi.update(state, data, subsample)
        return state, exact_elbo(svi.get_params(state), data)

    curve, times = [], []
    for _ in tqdm(range(steps), desc=desc, disable=not progress):
        t = time.perf_counter()
        state, value = step(state)
        curve.append(float(value))  # waits for the step
        times.append(time.perf_counter() - t)
    # the median (the first step compiles; a loaded machine adds spikes)
    ms = 1e3 * float(np.median(times[1:])) if steps > 1 else float("nan")
    return svi.get_params(state), np.array(curve), ms


def _z_text(z):
    """A z-score as printed: "exact" (no spread, no error), "> 1000" (an error where
    the estimate does not vary)."""
    return "exact" if z is None else ("> 1000" if z > 1000 else f"{z:.1f}")


def main(
    steps=3000,
    n=600,
    subsample=100,
    draws=500,
    lr=0.05,
    seed=0,
    out=None,
    progress=True,
    names=None,
):
    """Returns a dict: per estimator "elbo" (final, exact), "locs" (sorted), "log10 var",
    "agreement" (standard errors; None for exact estimators), "ms/step"; also "em elbo",
    "em locs", and the gradients at the starting point, "gradient" (mean of the draws)
    and "exact gradient" (TraceEnum_ELBO's)."""
    start = time.perf_counter()
    data = make_data(n, seed)
    table = estimators()
    names = list(names or table)
    em_w, em_locs, em_elbo = em(data)
    point = init_params(n)
    exact = jax.jit(
        lambda p: gradient(TraceEnum_ELBO(), config_enumerate(make_guide()), p, data, KEY)
    )(point)
    keys = ("elbo", "locs", "log10 var", "agreement", "agreement, subsampled", "ms/step")
    results: dict = {k: {} for k in keys + ("gradient",)}
    curves = {}
    for name in names:
        loss, guide = table[name]
        params, curve, ms = train(loss, guide, data, steps, subsample, lr, seed, name, progress)
        log10_var, z, mean = measure(loss, guide, point, data, exact, draws)
        _, z_sub, _ = measure(loss, guide, point, data, exact, draws, subsample)
        curves[name] = curve
        results["elbo"][name] = float(curve[-1])
        results["locs"][name] = np.sort(np.asarray(params["locs"]))
        results["log10 var"][name] = log10_var
        results["agreement"][name] = z
        results["agreement, subsampled"][name] = z_sub
        results["ms/step"][name] = ms
        results["gradient"][name] = mean
    results.update({"em elbo": em_elbo, "em locs": np.sort(em_locs), "exact gradient": exact})

    print(f"{n} points, {steps} steps of {subsample} (Adam {lr}); {draws} gradient draws")
    print(f"EM (the ELBO's maximum): {em_elbo:.2f}, means {np.round(np.sort(em_locs), 2)}")
    print(f"true means {TRUE_LOCS}")
    print(
        f"{'estimator':<33} {'final ELBO':>10}  {'means':<18} {'log10 var':>9} "
        f"{'agreement':>9} {'subsampled':>10} {'ms/step':>7}"
    )
    for name in names:
        z, z_sub = results["agreement"][name], results["agreement, subsampled"][name]
        locs = " ".join(f"{m:5.2f}" for m in results["locs"][name])
        print(
            f"{name:<33} {results['elbo'][name]:>10.2f}  {locs:<18} "
            f"{results['log10 var'][name]:>9.2f} {_z_text(z):>9} {_z_text(z_sub):>10} "
            f"{results['ms/step'][name]:>7.2f}"
        )
    print(f"{time.perf_counter() - start:.0f} s")

    out = pathlib.Path(out or pathlib.Path(__file__).parent / "out" / "gmm_svi.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax, hx) = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in curves.items():
        ax.plot(np.arange(1, len(c) + 1), np.maximum(em_elbo - c, 1e-3), label=name)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="step",
        ylabel="EM optimum − ELBO (nats, all points)",
        title="Gaussian mixture, SVI: distance to the optimum",
    )
    ax.legend(fontsize=8)
    x = np.asarray(data)
    hx.hist(x, bins=60, density=True, color="#cccccc")
    grid = np.linspace(x.min() - 1, x.max() + 1, 400)
    density = (em_w * np.exp(-0.5 * (grid[:, None] - em_locs) ** 2) / np.sqrt(2 * np.pi)).sum(1)
    hx.plot(grid, density, "k", lw=1, label="EM fit")
    for i, name in enumerate(names):
        hx.plot(results["locs"][name], np.full(K, 0.01 + 0.015 * i), "|", ms=12, label=name)
    hx.plot(TRUE_LOCS, np.zeros(K), "kv", label="true means")
    hx.set(xlabel="x", title="data and recovered means")
    hx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"saved {out}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Gaussian mixture with SVI: scgjax vs NumPyro")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--n", type=int, default=600, help="data points")
    parser.add_argument("--subsample", type=int, default=100, help="points per step")
    parser.add_argument("--draws", type=int, default=500, help="gradient draws for variance")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="PNG path (default examples/out/)")
    a = parser.parse_args()
    main(a.steps, a.n, a.subsample, a.draws, a.lr, a.seed, a.out)

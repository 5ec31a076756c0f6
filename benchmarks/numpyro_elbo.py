"""TraceSCG_ELBO against NumPyro's TraceGraph_ELBO, Trace_ELBO and TraceEnum_ELBO.

For each model (a plate of discrete assignments as in NumPyro's test_gradient.py, a
Gaussian mixture, a two-layer sigmoid belief net), with the guide's discrete sites drawn
by the score function:

* agreement: the largest |mean of N gradient estimates − exact| over the entries, in
  standard errors of the mean (exact: TraceEnum_ELBO with the guide enumerated);
* log10 var: log10 of the mean per-entry variance of one gradient estimate (one step's:
  one particle, four for leave-one-out);
* ms/step: the median time of one jitted `value_and_grad` of the loss (one particle,
  four for leave-one-out), the ELBOs taking turns call by call;
* ratio: ms/step over TraceGraph_ELBO's.

Trace_ELBO has no score-function terms, so its gradient is biased for these guides: it is
here as the floor of the time per step.

    python benchmarks/numpyro_elbo.py [--draws 2000] [--repeats 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.funsor import config_enumerate
from numpyro.distributions import constraints
from numpyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO

from scgjax.infer import TraceSCG_ELBO

# -- models -----------------------------------------------------------------------------


def assignments(n=64):
    data = jnp.asarray(np.random.default_rng(0).normal(size=n)) + 0.5

    def model(data):
        with numpyro.plate("data", data.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.array([0.35, 0.65])))
            numpyro.sample("x", dist.Normal(1.5 * z - 0.5, 1.0), obs=data)

    def guide(data):
        logits = numpyro.param("logits", jnp.zeros((data.shape[0], 2)))
        with numpyro.plate("data", data.shape[0]):
            numpyro.sample("z", dist.Categorical(logits=logits))

    params = {"logits": jnp.tile(jnp.array([-0.2, 0.2]), (n, 1))}
    return model, guide, params, data


def mixture(n=256, k=3):
    rng = np.random.default_rng(1)
    data = jnp.asarray(rng.normal(size=n) + rng.choice([-3.0, 0.0, 3.0], size=n))

    def model(data):
        w = numpyro.param("weights", jnp.ones(k) / k, constraint=constraints.simplex)
        locs = numpyro.param("locs", jnp.linspace(-2.0, 2.0, k))
        with numpyro.plate("data", data.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("x", dist.Normal(locs[z], 1.0), obs=data)

    def guide(data):
        logits = numpyro.param("assign_logits", jnp.zeros((data.shape[0], k)))
        with numpyro.plate("data", data.shape[0]):
            numpyro.sample("z", dist.Categorical(logits=logits))

    params = {
        "weights": jnp.ones(k) / k,
        "locs": jnp.linspace(-2.0, 2.0, k),
        "assign_logits": 0.1 * jnp.asarray(rng.normal(size=(n, k))),
    }
    return model, guide, params, data


def sbn(rows=64, d=8):
    rng = np.random.default_rng(2)
    data = jnp.asarray(rng.random((rows, d)) < 0.4, jnp.float32)

    def model(data):
        w_top = numpyro.param("w_top", 0.0)
        w_mid = numpyro.param("w_mid", jnp.zeros(2))
        w_out = numpyro.param("w_out", jnp.zeros((2, d)))
        with numpyro.plate("rows", data.shape[0]):
            h1 = numpyro.sample("h1", dist.Bernoulli(logits=w_top))
            h2 = numpyro.sample("h2", dist.Bernoulli(logits=w_mid[0] + w_mid[1] * h1))
            logits = w_out[0] + h2[..., None] * w_out[1]
            numpyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=data)

    def guide(data):
        enc = numpyro.param("enc", jnp.zeros((d, 2)))
        with numpyro.plate("rows", data.shape[0]):
            h1 = numpyro.sample("h1", dist.Bernoulli(logits=data @ enc[:, 0]))
            numpyro.sample("h2", dist.Bernoulli(logits=data @ enc[:, 1] + 0.5 * h1))

    params = {
        "w_top": jnp.array(0.2),
        "w_mid": jnp.array([-0.3, 0.7]),
        "w_out": 0.3 * jnp.asarray(rng.normal(size=(2, d)), jnp.float32),
        "enc": 0.3 * jnp.asarray(rng.normal(size=(d, 2)), jnp.float32),
    }
    return model, guide, params, data


WORKLOADS = {
    "assignments (test_gradient, N=64)": assignments,
    "Gaussian mixture (N=256, K=3)": mixture,
    "sigmoid belief net (B=64, 2 layers)": sbn,
}


# -- measurements --------------------------------------------------------------------------


def exact_gradient(model, guide, params, data):
    loss = lambda p: TraceEnum_ELBO().loss(
        jax.random.PRNGKey(0), p, model, config_enumerate(guide), data
    )
    return jax.jit(jax.grad(loss))(params)


def gradient_draws(elbo, model, guide, params, data, n):
    one = lambda key: jax.grad(lambda p: elbo.loss(key, p, model, guide, data))(params)
    keys = jax.random.split(jax.random.PRNGKey(1), n)
    out = []
    for chunk in np.array_split(np.arange(n), max(1, n // 500)):
        out.append(jax.jit(jax.vmap(one))(keys[chunk]))
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *out)


def ms_per_step(elbos, model, guide, params, data, repeats=200):
    """The median time of one jitted `value_and_grad` step per ELBO, the ELBOs taking
    turns call by call (so that a machine's load falls on all of them alike)."""
    steps = [
        jax.jit(jax.value_and_grad(lambda p, key, e=e: e.loss(key, p, model, guide, data)))
        for e in elbos
    ]
    key = jax.random.PRNGKey(2)
    for step in steps:
        jax.block_until_ready(step(params, key))
    times = [[] for _ in steps]
    for i in range(repeats):
        k = jax.random.fold_in(key, i)
        for step, ts in zip(steps, times):
            t = time.perf_counter()
            jax.block_until_ready(step(params, k))
            ts.append(time.perf_counter() - t)
    return [1e3 * float(np.median(ts)) for ts in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=200, help="timed steps per ELBO")
    args = parser.parse_args()
    estimators = {
        "TraceGraph_ELBO": TraceGraph_ELBO(),
        "TraceSCG_ELBO": TraceSCG_ELBO(),
        "TraceSCG_ELBO, K=4 leave-one-out": TraceSCG_ELBO(
            num_particles=4, baseline="leave_one_out"
        ),
        "Trace_ELBO (no score terms: biased)": Trace_ELBO(),
    }
    print(f"jax {jax.__version__}, numpyro {numpyro.__version__}, {jax.devices()[0].platform}")
    print(f"{args.draws} gradient draws per estimator")
    header = (
        f"{'model':38s} {'estimator':36s} {'agreement (s.e.)':>16s} {'log10 var':>10s} "
        f"{'ms/step':>8s} {'ratio':>6s}"
    )
    print(header)
    print("-" * len(header))
    for wname, make in WORKLOADS.items():
        model, guide, params, data = make()
        exact = exact_gradient(model, guide, params, data)
        times = ms_per_step(
            list(estimators.values()), model, guide, params, data, repeats=args.repeats
        )
        for (ename, elbo), ms in zip(estimators.items(), times):
            draws = gradient_draws(elbo, model, guide, params, data, args.draws)
            mean = jax.tree.map(lambda x: x.mean(0), draws)
            var = jax.tree.map(lambda x: x.var(0, ddof=1), draws)
            z = max(
                float(np.max(np.abs(m - np.asarray(e)) / np.sqrt(v / args.draws + 1e-30)))
                for m, e, v in zip(
                    jax.tree.leaves(mean), jax.tree.leaves(exact), jax.tree.leaves(var)
                )
            )
            flat_var = np.concatenate([np.ravel(v) for v in jax.tree.leaves(var)])
            print(
                f"{wname:38s} {ename:36s} {z:16.2f} {np.log10(flat_var.mean()):10.2f} "
                f"{ms:8.3f} {ms / times[0]:6.2f}"
            )


if __name__ == "__main__":
    main()

"""GenJAX ADEV's estimators on ``estimators.py``'s workloads (issue 9's peer column).

Run with a Python that has genjax (1.0.14 needs Python >= 3.12 and jax 0.11; not
scgjax's; see benchmarks/README.md):

    python benchmarks/estimators.py --export inputs.npz        # scgjax's Python
    python benchmarks/peers_genjax.py inputs.npz --save genjax_params.npz
    python benchmarks/estimators.py --evaluate genjax_params.npz   # same scoring as scgjax

ADEV chooses the estimator by the primitive a program samples with: ``flip_enum``,
``flip_mvd``, ``flip_reinforce``, ``flip_enum_parallel`` (Bernoulli, given a
probability), ``categorical_enum_parallel`` (Categorical, given logits) and
``reinforce(...)`` (the score function of any distribution). A program is wrapped
with ``genjax.adev.expectation``; ``seed(obj.grad_estimate)(key, *args)`` is one
gradient estimate. The columns are those of ``estimators.py`` (variance at the initial
parameters, bias against the exact gradient where known, median time of one jitted
gradient, the objective after ``--steps`` Adam steps on the exported minibatch
schedule; Adam is written out here with optax's defaults, since genjax's environment
has no optax). On the models, images are mapped with ``modular_vmap`` (GenJAX's
vmap for programs that sample).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import time
import traceback

import genjax
import jax
import jax.numpy as jnp
import numpy as np
from genjax import categorical, modular_vmap, seed
from genjax.adev import (
    categorical_enum_parallel,
    expectation,
    flip_enum,
    flip_enum_parallel,
    flip_mvd,
    flip_reinforce,
    reinforce,
)

LATENTS, CATS = 32, 10

# The score function of a Categorical given logits, built with ADEV's own factory.
categorical_reinforce = reinforce(
    categorical.sample,
    categorical.logpdf,
    lambda key, logits, sample_shape=(): jax.random.categorical(
        key, logits, shape=sample_shape + jnp.shape(logits)[:-1]
    ),
)


def bern_logpdf(z, logits):
    return z * jax.nn.log_sigmoid(logits) + (1 - z) * jax.nn.log_sigmoid(-logits)


# -- Programs ------------------------------------------------------------------------------


def toy_program(prim, target=0.499):
    @expectation
    def obj(theta):
        b = prim(jax.nn.sigmoid(theta)).astype(jnp.float32)
        return (b - target) ** 2

    return obj


def sbn_cost_at(p, x, z):
    log_q = bern_logpdf(z, x @ p["W"] + p["b"]).sum(-1)
    log_prior = LATENTS * jnp.log(0.5)
    log_lik = bern_logpdf(x, z @ p["V"] + p["c"]).sum(-1)
    return log_q - log_prior - log_lik


def catvae_cost_at(p, x, onehot):
    log_q = jnp.sum(onehot * jax.nn.log_softmax(x @ p["W"] + p["b"]), -1)
    log_lik = bern_logpdf(x, onehot @ p["V"]).sum(-1)
    return log_q + jnp.log(CATS) - log_lik


def sbn_program(prim, per_image):
    if per_image:  # each image's 32 flips inside modular_vmap

        @expectation
        def obj(p, x):
            def one(xi):
                z = prim(jax.nn.sigmoid(xi @ p["W"] + p["b"])).astype(jnp.float32)
                return sbn_cost_at(p, xi, z)

            return jnp.mean(modular_vmap(one)(x))

        return obj

    @expectation
    def obj(p, x):  # one batched flip over the (B, 32) probabilities
        z = prim(jax.nn.sigmoid(x @ p["W"] + p["b"])).astype(jnp.float32)
        return jnp.mean(sbn_cost_at(p, x, z))

    return obj


def catvae_program(prim, per_image=True):
    if not per_image:

        @expectation
        def obj(p, x):  # one batched site over the (B, 10) logits
            k = prim(x @ p["W"] + p["b"])
            return jnp.mean(catvae_cost_at(p, x, jax.nn.one_hot(k, CATS)))

        return obj

    @expectation
    def obj(p, x):
        def one(xi):
            k = prim(xi @ p["W"] + p["b"])
            return catvae_cost_at(p, xi, jax.nn.one_hot(k, CATS))

        return jnp.mean(modular_vmap(one)(x))

    return obj


def rows(workload):
    if workload == "toy":
        return {
            "flip_enum": lambda: toy_program(flip_enum),
            "flip_mvd": lambda: toy_program(flip_mvd),
            "flip_reinforce": lambda: toy_program(flip_reinforce),
            "flip_enum_parallel": lambda: toy_program(flip_enum_parallel),
        }
    if workload == "sbn":
        return {
            "flip_reinforce (one batched site)": lambda: sbn_program(flip_reinforce, False),
            "flip_reinforce (modular_vmap over images)": lambda: sbn_program(flip_reinforce, True),
            "flip_mvd (modular_vmap over images)": lambda: sbn_program(flip_mvd, True),
            "flip_enum (modular_vmap over images)": lambda: sbn_program(flip_enum, True),
        }
    return {
        "reinforce(categorical) (one batched site)": lambda: catvae_program(
            categorical_reinforce, False
        ),
        "reinforce(categorical) (modular_vmap)": lambda: catvae_program(categorical_reinforce),
        "categorical_enum_parallel (modular_vmap)": lambda: catvae_program(
            categorical_enum_parallel
        ),
    }


# -- Measurements --------------------------------------------------------------------------


def flat(g):
    return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in jax.tree.leaves(g)], 1)


def variance_and_bias(grad, args, draws, exact, key=11):
    keys = jax.random.split(jax.random.key(key), draws)
    g = []
    for chunk in range(0, draws, 250):  # chunks keep the vmapped program's memory bounded
        g.append(flat(jax.jit(jax.vmap(lambda k: grad(k, *args)))(keys[chunk : chunk + 250])))
    g = jnp.concatenate(g).astype(jnp.float64 if jax.config.x64_enabled else jnp.float32)
    var = jnp.var(g, axis=0)
    lv = float(np.log10(max(float(jnp.mean(var)), 1e-300)))
    bias = None
    if exact is not None:
        floor = 1e-5 * float(jnp.max(jnp.abs(exact)))
        se = jnp.sqrt(var / draws + floor**2)
        bias = float(jnp.max(jnp.abs(g.mean(0) - exact) / se))
    return lv, bias, g


def time_step(grad, args, repeats):
    step = jax.jit(grad)
    keys = jax.random.split(jax.random.key(5), repeats + 1)
    jax.block_until_ready(step(keys[0], *args))
    times = []
    for k in keys[1:]:
        t = time.perf_counter()
        jax.block_until_ready(step(k, *args))
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def adam(lr, b1=0.9, b2=0.999, eps=1e-8):
    def init(p):
        z = jax.tree.map(jnp.zeros_like, p)
        return (z, z, jnp.zeros((), jnp.int32))

    def update(g, state, p):
        m, v, t = state
        t = t + 1
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
        v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
        tf = t.astype(jnp.float32)
        p = jax.tree.map(
            lambda p, m, v: p - lr * (m / (1 - b1**tf)) / (jnp.sqrt(v / (1 - b2**tf)) + eps),
            p,
            m,
            v,
        )
        return p, (m, v, t)

    return init, update


def train(grad, params, data, idx, steps, lr):
    init, update = adam(lr)
    state = init(params)

    @jax.jit
    def step(p, state, key, i):
        kg = jax.random.split(key)[1]  # estimators.py: a step's key splits into (batch, draw)
        g = grad(kg, p) if data is None else grad(kg, p, data[i])
        return update(g, state, p)

    keys = jax.random.split(jax.random.key(3), steps)
    for s in range(steps):
        params, state = step(params, state, keys[s], None if data is None else idx[s])
    return params


def mc_objective(cost_at, sampler, data):
    @jax.jit
    def evaluate(p):
        keys = jax.random.split(jax.random.key(99), 20)
        return jnp.mean(jax.vmap(lambda k: jnp.mean(cost_at(p, data, sampler(k, p, data))))(keys))

    return evaluate


def sbn_sampler(k, p, x):
    return jax.random.bernoulli(k, jax.nn.sigmoid(x @ p["W"] + p["b"])).astype(jnp.float32)


def catvae_sampler(k, p, x):
    return jax.nn.one_hot(jax.random.categorical(k, x @ p["W"] + p["b"]), CATS)


def check_models(inp, sbn0, cat0, batch):
    u = jnp.asarray(inp["check_u"])
    z = (u < jax.nn.sigmoid(batch @ sbn0["W"] + sbn0["b"])).astype(jnp.float32)
    pairs = {
        "sbn cost at fixed z": (jnp.mean(sbn_cost_at(sbn0, batch, z)), inp["sbn_check_cost"]),
        "catvae cost at fixed z": (
            jnp.mean(catvae_cost_at(cat0, batch, jax.nn.one_hot(inp["check_z"], CATS))),
            inp["catvae_check_cost"],
        ),
    }
    for name, (mine, theirs) in pairs.items():
        rel = abs(float(mine) - float(theirs)) / abs(float(theirs))
        print(
            f"# check {name}: genjax-side {float(mine):.6f}, scgjax {float(theirs):.6f}, "
            f"rel. diff {rel:.1e}"
        )
        assert rel < 1e-5, name


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs")
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--workloads", default="toy,sbn,catvae")
    ap.add_argument("--rows", default=None, help="comma-separated substrings of row names")
    ap.add_argument("--save", metavar="NPZ")
    args = ap.parse_args()

    inp = np.load(args.inputs)
    data = jnp.asarray(inp["data"])
    batch = data[:100]
    idx = jnp.asarray(inp["train_idx"][: args.steps])
    assert idx.shape[0] == args.steps, "inputs.npz holds fewer steps: export with --steps"
    sbn0 = {k: jnp.asarray(inp[f"sbn_{k}"]) for k in "WbVc"}
    cat0 = {k: jnp.asarray(inp[f"catvae_{k}"]) for k in "WbV"}
    check_models(inp, sbn0, cat0, batch)
    exact_cat = jnp.concatenate([jnp.asarray(inp[f"catvae_exact_{k}"]).reshape(-1) for k in "WbV"])
    print(
        f"# peers_genjax.py on {platform.machine()}, {os.cpu_count()} CPUs, genjax "
        f"{genjax.__version__ if hasattr(genjax, '__version__') else '1.0.14'}, jax "
        f"{jax.__version__}; {args.draws} draws, {args.steps} steps"
    )
    s = 1 / (1 + np.exp(-0.5))
    workloads = {
        "toy": (
            jnp.asarray(0.0),
            None,
            None,
            0.05,
            lambda t: float(jax.nn.sigmoid(t) * 0.501**2 + (1 - jax.nn.sigmoid(t)) * 0.499**2),
            jnp.asarray(inp["toy_exact"]).reshape(1),
        ),
        "sbn": (sbn0, batch, data, 0.01, mc_objective(sbn_cost_at, sbn_sampler, data), None),
        "catvae": (
            cat0,
            batch,
            data,
            0.01,
            mc_objective(catvae_cost_at, catvae_sampler, data),
            exact_cat,
        ),
    }
    saved = {}
    for name in args.workloads.split(","):
        params, x, full, lr, evaluate, exact = workloads[name]
        check = name == "toy"
        print(f"\n## {name}\n")
        print(
            "| estimator | log10 var | bias (max |z|) | ms/step | objective after training |"
            + (" check: mean − exact at θ=0.5, t=0.3 (z) |" if check else "")
        )
        print("|---|---|---|---|---|" + ("---|" if check else ""))
        for row, make in rows(name).items():
            if args.rows and not any(r in row for r in args.rows.split(",")):
                continue
            try:
                obj = make()
                seeded = seed(obj.grad_estimate)
                # grad_estimate differentiates every argument: keep the parameters' part
                grad = seeded if x is None else (lambda k, p, xb: seeded(k, p, xb)[0])
                a = (params,) if x is None else (params, x)
                lv, bias, _ = variance_and_bias(grad, a, args.draws, exact)
                ms = time_step(grad, a, args.repeats)
                trained = train(grad, params, full, idx, args.steps, lr)
                value = evaluate(trained)
                if full is not None:
                    saved.update({f"{name}/{row}/{k}": np.asarray(v) for k, v in trained.items()})
                extra = ""
                if check:
                    cgrad = seed(toy_program(_prim_of(row), 0.3).grad_estimate)
                    ex = s * (1 - s) * (1 - 2 * 0.3)
                    _, _, g = variance_and_bias(cgrad, (jnp.asarray(0.5),), args.draws, None, 12)
                    se = max(float(jnp.std(g)) / np.sqrt(args.draws), 1e-5 * ex)
                    d = float(jnp.mean(g)) - ex
                    extra = f" {d:+.4f} ({d / se:+.1f}) |"
                b = "-" if bias is None else f"{bias:.1f}"
                lv_s = "exact (rounding)" if lv < -12 else f"{lv:.2f}"
                print(
                    f"| {row} | {lv_s} | {b} | {ms:.2f} | {float(value):.4f} |{extra}", flush=True
                )
            except Exception as e:  # noqa: BLE001 -- a peer's failure is a result
                msg = " ".join(f"{type(e).__name__}: {e}".split())
                msg = re.sub(r"\x1b?\[[0-9;]*m", "", msg)[:200]  # beartype's colours
                print(f"| {row} | failed: {msg} | | | |", flush=True)
                if os.environ.get("PEERS_DEBUG"):
                    traceback.print_exc()
    if args.save and saved:
        np.savez(args.save, **saved)
        print(f"\n# saved {len(saved)} arrays to {args.save}")


def _prim_of(row):
    return {
        "flip_enum": flip_enum,
        "flip_mvd": flip_mvd,
        "flip_reinforce": flip_reinforce,
        "flip_enum_parallel": flip_enum_parallel,
    }[row]


if __name__ == "__main__":
    main()

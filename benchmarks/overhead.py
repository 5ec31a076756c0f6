"""Overhead of ``scg.scg_grad`` against a hand-written DiCE surrogate.

Two workloads from the issue:

* ``vae`` -- a discrete VAE / sigmoid belief net: batch 128, 64 binary pixels,
  256 Bernoulli latents drawn with ``scg.sample`` (score function), a linear
  encoder and decoder, and the single-sample negative ELBO
  ``mean_b[ sum_j (log q(z_bj|x_b) - log p(z_bj)) - sum_i log p(x_bi|z_b) ]``
  with a Bernoulli(0.5) prior.
* ``rl`` -- a 200-step ``lax.scan`` rollout of a linear categorical policy
  (state dim 8, 4 actions) with ``scg.sample`` inside the scan body, a
  deterministic action-dependent transition, a reward per step and
  cost = -(total reward).

For each workload ``jax.jit(scg.scg_grad(cost))`` is compared with
``jax.jit(jax.grad(hand_surrogate))``, where the hand-written surrogate is the
*same estimator* the library builds. The script first asserts that both give the
same gradient for the same keys (which proves it is the same estimator), then
times them interleaved in one process (median run time, block_until_ready after
every call) and times trace+lower+compile with fresh function objects.

The hand-written surrogates come in several Rao-Blackwellization levels; the
script compares the library's gradient with each of them and uses the closest,
which must agree to rtol (normwise), and says which:

* ``whole`` -- one box of all the log-probs times the whole cost (what scgjax
  does without plates / causality);
* vae: ``log q: G1, log p: G2, recon: G3`` -- automatic plates, each piece of
  the cost boxed at its own granularity G (``element``: element (b, j) with
  log q(z_bj); ``example``: example b with sum_j log q(z_bj); ``whole``);
* rl: ``causal`` -- causality inside ``scan`` (the reward of step t is boxed
  with the log-probs of steps <= t).

Run:  python benchmarks/overhead.py            (30-60 s on 2 CPU cores)
      python benchmarks/overhead.py --quick    (~15 s, rough numbers)
      python benchmarks/overhead.py --help
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro

# The pieces shared with variance.py; importing them also puts the checkout's scgjax
# on sys.path, so the script runs without installing the package.
if __package__:  # imported as a package module, e.g. `python -m benchmarks.overhead`
    from . import workloads as wl
else:  # run as `python benchmarks/overhead.py` (sys.path[0] is benchmarks/) or loaded by path
    if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import workloads as wl

import scgjax as scg  # noqa: E402

magic_box = wl.magic_box
RUN_TARGET = 1.05
COMPILE_TARGET = 2.0


# --------------------------------------------------------------------------
# (a) discrete VAE / sigmoid belief net
# --------------------------------------------------------------------------
VAE_BATCH, VAE_PIXELS, VAE_LATENTS = 128, 64, 256


def vae_problem(seed=0, batch=VAE_BATCH, pixels=VAE_PIXELS, latents=VAE_LATENTS):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    # Binary "images": each pixel on with its own probability.
    pix_p = jax.random.uniform(ks[0], (pixels,), minval=0.1, maxval=0.9)
    x = jax.random.bernoulli(ks[1], pix_p, (batch, pixels)).astype(jnp.float32)
    return wl.vae_init_params(ks[2:], pixels, latents), x


def make_vae_cost():
    """A fresh stochastic program (fresh function object on every call)."""

    def vae_cost(params, key, x):
        return wl.vae_cost(params, x, key)

    return vae_cost


# Box granularity of each of the three cost pieces, finest (best) first:
#   "element": element (b, j) of the piece is boxed with log q(z_bj) alone;
#   "example": example b's part is boxed with sum_j log q(z_bj) (plate over b);
#   "whole":   the piece is boxed with the sum of all B*L log-probs.
# The recon term of example b reads all of z_b, so "element" is not valid for it.
GRANULARITY = ("element", "example", "whole")


def make_vae_hand(lq_box="element", lp_box="element", recon_box="example"):
    """Hand-written DiCE surrogate of vae_cost.

    cost = (1/B) [ sum_bj log q(z_bj) - sum_bj log p(z_bj) - sum_b recon_b ],
    every piece depends on z, each boxed at the granularity given.
    """

    def hand(params, key, x):
        lq, lp, recon = wl.vae_parts(params, x, key)
        boxes = {
            "element": magic_box(lq),  # [B, L]
            "example": magic_box(jnp.sum(lq, axis=-1)),  # [B]
            "whole": magic_box(jnp.sum(lq)),  # []
        }

        def boxed(term, how):  # term: [B, L]
            if how == "element":
                return jnp.sum(boxes["element"] * term)
            if how == "example":
                return jnp.sum(boxes["example"] * jnp.sum(term, axis=-1))
            return boxes["whole"] * jnp.sum(term)

        recon_part = (
            jnp.sum(boxes["example"] * -recon)
            if recon_box == "example"
            else boxes["whole"] * -jnp.sum(recon)
        )
        return (boxed(lq, lq_box) + boxed(-lp, lp_box) + recon_part) / lq.shape[0]

    return hand


def _vae_variants():
    out = {}
    for lq_box in GRANULARITY:
        for lp_box in GRANULARITY:
            for recon_box in GRANULARITY[1:]:
                name = f"log q: {lq_box}, log p: {lp_box}, recon: {recon_box}"
                out[name] = lambda a=lq_box, b=lp_box, c=recon_box: make_vae_hand(a, b, c)
    # Without plates, every piece is boxed whole.
    out = {"whole": out.pop("log q: whole, log p: whole, recon: whole"), **out}
    return out


# --------------------------------------------------------------------------
# (b) policy-gradient rollout in lax.scan
# --------------------------------------------------------------------------
# The workload itself (rl_problem, the rollout, the hand-written surrogates) is in
# workloads.py; here each maker returns a fresh function object in this script's
# (params, key, env) order.
RL_HORIZON, RL_STATE, RL_ACTIONS = wl.RL_HORIZON, wl.RL_STATE, wl.RL_ACTIONS
rl_problem = wl.rl_problem


def make_rl_cost(horizon=RL_HORIZON):
    def rl_cost(params, key, env):
        return wl.rl_cost(params, env, key, horizon)

    return rl_cost


def make_rl_hand_whole(horizon=RL_HORIZON):
    # Without causality every step's reward depends (through the state) on all
    # actions of the scan's one score node: one box of the summed log-probs.
    def hand(params, key, env):
        return wl.rl_hand_whole(params, env, key, horizon)

    return hand


def make_rl_hand_causal(horizon=RL_HORIZON):
    # Causality: the reward of step t is boxed with the log-probs of steps <= t.
    def hand(params, key, env):
        return wl.rl_hand_causal(params, env, key, horizon)

    return hand


# --------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------
CASES = {
    "vae": dict(
        title=f"discrete VAE (B={VAE_BATCH}, {VAE_PIXELS} px, {VAE_LATENTS} Bernoulli latents)",
        problem=vae_problem,
        make_cost=make_vae_cost,
        hands=_vae_variants(),
    ),
    "rl": dict(
        title=f"scan rollout (T={RL_HORIZON}, state {RL_STATE}, {RL_ACTIONS} actions)",
        problem=rl_problem,
        make_cost=make_rl_cost,
        hands={"whole": make_rl_hand_whole, "causal": make_rl_hand_causal},
    ),
}


def make_scg(case):
    return scg.scg_grad(CASES[case]["make_cost"]())


def make_hand(case, variant):
    return jax.grad(CASES[case]["hands"][variant]())


def _max_rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _norm_err(g_scg, g_hand):
    """max over keys and leaves of max|scg - hand| / max|hand| (normwise)."""
    return max(_max_rel_err(gs[name], gh[name]) for gs, gh in zip(g_scg, g_hand) for name in gs)


def match_estimator(case, args_for_key, keys, rtol):
    """The hand-written variant whose gradient is the library's, for every key.

    Every variant is tried; the closest one must agree to `rtol` normwise (per
    leaf, |scg - hand| <= rtol * max|hand|: float32 sums of thousands of terms
    cancel, so elementwise relative error is meaningless near zero entries).
    Returns (variant, its error, {variant: error}).
    """
    # Full-precision matmuls (no TF32 on GPUs): the score-function samples are
    # thresholds of logits, so a last-bit difference between the two compiled
    # programs could flip a sample and make identical estimators disagree.
    with jax.default_matmul_precision("highest"):
        scg_fn = jax.jit(make_scg(case))
        g_scg = [scg_fn(*args_for_key(k)) for k in keys]
        g_hands, errors = {}, {}
        for variant in CASES[case]["hands"]:
            hand_fn = jax.jit(make_hand(case, variant))
            g_hands[variant] = [hand_fn(*args_for_key(k)) for k in keys]
            errors[variant] = _norm_err(g_scg, g_hands[variant])
    best = min(errors, key=errors.get)
    if errors[best] > rtol:
        lines = "\n".join(
            f"  hand[{v}]: max |scg - hand| / max|hand| = {e:.3e}"
            for v, e in sorted(errors.items(), key=lambda kv: kv[1])
        )
        raise AssertionError(
            f"{case}: scg.scg_grad matches none of the hand-written estimators "
            f"(rtol={rtol}):\n{lines}"
        )
    for gs, gh in zip(g_scg, g_hands[best]):
        for name in gs:
            scale = float(np.max(np.abs(np.asarray(gh[name]))))
            np.testing.assert_allclose(
                np.asarray(gs[name]),
                np.asarray(gh[name]),
                rtol=rtol,
                atol=rtol * scale,
                err_msg=f"{case}: scg vs hand[{best}], leaf {name!r}",
            )
    return best, errors[best], errors


def time_compiles(makers, args, reps):
    """Median seconds of jit(fn).lower(*args) and .compile(), fresh fns each time."""
    out = {name: {"lower": [], "compile": []} for name in makers}
    order = list(makers)
    for name in order:  # one discarded round: first-use costs inside JAX
        jax.jit(makers[name]()).lower(*args).compile()
    for r in range(reps):
        for name in order if r % 2 == 0 else order[::-1]:
            fn = makers[name]()  # fresh function objects: no tracing cache hit
            t0 = time.perf_counter()
            lowered = jax.jit(fn).lower(*args)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
            out[name]["lower"].append(t1 - t0)
            out[name]["compile"].append(t2 - t1)
            out[name]["hlo"] = _hlo_instructions(compiled)
    res = {}
    for name, d in out.items():
        total = [a + b for a, b in zip(d["lower"], d["compile"])]
        res[name] = {
            "lower": statistics.median(d["lower"]),
            "compile": statistics.median(d["compile"]),
            "total": statistics.median(total),
            "hlo": d["hlo"],
        }
    return res


def _hlo_instructions(compiled):
    """Number of instructions in the optimized HLO (None if unavailable)."""
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001 - backend may not expose it
        return None
    if not text:
        return None
    return sum(
        1 for line in text.splitlines() if " = " in line and not line.lstrip().startswith("//")
    )


_fmt_t = wl.fmt_t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="vae,rl", help="comma-separated subset of: vae,rl")
    p.add_argument("--reps", type=int, default=100, help="interleaved timing repetitions")
    p.add_argument("--inner", type=int, default=25, help="calls per repetition")
    p.add_argument("--compile-reps", type=int, default=7, help="trace+compile repetitions")
    p.add_argument("--rtol", type=float, default=1e-4, help="gradient agreement tolerance")
    p.add_argument("--quick", action="store_true", help="reps=5, inner=5, compile-reps=2")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    a = p.parse_args(argv)
    if a.quick:
        a.reps, a.inner, a.compile_reps = 5, 5, 2
    cases = wl.parse_cases(p, a.cases, CASES)

    dev = jax.devices()[0]
    env_info = {
        "jax": jax.__version__,
        "jaxlib": _jaxlib_version(),
        "numpyro": numpyro.__version__,
        "python": platform.python_version(),
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "host_cpus": os.cpu_count(),
        "reps": a.reps,
        "inner": a.inner,
        "compile_reps": a.compile_reps,
    }
    print("# scgjax overhead benchmark\n")
    print(
        f"device: {dev.device_kind} ({dev.platform}, {jax.device_count()} device(s)), "
        f"host CPUs: {os.cpu_count()}"
    )
    print(
        f"jax {env_info['jax']}, jaxlib {env_info['jaxlib']}, numpyro {env_info['numpyro']}, "
        f"python {env_info['python']}"
    )
    print(f"reps={a.reps} x inner={a.inner} calls, compile reps={a.compile_reps}\n", flush=True)

    t_start = time.perf_counter()
    rows = []
    for case in cases:
        spec = CASES[case]
        params, data = spec["problem"]()
        key = jax.random.PRNGKey(42)
        args = (params, key, data)

        check_keys = [jax.random.PRNGKey(i) for i in (42, 7)]
        variant, err, report = match_estimator(
            case, lambda k: (params, k, data), check_keys, a.rtol
        )
        others = sorted((e, v) for v, e in report.items() if v != variant)
        print(
            f"[{case}] scg gradient == hand[{variant}] gradient "
            f"(normwise rel err {err:.1e}"
            + (f"; next closest: hand[{others[0][1]}] at {others[0][0]:.1e}" if others else "")
            + ")",
            flush=True,
        )

        fns = {"scg": jax.jit(make_scg(case)), "hand": jax.jit(make_hand(case, variant))}
        run, _ = wl.time_runs(fns, args, a.reps, a.inner)
        comp = time_compiles(
            {"scg": lambda: make_scg(case), "hand": lambda: make_hand(case, variant)},
            args,
            a.compile_reps,
        )
        row = {
            "case": case,
            "title": spec["title"],
            "estimator": variant,
            "grad_rel_err": err,
            "estimator_errors": report,
            "run_scg": run["scg"],
            "run_hand": run["hand"],
            "run_ratio": run["scg"] / run["hand"],
            "compile_scg": comp["scg"]["total"],
            "compile_hand": comp["hand"]["total"],
            "compile_ratio": comp["scg"]["total"] / comp["hand"]["total"],
            "lower_scg": comp["scg"]["lower"],
            "lower_hand": comp["hand"]["lower"],
            "xla_scg": comp["scg"]["compile"],
            "xla_hand": comp["hand"]["compile"],
            "hlo_scg": comp["scg"]["hlo"],
            "hlo_hand": comp["hand"]["hlo"],
        }
        rows.append(row)
        print(
            f"[{case}] run {_fmt_t(row['run_scg'])} vs {_fmt_t(row['run_hand'])} "
            f"(x{row['run_ratio']:.3f}); trace+compile {_fmt_t(row['compile_scg'])} vs "
            f"{_fmt_t(row['compile_hand'])} (x{row['compile_ratio']:.2f})",
            flush=True,
        )

    def ok(x, target):
        return "ok" if x <= target else "**over**"

    print()
    print(
        f"Device: {dev.device_kind} ({dev.platform}); jax {env_info['jax']}; "
        f"host CPUs {os.cpu_count()}\n"
    )
    print(
        "| workload | hand estimator | run scg | run hand | run ratio "
        f"(≤ {RUN_TARGET}) | trace+compile scg | trace+compile hand | "
        f"compile ratio (≤ {COMPILE_TARGET:g}) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['title']} | {r['estimator']} | {_fmt_t(r['run_scg'])} | "
            f"{_fmt_t(r['run_hand'])} | {r['run_ratio']:.3f} {ok(r['run_ratio'], RUN_TARGET)} | "
            f"{_fmt_t(r['compile_scg'])} | {_fmt_t(r['compile_hand'])} | "
            f"{r['compile_ratio']:.2f} {ok(r['compile_ratio'], COMPILE_TARGET)} |"
        )
    print()
    print("Trace+compile split (median): trace/lower | XLA compile; optimized HLO instructions\n")
    print("| workload | lower scg | lower hand | XLA scg | XLA hand | HLO instrs scg / hand |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {_fmt_t(r['lower_scg'])} | {_fmt_t(r['lower_hand'])} | "
            f"{_fmt_t(r['xla_scg'])} | {_fmt_t(r['xla_hand'])} | "
            f"{r['hlo_scg']} / {r['hlo_hand']} |"
        )
    print(f"\ntotal benchmark time: {time.perf_counter() - t_start:.1f} s")

    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"env": env_info, "rows": rows}, fh, indent=2)
    missed = [
        r["case"]
        for r in rows
        if r["run_ratio"] > RUN_TARGET or r["compile_ratio"] > COMPILE_TARGET
    ]
    if a.strict and missed:
        print(f"targets missed: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


def _jaxlib_version():
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    sys.exit(main())

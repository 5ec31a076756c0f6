"""Data-parallel scaling of the discrete VAE: scgjax against the hand-written surrogate.

For 1, 2, 4, 8 devices (CPU devices are forced with
`--xla_force_host_platform_device_count`, set before JAX starts; on a GPU/TPU host the
accelerators are used when there are enough of them), weak scaling (a fixed batch per
device), two ways of writing the data-parallel step:

* `jit`: `jax.jit(scg.scg_grad(cost))` on a batch sharded over the mesh axis `d` (Auto
  axes, `jax.set_mesh`), parameters replicated;
* `shard_map`: `scg.scg_grad(cost)` inside a `shard_map` body, the shard index folded
  into the key (`check_vma=True`: the replicated parameters' gradients come out summed
  over the shards, and are divided by their number);

each against `jax.grad` of the hand-written DiCE surrogate (`overhead.make_vae_hand`,
the estimator scgjax builds) written the same way, after checking that both give the
same gradient for the same key. It prints steps/s of each, the paired run-time ratio
scg/hand (target ≤ 1.05 at every device count) and the weak-scaling efficiency
`examples/s(n) / (n · examples/s(1))`, which is `steps/s(n) / steps/s(1)`.

    python benchmarks/scaling.py                # vae (batch 128/device, 64 px, 256 latents)
    python benchmarks/scaling.py --case large   # 256 px, 512 latents, batch 512/device

On a CPU host the devices share the host's cores, so the efficiency there measures
XLA's partitioning overhead, not a speed-up; the ratio is what this script is for.
"""

from __future__ import annotations

import os
import sys

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()

import argparse  # noqa: E402
from functools import partial  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads as wl  # noqa: E402
from overhead import make_vae_hand  # noqa: E402

import scgjax as scg  # noqa: E402

CASES = {"vae": (128, 64, 256), "large": (512, 256, 512)}  # batch/device, pixels, latents


def _devices():
    accel = [d for d in jax.devices() if d.platform != "cpu"]
    return accel if len(accel) >= 2 else jax.devices("cpu")


def _hand(params, x, key):
    return make_vae_hand()(params, key, x)


def _steps(mesh, style):
    """(scg step, hand step) for the mesh, both taking (params, x, key)."""
    if style == "jit":
        return jax.jit(scg.scg_grad(wl.vae_cost)), jax.jit(jax.grad(_hand))

    def data_parallel(grad):
        @partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("d"), P()), out_specs=P())
        def step(params, x, key):
            key = jax.random.fold_in(key, lax.axis_index("d"))
            # With check_vma=True the gradient of the replicated parameters is already
            # summed over the shards (JAX's semantics): divide for the mean.
            n = lax.psum(1, "d")
            return jax.tree.map(lambda g: g / n, grad(params, x, key))

        return jax.jit(step)

    return data_parallel(scg.scg_grad(wl.vae_cost)), data_parallel(jax.grad(_hand))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="vae", choices=sorted(CASES))
    p.add_argument("--devices", default="1,2,4,8")
    p.add_argument("--styles", default="jit,shard_map")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--inner", type=int, default=5)
    args = p.parse_args(argv)
    per_device, pixels, latents = CASES[args.case]
    devices = _devices()
    counts = [int(c) for c in args.devices.split(",") if int(c) <= len(devices)]
    print(
        f"jax {jax.__version__}, {devices[0].platform} × {len(devices)} "
        f"({getattr(devices[0], 'device_kind', '')}), host cores: {os.cpu_count()}"
    )
    print(f"case {args.case}: batch {per_device}/device, {pixels} pixels, {latents} latents")
    params = wl.vae_init_params(jax.random.split(jax.random.key(0), 4), pixels, latents)
    rows, base = [], {}
    for style in args.styles.split(","):
        for n in counts:
            mesh = jax.make_mesh((n,), ("d",), axis_types=(AxisType.Auto,), devices=devices[:n])
            with jax.set_mesh(mesh):
                x = (jax.random.uniform(jax.random.key(1), (per_device * n, pixels)) < 0.5).astype(
                    jnp.float32
                )
                x = jax.device_put(x, NamedSharding(mesh, P("d")))
                rep = NamedSharding(mesh, P())
                prm = jax.device_put(params, rep)
                key = jax.random.key(2)
                ours, hand = _steps(mesh, style)
                with jax.default_matmul_precision("highest"):
                    for k in (key, jax.random.key(3)):
                        for name, a in ours(prm, x, k).items():
                            b = hand(prm, x, k)[name]
                            scale = float(jnp.max(jnp.abs(b)))
                            np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * scale)
                med, ratio = wl.time_runs(
                    {"scg": ours, "hand": hand}, (prm, x, key), args.reps, args.inner, ref="hand"
                )
            sps = {k: 1.0 / v for k, v in med.items()}
            if n == counts[0]:
                base[style] = sps
            # Weak scaling: n devices do n times the work per step, so perfect scaling
            # keeps the steps/s (the examples/s grow n-fold).
            eff = {k: sps[k] / base[style][k] for k in sps}
            rows.append((style, n, sps["scg"], sps["hand"], ratio["scg"], eff["scg"], eff["hand"]))
    print()
    print(
        "| style | devices | scg steps/s | hand steps/s | ratio scg/hand | efficiency scg | hand |"
    )
    print("|---|---|---|---|---|---|---|")
    for style, n, s, h, r, es, eh in rows:
        print(f"| {style} | {n} | {s:.1f} | {h:.1f} | {r:.3f} | {es:.2f} | {eh:.2f} |")
    worst = max(r[4] for r in rows)
    print(f"\nworst ratio {worst:.3f} (target ≤ 1.05: {'met' if worst <= 1.05 else 'NOT met'})")


if __name__ == "__main__":
    main()

"""Data-parallel training of a discrete VAE over several processes (multi-host).

Every process runs this same script (JAX's multi-controller model): it joins the others
through `jax.distributed.initialize`, builds one mesh over every process's devices,
loads only its own rows of the batch (`jax.make_array_from_process_local_data`), and
runs the same jitted step, `jax.jit(scg.scg_grad(neg_elbo))` on the globally sharded
batch. The gradient is the one a single process holding the whole batch computes for
the same key (the draws are made once, where the program makes them, with the
partitionable threefry).

On this machine, two processes with four CPU devices each:

    python examples/distributed_vae.py --spawn 2 --local-devices 4 --steps 20

On a cluster, start one process per host, with the same coordinator address:

    python examples/distributed_vae.py --coordinator HOST0:1234 \\
        --num-processes $NUM_HOSTS --process-id $HOST_INDEX --steps 1000

(On GPU or TPU hosts drop `--local-devices`; each process uses its accelerators. Under
SLURM or on Cloud TPU, `jax.distributed.initialize()` finds all three values itself:
pass `--coordinator auto`.)

`--out FILE` writes the first step's gradient (process 0) as `.npz`, which the test suite
compares with a single process's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from functools import partial

PIXELS, LATENTS, BATCH = 64, 32, 64


def _parse(argv):
    p = argparse.ArgumentParser(description="Data-parallel discrete VAE over processes.")
    p.add_argument("--spawn", type=int, default=0, help="start this many local processes")
    p.add_argument("--coordinator", default=None, help="host:port of process 0, or 'auto'")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--local-devices", type=int, default=0, help="CPU devices per process")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--out", default=None, help="write the first gradient here (.npz)")
    return p.parse_args(argv)


def _spawn(args, argv) -> int:
    """Starts `args.spawn` copies of this script on this machine, one per process id."""
    import socket

    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rest, skip = [], False
    for a in argv:  # everything but --spawn N / --spawn=N
        if skip or a.startswith("--spawn"):
            skip = a == "--spawn"
            continue
        rest.append(a)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *rest, "--coordinator", f"127.0.0.1:{port}"]
            + ["--num-processes", str(args.spawn), "--process-id", str(i)]
        )
        for i in range(args.spawn)
    ]
    codes = [p.wait() for p in procs]
    return max(codes)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    if args.spawn:
        return _spawn(args, argv)
    if args.local_devices:
        flag = f"--xla_force_host_platform_device_count={args.local_devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import numpyro.distributions as dist
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import scgjax as scg

    if args.coordinator is not None:
        if args.local_devices:  # CPU devices talk to each other through gloo
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if args.coordinator == "auto":
            jax.distributed.initialize()
        else:
            jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    def neg_elbo(params, x, key):
        q = dist.Bernoulli(logits=x @ params["enc_w"] + params["enc_b"])
        z = scg.sample(key, q).astype(x.dtype)  # score function, per-element plates
        px = dist.Bernoulli(logits=z @ params["dec_w"] + params["dec_b"])
        kl = jnp.sum(q.log_prob(z) - dist.Bernoulli(probs=0.5).log_prob(z), axis=-1)
        return jnp.mean(kl - jnp.sum(px.log_prob(x), axis=-1))

    k = jax.random.split(jax.random.key(0), 5)
    params = {
        "enc_w": 0.1 * jax.random.normal(k[0], (PIXELS, LATENTS)),
        "enc_b": 0.1 * jax.random.normal(k[1], (LATENTS,)),
        "dec_w": 0.1 * jax.random.normal(k[2], (LATENTS, PIXELS)),
        "dec_b": 0.1 * jax.random.normal(k[3], (PIXELS,)),
    }
    data = np.asarray(jax.random.uniform(k[4], (BATCH, PIXELS)) < 0.3, np.float32)

    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices)
    rows = NamedSharding(mesh, P("data"))
    # This process's rows of the global batch, where its devices hold them.
    n_proc, pid = jax.process_count(), jax.process_index()
    local = data.reshape(n_proc, -1, PIXELS)[pid]
    x = jax.make_array_from_process_local_data(rows, local, data.shape)
    replicated = NamedSharding(mesh, P())
    params = jax.device_put(params, replicated)

    @partial(jax.jit, out_shardings=replicated)  # every process holds the whole result
    def step(params, x, key):
        grads = scg.scg_grad(neg_elbo)(params, x, key)
        loss = neg_elbo(params, x, key)
        return jax.tree.map(lambda p, g: p - args.lr * g, params, grads), grads, loss

    if pid == 0:
        print(
            f"{n_proc} process(es), {len(devices)} devices ({devices[0].platform}), "
            f"batch {BATCH} sharded {BATCH // len(devices)} rows per device"
        )
    key = jax.random.key(1)
    first: dict[str, np.ndarray] = {}
    losses = []
    for _ in range(args.steps):
        key, sub = jax.random.split(key)
        params, grads, loss = step(params, x, sub)
        if not first:
            first = {k: np.asarray(g.addressable_data(0)) for k, g in grads.items()}
        losses.append(float(loss.addressable_data(0)))
    if pid == 0:
        print(f"loss: first {losses[0]:.3f}, last {losses[-1]:.3f} after {args.steps} steps")
        if args.out:
            np.savez(args.out, **first)  # pyright: ignore[reportArgumentType]
    return 0


if __name__ == "__main__":
    sys.exit(main())

# temporary GPU diagnostic (deleted after use)
import sys, os
sys.path.insert(0, os.path.dirname(__file__)); sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax, jax.numpy as jnp, numpy as np
import overhead as o
params, x = o.vae_problem()
v = "log q: element, log p: whole, recon: example"
for kk in (42, 7):
    key = jax.random.PRNGKey(kk)
    with jax.default_matmul_precision("highest"):
        val, _ = jax.jit(jax.value_and_grad(o.CASES["vae"]["hands"]["whole"]()))(params, key, x)
        cost = jax.jit(o.make_vae_cost())(params, key, x)
        gs = jax.jit(o.make_scg("vae"))(params, key, x)
        gh = jax.jit(o.make_hand("vae", v))(params, key, x)
        gh2 = jax.jit(o.make_hand("vae", v))(params, key, x)
    print("key", kk, "whole-box surrogate value / cost - 1 =", float(val / cost - 1))
    for n in gs:
        print("  ", n, "scg-hand", o._max_rel_err(gs[n], gh[n]), "hand-hand", o._max_rel_err(gh2[n], gh[n]))

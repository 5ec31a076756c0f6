# temporary diagnostic (to be deleted)
import sys, os
sys.path.insert(0, os.path.dirname(__file__))
import jax, jax.numpy as jnp, numpy as np
import overhead as o
def check(case, prec):
    params, data = o.CASES[case]["problem"]()
    keys = [jax.random.PRNGKey(i) for i in (42, 7)]
    try:
        if prec:
            with jax.default_matmul_precision(prec):
                r = o.match_estimator(case, lambda k: (params, k, data), keys, 1e-4)
        else:
            r = o.match_estimator(case, lambda k: (params, k, data), keys, 1e-4)
        print(jax.devices()[0].platform, case, prec, "MATCH", r, flush=True)
    except AssertionError as e:
        print(jax.devices()[0].platform, case, prec, "FAIL", str(e).replace("\n", " | "), flush=True)
for case in ("vae", "rl"):
    for prec in (None, "highest"):
        check(case, prec)
# logits: are the sampled z the same in two different programs?
params, x = o.vae_problem(); key = jax.random.PRNGKey(42)
import numpyro.distributions as dist
f1 = jax.jit(lambda p, x: x @ p["enc_w"] + p["enc_b"])
def f2(p, x):
    l = x @ p["enc_w"] + p["enc_b"]
    return l, jnp.tanh(l) @ p["dec_w"]
l1 = f1(params, x); l2 = jax.jit(f2)(params, x)[0]
l3 = np.asarray(x, np.float64) @ np.asarray(params["enc_w"], np.float64) + np.asarray(params["enc_b"], np.float64)
print("logit diff between programs", float(jnp.max(jnp.abs(l1 - l2))), "vs float64", float(np.max(np.abs(np.asarray(l1) - l3))))

"""First-order weights: a value of 0 whose first derivative is an estimator's.

The antithetic (`"arm"`, `"disarm"`) and measure-valued (`"measure_valued"`) estimators
give a site's parameter `θ` the derivative `Σ_r a_r c_r` of the costs `c_r` at a few
alternative values of the site, with coefficients `a_r` that are not the derivative of
anything the surrogate could hold at every order. Their surrogate weights each cost by
`v_r + weight(θ, a_r)`, where `weight` has the value 0 and the derivative `a_r · dθ`:
the first derivative of the surrogate is the estimator, and its value the plain average.

A second derivative through `θ` is not an unbiased estimate of anything, so it is
refused: the tangent of `weight` is `scaled_p(dθ, a, θ)`, the product `a · dθ`, linear
in `dθ` (it transposes to itself), whose own derivative raises a clear error. It takes
`θ` as an operand, so any second derivative in a direction that moves `θ` meets it
(also when `a` and the costs do not move: ARM's `u − ½`), while a first derivative
(forward or reverse, under `jit`, `vmap`, `shard_map`) never differentiates it. That
holds for `jax.hessian` of the surrogate, `jax.grad` of a function of `scg_grad`'s
result (MAML), and an scgjax transform around another (the weight is a primitive, so an
outer interpreter keeps it). Second derivatives in directions that do not move `θ` are
unaffected, and right (the estimators are linear in the costs).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.interpreters import ad, batching, mlir

from . import _compat

weight_p = _compat.Primitive("scg_first_order_weight")
scaled_p = _compat.Primitive("scg_first_order_tangent")


def weight(param, coef, what: str):
    """0 (shaped like `param`), with derivative `coef · dparam` (`coef` held fixed,
    broadcast to `param`'s shape). `what` names the estimator in the error that a
    second derivative through `param` raises."""
    param = jnp.asarray(param)
    coef = jnp.broadcast_to(lax.stop_gradient(jnp.asarray(coef, param.dtype)), param.shape)
    return weight_p.bind(param, coef, what=what)


def _weight_impl(param, coef, *, what):
    del coef, what
    return jnp.zeros_like(param)


def _weight_jvp(primals, tangents, *, what):
    param, coef = primals
    dparam, _ = tangents
    out = weight_p.bind(param, coef, what=what)
    if type(dparam) is ad.Zero:
        return out, _compat.zero_tangent(out)
    return out, scaled_p.bind(dparam, coef, param, what=what)


def _elementwise_batch(prim):
    def rule(args, dims, **params):
        size, spec = next(
            (a.shape[d], _compat.batch_axis_spec(a, d)) for a, d in zip(args, dims) if d is not None
        )
        moved = [
            _compat.broadcast_leading(a, size, spec) if d is None else jnp.moveaxis(a, d, 0)
            for a, d in zip(args, dims)
        ]
        return prim.bind(*moved, **params), 0

    return rule


weight_p.def_impl(_weight_impl)
weight_p.def_abstract_eval(lambda param, coef, *, what: param)
ad.primitive_jvps[weight_p] = _weight_jvp
batching.primitive_batchers[weight_p] = _elementwise_batch(weight_p)
mlir.register_lowering(weight_p, mlir.lower_fun(_weight_impl, multiple_results=False))


def _scaled_impl(dparam, coef, param, *, what):
    del param, what
    return coef * dparam


def _scaled_jvp(primals, tangents, *, what):
    del primals, tangents
    raise ValueError(
        f"scgjax: a second derivative through the parameters of a site drawn with "
        f"estimator={what!r}, which estimates first derivatives only (differentiating its "
        "estimate again is not an unbiased estimate of anything). Use estimator='score' "
        "or 'enum' (every order) for this site where you need second derivatives "
        "(jax.hessian, MAML/LOLA, a derivative of scg_grad's result), or 'pathwise' "
        "where it applies."
    )


def _scaled_transpose(ct, dparam, coef, param, *, what):
    del dparam
    if type(ct) is ad.Zero:
        return [ct, None, None]
    return [scaled_p.bind(ct, coef, param, what=what), None, None]


scaled_p.def_impl(_scaled_impl)
scaled_p.def_abstract_eval(lambda dparam, coef, param, *, what: dparam)
ad.primitive_jvps[scaled_p] = _scaled_jvp
ad.primitive_transposes[scaled_p] = _scaled_transpose
batching.primitive_batchers[scaled_p] = _elementwise_batch(scaled_p)
mlir.register_lowering(scaled_p, mlir.lower_fun(_scaled_impl, multiple_results=False))

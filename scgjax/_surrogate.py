"""The public transforms: `surrogate`, `scg_grad`, `scg_value_and_grad`.

`surrogate(f)` traces `f` to a jaxpr, evaluates it with the SCG interpreter (which draws
every sample, records the score-function nodes and splits the cost into terms) and
returns the DiCE objective `Σ_c ⊡(Σ_{w upstream of c} log p(w)) · c`. Its value is the
cost, and `jax.grad` of it is the estimator of Schulman et al. (2015); because of the magic
box, `jax.hessian`/`jax.jacfwd` of it are unbiased too (Foerster et al. 2018).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import _control_flow  # noqa: F401  (registers the higher-order rules)
from . import _graph, _interpret
from ._graph import Graph, Val


def _is_array_like(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, complex, bool)) \
        or isinstance(x, jax.core.Tracer)


def _trace(f: Callable, args: tuple, kwargs: dict, has_aux: bool):
    """Traces `f`; returns (closed jaxpr, dynamic leaves, output tree)."""
    leaves, in_tree = jax.tree_util.tree_flatten((args, kwargs))
    dynamic = [_is_array_like(x) for x in leaves]
    dyn_leaves = [x for x, d in zip(leaves, dynamic) if d]

    def flat_f(*dyn):
        it = iter(dyn)
        full = [next(it) if d else x for x, d in zip(leaves, dynamic)]
        a, kw = jax.tree_util.tree_unflatten(in_tree, full)
        return f(*a, **kw)

    closed, out_shape = jax.make_jaxpr(flat_f, return_shape=True)(*dyn_leaves)
    cost_shape = out_shape
    if has_aux:
        if not (isinstance(out_shape, (tuple, list)) and len(out_shape) == 2):
            raise TypeError(
                "scgjax: with has_aux=True, f must return a pair (cost, aux), got "
                f"{jax.tree_util.tree_structure(out_shape)}.")
        cost_shape = out_shape[0]
    _check_cost(cost_shape)
    return closed, dyn_leaves, jax.tree_util.tree_structure(out_shape)


def _check_cost(cost_shape: Any) -> None:
    if not isinstance(cost_shape, jax.ShapeDtypeStruct):
        raise TypeError(
            "scgjax: f must return a scalar cost (a single float array of shape ()), got "
            f"a {jax.tree_util.tree_structure(cost_shape)}. To return more, use "
            "has_aux=True and return (cost, aux).")
    if cost_shape.shape != ():
        raise ValueError(
            f"scgjax: f must return a scalar cost, got an array of shape {cost_shape.shape}. "
            "Reduce it, e.g. with .sum() or .mean(), to the quantity whose expectation you "
            "want to differentiate.")
    if not jnp.issubdtype(cost_shape.dtype, jnp.floating):
        raise TypeError(
            f"scgjax: f must return a floating-point scalar cost, got dtype "
            f"{cost_shape.dtype}. Convert it, e.g. with .astype(jnp.float32).")


def _evaluate(f, args, kwargs, has_aux):
    """Runs the SCG interpreter on `f`: (cost `Val`, aux values, graph)."""
    closed, dyn_leaves, out_tree = _trace(f, args, kwargs, has_aux)
    graph = Graph()
    ctx = _interpret.Context((), graph)
    outs = _interpret.eval_jaxpr(ctx, closed.jaxpr, [Val(c) for c in closed.consts],
                                 [Val(x) for x in dyn_leaves])
    values = jax.tree_util.tree_unflatten(out_tree, [v.value for v in outs])
    aux = values[1] if has_aux else None
    return outs[0], aux, graph


def surrogate(f: Callable, *, has_aux: bool = False) -> Callable:
    """The DiCE surrogate objective of a stochastic program.

    Args:
      f: a function of arrays (and pytrees of arrays) that draws samples with
        `scgjax.sample` and returns a scalar cost (or `(cost, aux)` with `has_aux`).
      has_aux: whether `f` returns `(cost, aux)`.

    Returns:
      A function with `f`'s signature whose value equals `f`'s cost for the same
      arguments (and key), and whose derivatives of every order with respect to any
      argument (`jax.grad`, `jax.hessian`, `jax.jacfwd`) are unbiased estimates of the
      derivatives of `E[cost]`. With `has_aux`, it returns `(surrogate, aux)`.

    Example:
      >>> L = scg.surrogate(f)(theta, key)        # == f(theta, key)
      >>> H = jax.hessian(scg.surrogate(f))(theta, key)
    """

    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        cost, aux, graph = _evaluate(f, args, kwargs, has_aux)
        value = _graph.dice_objective(cost, graph)
        return (value, aux) if has_aux else value

    return wrapped


def scg_value_and_grad(f: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False) -> Callable:
    """Like `jax.value_and_grad`, with an unbiased estimate of the gradient of `E[f]`.

    Args:
      f: a stochastic program (see `surrogate`).
      argnums: which positional argument(s) to differentiate, as in `jax.grad`.
      has_aux: whether `f` returns `(cost, aux)`.

    Returns:
      A function returning `(cost, grad)`, or `((cost, aux), grad)` with `has_aux`.
    """
    return jax.value_and_grad(surrogate(f, has_aux=has_aux), argnums=argnums, has_aux=has_aux)


def scg_grad(f: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False) -> Callable:
    """Like `jax.grad`: an unbiased estimate of the gradient of `E[f]`.

    Score-function (REINFORCE) terms are added for draws that are not reparameterized,
    each weighted only by the cost terms downstream of it; reparameterized draws are
    differentiated through.

    Args:
      f: a stochastic program (see `surrogate`).
      argnums: which positional argument(s) to differentiate, as in `jax.grad`.
      has_aux: whether `f` returns `(cost, aux)`; then this returns `(grad, aux)`.

    Example:
      >>> g = scg.scg_grad(f)(theta, key)
      >>> g = jax.jit(jax.vmap(scg.scg_grad(f), (None, 0)))(theta, keys).mean(0)
    """
    return jax.grad(surrogate(f, has_aux=has_aux), argnums=argnums, has_aux=has_aux)


def describe(f: Callable, *, has_aux: bool = False) -> Callable[..., str]:
    """A table of the sample sites of `f`: estimator, shape, and the cost terms each
    score node weights. Traces `f` abstractly; nothing is computed.

    Example:
      >>> print(scg.describe(f)(theta, key))
      node  distribution     estimator  shape  weights  source
      0     BernoulliLogits  score      ()     1 of 2   quickstart.py:20 (f)
      ...
    """

    @functools.wraps(f)
    def wrapped(*args, **kwargs) -> str:
        box: dict = {}

        def run(*args, **kwargs):
            cost, _, graph = _evaluate(f, args, kwargs, has_aux)
            box["cost"], box["graph"] = cost, graph
            return cost.value

        jax.eval_shape(run, *args, **kwargs)
        cost, graph = box["cost"], box["graph"]
        weights = _graph.downstream_costs(cost)
        n_terms = len(cost.term_items())
        rows = [("node", "distribution", "estimator", "shape", "weights", "source")]
        for i, node in enumerate(graph.nodes.values()):
            weighted = (f"{len(weights.get(node.id, []))} of {n_terms} cost terms"
                        if node.estimator == "score" else "-")
            rows.append((str(i), node.distribution, node.estimator, str(node.shape),
                         weighted, node.source))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()
                         for r in rows)

    return wrapped

"""The jaxpr interpreter that turns a stochastic program into its graph.

`eval_jaxpr` walks a jaxpr once. Every value is a `Val` (value, dependencies, additive
terms). At a `sample` equation it draws the value (stop-gradient for score nodes),
computes the node's log-probability and records the node; every other equation is
re-bound unchanged on the values, and its output depends on what its inputs depend on.
Linear equations on the cost's additive tail also map the terms of their inputs.

Rules live in registries keyed by primitive:

* `higher_order_rules[prim](ctx, index, eqn, invals) -> outvals` for primitives with sub-jaxprs
  that contain samples (`_control_flow.py` registers one small rule per primitive);
* `term_rules[name](eqn, invals, out_value) -> terms | None` for the linear primitives
  that split costs into terms (keyed by primitive name).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from . import _compat, _graph, _logprob, _sample
from ._graph import NO_DEPS, Graph, NodeId, StochasticNode, Val

higher_order_rules: dict[Any, Callable] = {}
term_rules: dict[str, Callable] = {}
# Higher-order primitives whose rule also runs without samples inside, whenever an input
# depends on a node: it tracks dependencies per output and carries cost terms through.
DATAFLOW_RULES = frozenset({"jit", "pjit", "closed_call", "remat2", "checkpoint", "scan",
                            "cond"})


@dataclasses.dataclass
class Context:
    """Where the interpreter is: the node-id prefix and the graph being filled."""

    path: NodeId
    graph: Graph

    def child(self, *indices: int) -> Context:
        """A context for a sub-jaxpr of the equation at `indices`, with a graph of its own."""
        return Context(self.path + indices, Graph())


# -- Does a jaxpr draw samples? ----------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def _jaxpr_has_sample(jaxpr: _compat.Jaxpr) -> bool:
    return any(eqn_has_sample(e) for e in jaxpr.eqns)


def eqn_has_sample(eqn) -> bool:
    if eqn.primitive is _sample.sample_p:
        return True
    return any(_jaxpr_has_sample(j) for j in _compat.iter_subjaxprs(eqn.params))


def jaxpr_has_sample(jaxpr) -> bool:
    return _jaxpr_has_sample(_compat.open_jaxpr(jaxpr)[0])


# -- The evaluation loop -----------------------------------------------------------------

def eval_jaxpr(ctx: Context, jaxpr: _compat.Jaxpr, consts: list[Val], args: list[Val]) -> list[Val]:
    """Evaluates `jaxpr` on `Val`s, recording score nodes in `ctx.graph`."""
    env: dict[Any, Val] = {}

    def read(v) -> Val:
        if isinstance(v, _compat.Literal):
            return Val(v.val)
        return env[v]

    if len(args) != len(jaxpr.invars):
        raise AssertionError(f"{len(args)} arguments for {len(jaxpr.invars)} inputs")
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for index, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        outvals = eval_equation(ctx, index, eqn, invals)
        for v, out in zip(eqn.outvars, outvals):
            if not isinstance(v, _compat.DropVar):
                env[v] = out
    return [read(v) for v in jaxpr.outvars]


def eval_equation(ctx: Context, index: int, eqn, invals: list[Val]) -> list[Val]:
    prim = eqn.primitive
    if prim is _sample.sample_p:
        return [sample_rule(ctx, index, eqn, invals)]
    if eqn_has_sample(eqn) or (prim.name in DATAFLOW_RULES and any(v.deps for v in invals)):
        rule = higher_order_rules.get(prim)
        if rule is None:
            raise NotImplementedError(
                f"scgjax: scg.sample inside `{prim.name}` is not supported"
                f"{_at(eqn)}. Draw the sample outside the `{prim.name}` and pass it in."
            )
        return rule(ctx, index, eqn, invals)
    return default_rule(eqn, invals)


def default_rule(eqn, invals: list[Val]) -> list[Val]:
    """Re-binds the equation unchanged; outputs depend on everything the inputs do."""
    outs = _compat.bind_equation(eqn, [v.value for v in invals])
    deps = _graph.union(v.deps for v in invals)
    rule = term_rules.get(eqn.primitive.name)
    if deps and len(outs) == 1 and rule is not None:
        terms = rule(eqn, invals, outs[0])
        if terms is not None:
            return [_graph.make_val(outs[0], terms)]
    return [Val(o, deps) for o in outs]


def _at(eqn) -> str:
    where = _compat.source_info(eqn)
    return f" (at {where})" if where else ""


# -- Stochastic nodes --------------------------------------------------------------------

def sample_rule(ctx: Context, index: int, eqn, invals: list[Val]) -> Val:
    """Draws the value; for a score node also records its log-probability."""
    params = eqn.params
    key, *leaves = (v.value for v in invals)
    deps = _graph.union(v.deps for v in invals)
    spec, n_batch = params["spec"], params["n_batch"]
    pathwise = params["estimator"] == "pathwise"
    value = _sample.draw(key, leaves, spec=spec, sample_shape=params["sample_shape"],
                         n_batch=n_batch, reparameterized=pathwise)
    node_id, source = ctx.path + (index,), _compat.source_info(eqn)
    if pathwise:
        ctx.graph.add(StochasticNode(node_id, spec.name, "pathwise", jnp.shape(value), source))
        return Val(value, deps)
    value = lax.stop_gradient(value)
    log_prob = _sample.log_prob(value, leaves, spec=spec, n_batch=n_batch,
                                score_log_prob=_logprob.score_log_prob)
    node = StochasticNode(node_id, spec.name, "score", jnp.shape(log_prob), source)
    ctx.graph.add(node, log_prob)
    return Val(value, deps | {node.id})


# -- Linear equations: how cost terms pass through them ----------------------------------

def _map_terms(eqn, invals: list[Val], position: int) -> dict | None:
    """Terms of `invals[position]` pushed through `eqn`, the other operands fixed; None
    when that operand is a single term (then the output is one term too)."""
    if not invals[position].has_terms:
        return None
    others = [v.value for v in invals]
    out = {}
    for deps, t in invals[position].term_items():
        args = list(others)
        args[position] = t
        out[deps] = _compat.bind_equation(eqn, args)[0]
    return out


def _unary_linear(eqn, invals, out):
    if len(invals) != 1:
        return None
    return _map_terms(eqn, invals, 0)


def _add(eqn, invals, out):
    a, b = invals
    if not (a.has_terms or b.has_terms) and a.deps == b.deps:
        return None
    return _graph.add_terms(a.term_items(), b.term_items(), shape=jnp.shape(out))


def _sub(eqn, invals, out):
    a, b = invals
    if not (a.has_terms or b.has_terms) and a.deps == b.deps:
        return None
    negated = [(d, -t) for d, t in b.term_items()]
    return _graph.add_terms(a.term_items(), negated, shape=jnp.shape(out))


def _concatenate(eqn, invals, out):
    """(concatenate, stack) Each operand's terms, embedded with zeros in place of the other operands."""
    if not any(v.has_terms for v in invals) and len({v.deps for v in invals}) == 1:
        return None
    zeros = [jnp.zeros_like(v.value) for v in invals]
    pieces = []
    for i, v in enumerate(invals):
        for deps, t in v.term_items():
            args = zeros[:i] + [t] + zeros[i + 1:]
            pieces.append((deps, _compat.bind_equation(eqn, args)[0]))
    return _graph.add_terms(pieces)


def _linear_in_one(*positions):
    """Linear in the operand at one of `positions` when every other operand is sample-free."""

    def rule(eqn, invals, out):
        for p in positions:
            if all(not v.deps for i, v in enumerate(invals) if i != p):
                return _map_terms(eqn, invals, p)
        return None

    return rule


# Keyed by primitive name: some (e.g. `stack`) are not exported by every JAX version.
for _name in ("neg", "reduce_sum", "convert_element_type", "broadcast_in_dim", "reshape",
              "squeeze", "expand_dims", "transpose", "copy", "copy_p", "real",
              "reduce_precision"):
    term_rules[_name] = _unary_linear
term_rules["add"] = term_rules["add_any"] = _add
term_rules["sub"] = _sub
term_rules["concatenate"] = term_rules["stack"] = _concatenate
term_rules["mul"] = _linear_in_one(0, 1)
term_rules["div"] = _linear_in_one(0)
term_rules["dot_general"] = _linear_in_one(0, 1)

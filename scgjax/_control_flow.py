"""One small rule per higher-order primitive whose sub-jaxpr draws samples.

Each rule re-enters JAX through the public combinator (`jax.jit`, `lax.scan`,
`lax.switch`, `lax.while_loop`, `jax.checkpoint`) with a body that runs the interpreter
on the sub-jaxpr, so the emitted program keeps the user's structure. Dependencies and
node metadata are static Python values; they leave the traced body through `meta`, a
dict the body fills while it is traced. Arrays (values, cost terms, log-probabilities)
leave it as ordinary outputs.

Across a loop boundary a value's additive terms are collapsed into one term: inside
`scan` bodies, every output (carry and stacked) depends on the nodes drawn in the loop
that reach it, in any iteration (step-level causality is on the roadmap).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from . import _compat, _graph
from ._graph import Graph, Val
from ._interpret import Context, eval_jaxpr, higher_order_rules, jaxpr_has_sample

P = _compat.primitives


# -- Crossing a combinator boundary ------------------------------------------------------

def pack(vals: list[Val]) -> tuple[list[Any], list[tuple]]:
    """Arrays and static structure of `vals` (values first, then each one's terms)."""
    arrays, struct = [], []
    for v in vals:
        arrays.append(v.value)
        if v.has_terms:
            keys = tuple(v.terms)
            arrays.extend(v.terms[k] for k in keys)
            struct.append((v.deps, keys))
        else:
            struct.append((v.deps, None))
    return arrays, struct


def unpack(arrays: list[Any], struct: list[tuple]) -> list[Val]:
    vals, i = [], 0
    for deps, keys in struct:
        value = arrays[i]
        i += 1
        if keys is None:
            vals.append(Val(value, deps))
        else:
            terms = dict(zip(keys, arrays[i:i + len(keys)]))
            i += len(keys)
            vals.append(Val(value, deps, terms))
    return vals


def _const_vals(consts) -> list[Val]:
    return [Val(c) for c in consts]


def _run(ctx: Context, jaxpr, consts, args: list[Val], meta: dict) -> tuple[list, list]:
    """Evaluates a sub-jaxpr; returns packed outputs and log-probs, fills `meta`."""
    graph = Graph()
    outs = eval_jaxpr(Context(ctx.path, graph), jaxpr, _const_vals(consts), args)
    arrays, struct = pack(outs)
    meta["struct"] = struct
    meta["nodes"] = list(graph.nodes.values())
    return arrays, list(graph.log_probs.values())


def _stacked(nodes, shape_prefix: tuple[int, ...]):
    return [dataclasses.replace(n, shape=shape_prefix + n.shape) for n in nodes]


def _shape_struct(x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def _slice_struct(x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x))


# -- jit and other calls -----------------------------------------------------------------

def _call_rule(wrap):
    """A rule for call-like primitives: `wrap(fn, params)` re-enters JAX around `fn`."""

    def rule(ctx: Context, index: int, eqn, invals: list[Val]) -> list[Val]:
        key = "jaxpr" if "jaxpr" in eqn.params else "call_jaxpr"
        jaxpr, consts = _compat.open_jaxpr(eqn.params[key])
        in_arrays, in_struct = pack(invals)
        meta: dict = {}
        sub = ctx.child(index)

        def inner(*arrays):
            return _run(sub, jaxpr, consts, unpack(list(arrays), in_struct), meta)

        inner.__name__ = str(eqn.params.get("name", eqn.primitive.name))
        out_arrays, log_probs = wrap(inner, eqn.params)(*in_arrays)
        ctx.graph.merge(meta["nodes"], log_probs)
        return unpack(list(out_arrays), meta["struct"])

    return rule


higher_order_rules[P.jit_p] = _call_rule(lambda fn, params: jax.jit(fn))
higher_order_rules[P.remat_p] = _call_rule(
    lambda fn, params: jax.checkpoint(fn, prevent_cse=params.get("prevent_cse", True),
                                      policy=params.get("policy")))
higher_order_rules[P.closed_call_p] = _call_rule(lambda fn, params: fn)
if hasattr(P, "core_call_p"):  # pragma: no cover - older JAX only
    higher_order_rules[P.core_call_p] = _call_rule(lambda fn, params: fn)


# -- scan ----------------------------------------------------------------------------------

def _scan_rule(ctx: Context, index: int, eqn, invals: list[Val]) -> list[Val]:
    params = eqn.params
    num_consts, num_carry = _compat.scan_layout(params)
    jaxpr, jconsts = _compat.open_jaxpr(params["jaxpr"])
    invals = [v.collapsed() for v in invals]
    consts = invals[:num_consts]
    init = invals[num_consts:num_consts + num_carry]
    xs = invals[num_consts + num_carry:]
    sub = ctx.child(index)

    def body_fn(carry_deps, meta):
        def body(carry, x):
            args = (consts + [Val(c, d) for c, d in zip(carry, carry_deps)]
                    + [Val(a, v.deps) for a, v in zip(x, xs)])
            arrays, log_probs = _run(sub, jaxpr, jconsts, args, meta)
            carry_out = unpack(arrays, meta["struct"])[:num_carry]
            meta["carry_deps"] = [v.deps for v in carry_out]
            n_carry_arrays = sum(1 if k is None else 1 + len(k)
                                 for _, k in meta["struct"][:num_carry])
            return [v.value for v in carry_out], (arrays[n_carry_arrays:], log_probs)
        return body

    # The carries' dependencies: the least fixpoint over one iteration.
    carry_deps = [v.deps for v in init]
    while True:
        meta: dict = {}
        jax.eval_shape(body_fn(carry_deps, meta), [_shape_struct(v.value) for v in init],
                       [_slice_struct(v.value) for v in xs])
        grown = [a | b for a, b in zip(carry_deps, meta["carry_deps"])]
        if grown == carry_deps:
            break
        carry_deps = grown

    meta = {}
    carry, (ys_arrays, log_probs) = lax.scan(
        body_fn(carry_deps, meta), [v.value for v in init], [v.value for v in xs],
        length=params["length"], reverse=params["reverse"], unroll=params["unroll"])
    assert all(a >= b for a, b in zip(carry_deps, meta["carry_deps"]))
    ctx.graph.merge(_stacked(meta["nodes"], (params["length"],)), log_probs)
    ys = unpack(list(ys_arrays), meta["struct"][num_carry:])
    return [Val(c, d) for c, d in zip(carry, carry_deps)] + ys


higher_order_rules[P.scan_p] = _scan_rule


# -- cond / switch -------------------------------------------------------------------------

def _cond_rule(ctx: Context, index: int, eqn, invals: list[Val]) -> list[Val]:
    branches = [_compat.open_jaxpr(b) for b in eqn.params["branches"]]
    which, *ops = invals
    ops = [v.collapsed() for v in ops]
    op_structs = [_shape_struct(v.value) for v in ops]

    def branch_fn(b, meta):
        jaxpr, consts = branches[b]
        sub = ctx.child(index, b)

        def fn(*values):
            args = [Val(x, v.deps) for x, v in zip(values, ops)]
            return _run(sub, jaxpr, consts, args, meta)
        return fn

    # First pass: what each branch returns and which nodes it draws.
    metas, shapes = [], []
    for b in range(len(branches)):
        meta: dict = {}
        _, lp_shapes = jax.eval_shape(branch_fn(b, meta), *op_structs)
        metas.append(meta)
        shapes.append(lp_shapes)
    n_out = len(metas[0]["struct"])
    out_keys = [sorted({k for m in metas for k in _keys(m["struct"][j])}, key=_order)
                for j in range(n_out)]
    score_nodes = [(b, i, node) for b, m in enumerate(metas)
                   for i, node in enumerate(n for n in m["nodes"] if n.estimator == "score")]

    def unified(b):
        meta: dict = {}
        fn = branch_fn(b, meta)

        def out(*values):
            arrays, log_probs = fn(*values)
            vals = unpack(arrays, meta["struct"])
            result = [v.value for v in vals]
            for j, v in enumerate(vals):
                terms = dict(v.term_items())
                result.extend(terms[k] if k in terms else jnp.zeros_like(v.value)
                              for k in out_keys[j])
            result.extend(log_probs[i] if bb == b else jnp.zeros(shapes[bb][i].shape, shapes[bb][i].dtype)
                          for bb, i, _ in score_nodes)
            return result
        return out

    results = lax.switch(which.value, [unified(b) for b in range(len(branches))],
                         *[v.value for v in ops])
    values, rest = results[:n_out], results[n_out:]
    outs = []
    for j in range(n_out):
        terms_j, rest = rest[:len(out_keys[j])], rest[len(out_keys[j]):]
        terms = _graph.add_terms([(k | which.deps, t) for k, t in zip(out_keys[j], terms_j)])
        outs.append(_graph.make_val(values[j], terms))
    ctx.graph.merge([node for m in metas for node in m["nodes"]], rest)
    return outs


def _keys(struct_entry) -> tuple:
    deps, keys = struct_entry
    return (deps,) if keys is None else keys


def _order(deps) -> tuple:
    return (len(deps), sorted(deps))


higher_order_rules[P.cond_p] = _cond_rule


# -- while ---------------------------------------------------------------------------------

def _while_rule(ctx: Context, index: int, eqn, invals: list[Val]) -> list[Val]:
    params = eqn.params
    cond_jaxpr, cond_jconsts = _compat.open_jaxpr(params["cond_jaxpr"])
    body_jaxpr, body_jconsts = _compat.open_jaxpr(params["body_jaxpr"])
    cn, bn = params["cond_nconsts"], params["body_nconsts"]
    invals = [v.collapsed() for v in invals]
    cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
    if jaxpr_has_sample(cond_jaxpr):
        raise NotImplementedError(
            "scgjax: scg.sample inside the condition of a lax.while_loop is not "
            "supported. Draw it in the loop body and carry the result.")
    if any(_compat.is_reverse_mode_tracer(v.value) for v in invals):
        raise ValueError(
            "scgjax: a scg.sample inside lax.while_loop needs reverse-mode "
            "differentiation through the loop (its log-probability depends on the "
            "differentiated inputs), and JAX cannot reverse-differentiate a while_loop. "
            "Use lax.scan, or lax.fori_loop with static (Python int) bounds, which "
            "lowers to scan. Forward mode (jax.jvp, jax.jacfwd) and the value work.")
    sub = ctx.child(index)

    def pred_deps(carry_deps) -> _graph.Deps:
        """What the loop's trip count depends on, given the carries' dependencies."""
        box: dict = {}

        def pred(*carry):
            args = cconsts + [Val(c, d) for c, d in zip(carry, carry_deps)]
            out = eval_jaxpr(Context(sub.path, Graph()), cond_jaxpr,
                             _const_vals(cond_jconsts), args)[0]
            box["deps"] = out.deps
            return out.value

        jax.eval_shape(pred, *init_structs)
        return box["deps"]

    def body_fn(carry_deps, meta):
        def body(state):
            carry, totals = state
            args = bconsts + [Val(c, d) for c, d in zip(carry, carry_deps)]
            arrays, log_probs = _run(sub, body_jaxpr, body_jconsts, args, meta)
            outs = unpack(arrays, meta["struct"])
            meta["carry_deps"] = [v.deps for v in outs]
            totals = [t + lp for t, lp in zip(totals, log_probs)] if totals else log_probs
            return [v.value for v in outs], totals
        return body

    init_structs = [_shape_struct(v.value) for v in init]
    carry_deps = [v.deps for v in init]
    while True:
        meta: dict = {}
        _, lp_structs = jax.eval_shape(body_fn(carry_deps, meta), (init_structs, []))
        trip = pred_deps(carry_deps)
        grown = [a | b | trip for a, b in zip(carry_deps, meta["carry_deps"])]
        if grown == carry_deps:
            break
        carry_deps = grown

    zeros = [jnp.zeros(s.shape, s.dtype) for s in lp_structs]
    meta = {}
    body = body_fn(carry_deps, meta)

    def cond(state):
        carry, _ = state
        out = eval_jaxpr(Context(sub.path, Graph()), cond_jaxpr, _const_vals(cond_jconsts),
                         cconsts + [Val(c) for c in carry])
        return out[0].value

    carry, totals = lax.while_loop(cond, body, ([v.value for v in init], zeros))
    ctx.graph.merge(meta["nodes"], totals)
    return [Val(c, d) for c, d in zip(carry, carry_deps)]


higher_order_rules[P.while_p] = _while_rule


# -- custom derivatives: a sample inside would bypass the custom rule ----------------------

def _custom_rule(kind: str):
    def rule(ctx, index, eqn, invals):
        name = eqn.params.get("name", "")
        raise NotImplementedError(
            f"scgjax: scg.sample inside a jax.{kind} function{f' ({name})' if name else ''} "
            f"is not supported: its custom derivative rule cannot see the sample's "
            f"score-function term. Draw the sample outside the {kind} function and pass "
            f"the value in.")
    return rule


higher_order_rules[P.custom_jvp_call_p] = _custom_rule("custom_jvp")
higher_order_rules[P.custom_vjp_call_p] = _custom_rule("custom_vjp")

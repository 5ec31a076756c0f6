"""One small rule per higher-order primitive whose sub-jaxpr draws samples (or whose
inputs depend on samples, so that dependencies are tracked per output).

Each rule re-enters JAX through the public combinator (`jax.jit`, `lax.scan`,
`lax.switch`, `lax.while_loop`, `jax.checkpoint`) with a body that runs the interpreter
on the sub-jaxpr, so the emitted program keeps the user's structure. Dependencies and
node metadata are static Python values; they leave the traced body through `meta`, a
dict the body fills while it is traced. Arrays (values, cost terms, log-probabilities,
baseline terms) leave it as ordinary outputs.

`scan` gives causality: inside the body, a node's stacked axis is `Loop(level)`; values
from earlier iterations reach the body through the carry as `Loop(level, "lt")`. Lifted
out, a stacked output at step `t` depends on node elements at steps `== t`, `< t` or
`<= t` (`"gt"`/`"ge"` for `reverse=True`). A carry that accumulates, `c = c + r_t` or
`c = γ·c + r_t` with a sample-free loop constant `γ`, is split into its per-step
(discounted) increments, so a cost summed in the carry gets reward-to-go weights too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _compat, _deps, _graph, _interpret
from ._deps import ALL, Axis, Deps, Loop
from ._graph import Graph, Val
from ._interpret import (
    Context,
    const_val,
    eval_jaxpr,
    higher_order_rules,
    inside_call,
    jaxpr_has_sample,
)

P = _compat.primitives


# -- Crossing a combinator boundary ------------------------------------------------------


def pack(vals: list[Val]) -> tuple[list[Any], list[tuple]]:
    """Arrays and static structure of `vals` (values first, then each one's terms)."""
    arrays, struct = [], []
    for v in vals:
        arrays.append(v.value)
        if v.terms is not None:
            terms = v.terms
            keys = tuple(terms)
            arrays.extend(terms[k] for k in keys)
            struct.append((v.deps, keys))
        else:
            struct.append((v.deps, None))
    return arrays, struct


def unpack(arrays: list[Any], struct: list[tuple], lift=None) -> list[Val]:
    """The inverse of `pack`; `lift(deps)` maps dependencies on the way out."""
    lift = lift or (lambda d: d)
    vals, i = [], 0
    for deps, keys in struct:
        value = arrays[i]
        i += 1
        if keys is None:
            vals.append(Val(value, lift(deps)))
        else:
            items = [(lift(k[0]), t) for k, t in zip(keys, arrays[i : i + len(keys)])]
            i += len(keys)
            vals.append(_graph.make_val(value, lift(deps), items))
    return vals


def _n_arrays(struct) -> int:
    return sum(1 if k is None else 1 + len(k) for _, k in struct)


def _run(ctx: Context, jaxpr, consts, args: list[Val], meta: dict, extra_outvars=()):
    """Evaluates a sub-jaxpr in a fresh graph. Returns packed outputs, the graph's node
    arrays (`Graph.node_arrays`: score log-probs, records) and the sum of baseline
    terms; fills `meta` with the static structure."""
    graph = Graph(ctx.graph.record)
    sub = dataclasses.replace(ctx, graph=graph)
    outs = eval_jaxpr(sub, jaxpr, [const_val(c) for c in consts], args, extra_outvars)
    arrays, struct = pack(outs)
    meta["struct"] = struct
    meta["out_shapes"] = [tuple(np.shape(o.value)) for o in outs]
    meta["nodes"] = list(graph.nodes.values())
    meta["has_baseline"] = bool(graph.baseline_terms)
    meta["known"] = [o.known for o in outs]
    return arrays, graph.node_arrays(), graph.baseline_total()


def _with_known(vals: list[Val], known: list) -> list[Val]:
    """`vals` with the values known while tracing (index arrays) of the same positions."""
    return [v if k is None else dataclasses.replace(v, known=k) for v, k in zip(vals, known)]


def _adopt(ctx: Context, meta: dict, node_arrays, baseline_total, nodes=None) -> None:
    """Adds a sub-jaxpr's nodes (with their node arrays) and baseline terms to the
    enclosing graph."""
    ctx.graph.merge(meta["nodes"] if nodes is None else nodes, node_arrays)
    if meta["has_baseline"]:
        ctx.graph.baseline_terms.append(jnp.sum(baseline_total))


def _shape_struct(x) -> jax.ShapeDtypeStruct:
    # With its varying manual axes: a carry inside a `shard_map` body keeps its type.
    return _compat.shape_struct(jax.typeof(x))


def _slice_struct(x) -> jax.ShapeDtypeStruct:
    return _compat.shape_struct(jax.typeof(x), drop_leading=True)


# -- jit and other calls -----------------------------------------------------------------


def _call_rule(wrap):
    """A rule for call-like primitives: `wrap(fn, params)` re-enters JAX around `fn`."""

    def rule(ctx: Context, index: int, eqn, invals: list[Val]) -> list[Val]:
        key = "jaxpr" if "jaxpr" in eqn.params else "call_jaxpr"
        jaxpr, consts = _compat.open_jaxpr(eqn.params[key])
        in_arrays, in_struct = pack(invals)
        meta: dict = {}
        sub = ctx.child(index)

        in_shardings = eqn.params.get("in_shardings") or ()
        out_shardings = eqn.params.get("out_shardings") or ()

        def inner(*arrays):
            args = _with_known(unpack(list(arrays), in_struct), [v.known for v in invals])
            # The user's `jax.jit(..., in_shardings=, out_shardings=)` keep their effect
            # on the values (as constraints: the call's operands are now the values and
            # their terms). Donation is moot inside the enclosing program.
            args = [
                dataclasses.replace(v, value=_compat.constrain(v.value, sh))
                for v, sh in zip(args, _padded(in_shardings, len(args)))
            ]
            with inside_call(eqn):
                out_arrays, node_arrays, baseline_total = _run(sub, jaxpr, consts, args, meta)
            if any(_compat.is_sharding(sh) for sh in out_shardings):
                i = 0
                for (_, keys), sh in zip(
                    meta["struct"], _padded(out_shardings, len(meta["struct"]))
                ):
                    out_arrays[i] = _compat.constrain(out_arrays[i], sh)
                    i += 1 + (0 if keys is None else len(keys))
            return out_arrays, node_arrays, baseline_total

        inner.__name__ = str(eqn.params.get("name", eqn.primitive.name))
        out_arrays, log_probs, baseline_total = wrap(inner, eqn.params)(*in_arrays)
        _adopt(ctx, meta, log_probs, baseline_total)
        return _with_known(unpack(list(out_arrays), meta["struct"]), meta["known"])

    return rule


def _padded(shardings, n: int) -> list:
    shardings = list(shardings)
    return shardings + [None] * (n - len(shardings))


higher_order_rules[P.jit_p] = _call_rule(lambda fn, params: jax.jit(fn))
higher_order_rules[P.remat_p] = _call_rule(
    lambda fn, params: jax.checkpoint(
        fn, prevent_cse=params.get("prevent_cse", True), policy=params.get("policy")
    )
)
higher_order_rules[P.closed_call_p] = _call_rule(lambda fn, params: fn)


# -- scan ----------------------------------------------------------------------------------


def _accumulators(jaxpr, num_consts: int, num_carry: int) -> dict[int, tuple]:
    """Carries updated as `c = c + x` or `c = γ·c + x` (in either operand order), with `γ`
    a literal or a loop constant: carry index → (the variable `x`, the atom `γ` or None)."""
    producer = {}
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            producer[v] = eqn
    consts = set(jaxpr.invars[:num_consts])

    def source(v):  # looks through dtype conversions (e.g. of a weakly typed carry)
        while (
            not isinstance(v, _compat.Literal)
            and v in producer
            and producer[v].primitive.name in ("convert_element_type", "copy", "copy_p")
        ):
            v = producer[v].invars[0]
        return v

    def scaled_carry(v, c_in):
        """(True, γ) when `v` is c_in or γ·c_in with γ a literal or loop constant."""
        v = source(v)
        if v is c_in:
            return True, None
        eqn = producer.get(v) if not isinstance(v, _compat.Literal) else None
        if eqn is not None and eqn.primitive.name == "mul":
            for c, g in (eqn.invars, eqn.invars[::-1]):
                g_src = source(g)
                if source(c) is c_in and (isinstance(g_src, _compat.Literal) or g_src in consts):
                    return True, g_src
        return False, None

    out = {}
    for j in range(num_carry):
        c_in, c_out = jaxpr.invars[num_consts + j], jaxpr.outvars[j]
        eqn = producer.get(c_out) if not isinstance(c_out, _compat.Literal) else None
        if eqn is None or eqn.primitive.name not in ("add", "add_any"):
            continue
        a, b = eqn.invars
        for mine, other in ((a, b), (b, a)):
            is_carry, gamma = scaled_carry(mine, c_in)
            if (
                is_carry
                and not isinstance(other, _compat.Literal)
                and source(other) is not c_in
                and tuple(other.aval.shape) == tuple(c_in.aval.shape)
            ):  # no broadcast
                out[j] = (other, gamma)
                break
    return out


def _counters(jaxpr, num_consts, init, xs, level, length, reverse) -> dict:
    """The body inputs (carries, then xs, counted from 0) that equal the iteration plus a
    constant, as `LoopIndex`es: a carry that starts at a known integer and is
    incremented by 1 (`fori_loop`'s counter; a forward scan only), and an `xs` known to
    be `c + jnp.arange(length)` (its slice at iteration `t` is `c + t`)."""
    out = {}
    n_carry = len(init)
    producer = {v: e for e in jaxpr.eqns for v in e.outvars}
    for j, v in enumerate(init):
        c0 = _interpret._uniform(v.known) if np.ndim(v.known) == 0 else None
        c_in, c_out = jaxpr.invars[num_consts + j], jaxpr.outvars[j]
        eqn = None if isinstance(c_out, _compat.Literal) else producer.get(c_out)
        if reverse or c0 is None or eqn is None or eqn.primitive.name != "add":
            continue
        a, b = eqn.invars
        one = b if a is c_in else a if b is c_in else None
        li = _interpret.LoopIndex(level, c0, length)
        if (
            isinstance(one, _compat.Literal)
            and np.ndim(one.val) == 0
            and one.val == 1
            and _interpret._holds(c_in.aval.dtype, li)  # an int8 counter would wrap
        ):
            out[j] = li
    for i, v in enumerate(xs):
        k = v.known
        if isinstance(k, np.ndarray) and not np.ma.isMaskedArray(k) and k.shape == (length,):
            offset = int(k[0]) if length else 0
            if np.array_equal(k, offset + np.arange(length)):
                out[n_carry + i] = _interpret.LoopIndex(level, offset, length)
    return out


def _discount(gamma, exponent, term):
    """γ**exponent laid out on `term`'s axes: an optional leading step axis (when
    `exponent` has one), then the carry's axes (γ is a scalar or has the carry's rank),
    then the term's pending axes."""
    g, e = jnp.asarray(gamma), jnp.asarray(exponent)
    w = g.reshape((1,) * e.ndim + g.shape) ** e.reshape(e.shape + (1,) * g.ndim)
    return w.reshape(w.shape + (1,) * (np.ndim(term) - w.ndim)).astype(jnp.result_type(term))


def _scan_rule(ctx: Context, index: int, eqn, invals: list[Val]) -> list[Val]:
    params = eqn.params
    num_consts, num_carry = _compat.scan_layout(params)
    jaxpr, jconsts = _compat.open_jaxpr(params["jaxpr"])
    sub = ctx.child(index, new_loop=True)
    level, reverse, length = sub.level, params["reverse"], params["length"]
    accumulators = _accumulators(jaxpr, num_consts, num_carry)
    # A discount γ must not depend on a draw.
    accumulators = {
        j: (x, g)
        for j, (x, g) in accumulators.items()
        if g is None
        or isinstance(g, _compat.Literal)
        or not _deps.scored(invals[jaxpr.invars.index(g)].deps)
    }
    acc_index = sorted(accumulators)
    init_terms = {j: invals[num_consts + j] for j in acc_index}
    invals = [v.collapsed() for v in invals]
    consts = invals[:num_consts]
    init = invals[num_consts : num_consts + num_carry]
    xs = invals[num_consts + num_carry :]
    before = "gt" if reverse else "lt"  # the iterations that ran before this one

    def slice_deps(d: Deps) -> Deps:  # xs[t] inside the body
        return d.map_entries(
            lambda e: (
                (Loop(level, e.kind) if e.axis == 0 else Axis(e.axis - 1, e.kind))
                if isinstance(e, Axis)
                else e
            )
        )

    def carry_in(d: Deps) -> Deps:  # what the previous iterations left in the carry
        def fn(e):
            if isinstance(e, Loop) and e.level == level:
                kind = _deps.compose_kind(e.kind, before)
                return ALL if kind is None else Loop(level, kind)
            return e

        return d.map_entries(fn)

    def lift_stacked(d: Deps) -> Deps:  # a per-step output, stacked on axis 0
        return d.map_entries(
            lambda e: (
                Axis(0, e.kind)
                if isinstance(e, Loop) and e.level == level
                else (Axis(e.axis + 1, e.kind) if isinstance(e, Axis) else e)
            )
        )

    def lift_final(d: Deps) -> Deps:  # the final carry: every iteration
        return d.map_entries(lambda e: ALL if isinstance(e, Loop) and e.level == level else e)

    counters = _counters(jaxpr, num_consts, init, xs, level, length, reverse)
    xs_body = [Val(None, slice_deps(v.deps)) for v in xs]
    extra = [accumulators[j][0] for j in acc_index]
    # Replayed draws of the body's nodes are stacked along the loop: scanned like xs.
    draws = sub.draws or {}
    draw_ids = sorted(draws)
    draw_xs = [jnp.asarray(draws[n]) for n in draw_ids]
    for d in draw_xs:
        if np.ndim(d) == 0 or np.shape(d)[0] != length:
            raise ValueError(
                f"scgjax: a replayed draw inside a scan of length {length} needs a leading "
                f"axis of that length (one value per iteration), got shape {np.shape(d)}."
            )

    def body_fn(carry_deps, meta):
        def body(carry, x):
            x, x_draws = x[: len(xs)], x[len(xs) :]
            here = dataclasses.replace(sub, draws=dict(zip(draw_ids, x_draws)) or None)
            args = consts + [
                Val(c, d, known=counters.get(i))
                for i, (c, d) in enumerate(
                    zip(list(carry) + list(x), carry_deps + [v.deps for v in xs_body])
                )
            ]
            arrays, log_probs, baseline_total = _run(here, jaxpr, jconsts, args, meta, extra)
            outs = unpack(arrays, meta["struct"])
            meta["carry_deps"] = [v.deps for v in outs[:num_carry]]
            n_carry_arrays = _n_arrays(meta["struct"][:num_carry])
            return (
                [v.value for v in outs[:num_carry]],
                (arrays[n_carry_arrays:], log_probs, baseline_total),
            )

        return body

    # The carries' dependencies: the least fixpoint over one iteration.
    carry_deps = [carry_in(v.deps) for v in init]
    while True:
        meta: dict = {}
        jax.eval_shape(
            body_fn(carry_deps, meta),
            [_shape_struct(v.value) for v in init],
            [_slice_struct(v.value) for v in xs] + [_slice_struct(d) for d in draw_xs],
        )
        grown = [carry_in(_deps.join([a, b])) for a, b in zip(carry_deps, meta["carry_deps"])]
        if grown == carry_deps:
            break
        carry_deps = grown

    meta = {}
    carry, (ys_arrays, log_probs, baseline_total) = lax.scan(
        body_fn(carry_deps, meta),
        [v.value for v in init],
        [v.value for v in xs] + draw_xs,
        length=length,
        reverse=reverse,
        unroll=params["unroll"],
    )
    nodes = [
        dataclasses.replace(
            n,
            shape=(length,) + n.shape,
            parents=None if n.parents is None else lift_stacked(n.parents),
        )
        for n in meta["nodes"]
    ]
    _adopt(ctx, meta, log_probs, baseline_total, nodes)
    ys_and_increments = unpack(list(ys_arrays), meta["struct"][num_carry:], lift_stacked)
    n_ys = len(ys_and_increments) - len(extra)
    ys, increments = ys_and_increments[:n_ys], ys_and_increments[n_ys:]
    final_deps = [lift_final(_deps.join([a, b])) for a, b in zip(carry_deps, meta["carry_deps"])]
    final = [Val(c, d) for c, d in zip(carry, final_deps)]
    for j, inc in zip(acc_index, increments):
        # c_T = γ^T·c_0 + Σ_t γ^(steps after t)·x_t: each step's increment keeps its causal
        # weight, with the step axis moved to the pending axes.
        gamma = accumulators[j][1]
        g = None
        if gamma is not None:
            g = (
                gamma.val
                if isinstance(gamma, _compat.Literal)
                else invals[jaxpr.invars.index(gamma)].value
            )
        items = [
            (d, t if g is None else t * _discount(g, length, t))
            for d, t in init_terms[j].term_items()
        ]
        steps_after = jnp.arange(length) if reverse else length - 1 - jnp.arange(length)
        for d, t in inc.term_items():
            n = np.ndim(t)
            if g is not None:
                t = t * _discount(g, steps_after, t)
            moved = d.map_axes(lambda a, n=n: n - 1 if a == 0 else a - 1)
            items.append((moved, jnp.moveaxis(t, 0, -1)))
        if gamma is not None and not isinstance(gamma, _compat.Literal):
            items = _deps.with_sources(items, [invals[jaxpr.invars.index(gamma)]])
        final[j] = _graph.make_val(final[j].value, final[j].deps, items)
    return final + ys


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
        _, lp_shapes, _ = jax.eval_shape(branch_fn(b, meta), *op_structs)
        metas.append(meta)
        shapes.append(lp_shapes)
    n_out = len(metas[0]["struct"])
    out_keys = [
        _union_keys((m["struct"][j], m["out_shapes"][j]) for m in metas) for j in range(n_out)
    ]
    # Every branch's node arrays; a branch not taken gives zeros (log-prob 0, and when
    # recording, value 0 and drawn flag False).
    score = [(b, i) for b, lp_shapes in enumerate(shapes) for i in range(len(lp_shapes))]

    def unified(b):
        meta: dict = {}
        fn = branch_fn(b, meta)

        def out(*values):
            arrays, log_probs, baseline_total = fn(*values)
            vals = unpack(arrays, meta["struct"])
            result = [v.value for v in vals]
            for j, v in enumerate(vals):
                terms = {(d, tuple(np.shape(t))): t for d, t in v.term_items()}
                result.extend(
                    terms[k] if k in terms else jnp.zeros(k[1], jnp.result_type(v.value))
                    for k in out_keys[j]
                )
            result.extend(
                log_probs[i] if bb == b else jnp.zeros(shapes[bb][i].shape, shapes[bb][i].dtype)
                for bb, i in score
            )
            result.append(jnp.asarray(baseline_total, jnp.float32))
            return result

        return out

    results = lax.switch(
        which.value, [unified(b) for b in range(len(branches))], *[v.value for v in ops]
    )
    values, rest = results[:n_out], results[n_out:]
    outs = []
    for j in range(n_out):
        terms_j, rest = rest[: len(out_keys[j])], rest[len(out_keys[j]) :]
        deps_j = _deps.join([which.deps] + [m["struct"][j][0] for m in metas])
        items = [(_deps.join([k[0], which.deps]), t) for k, t in zip(out_keys[j], terms_j)]
        outs.append(_graph.make_val(values[j], deps_j, items))
    log_probs, baseline_total = rest[:-1], rest[-1]
    meta = {
        "nodes": [node for m in metas for node in m["nodes"]],
        "has_baseline": any(m["has_baseline"] for m in metas),
    }
    _adopt(ctx, meta, log_probs, baseline_total)
    return outs


def _union_keys(entries) -> list:
    """Every term key `(deps, shape)` that a branch gives output `j`, in a fixed order."""
    keys: dict = {}
    for (deps, ks), shape in entries:
        for k in ks if ks is not None else [(deps, shape)]:
            keys.setdefault(k, None)
    return list(keys)


higher_order_rules[P.cond_p] = _cond_rule


# -- while ---------------------------------------------------------------------------------


def _while_rule(ctx: Context, index: int, eqn, invals: list[Val]) -> list[Val]:
    params = eqn.params
    cond_jaxpr, cond_jconsts = _compat.open_jaxpr(params["cond_jaxpr"])
    body_jaxpr, body_jconsts = _compat.open_jaxpr(params["body_jaxpr"])
    cn, bn = params["cond_nconsts"], params["body_nconsts"]
    invals = [v.collapsed() for v in invals]
    cconsts, bconsts, init = invals[:cn], invals[cn : cn + bn], invals[cn + bn :]
    if jaxpr_has_sample(cond_jaxpr):
        raise NotImplementedError(
            "scgjax: scg.sample inside the condition of a lax.while_loop is not "
            "supported. Draw it in the loop body and carry the result."
        )
    if any(_compat.is_reverse_mode_tracer(v.value) for v in invals):
        raise ValueError(
            "scgjax: a scg.sample inside lax.while_loop needs reverse-mode "
            "differentiation through the loop (its log-probability depends on the "
            "differentiated inputs), and JAX cannot reverse-differentiate a while_loop. "
            "Use lax.scan, or lax.fori_loop with static (Python int) bounds, which "
            "lowers to scan. Forward mode (jax.jvp, jax.jacfwd) and the value work."
        )
    # A node's log-probabilities are summed over the iterations: its baseline term is
    # built in the body, per iteration.
    sub = dataclasses.replace(ctx.child(index), box_baselines=False)
    if (sub.draws or ctx.graph.record) and jaxpr_has_sample(body_jaxpr):
        raise NotImplementedError(
            "scgjax: draws inside lax.while_loop cannot be replayed or traced (the number "
            "of iterations is not known when tracing). Use lax.scan, or lax.fori_loop with "
            "static bounds."
        )
    init_structs = [_shape_struct(v.value) for v in init]

    def run_cond(carry_deps, carry):
        args = cconsts + [Val(c, d) for c, d in zip(carry, carry_deps)]
        return eval_jaxpr(
            dataclasses.replace(sub, graph=Graph()),
            cond_jaxpr,
            [const_val(c) for c in cond_jconsts],
            args,
        )[0]

    def trip_deps(carry_deps) -> Deps:
        """What the number of iterations depends on."""
        box: dict = {}

        def pred(*carry):
            out = run_cond(carry_deps, carry)
            box["deps"] = out.deps
            return out.value

        jax.eval_shape(pred, *init_structs)
        return box["deps"].coarsened()

    def body_fn(carry_deps, meta):
        def body(state):
            carry, totals, baseline_total = state
            args = bconsts + [Val(c, d) for c, d in zip(carry, carry_deps)]
            arrays, log_probs, bt = _run(sub, body_jaxpr, body_jconsts, args, meta)
            outs = unpack(arrays, meta["struct"])
            meta["carry_deps"] = [v.deps for v in outs]
            totals = [t + lp for t, lp in zip(totals, log_probs)] if totals else log_probs
            return [v.value for v in outs], totals, baseline_total + bt

        return body

    carry_deps = [v.deps for v in init]
    while True:
        meta: dict = {}
        _, lp_structs, _ = jax.eval_shape(body_fn(carry_deps, meta), (init_structs, [], 0.0))
        trip = trip_deps(carry_deps)
        grown = [_deps.join([a, b, trip]) for a, b in zip(carry_deps, meta["carry_deps"])]
        if grown == carry_deps:
            break
        carry_deps = grown

    zeros = [jnp.zeros(s.shape, s.dtype) for s in lp_structs]
    meta = {}
    carry, totals, baseline_total = lax.while_loop(
        lambda s: run_cond(carry_deps, s[0]).value,
        body_fn(carry_deps, meta),
        ([v.value for v in init], zeros, jnp.zeros((), jnp.float32)),
    )
    _adopt(ctx, meta, totals, baseline_total)
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
            f"the value in."
        )

    return rule


higher_order_rules[P.custom_jvp_call_p] = _custom_rule("custom_jvp")
higher_order_rules[P.custom_vjp_call_p] = _custom_rule("custom_vjp")

"""The `shard_map` rule: samples, costs and collectives inside a `shard_map` body.

A `shard_map` (and `jax.pmap`, which lowers to one) runs its body once per shard of the
manual mesh axes `M`. The rule re-enters JAX through `jax.shard_map` with a body that
runs the interpreter on the per-shard jaxpr: the values leave with the user's
`out_specs`, and everything the graph needs (cost terms, the nodes' log-probabilities
and records, baseline terms) leaves *stacked*, with one leading axis per manual axis
(`out_specs=P(*M)`), and is laid out globally outside.

A node drawn in the body is one node per shard. Its global log-probability is either

* *stacked*: `(n_a, n_b, ..., *local)`, one axis per manual axis, or
* *concatenated* along its first axis in the order of `M` (`(n·b0, ...)`), which lines
  up with a value that `out_specs` shards over `M` on an axis of the same block size;

whichever keeps more of the outputs' relations (plates) exact. Inside the body a
dependency on a node drawn there is on the same shard; collectives make it reach other
shards (`_deps.Lanes`, as under `vmap`). Lifted out, a relation entry on a value axis
stays exact only where the global index is the local one (an axis that `out_specs` does
not shard) or where the layout lines the shards up (a shard axis of block size 1 against
a stacked node axis, a sharded axis against a concatenated node axis); every other entry
becomes `ALL`, which costs variance only. Dependencies on nodes drawn outside enter with
`ALL` on the axes that `in_specs` shards.

A draw needs a key that differs on every shard: a key that is the same on some shards
(an unsharded key, not folded with `lax.axis_index`) would make those shards' draws the
same, and their score terms would count one draw several times. Such a program is
refused at trace time (`_check_keys_vary`).
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from . import _compat, _deps, _graph, _interpret, _sample
from ._control_flow import _adopt, _run
from ._deps import ALL, Axis, Deps, Lanes
from ._graph import Val
from ._interpret import Context, higher_order_rules

# -- Specs -------------------------------------------------------------------------------


def _entry_axes(entry: Any) -> tuple:
    """The mesh axes of one `PartitionSpec` entry, as a tuple."""
    if entry is None:
        return ()
    if isinstance(entry, (tuple, list)):
        return tuple(entry)
    if entry is PartitionSpec.UNCONSTRAINED:  # pragma: no cover - not in shard_map specs
        return ()
    return (entry,)


def _dim_axes(spec: Any, ndim: int) -> list[tuple]:
    """For each of `ndim` axes, the mesh axes that `spec` shards it over."""
    entries = tuple(spec) if spec is not None else ()
    return [_entry_axes(entries[k]) if k < len(entries) else () for k in range(ndim)]


def _manual_axes(params: dict) -> tuple:
    mesh = params["mesh"]
    manual = params.get("newly_manual_axes") or params.get("axis_names") or ()
    names = tuple(mesh.axis_names)
    return tuple(a for a in names if a in manual) if manual else names


# -- Keys: a draw's key must differ on every shard -----------------------------------------

_INVARIANT_OUT = frozenset(
    {"psum", "psum2", "psum_invariant", "pmax", "pmin", "all_gather", "all_gather_invariant"}
)
_VARYING_OUT = frozenset({"ppermute", "all_to_all", "psum_scatter", "reduce_scatter"})


def _names_of(params: dict) -> set:
    axes = params.get("axes", params.get("axis_name", ()))
    axes = axes if isinstance(axes, (tuple, list)) else (axes,)
    return {a for a in axes if not isinstance(a, int)}


def _varying(jaxpr, in_sets: list[set], on_sample) -> list[set]:
    """The mesh axes along which each output of `jaxpr` may differ between shards (a
    content analysis: `pvary` changes the type, not the values); calls
    `on_sample(eqn, key_set)` at every `sample` equation."""
    env: dict = dict(zip(jaxpr.invars, in_sets))

    def read(v) -> set:
        return set() if isinstance(v, _compat.Literal) else env.get(v, set())

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        union = set().union(*ins) if ins else set()
        name = eqn.primitive.name
        if eqn.primitive is _sample.sample_p:
            on_sample(eqn, ins[0])
            outs = [union] * len(eqn.outvars)
        elif name == "axis_index":
            outs = [_names_of(eqn.params)]
        elif name in _INVARIANT_OUT:
            outs = [union - _names_of(eqn.params)] * len(eqn.outvars)
        elif name in _VARYING_OUT:
            outs = [union | _names_of(eqn.params)] * len(eqn.outvars)
        elif name == "scan":
            outs = _varying_scan(eqn, ins, on_sample)
        elif name == "cond":
            # Each branch on the operands; which branch ran varies as the predicate.
            outs = [set(ins[0]) for _ in eqn.outvars]
            for branch in eqn.params["branches"]:
                sub, _ = _compat.open_jaxpr(branch)
                for o, b in zip(outs, _varying(sub, ins[1:], on_sample)):
                    o |= b
        elif name == "while":
            outs = _varying_while(eqn, ins, on_sample)
        else:
            subs = [j for j, _ in _compat.iter_subjaxprs_with_consts(eqn.params)]
            if len(subs) == 1 and len(subs[0].invars) == len(ins):
                # A call on its operands (jit, checkpoint, custom_jvp/vjp): position by
                # position, so an unsharded key stays unsharded inside.
                outs = _varying(subs[0], ins, on_sample)
                outs = outs if len(outs) == len(eqn.outvars) else [union] * len(eqn.outvars)
            else:
                for sub in subs:  # a cover: every input may reach every output
                    _varying(sub, [union] * len(sub.invars), on_sample)
                outs = [union] * len(eqn.outvars)
        for v, s in zip(eqn.outvars, outs):
            env[v] = s
    return [read(v) for v in jaxpr.outvars]


def _fixpoint(body, consts: list[set], carry: list[set], rest: list[set], on_sample):
    """The carries' varying axes at a loop's fixpoint (they only grow), and the body's
    outputs for them; `on_sample` runs once, on the fixpoint."""
    quiet = lambda eqn, key_set: None  # noqa: E731
    while True:
        outs = _varying(body, consts + carry + rest, quiet)
        grown = [c | o for c, o in zip(carry, outs)]
        if grown == carry:
            break
        carry = grown
    return carry, _varying(body, consts + carry + rest, on_sample)


def _varying_scan(eqn, ins, on_sample) -> list[set]:
    num_consts, num_carry = _compat.scan_layout(eqn.params)
    body, _ = _compat.open_jaxpr(eqn.params["jaxpr"])
    consts = [set(s) for s in ins[:num_consts]]
    carry = [set(s) for s in ins[num_consts : num_consts + num_carry]]
    xs = [set(s) for s in ins[num_consts + num_carry :]]
    carry, outs = _fixpoint(body, consts, carry, xs, on_sample)
    return carry + outs[num_carry:]


def _varying_while(eqn, ins, on_sample) -> list[set]:
    cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
    body, _ = _compat.open_jaxpr(eqn.params["body_jaxpr"])
    cond, _ = _compat.open_jaxpr(eqn.params["cond_jaxpr"])
    carry = [set(s) for s in ins[cn + bn :]]
    carry, _ = _fixpoint(body, [set(s) for s in ins[cn : cn + bn]], carry, [], on_sample)
    # How many iterations run varies as the condition does.
    (pred,) = _varying(cond, [set(s) for s in ins[:cn]] + carry, on_sample)
    return [c | pred for c in carry]


def _check_keys_vary(eqn, jaxpr, manual: tuple) -> None:
    in_sets = [
        {a for axes in _dim_axes(spec, len(v.aval.shape)) for a in axes}
        for spec, v in zip(eqn.params["in_specs"], jaxpr.invars)
    ]

    def on_sample(sample_eqn, key_set):
        same = [a for a in manual if a not in key_set]
        if not same or sample_eqn.params.get("estimator") != "score":
            return  # (a pathwise draw's gradient is right whatever shares its noise)
        name = sample_eqn.params["spec"].name
        axis = same[0]
        raise ValueError(
            f"scgjax: the key of this scg.sample({name}){_interpret._at(sample_eqn)} inside "
            f"a shard_map is the same on every shard along mesh axis "
            f"{', '.join(map(repr, same))}: those shards draw the same values, and their "
            "score terms would count one draw as several independent ones. Give each shard "
            f"its own key: key = jax.random.fold_in(key, jax.lax.axis_index({axis!r})), or "
            f"pass jax.random.split(key, n) with in_specs=P({axis!r})."
        )

    _varying(jaxpr, in_sets, on_sample)


# -- Layouts and lifting -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How the shards of a node drawn in the body are laid out globally."""

    concat: bool  # along the node's first axis in the order of M; else stacked
    first: int  # the local size of that first axis (concat only)


class _Lift:
    """Maps dependencies inside the body to dependencies of the global outputs."""

    def __init__(
        self, manual: tuple, sizes: dict, n_loops: int, layouts: dict, views: dict | None = None
    ):
        self.manual, self.sizes, self.n_loops, self.layouts = manual, sizes, n_loops, layouts
        self.views = {} if views is None else views  # see `_Views`

    def deps(self, deps: Deps, dim_axes: list[tuple], shape: tuple, layouts=None) -> Deps:
        """`deps` of a per-shard array of `shape` whose axes `out_specs` shards over
        `dim_axes` (pending axes of a term: `()`)."""
        layouts = self.layouts if layouts is None else layouts
        out: dict = {}
        for key, rel in deps.items():
            node, names = _deps.base_node(key), _deps.lane_names(key)
            n_node = len(rel) - len(names)
            head, lanes = rel[:n_node], dict(zip(names, rel[n_node:]))
            outer = tuple(n for n in names if n not in self.manual)
            inner_names = [n for n in names if n in self.manual]

            def local(e):  # an entry on a value axis of the shard
                if isinstance(e, Axis):
                    return e if e.axis < len(dim_axes) and not dim_axes[e.axis] else ALL
                return e

            layout = layouts.get(node)
            view = self.views.get(node)
            if view is not None:  # a block of a node drawn outside (`_Views`)
                node, j, axes, block = view
                new = tuple(
                    (
                        e
                        if isinstance(e, Axis)
                        and e.axis < len(dim_axes)
                        and dim_axes[e.axis] == axes
                        and shape[e.axis] == block
                        and not set(inner_names) & set(axes)
                        else ALL
                    )
                    if i == j
                    else local(e)
                    for i, e in enumerate(head)
                )
            elif layout is None:  # a node drawn outside: the same node on every shard
                new = tuple(local(e) for e in head)
            elif layout.concat:
                loops, own = head[: self.n_loops], head[self.n_loops :]
                first = own[0]
                keep = (
                    isinstance(first, Axis)
                    and not inner_names
                    and first.axis < len(dim_axes)
                    and dim_axes[first.axis] == self.manual
                    and shape[first.axis] == layout.first
                )
                new = loops + ((first if keep else ALL),) + tuple(local(e) for e in own[1:])
            else:
                loops, own = head[: self.n_loops], head[self.n_loops :]
                stack = tuple(
                    self._lane_entry(m, lanes.get(m, "own"), dim_axes, shape) for m in self.manual
                )
                new = loops + stack + tuple(local(e) for e in own)
            new = new + tuple(lanes[n] for n in outer)
            out.setdefault(Lanes(node, outer) if outer else node, []).append(new)
        return Deps._of(out)

    def _lane_entry(self, m, lane, dim_axes, shape):
        """The entry of a stacked node's axis for mesh axis `m`."""
        if lane == "own":  # the same shard: an axis sharded over `m` alone, block size 1
            for k, axes in enumerate(dim_axes):
                if axes == (m,) and shape[k] == 1:
                    return Axis(k)
            return ALL
        if (
            isinstance(lane, Axis)
            and lane.kind == "eq"
            and lane.axis < len(dim_axes)
            and not dim_axes[lane.axis]
            and shape[lane.axis] == self.sizes[m]
        ):  # `all_gather`: element j of that axis is shard j's
            return lane
        return ALL

    def score(self, deps: Deps, dim_axes, shape, node, layout) -> int:
        """How many exact entries `node`'s relations keep under `layout`."""
        lifted = self.deps(deps, dim_axes, shape, {node: layout})
        return sum(
            e is not ALL for key, rel in lifted.items() if _deps.base_node(key) == node for e in rel
        )


class _Views:
    """Blocks of nodes drawn outside the `shard_map`.

    An operand whose axis `k` `in_specs` shards over mesh axes `A` holds, on each shard,
    one block of `b` elements; a dependency on node axis `j` aligned with that axis
    (`Axis(k)`, elementwise) is, inside the body, a dependency on the shard's own block.
    It is keyed by a *view* id (the node id, then `-1, j, i`), whose relation keeps
    `Axis(k)` as a dependency on a node drawn in the body does, so plates survive the
    body; lifted out (`_Lift.deps`), the view maps back to the node, aligned where an
    output axis is sharded over the same `A` with the same block size, every element
    elsewhere. Other entries on sharded axes (and cumulative kinds there, whose blocks
    would miss the earlier shards) become ALL on the way in."""

    def __init__(self, path: tuple, sizes: dict):
        self.path, self.sizes = path, sizes
        self.ids: dict = {}  # (node, j, axes, block) -> view id
        self.table: dict = {}  # view id -> (node, j, axes, block)

    def entering(self, deps: Deps, dim_axes: list[tuple], shape: tuple) -> Deps:
        out: dict = {}
        for key, rel in deps.items():
            node, names = _deps.base_node(key), _deps.lane_names(key)
            n_node = len(rel) - len(names)
            head, tail = list(rel[:n_node]), tuple(rel[n_node:])
            view = None
            for i, e in enumerate(head):
                if not (isinstance(e, Axis) and e.axis < len(dim_axes) and dim_axes[e.axis]):
                    continue  # unsharded: the same index inside
                own = node[: len(self.path)] == self.path  # see `_own_nodes_entering`
                if view is None and e.kind == "eq" and not own:
                    axes = dim_axes[e.axis]
                    view = (node, i, axes, shape[e.axis] // math.prod(self.sizes[a] for a in axes))
                else:
                    head[i] = ALL
            if view is not None:
                vid = self.ids.get(view)
                if vid is None:
                    vid = self.ids[view] = node + (-1, view[1], len(self.ids))
                    self.table[vid] = view
                node = vid
            new_key = Lanes(node, names) if names else node
            out.setdefault(new_key, []).append(tuple(head) + tail)
        return Deps._of(out)


def _own_nodes_entering(deps: Deps, path: tuple, n_loops: int, manual: tuple) -> Deps:
    """Dependencies entering the body on its own nodes (drawn in earlier iterations of an
    enclosing loop, back through its carry): their relations are in the nodes' global
    (stacked) layout, so inside they become a dependency on every shard's elements
    (`Lanes` over the manual axes, `ALL`), keeping only their loop entries."""
    if not any(_deps.base_node(k)[: len(path)] == path for k in deps):
        return deps
    out: dict = {}
    for key, rel in deps.items():
        node, names = _deps.base_node(key), _deps.lane_names(key)
        if node[: len(path)] != path:
            out.setdefault(key, []).append(rel)
            continue
        n_node = len(rel) - len(names)
        lanes = dict(zip(names, rel[n_node:]))
        n_local = n_node - n_loops - len(manual)  # stacked: one axis per manual axis
        new_names = tuple(sorted(set(names) | set(manual)))
        new = (
            tuple(rel[:n_loops])
            + (ALL,) * n_local
            + tuple(lanes.get(n, ALL) if n not in manual else ALL for n in new_names)
        )
        out.setdefault(Lanes(node, new_names), []).append(new)
    return Deps._of(out)


def _assemble(x, manual: tuple, sizes: dict, dim_axes: list[tuple]):
    """The global array of a stacked output `x` (`(n_a, n_b, ..., *local)`): the inverse
    of what `out_specs` with `dim_axes` does; shards along a mesh axis that no axis uses
    hold copies, and the first one is kept."""
    used = [a for axes in dim_axes for a in axes]
    if any(a not in used for a in manual):
        # Copies along these axes: keep the first (on an Explicit mesh, a sharded axis
        # cannot be indexed, so the stacked array is replicated first).
        x = _compat.replicated(x)
        x = x[tuple(slice(None) if a in used else 0 for a in manual)]
    lanes = [a for a in manual if a in used]
    perm, shape = [], []
    local = np.shape(x)[len(lanes) :]
    for k, axes in enumerate(dim_axes):
        perm += [lanes.index(a) for a in axes] + [len(lanes) + k]
        shape.append(math.prod(sizes[a] for a in axes) * local[k])
    return jnp.transpose(x, perm).reshape(shape)


def _node_global(x, layout: _Layout, n_lanes: int):
    """A node array (stacked over the manual axes) in the node's global layout."""
    if not layout.concat:
        return x
    shape = np.shape(x)
    return jnp.reshape(x, (math.prod(shape[: n_lanes + 1]),) + shape[n_lanes + 1 :])


def _stacked(x, n_lanes: int):
    x = jnp.asarray(x)
    return x.reshape((1,) * n_lanes + x.shape)


# -- The rule --------------------------------------------------------------------------------


_INSIDE: contextvars.ContextVar[bool] = contextvars.ContextVar("scg_in_shard_map", default=False)


def _shard_map_rule(ctx: Context, index: int, eqn, invals: list[Val]) -> list[Val]:
    if _INSIDE.get():
        raise NotImplementedError(
            f"scgjax: a shard_map inside another shard_map's body{_interpret._at(eqn)}, with "
            "draws or their dependencies crossing it, is not supported. Map over every "
            "mesh axis in one shard_map, or draw the samples outside the inner one."
        )
    token = _INSIDE.set(True)
    try:
        return _shard_map_rule_body(ctx, index, eqn, invals)
    finally:
        _INSIDE.reset(token)


def _shard_map_rule_body(ctx: Context, index: int, eqn, invals: list[Val]) -> list[Val]:
    params = eqn.params
    mesh, in_specs, out_specs = params["mesh"], params["in_specs"], params["out_specs"]
    manual = _manual_axes(params)
    sizes = {a: dict(zip(mesh.axis_names, mesh.axis_sizes))[a] for a in manual}
    n_lanes = len(manual)
    jaxpr, consts = _compat.open_jaxpr(params["jaxpr"])
    if _interpret.jaxpr_has_sample(jaxpr):
        _check_keys_vary(eqn, jaxpr, manual)
    invals = [v.collapsed() for v in invals]
    in_axes = [_dim_axes(s, np.ndim(v.value)) for s, v in zip(in_specs, invals)]
    # (baseline terms are built in the body: the parents' views do not lift out)
    sub = dataclasses.replace(ctx.child(index), box_baselines=False)
    # Inside the body, an axis that in_specs shards holds one block of the nodes drawn
    # outside (a view of the node, `_Views`).
    views = _Views(sub.path, sizes)
    args = [
        Val(
            None,
            _own_nodes_entering(
                views.entering(v.deps, ax, np.shape(v.value)),
                sub.path,
                len(ctx.loop_levels),
                manual,
            ),
        )
        for v, ax in zip(invals, in_axes)
    ]
    n_out = len(eqn.outvars)
    lanes_spec = PartitionSpec(*manual)

    def body_fn(meta: dict, draw_ids: list, layouts: dict | None):
        def body(*arrays):
            values, draw_arrays = arrays[: len(invals)], arrays[len(invals) :]
            here = dataclasses.replace(sub, draws=None)  # the first pass of a replay
            if draw_ids:
                local = {}
                for n, d in zip(draw_ids, draw_arrays):
                    local[n] = d.reshape(np.shape(d)[n_lanes:])
                here = dataclasses.replace(sub, draws=local)
            body_args = [Val(x, v.deps) for x, v in zip(values, args)]
            out_arrays, node_arrays, baseline_total = _run(here, jaxpr, consts, body_args, meta)
            values, terms, i = [], [], 0
            for _, keys in meta["struct"]:
                values.append(out_arrays[i])
                n_terms = 0 if keys is None else len(keys)
                terms += out_arrays[i + 1 : i + 1 + n_terms]
                i += 1 + n_terms
            rest = [_stacked(t, n_lanes) for t in terms]
            rest += [_stacked(a, n_lanes) for a in node_arrays]
            rest.append(_stacked(jnp.asarray(baseline_total, jnp.float32), n_lanes))
            meta["local_node_shapes"] = [tuple(np.shape(a)) for a in node_arrays]
            return values, rest

        return body

    def shard_mapped(meta, draw_ids, layouts, extra_specs):
        return jax.shard_map(
            body_fn(meta, draw_ids, layouts),
            mesh=mesh,
            in_specs=tuple(in_specs) + tuple(extra_specs),
            out_specs=(list(out_specs), lanes_spec),
            check_vma=params.get("check_vma", True),
            axis_names=set(manual),
        )

    in_values = [v.value for v in invals]
    draws = sub.draws or {}
    meta: dict = {}
    if draws:
        # The layouts decide how the replayed (global) draws split into shards.
        jax.eval_shape(shard_mapped(meta, [], None, []), *in_values)
    else:
        out_values, rest = shard_mapped(meta, [], None, [])(*in_values)
    nodes = meta["nodes"]
    lift = _Lift(manual, sizes, len(ctx.loop_levels), {}, views.table)
    # In a loop the body runs once per pass of the loop's fixpoint, and its nodes' earlier
    # draws come back in through the carry laid out as before: stacked, always.
    layouts = (
        {n.id: _Layout(False, 0) for n in nodes}
        if ctx.loop_levels
        else _choose_layouts(lift, meta, nodes, out_specs)
    )
    lift.layouts = layouts
    if draws:
        draw_ids = sorted(draws)
        by_id = {n.id: n for n in nodes}
        draw_arrays = []
        for n in draw_ids:
            d = jnp.asarray(draws[n])
            layout = layouts.get(n)
            if layout is None or n not in by_id:
                raise ValueError(f"scgjax: a replayed draw {n} is not a node of this shard_map.")
            if layout.concat:
                d = d.reshape(tuple(sizes[a] for a in manual) + (-1,) + np.shape(d)[1:])
            draw_arrays.append(d)
        meta = {}
        out_values, rest = shard_mapped(meta, draw_ids, layouts, [lanes_spec] * len(draw_ids))(
            *in_values, *draw_arrays
        )
    # Lay the stacked arrays out globally.
    struct = meta["struct"][:n_out]
    out_shapes = meta["out_shapes"]
    rest = list(rest)
    outs = []
    for j, ((deps, keys), value) in enumerate(zip(struct, out_values)):
        shape = out_shapes[j]
        dim_axes = _dim_axes(out_specs[j], len(shape))
        value_deps = lift.deps(deps, dim_axes, shape)
        if keys is None:
            outs.append(Val(value, value_deps))
            continue
        items = []
        for k in keys:
            t = rest.pop(0)
            t_local = k[1]
            t_axes = dim_axes + [()] * (len(t_local) - len(shape))
            items.append((lift.deps(k[0], t_axes, t_local), _assemble(t, manual, sizes, t_axes)))
        outs.append(_graph.make_val(value, value_deps, items))
    n_node_arrays = len(meta["local_node_shapes"])
    node_arrays, baseline = rest[:n_node_arrays], rest[n_node_arrays]
    global_arrays, global_nodes, i = [], [], 0
    for node in nodes:
        layout = layouts[node.id]
        count = (1 if node.estimator == "score" else 0) + (3 if ctx.graph.record else 0)
        for a in node_arrays[i : i + count]:
            global_arrays.append(_node_global(a, layout, n_lanes))
        i += count
        global_nodes.append(
            dataclasses.replace(node, shape=_global_shape(node.shape, layout, sizes, manual))
        )
    _adopt(ctx, meta, global_arrays, jnp.sum(baseline), global_nodes)
    return outs


def _global_shape(shape: tuple, layout: _Layout, sizes: dict, manual: tuple) -> tuple:
    lanes = tuple(sizes[a] for a in manual)
    if layout.concat:
        return (math.prod(lanes) * shape[0],) + tuple(shape[1:])
    return lanes + tuple(shape)


def _choose_layouts(lift: _Lift, meta: dict, nodes, out_specs) -> dict:
    """Concatenated where that keeps more exact entries than stacking, per node."""
    stacked = {n.id: _Layout(False, 0) for n in nodes}
    items = []  # (deps, dim_axes, shape) of every output and term
    for j, (deps, keys) in enumerate(meta["struct"][: len(out_specs)]):
        shape = meta["out_shapes"][j]
        dim_axes = _dim_axes(out_specs[j], len(shape))
        items.append((deps, dim_axes, shape))
        for k in keys or ():
            t_local = k[1]
            items.append((k[0], dim_axes + [()] * (len(t_local) - len(shape)), t_local))
    layouts = {}
    for node in nodes:
        layout = stacked[node.id]
        if node.estimator == "score" and len(node.shape) >= 1:
            concat = _Layout(True, node.shape[0])
            mine = [it for it in items if node.id in {_deps.base_node(k) for k in it[0]}]
            s_stack = sum(lift.score(d, a, s, node.id, layout) for d, a, s in mine)
            s_concat = sum(lift.score(d, a, s, node.id, concat) for d, a, s in mine)
            if s_concat > s_stack:
                layout = concat
        layouts[node.id] = layout
    return layouts


if _compat.shard_map_p is not None:  # pragma: no branch
    higher_order_rules[_compat.shard_map_p] = _shard_map_rule

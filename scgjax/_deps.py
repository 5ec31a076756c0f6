"""Dependencies: which elements of which score nodes a value depends on.

A value's `Deps` maps each score node it depends on to a set of disjoint *relations*.
A relation has one entry per axis of the node's log-probability (as stacked at the top
level), saying which elements along that node axis reach a given element of the value:

* `ALL` (`None`): every element along that node axis (the safe fallback);
* `Axis(a, kind)`: along value axis `a`, value element `i` depends on node elements `j`
  with `j == i` (`"eq"`: an automatic plate), `j <= i` (`"le"`), `j < i` (`"lt"`),
  `j >= i` (`"ge"`) or `j > i` (`"gt"`): causality along a stacked loop axis or a
  cumulative op;
* `Loop(level, kind)`: inside a `scan` body, the node axis that the loop at `level`
  stacks, related in the same way to the current iteration.

Collectives over named axes (`lax.psum` under `jax.vmap(..., axis_name=...)`, `pmap` or
`shard_map`) make a value in one lane depend on nodes drawn in other lanes. The lanes are
not axes of the node's log-probability (the interpreter runs inside the mapped trace), so
such a dependency is keyed by `Lanes(node, names)` instead of the node id, and its
relations carry one more entry per named axis, after the node-axis entries: `ALL` (every
lane) or `Axis(a)` (lane `j` ↔ element `j` of value axis `a`, as `all_gather` makes).
A dependency keyed by the node id itself is on the node in the value's own lane.

A value depends on the union of its relations' elements. Several relations are kept only
while they are disjoint (then their log-probabilities add without double counting), which
is what nested loops need: a cost at inner step `u` of outer step `t` depends on every
draw of outer steps `< t` and on the draws of step `t` at inner steps `<= u`.

Per-primitive rules say how each operand's value axes move to the output's (`axis_rule`);
what they cannot prove becomes `ALL`. Over-approximating costs variance only;
under-approximating would bias the estimator, so every rule errs towards `ALL`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

import numpy as np

ALL = None
# A kind is the set of orderings {"<", "=", ">"} of node index j against value index i.
_ORDERS = {
    "eq": frozenset("="),
    "le": frozenset("<="),
    "lt": frozenset("<"),
    "ge": frozenset(">="),
    "gt": frozenset(">"),
}
_KIND_OF = {v: k for k, v in _ORDERS.items()}
MAX_RELATIONS = 4


@dataclasses.dataclass(frozen=True)
class Axis:
    axis: int
    kind: str = "eq"


@dataclasses.dataclass(frozen=True)
class Loop:
    level: int
    kind: str = "eq"


@dataclasses.dataclass(frozen=True)
class Lanes:
    """The key of a dependency on `node` in other lanes of the named axes `names`
    (sorted); its relations end with one entry per name."""

    node: tuple
    names: tuple


def base_node(key) -> tuple:
    """The node id of a dependency key (a node id or `Lanes`)."""
    return key.node if isinstance(key, Lanes) else key


def lane_names(key) -> tuple:
    return key.names if isinstance(key, Lanes) else ()


# -- Sources: what `scg.draw`'s influence pass tracks besides the score nodes ---------------


def is_source(key) -> bool:
    """Whether a dependency key (or node of a key) is a *source* of `scg.draw`'s influence
    pass (`("input", i)`, `("draw", node id)`) rather than a score node. Sources exist
    only in that pass; they have no axes, and the decisions that shape the cost terms
    (is an operand sample-free? do two operands depend on the same nodes?) ignore them,
    so that the pass splits the cost exactly as the estimator does."""
    key = base_node(key)
    return isinstance(key, tuple) and bool(key) and isinstance(key[0], str)


def scored(deps: Deps) -> bool:
    """Whether `deps` depends on a score node (not only on sources)."""
    return any(not is_source(k) for k in deps._map)


def scored_part(deps: Deps) -> Deps:
    """`deps` without its sources (itself when it has none)."""
    if not any(is_source(k) for k in deps._map):
        return deps
    return Deps._of({k: list(r) for k, r in deps._map.items() if not is_source(k)})


def without_nodes(deps: Deps, ids) -> Deps:
    """`deps` without the nodes `ids` (e.g. enumerated sites: they weigh, not score)."""
    ids = set(ids)
    kept = {k: rels for k, rels in deps._map.items() if base_node(k) not in ids}
    if len(kept) == len(deps._map):
        return deps
    return Deps._of({k: list(rels) for k, rels in kept.items()})


def sources_of(deps_list) -> Deps:
    """The sources in any of `deps_list`, as dependencies of their own."""
    found = {k: list(r) for d in deps_list for k, r in d._map.items() if is_source(k)}
    return Deps._of(found) if found else EMPTY


def with_sources(items: list, factors: list) -> list:
    """Cost terms `items` (deps, term) scaled by sample-free `factors` (`Val`s): each
    term also depends on the factors' sources (none outside the influence pass)."""
    extra = sources_of([v.deps for v in factors])
    if not extra:
        return items
    return [(join([d, extra]), t) for d, t in items]


Entry = Axis | Loop | None  # ALL (None) | Axis | Loop
Rel = tuple  # tuple[Entry, ...]


def union_kind(k1: str, k2: str) -> str | None:
    """The kind covering both (None: every element)."""
    return _KIND_OF.get(_ORDERS[k1] | _ORDERS[k2])


def compose_kind(k: str, step: str) -> str | None:
    """Node → input relation `k`, then input → output relation `step` (a cumulative op
    or a loop carry): the node → output relation."""
    orders = _ORDERS[k] | _ORDERS[step]
    if "<" in orders and ">" in orders:
        return None
    if "=" in _ORDERS[k] and "=" in _ORDERS[step]:
        return _KIND_OF[orders]
    return _KIND_OF[orders - {"="}]


def _target(e):
    return (Axis, e.axis) if isinstance(e, Axis) else (Loop, e.level)


def meet(e1: Entry, e2: Entry) -> Entry:
    """The coarsest entry that covers both."""
    if e1 == e2:
        return e1
    if e1 is not None and e2 is not None and _target(e1) == _target(e2):
        kind = union_kind(e1.kind, e2.kind)
        if kind is not None:
            return dataclasses.replace(e1, kind=kind)
    return ALL


def _entry_within(e1: Entry, e2: Entry) -> bool:
    if e2 is None:
        return True
    return e1 is not None and _target(e1) == _target(e2) and _ORDERS[e1.kind] <= _ORDERS[e2.kind]


def _within(r1: Rel, r2: Rel) -> bool:
    """Whether relation r1's elements are all in r2's."""
    return all(_entry_within(a, b) for a, b in zip(r1, r2))


def _disjoint(r1: Rel, r2: Rel) -> bool:
    return any(
        a is not None
        and b is not None
        and _target(a) == _target(b)
        and not (_ORDERS[a.kind] & _ORDERS[b.kind])
        for a, b in zip(r1, r2)
    )


def _exact_union(r1: Rel, r2: Rel) -> Rel | None:
    """One relation with exactly the elements of both (e.g. `lt` and `eq` make `le`), or
    None when there is none."""
    diff = [k for k, (a, b) in enumerate(zip(r1, r2)) if a != b]
    if len(diff) != 1:
        return None
    a, b = r1[diff[0]], r2[diff[0]]
    if a is None or b is None or _target(a) != _target(b):
        return None
    kind = _KIND_OF.get(_ORDERS[a.kind] | _ORDERS[b.kind])
    return (
        None
        if kind is None
        else r1[: diff[0]] + (dataclasses.replace(a, kind=kind),) + r1[diff[0] + 1 :]
    )


def _normalized(rels) -> tuple:
    """`_normalize`, without its work for the common case of one relation."""
    if len(rels) == 1:
        return tuple(rels)
    unique = tuple(dict.fromkeys(rels))
    return unique if len(unique) == 1 else _normalize(unique)


def _normalize(rels: Iterable[Rel]) -> tuple:
    """A set of disjoint relations covering `rels` (merging those that overlap)."""
    out: list[Rel] = list(dict.fromkeys(rels))
    changed = True
    while changed:
        changed = False
        for i in range(len(out)):
            for j in range(i + 1, len(out)):
                a, b = out[i], out[j]
                union = _exact_union(a, b)
                if union is not None:
                    out = [r for k, r in enumerate(out) if k not in (i, j)] + [union]
                    changed = True
                    break
                if _within(a, b) or _within(b, a) or not _disjoint(a, b):
                    merged = (
                        b
                        if _within(a, b)
                        else a
                        if _within(b, a)
                        else tuple(meet(x, y) for x, y in zip(a, b))
                    )
                    out = [r for k, r in enumerate(out) if k not in (i, j)] + [merged]
                    changed = True
                    break
            if changed:
                break
    if len(out) > MAX_RELATIONS:
        merged = out[0]
        for r in out[1:]:
            merged = tuple(meet(x, y) for x, y in zip(merged, r))
        out = [merged]
    return tuple(sorted(out, key=repr))


class Deps:
    """An immutable map node id → disjoint relations; hashable, so it keys cost terms."""

    __slots__ = ("_map", "_hash", "_axis_free")

    def __init__(self, mapping: dict | None = None):
        """`mapping`: node id → one relation."""
        self._map = {n: (rel,) for n, rel in (mapping or {}).items()}
        self._hash = hash(frozenset(self._map.items()))
        self._axis_free = None

    @classmethod
    def _of(cls, relsets: dict) -> Deps:
        out = cls()
        out._map = {n: _normalized(rels) for n, rels in _merge_lanes(relsets).items()}
        out._hash = hash(frozenset(out._map.items()))
        return out

    def axis_free(self) -> bool:
        """Whether no relation has a value-axis entry (then moving axes changes nothing)."""
        if self._axis_free is None:
            self._axis_free = not any(
                isinstance(e, Axis) for rels in self._map.values() for rel in rels for e in rel
            )
        return self._axis_free

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, Deps) and self._map == other._map

    def __bool__(self):
        return bool(self._map)

    def __iter__(self) -> Iterator:
        return iter(self._map)

    def __len__(self):
        return len(self._map)

    def __contains__(self, node_id):
        return node_id in self._map

    def __repr__(self):
        return f"Deps({self._map})"

    def items(self) -> list[tuple]:
        """(node id, relation) for every relation (a node may appear more than once)."""
        return [(n, rel) for n, rels in self._map.items() for rel in rels]

    def map_entries(self, fn: Callable[[Entry], Entry]) -> Deps:
        return Deps._of(
            {n: [tuple(fn(e) for e in rel) for rel in rels] for n, rels in self._map.items()}
        )

    def map_axes(self, axis_map: Callable[[int], int | None]) -> Deps:
        """Moves value-axis entries with `axis_map` (None: that entry becomes ALL)."""

        if self.axis_free():
            return self

        def fn(e):
            if isinstance(e, Axis):
                a = axis_map(e.axis)
                return ALL if a is None else Axis(a, e.kind)
            return e

        return self.map_entries(fn)

    def coarsened(self) -> Deps:
        """Every value axis entry becomes ALL; loop entries stay (they do not involve the
        value's axes)."""
        return self.map_axes(lambda a: None)


EMPTY = Deps()


def _merge_lanes(relsets: dict) -> dict:
    """One key per node: a node reached in its own lane and through other lanes (or
    through lanes of different named axes) becomes one `Lanes` key over every name,
    an own-lane relation counting as every lane of the names it lacks (a cover: the
    own lane is one of them). Keeps relations disjoint per node, so log-probs add."""
    by_node: dict = {}
    for key in relsets:
        by_node.setdefault(base_node(key), []).append(key)
    if all(len(keys) == 1 for keys in by_node.values()):
        return relsets
    out = {}
    for node, keys in by_node.items():
        if len(keys) == 1:
            out[keys[0]] = relsets[keys[0]]
            continue
        names = tuple(sorted({n for k in keys for n in lane_names(k)}))
        rels = []
        for k in keys:
            have = dict(zip(lane_names(k), range(len(lane_names(k)))))
            for rel in relsets[k]:
                head = rel[: len(rel) - len(have)]
                tail = rel[len(rel) - len(have) :]
                rels.append(tuple(head) + tuple(tail[have[n]] if n in have else ALL for n in names))
        out[Lanes(node, names)] = rels
    return out


def across_lanes(deps: Deps, names: tuple, entry_of: Callable[[str], Entry]) -> Deps:
    """`deps` reached through a collective over the named axes `names`: each key gains
    an entry per name it does not have yet, `entry_of(name)` (`ALL`, or `Axis(a)` for the
    axis that `all_gather` makes); names it has keep their entries (every lane's copy
    already depends on those lanes in the same way). Shift value axes first."""
    out: dict = {}
    for key, rels in deps._map.items():
        old = lane_names(key)
        new_names = tuple(sorted(set(old) | set(names)))
        moved = []
        for rel in rels:
            head, tail = rel[: len(rel) - len(old)], dict(zip(old, rel[len(rel) - len(old) :]))
            # A name the key already has keeps its entry: every lane's copy already
            # depends on those lanes in the same way.
            entries = [tail[n] if n in tail else entry_of(n) for n in new_names]
            moved.append(tuple(head) + tuple(entries))
        out.setdefault(Lanes(base_node(key), new_names), []).extend(moved)
    return Deps._of(out)


def join(deps: Iterable[Deps]) -> Deps:
    """The dependencies of a value computed elementwise from values with `deps`."""
    deps = [d for d in deps if d]
    if not deps:
        return EMPTY
    if all(d == deps[0] for d in deps[1:]):
        return deps[0]
    out: dict = {}
    for d in deps:
        for n, rels in d._map.items():
            out.setdefault(n, []).extend(rels)
    return Deps._of(out)


# -- How operand axes move to output axes --------------------------------------------------

AxisMap = Callable[[int], int | None]


def _identity(a):
    return a


def _nothing(a):
    return None


ELEMENTWISE = frozenset(
    """
    neg sign floor ceil round is_finite exp exp2 log log1p expm1 tanh logistic sin cos tan
    asin acos atan sinh cosh asinh acosh atanh lgamma digamma erf erfc erf_inv abs sqrt
    rsqrt cbrt integer_pow pow add add_any sub mul div rem max min atan2 nextafter and or
    not xor eq ne lt le gt ge select_n convert_element_type stop_gradient clamp square
    imag real conj population_count shift_left shift_right_logical shift_right_arithmetic
    copy copy_p reduce_precision igamma igammac random_gamma_grad bessel_i0e bessel_i1e
    polygamma zeta regularized_incomplete_beta
    sharding_constraint reshard mesh_cast
""".split()
)


def axis_rule(
    eqn, in_shapes: list[tuple], out_shape: tuple, known: list | None = None
) -> list[AxisMap]:
    """For each operand, a map from its axes to the output's (None: not aligned).

    `known[i]`, where given, is operand `i`'s value as a NumPy array when it is known
    while tracing (index arrays such as `jnp.arange(B)`), else None."""
    name = eqn.primitive.name
    params = eqn.params
    n_out = len(out_shape)
    known = known if known is not None else [None] * len(in_shapes)
    if name == "gather":
        return _gather_maps(params, in_shapes, out_shape, known[1])
    if name.startswith("scatter"):
        return _scatter_maps(params, in_shapes, known[1])
    if name == "dynamic_slice":
        sizes = params["slice_sizes"]
        shape = in_shapes[0]
        return [lambda a: a if sizes[a] == shape[a] else None] + [_nothing] * (len(in_shapes) - 1)
    if name == "dynamic_update_slice":
        shape, upd = in_shapes[0], in_shapes[1]
        return [_identity, lambda a: a if upd[a] == shape[a] else None] + [_nothing] * (
            len(in_shapes) - 2
        )
    if name in ELEMENTWISE:
        return [_elementwise(s, out_shape) for s in in_shapes]
    if name == "broadcast_in_dim":
        dims = params["broadcast_dimensions"]
        (shape,) = in_shapes[:1]
        return [lambda a: dims[a] if shape[a] == out_shape[dims[a]] else None] + [_nothing] * (
            len(in_shapes) - 1
        )
    if name == "transpose":
        perm = list(params["permutation"])
        return [lambda a: perm.index(a)]
    if name in (
        "reduce_sum",
        "reduce_max",
        "reduce_min",
        "reduce_prod",
        "reduce_and",
        "reduce_or",
        "argmax",
        "argmin",
        "reduce_xor",
    ):
        axes = set(params["axes"])
        kept = [a for a in range(len(in_shapes[0])) if a not in axes]
        return [lambda a: kept.index(a) if a in kept else None] + [_nothing] * (len(in_shapes) - 1)
    if name == "squeeze":
        dims = set(d % len(in_shapes[0]) for d in params["dimensions"])
        kept = [a for a in range(len(in_shapes[0])) if a not in dims]
        return [lambda a: kept.index(a) if a in kept else None]
    if name == "expand_dims":
        dims = sorted(d % n_out for d in params["dimensions"])
        kept = [a for a in range(n_out) if a not in dims]
        return [lambda a: kept[a]]
    if name == "reshape":
        dims = params.get("dimensions")
        if dims is not None and tuple(dims) != tuple(range(len(in_shapes[0]))):
            return [_nothing] * len(in_shapes)  # a transpose first (order='F')
        return [_reshape_map(in_shapes[0], out_shape)] + [_nothing] * (len(in_shapes) - 1)
    if name == "conv_general_dilated":
        lhs_spec, _, out_spec = params["dimension_numbers"]
        if params.get("batch_group_count", 1) != 1:
            return [_nothing] * len(in_shapes)
        return [_table({lhs_spec[0]: out_spec[0]})] + [_nothing] * (len(in_shapes) - 1)
    if name == "dot_general":
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        maps = []
        n_batch = len(lb)
        lhs_free = [a for a in range(len(in_shapes[0])) if a not in lc and a not in lb]
        rhs_free = [a for a in range(len(in_shapes[1])) if a not in rc and a not in rb]
        for _contract, batch, free, offset in (
            (lc, lb, lhs_free, n_batch),
            (rc, rb, rhs_free, n_batch + len(lhs_free)),
        ):
            maps.append(_dot_map(list(batch), free, offset))
        return maps
    if name in ("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"):
        return [_identity]
    if name in ("concatenate", "pad"):
        dim = params.get("dimension")
        if name == "pad":
            changed = {
                a
                for a, (lo, hi, inner) in enumerate(params["padding_config"])
                if (lo, hi, inner) != (0, 0, 0)
            }
            return [lambda a: None if a in changed else a, _nothing]
        return [lambda a: None if a == dim else a] * len(in_shapes)
    if name == "stack":
        axis = params["axis"] % n_out
        return [lambda a: a if a < axis else a + 1] * len(in_shapes)
    if name == "slice":
        shape = in_shapes[0]
        strides = params["strides"] or (1,) * len(shape)
        full = {
            a
            for a in range(len(shape))
            if params["start_indices"][a] == 0
            and params["limit_indices"][a] == shape[a]
            and strides[a] == 1
        }
        return [lambda a: a if a in full else None]
    return [_nothing] * len(in_shapes)


def _table(table: dict) -> AxisMap:
    return lambda a: table.get(a)


def _iota_along(col: np.ndarray, size: int) -> int | None:
    """The axis `j` of `col` (an index array) along which `col[..., i, ...] == i` for
    every `i`, whatever the other axes (`jnp.arange(B)` broadcast), when `col` has
    length `size` there; else None."""
    if np.ma.getmaskarray(col).any():
        return None
    col = np.ma.getdata(col)
    for j in range(col.ndim):
        if col.shape[j] != size:
            continue
        shape = [1] * col.ndim
        shape[j] = size
        if np.array_equal(col, np.broadcast_to(np.arange(size).reshape(shape), col.shape)):
            return j
    return None


def _gather_maps(params, in_shapes, out_shape, known_indices) -> list[AxisMap]:
    """`lax.gather`: output element `(b, o)` (index batch position `b`, offset `o`) reads
    the operand at the start given by `indices[b]`, plus `o`.

    * indices: axis `j` (not the last, the index vector) is output batch axis `j`;
    * operand: a batching dimension (`take_along_axis`, a `vmap`ped gather) is its
      index batch axis; a window axis taken whole (its start is clamped to 0) is its
      offset axis; an axis indexed by a column of the indices that is known to be
      `arange` along index axis `j` (`x[jnp.arange(B), k]`) is output batch axis `j`.
      Any other axis (indexed by data or by a draw) reaches every element."""
    dn = params["dimension_numbers"]
    op_shape, idx_shape = in_shapes[0], in_shapes[1]
    offset_dims = tuple(dn.offset_dims)
    collapsed = tuple(dn.collapsed_slice_dims)
    start_map = tuple(dn.start_index_map)
    op_batch = tuple(getattr(dn, "operand_batching_dims", ()))
    idx_batch = tuple(getattr(dn, "start_indices_batching_dims", ()))
    sizes = params["slice_sizes"]
    batch_out = [d for d in range(len(out_shape)) if d not in offset_dims]
    n_idx = len(idx_shape) - 1  # the last axis of the indices is the index vector
    if len(batch_out) != n_idx:
        return [_nothing] * len(in_shapes)
    idx_map = {j: batch_out[j] for j in range(n_idx)}
    op_map: dict = {}
    window = [a for a in range(len(op_shape)) if a not in collapsed and a not in op_batch]
    for a, d in zip(window, offset_dims):
        if sizes[a] == op_shape[a] == out_shape[d]:
            op_map[a] = d
    for a, j in zip(op_batch, idx_batch):
        if op_shape[a] == idx_shape[j]:
            op_map[a] = batch_out[j]
    if known_indices is not None and np.shape(known_indices) == tuple(idx_shape):
        for p, a in enumerate(start_map):
            if a in op_map or sizes[a] != 1:
                continue
            j = _iota_along(known_indices[..., p], op_shape[a])
            if j is not None and j not in idx_batch and batch_out[j] not in op_map.values():
                op_map[a] = batch_out[j]
    return [_table(op_map), _table(idx_map)]


def _scatter_maps(params, in_shapes, known_indices) -> list[AxisMap]:
    """`lax.scatter` and `scatter-add` (`.at[...].set/add`, `segment_sum`): output
    element `i` is operand element `i`, combined with the updates that land on it.

    * operand: every axis (elementwise);
    * updates: a window axis taken whole is its operand axis; a scatter axis is an
      operand axis when it is a batching dimension, or when that operand axis is
      indexed by a column of the indices known to be `arange` along the scatter axis
      (`zeros.at[jnp.arange(B), k].add(v)`);
    * indices: such a scatter axis decides which element of that operand axis it
      writes, and nothing else does; every other axis reaches every element."""
    dn = params["dimension_numbers"]
    op_shape, idx_shape, upd_shape = in_shapes[0], in_shapes[1], in_shapes[2]
    window_dims = tuple(dn.update_window_dims)
    inserted = tuple(dn.inserted_window_dims)
    to_operand = tuple(dn.scatter_dims_to_operand_dims)
    op_batch = tuple(getattr(dn, "operand_batching_dims", ()))
    idx_batch = tuple(getattr(dn, "scatter_indices_batching_dims", ()))
    scatter_upd = [u for u in range(len(upd_shape)) if u not in window_dims]
    n_idx = len(idx_shape) - 1
    if len(scatter_upd) != n_idx or len(in_shapes) != 3:
        return [_identity] + [_nothing] * (len(in_shapes) - 1)
    upd_map: dict = {}
    window = [a for a in range(len(op_shape)) if a not in inserted and a not in op_batch]
    for a, u in zip(window, window_dims):
        if upd_shape[u] == op_shape[a]:
            upd_map[u] = a
    idx_map: dict = {}
    for a, j in zip(op_batch, idx_batch):
        if op_shape[a] == idx_shape[j]:
            upd_map[scatter_upd[j]] = a
            idx_map[j] = a
    if known_indices is not None and np.shape(known_indices) == tuple(idx_shape):
        for p, a in enumerate(to_operand):
            if a not in inserted or a in upd_map.values():
                continue
            j = _iota_along(known_indices[..., p], op_shape[a])
            if j is not None and j not in idx_batch:
                upd_map[scatter_upd[j]] = a
                idx_map[j] = a
    return [_identity, _table(idx_map), _table(upd_map)]


def _elementwise(in_shape, out_shape) -> AxisMap:
    """Right-aligned; an axis broadcast from size 1 is not aligned."""
    if tuple(in_shape) == tuple(out_shape):
        return _identity
    offset = len(out_shape) - len(in_shape)
    if offset < 0:
        return _nothing
    return lambda a: a + offset if in_shape[a] == out_shape[a + offset] else None


def _dot_map(batch, free, offset) -> AxisMap:
    def m(a):
        if a in batch:
            return batch.index(a)
        if a in free:
            return offset + free.index(a)
        return None

    return m


def _reshape_map(in_shape, out_shape) -> AxisMap:
    """A row-major reshape: size-1 axes aside, the axes fall into consecutive groups of
    equal size (`(B, H, W) -> (B, H·W)`: `[B] -> [B]`, `[H, W] -> [H·W]`); an axis that is
    a group of its own on both sides keeps its alignment. Merged or split axes reach
    every element."""
    src = [a for a, s in enumerate(in_shape) if s != 1]
    dst = [a for a, s in enumerate(out_shape) if s != 1]
    table: dict = {}
    i = j = 0
    while i < len(src) and j < len(dst):
        gi, gj = [src[i]], [dst[j]]
        pi, pj = in_shape[src[i]], out_shape[dst[j]]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(src):
                gi.append(src[i])
                pi *= in_shape[src[i]]
                i += 1
            elif pj < pi and j < len(dst):
                gj.append(dst[j])
                pj *= out_shape[dst[j]]
                j += 1
            else:
                return _table(table)
        if len(gi) == 1 and len(gj) == 1:
            table[gi[0]] = gj[0]
    return _table(table)


def cumulative_kind(eqn) -> tuple[int, str] | None:
    """For a cumulative op, (axis, kind) of the causal relation it creates."""
    if eqn.primitive.name in ("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"):
        return eqn.params["axis"], "ge" if eqn.params.get("reverse") else "le"
    return None


def move(eqn, deps: Deps, axis_map: AxisMap, n_in: int, n_out: int) -> Deps:
    """`deps` of an operand with `n_in` value axes, moved to an output with `n_out`;
    axes from `n_in` on are a term's pending axes and shift along unchanged."""
    moved = deps.map_axes(lambda a: axis_map(a) if a < n_in else a - n_in + n_out)
    cum = cumulative_kind(eqn)
    if cum is None:
        return moved
    axis, kind = cum

    def adjust(e):
        if isinstance(e, Axis) and e.axis == axis:
            k = compose_kind(e.kind, kind)
            return ALL if k is None else Axis(axis, k)
        return e

    return moved.map_entries(adjust)


def through(eqn, in_deps: list[Deps], in_shapes, out_shape, known=None) -> Deps:
    """The output's dependencies for a single-output equation without samples (`known`:
    the operands' values where known while tracing, as for `axis_rule`)."""
    maps = axis_rule(eqn, in_shapes, out_shape, known)
    return join(
        move(eqn, d, m, len(s), len(out_shape)) for d, m, s in zip(in_deps, maps, in_shapes) if d
    )


def node_rel(loop_levels: tuple[int, ...], ndim: int) -> Rel:
    """The relation of a freshly drawn node's value to itself."""
    return tuple(Loop(l) for l in loop_levels) + tuple(Axis(a) for a in range(ndim))

"""The jaxpr interpreter that turns a stochastic program into its graph.

`eval_jaxpr` walks a jaxpr once. Every value is a `Val` (value, dependencies, additive
terms). At a `sample` equation it draws the value (stop-gradient for score nodes),
computes the node's log-probability and records the node. Every other equation is
re-bound unchanged on the values, and its output's dependencies follow from its inputs'
through the per-primitive axis rules of `_deps` (automatic plates). Linear equations on
the cost's additive tail also carry the terms of their inputs along.

Rules live in registries:

* `higher_order_rules[prim](ctx, index, eqn, invals) -> outvals` for primitives with
  sub-jaxprs that contain samples (`_control_flow.py` registers one small rule per
  primitive);
* `term_rules[name](eqn, invals, out_value) -> [(deps, term)] | None` for the linear
  primitives that carry cost terms (keyed by primitive name).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax import lax

from . import _compat, _deps, _estimators, _graph, _logprob, _sample
from ._deps import ALL, EMPTY, Axis, Deps, Loop
from ._graph import Graph, NodeId, StochasticNode, Val

higher_order_rules: dict[Any, Callable] = {}
term_rules: dict[str, Callable] = {}
# Higher-order primitives whose rule also runs without samples inside, whenever an input
# depends on a node: it tracks dependencies per output and carries cost terms through.
DATAFLOW_RULES = frozenset(
    {"jit", "pjit", "closed_call", "remat2", "checkpoint", "scan", "cond", "shard_map"}
)
# Call-like primitives without samples whose dependencies are read off their jaxpr.
STATIC_CALLS = {
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}


@dataclasses.dataclass
class Context:
    """Where the interpreter is: node-id prefix, graph being filled, enclosing scans.

    `draws` holds values to use instead of drawing (`scgjax.trace(f, draws=...)`,
    `surrogate(f, draws=...)`), keyed by node id, for the nodes under this context (a
    `scan` rule hands its body the current iteration's slice); `graph.record` says
    whether nodes' values and log-probabilities are recorded too. `enumerated` holds
    the ids of the sites being summed out (`estimator="enum"`), whose replayed values
    are their alternatives. `box_baselines`: whether a node's `baseline=` term is built
    at the top level, boxed by its parents (`StochasticNode.parents`); False under
    combinators whose rules cannot lift the parents out (`while_loop`, `shard_map`).
    """

    path: NodeId
    graph: Graph
    loop_levels: tuple[int, ...] = ()
    draws: dict | None = None
    enumerated: frozenset = frozenset()
    box_baselines: bool = True

    def child(self, *indices: int, new_loop: bool = False) -> Context:
        """A context for a sub-jaxpr of the equation at `indices`, with a graph of its own
        (and one more loop level when the sub-jaxpr is a `scan` body)."""
        levels = self.loop_levels + ((len(self.loop_levels),) if new_loop else ())
        path = self.path + indices
        return Context(
            path,
            Graph(self.graph.record),
            levels,
            self.draws_under(path),
            self.enumerated,
            self.box_baselines,
        )

    def draws_under(self, path: NodeId) -> dict | None:
        """The replayed values of the nodes whose ids start with `path`."""
        if not self.draws:
            return None
        return {n: v for n, v in self.draws.items() if n[: len(path)] == path} or None

    @property
    def level(self) -> int:
        """The level of the innermost enclosing scan."""
        return self.loop_levels[-1]


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


def eval_jaxpr(
    ctx: Context, jaxpr: _compat.Jaxpr, consts: list[Val], args: list[Val], extra_outvars=()
) -> list[Val]:
    """Evaluates `jaxpr` on `Val`s, recording stochastic nodes in `ctx.graph`; returns the
    outputs, then the values of `extra_outvars` (inner variables a rule asks for)."""
    env: dict[Any, Val] = {}

    def read(v) -> Val:
        if isinstance(v, _compat.Literal):
            return Val(v.val, known=known_value(v.val))
        return env[v]

    if len(args) != len(jaxpr.invars):
        raise AssertionError(f"{len(args)} arguments for {len(jaxpr.invars)} inputs")
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for index, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        outvals = eval_equation(ctx, index, eqn, invals)
        known = _known_outputs(eqn, invals)
        if known is not None:
            outvals = [dataclasses.replace(o, known=k) for o, k in zip(outvals, known)]
        for v, out in zip(eqn.outvars, outvals):
            if not isinstance(v, _compat.DropVar):
                env[v] = out
    return [read(v) for v in (*jaxpr.outvars, *extra_outvars)]


# -- Values known while tracing -----------------------------------------------------------

# Index arrays up to this many elements are evaluated while tracing when they are known.
KNOWN_MAX_SIZE = 1 << 16


def known_value(x: Any) -> np.ndarray | None:
    """`x` as a NumPy array when it is a concrete (not traced), small integer or boolean
    array: the index arrays whose values prove alignment (`jnp.arange(B)`)."""
    if isinstance(x, _compat.Tracer):
        return None
    try:
        a = np.asarray(x)
    except (TypeError, ValueError):
        return None
    if a.dtype.kind not in "biu" or a.size > KNOWN_MAX_SIZE:
        return None
    return a


def const_val(x: Any) -> Val:
    """A jaxpr constant as a `Val` (known when it is an index array)."""
    return Val(x, known=known_value(x))


@dataclasses.dataclass(frozen=True)
class LoopIndex:
    """A known value that is not a constant: every element of the array equals the
    current iteration of the `scan` at `level` (of `length` steps) plus `offset` (a
    `fori_loop` counter, a slice of `jnp.arange(T)` scanned over). `xs[t]` and
    `buf.at[t].set(c)` at such an index keep causality (`_loop_index_deps`)."""

    level: int
    offset: int
    length: int

    def covers(self, lo: int, hi: int) -> bool:
        """Whether every value it takes lies in [lo, hi)."""
        return lo <= self.offset and self.offset + self.length <= hi


def _uniform(k: Any) -> int | None:
    """The one value of a known integer array whose elements are all equal, else None."""
    if not isinstance(k, np.ndarray) or np.ma.isMaskedArray(k) or k.size == 0:
        return None
    first = k.reshape(-1)[0]
    return int(first) if np.all(k == first) else None


# Shape and dtype changes that keep "every element equals t + offset".
_INDEX_PRESERVING = frozenset(
    {
        "convert_element_type",
        "copy",
        "copy_p",
        "broadcast_in_dim",
        "reshape",
        "squeeze",
        "expand_dims",
    }
)


def _loop_index_outputs(eqn, invals: list[Val]) -> list | None:
    """Known outputs of the index arithmetic JAX emits around a loop counter: `t + c`,
    `t - c`, `t < c` (the negative-index normalisation `select_n(t < 0, t, t + n)`)."""
    name = eqn.primitive.name
    ks = [v.known for v in invals]
    if name == "select_n":
        which = _uniform(ks[0])
        return None if which is None or ks[1 + which] is None else [ks[1 + which]]
    idx = [k for k in ks if isinstance(k, LoopIndex)]
    if len(idx) != 1 or not _small_integral(eqn.outvars[0]):
        return None
    (li,) = idx
    out = _loop_index_of(eqn, ks, li)
    if isinstance(out, LoopIndex) and not _holds(eqn.outvars[0].aval.dtype, out):
        return None  # `t.astype(bool)`, or a type too narrow for every step's value
    return None if out is None else [out]


def _holds(dtype, li: LoopIndex) -> bool:
    """Whether the integer `dtype` holds every value `li` takes (bool does not)."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu":
        return False
    info = np.iinfo(dtype)
    return info.min <= li.offset and li.offset + max(li.length - 1, 0) <= info.max


def _loop_index_of(eqn, ks: list, li: LoopIndex):
    """The known output of `eqn` on inputs `ks`, one of which is `li` (see
    `_loop_index_outputs`): a `LoopIndex`, a known array, or None."""
    name = eqn.primitive.name
    if name in _INDEX_PRESERVING:
        return li
    first = isinstance(ks[0], LoopIndex)
    if len(ks) != 2 or (not first and name != "add"):
        return None
    c = _uniform(ks[1] if first else ks[0])
    if c is None:
        return None
    if name == "add":
        return dataclasses.replace(li, offset=li.offset + c)
    if name == "sub":
        return dataclasses.replace(li, offset=li.offset - c)
    if name == "lt":
        shape = _aval_shape(eqn.outvars[0])
        if li.offset >= c:  # t + offset < c never holds
            return np.zeros(shape, bool)
        if li.offset + li.length <= c:  # always holds
            return np.ones(shape, bool)
    return None


def _small_integral(v) -> bool:
    aval = getattr(v, "aval", None)
    dtype = getattr(aval, "dtype", None)
    return (
        isinstance(dtype, np.dtype)  # not a PRNG key's extended dtype
        and dtype.kind in "biu"
        and int(np.prod(_aval_shape(v), dtype=np.int64)) <= KNOWN_MAX_SIZE
    )


def _known_outputs(eqn, invals: list[Val]) -> list | None:
    """The outputs of a sample-free equation on known integer inputs (`iota`, the index
    normalisation `select_n(x < 0, x, x + n)`, `broadcast_in_dim`), computed now with
    eager JAX; None when an input or output is not known. A `concatenate` of known and
    unknown parts is a `np.ma.MaskedArray`, the unknown elements masked."""
    if any(isinstance(v.known, LoopIndex) for v in invals):
        return _loop_index_outputs(eqn, invals)
    if eqn.primitive.name == "concatenate" and any(v.known is not None for v in invals):
        # Index columns side by side (`x[jnp.arange(B), k]`): the known ones stay known,
        # the others are masked.
        if not _small_integral(eqn.outvars[0]):
            return None
        parts = [
            np.ma.masked_all(_aval_shape(var), var.aval.dtype)
            if v.known is None
            else np.ma.asarray(v.known)
            for v, var in zip(invals, eqn.invars)
        ]
        return [np.ma.concatenate(parts, axis=eqn.params["dimension"])]
    if (
        any(v.known is None or np.ma.isMaskedArray(v.known) for v in invals)
        or eqn.effects
        or not all(_small_integral(v) for v in eqn.outvars)
        or any(True for _ in _compat.iter_subjaxprs(eqn.params))
    ):
        return None
    try:
        with jax.ensure_compile_time_eval():
            outs = _compat.bind_equation(eqn, [v.known for v in invals])
    except Exception:  # noqa: BLE001  (unknown is always sound)
        return None
    return [known_value(o) for o in outs]


def eval_equation(ctx: Context, index: int, eqn, invals: list[Val]) -> list[Val]:
    prim = eqn.primitive
    if prim is _sample.sample_p:
        return [sample_rule(ctx, index, eqn, invals)]
    if prim is _graph.magic_box_p:
        return [frozen_box_rule(invals[0])]
    if prim.name in COLLECTIVES and any(_deps.scored(v.deps) for v in invals):
        return collective_rule(eqn, invals)
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
    """Re-binds the equation unchanged; outputs depend on what the axis rules say."""
    outs = _compat.bind_equation(eqn, [v.value for v in invals])
    in_deps = [v.deps for v in invals]
    if not any(in_deps):
        return [Val(o) for o in outs]
    out_deps = _loop_index_deps(eqn, invals)
    if out_deps is None:
        arrays = [v.known if isinstance(v.known, np.ndarray) else None for v in invals]
        out_deps = output_deps(eqn, in_deps, arrays)
    if len(outs) == 1:
        rule = term_rules.get(eqn.primitive.name)
        items = rule(eqn, invals, outs[0]) if rule is not None else None
        if items is not None:
            note_fallbacks(
                eqn, [d for v in invals for d, _ in v.term_items()], [d for d, _ in items]
            )
            return [_graph.make_val(outs[0], out_deps[0], items)]
    if eqn.primitive.name not in STATIC_CALLS:
        note_fallbacks(eqn, [d for v in invals for d, _ in v.term_items()], out_deps)
    return [Val(o, d) for o, d in zip(outs, out_deps)]


def output_deps(eqn, in_deps: list[Deps], known: list | None = None) -> list[Deps]:
    """Dependencies of each output of a sample-free equation (`known`: the operands'
    values where known while tracing, see `known_value`)."""
    name = eqn.primitive.name
    if name in STATIC_CALLS and STATIC_CALLS[name] in eqn.params:
        jaxpr, consts = _compat.open_jaxpr(eqn.params[STATIC_CALLS[name]])
        if len(jaxpr.invars) == len(in_deps):
            # The equations of a library function's jaxpr (`jnp.take` is a `jit`) carry
            # no user source line: `describe` names the call's.
            with inside_call(eqn):
                return static_deps(jaxpr, [EMPTY] * len(consts), in_deps)
    in_shapes = [_aval_shape(v) for v in eqn.invars]
    if name in ("sort", "top_k"):
        # Along the sorted axis every output element may come from any operand element;
        # the other axes stay aligned (every operand has the output's shape there).
        n = len(in_shapes[0])
        axis = eqn.params["dimension"] if name == "sort" else eqn.params.get("axis", n - 1)

        def along(a):
            return None if a == axis else a

        out = _deps.join(d.map_axes(lambda a: along(a % n) if a < n else None) for d in in_deps)
        return [out] * len(eqn.outvars)
    if len(eqn.outvars) == 1:
        return [_deps.through(eqn, in_deps, in_shapes, _aval_shape(eqn.outvars[0]), known)]
    return [_deps.join(d.coarsened() for d in in_deps)] * len(eqn.outvars)


def _shifted_kind(kind: str, offset: int) -> str | None:
    """Node element `j` related by `kind` to `t + offset`: its relation to `t` (None:
    every element)."""
    if offset == 0:
        return kind
    below = offset < 0
    if kind in (("eq", "le", "lt") if below else ("eq", "ge", "gt")):
        return "lt" if below else "gt"
    return None


def _loop_index_deps(eqn, invals: list[Val]) -> list[Deps] | None:
    """`xs[t]` (`dynamic_slice`) and `buf.at[t].set(c)` (`dynamic_update_slice`, or a
    `scatter` at one index) at a loop counter `t` (`LoopIndex`) of a scan of length
    `len(xs)`: element `t` of axis `a` is the current iteration, so a node axis aligned
    with axis `a` becomes `Loop(level)` when read (step `t` reads what step `t` wrote,
    or what the `t`-th draw made) and a `Loop(level)` relation of the written value
    becomes axis `a` of the buffer (element `u` holds what step `u` wrote). Returns None
    when no index is a loop counter (the axis rules apply)."""
    name = eqn.primitive.name
    if name == "dynamic_slice":
        shape, sizes = _aval_shape(eqn.invars[0]), eqn.params["slice_sizes"]
        starts = invals[1:]
        to_loop = {}
        for a, v in enumerate(starts):
            li = v.known
            if isinstance(li, LoopIndex) and sizes[a] == 1 and li.covers(0, shape[a]):
                to_loop[a] = li
        if not to_loop:
            return None

        def read(e):
            if isinstance(e, Axis):
                if e.axis in to_loop:
                    li = to_loop[e.axis]
                    kind = _shifted_kind(e.kind, li.offset)
                    return ALL if kind is None else _deps.Loop(li.level, kind)
                return e if sizes[e.axis] == shape[e.axis] else ALL
            return e

        parts = [invals[0].deps.map_entries(read)] + [v.deps.coarsened() for v in starts]
        return [_deps.join(parts)]
    if name == "dynamic_update_slice":
        shape, upd = _aval_shape(eqn.invars[0]), _aval_shape(eqn.invars[1])
        starts, n_index = invals[2:], 2
    elif name in ("scatter", "scatter-add", "scatter_add"):
        dn = eqn.params["dimension_numbers"]
        li = invals[1].known
        shape, upd = _aval_shape(eqn.invars[0]), _aval_shape(eqn.invars[2])
        if not (
            isinstance(li, LoopIndex)
            and _aval_shape(eqn.invars[1]) == (1,)
            and len(dn.scatter_dims_to_operand_dims) == 1
            and tuple(dn.inserted_window_dims) == tuple(dn.scatter_dims_to_operand_dims)
            and not getattr(dn, "operand_batching_dims", ())
            and len(upd) == len(shape) - 1
        ):
            return None
        (a,) = dn.scatter_dims_to_operand_dims
        # The update is the buffer's row without axis `a`: laid out with a size-1 axis.
        upd = upd[:a] + (1,) + upd[a:]
        starts = [Val(None) for _ in shape]
        starts[a] = invals[1]
        n_index = 1
    else:
        return None
    written = {}
    for a, v in enumerate(starts):
        li = v.known
        if isinstance(li, LoopIndex) and li.offset == 0 and upd[a] == 1 and li.length == shape[a]:
            written[a] = li
    if not written:
        return None
    inserted = name != "dynamic_update_slice"
    (a,) = written if len(written) == 1 else (None,)
    if a is None:
        return None
    li = written[a]

    def write(e):
        if isinstance(e, _deps.Loop) and e.level == li.level:
            return Axis(a, e.kind)
        if isinstance(e, Axis):
            axis = e.axis + 1 if inserted and e.axis >= a else e.axis
            return Axis(axis, e.kind) if axis != a and upd[axis] == shape[axis] else ALL
        return e

    update = invals[-1] if inserted else invals[1]
    index_deps = [v.deps.coarsened() for v in (invals[1:2] if inserted else invals[n_index:])]
    return [_deps.join([invals[0].deps, update.deps.map_entries(write), *index_deps])]


# Where alignment fell back to "every element", collected while `describe` runs:
# (node id, node axis) -> [(primitive, source)].
_FALLBACKS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fallbacks", default=None)
# The source line of the innermost call equation whose jaxpr is being read.
_CALL_SOURCE: contextvars.ContextVar[str] = contextvars.ContextVar("call_source", default="")
# Set while `scg.draw` runs its influence pass (`_draw.py`): node id -> the dependencies
# of the draw's parameters. In that pass the inputs and every draw are also *sources*
# (dependency keys that are not node ids, `_deps.is_source`), which stop at the next draw.
_INFLUENCE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("influence", default=None)


def _influence(node_id: NodeId, params: list[Val], deps: Deps) -> Deps:
    """`deps` of a draw's value, unchanged outside the influence pass. In it, records what
    the draw's parameters depend on (the sources that reach them directly, and the score
    nodes upstream) and returns `deps` with the sources replaced by the draw itself:
    what the draw's parents influence further down, they influence through the draw."""
    log = _INFLUENCE.get()
    if log is None:
        return deps
    parents = _deps.join([v.deps for v in params])
    log[node_id] = _deps.join([log.get(node_id, EMPTY), parents])
    return _deps.join([_deps.scored_part(deps), Deps({("draw", node_id): ()})])


@contextlib.contextmanager
def inside_call(eqn):
    """While reading the jaxpr of call equation `eqn`: its equations without a source
    line of their own are reported at `eqn`'s."""
    token = _CALL_SOURCE.set(_compat.source_info(eqn) or _CALL_SOURCE.get())
    try:
        yield
    finally:
        _CALL_SOURCE.reset(token)


def note_fallbacks(eqn, in_deps: list[Deps], out_deps: list[Deps], what: str | None = None):
    """Records, for `describe`, each node axis that an input is aligned with and no
    output is (a plate or time order lost at this equation)."""
    log = _FALLBACKS.get()
    if log is None:
        return

    def aligned(deps_list):
        out = set()
        for d in deps_list:
            for key, rel in d.items():
                n_node = len(rel) - len(_deps.lane_names(key))
                out.update(
                    (_deps.base_node(key), k)
                    for k, e in enumerate(rel[:n_node])
                    if isinstance(e, Axis)
                )
        return out

    lost = aligned(in_deps) - aligned(out_deps)
    if lost:
        where = (what or eqn.primitive.name, _compat.source_info(eqn) or _CALL_SOURCE.get())
        for node_axis in lost:
            entries = log.setdefault(node_axis, [])
            if where not in entries:
                entries.append(where)


def static_deps(jaxpr, const_deps: list[Deps], in_deps: list[Deps]) -> list[Deps]:
    """The outputs' dependencies of a sample-free jaxpr, read off its equations."""
    env: dict[Any, Deps] = dict(zip(jaxpr.constvars, const_deps))
    env.update(zip(jaxpr.invars, in_deps))

    def read(v) -> Deps:
        return EMPTY if isinstance(v, _compat.Literal) else env.get(v, EMPTY)

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        outs = output_deps(eqn, ins) if any(ins) else [EMPTY] * len(eqn.outvars)
        if any(ins) and eqn.primitive.name not in STATIC_CALLS:
            note_fallbacks(eqn, ins, outs)
        for v, d in zip(eqn.outvars, outs):
            if not isinstance(v, _compat.DropVar):
                env[v] = d
    return [read(v) for v in jaxpr.outvars]


def _aval_shape(v) -> tuple:
    return tuple(v.aval.shape) if hasattr(v.aval, "shape") else ()


def _at(eqn) -> str:
    where = _compat.source_info(eqn)
    return f" (at {where})" if where else ""


def frozen_box_rule(tau: Val) -> Val:
    """A magic box of an scgjax transform nested inside this one: its value (1) with no
    derivative and no dependence on the draws. The inner gradient estimate is then
    differentiated as the function of θ and of the draws that it is; the inner draws are
    nodes of this graph (their `sample_p` equations), so their score terms come from
    here, weighted by the costs downstream of them."""
    return Val(lax.stop_gradient(_graph.magic_box_p.bind(tau.value)))


# -- Collectives over named axes ---------------------------------------------------------

# Sums over lanes (positional int axes, which `vmap` inside the program leaves, reduce
# like `reduce_sum`).
_LANE_SUMS = frozenset({"psum", "psum2", "psum_invariant"})
# Casts between invariant and varying types (`shard_map`): the value is unchanged.
_LANE_CASTS = frozenset({"pvary", "pcast", "pbroadcast"})
COLLECTIVES = (
    _LANE_SUMS
    | _LANE_CASTS
    | frozenset(
        {
            "pmax",
            "pmin",
            "all_gather",
            "all_gather_invariant",
            "ppermute",
            "all_to_all",
            "reduce_scatter",
            "psum_scatter",
        }
    )
)


def _names(axes) -> tuple:
    axes = axes if isinstance(axes, (tuple, list)) else (axes,)
    return tuple(a for a in axes if not isinstance(a, int))


def collective_rule(eqn, invals: list[Val]) -> list[Val]:
    """A collective makes each lane's value depend on the other lanes' draws.

    * `psum` over named axes: the value depends on the node in every lane (`ALL`);
      each cost term goes through as the lanes' terms gathered on a new pending axis
      (`all_gather`), so lane `j`'s term keeps exactly lane `j`'s log-probabilities
      (the per-lane surrogate `Σ_j ⊡(τ_j)·c_j`, the same numbers as a hand-written
      DiCE of the pmean'd loss). Positional axes (what `vmap` inside the program leaves)
      reduce like `reduce_sum`.
    * `all_gather` (untiled, one name): element `j` of the new axis is lane `j`'s;
      linear, so terms are gathered too.
    * casts (`pvary`): unchanged. Anything else (`pmax`, `ppermute`, `all_to_all`,
      `reduce_scatter`, tiled gathers, `axis_index_groups`): every lane, every element.
    """
    outs = _compat.bind_equation(eqn, [v.value for v in invals])
    name, params = eqn.primitive.name, eqn.params
    if name in _LANE_CASTS:
        # The terms take the value's new type (varying along the cast's axes, under
        # `check_vma=True`), so they combine with what the value combines with.
        return [
            _graph.make_val(o, v.deps, [(d, _compat.vary_like(t, o)) for d, t in v.term_items()])
            if v.has_terms
            else Val(o, v.deps)
            for o, v in zip(outs, invals)
        ]
    if params.get("axis_index_groups") is not None:
        return [_coarse_lanes(o, v, ()) for o, v in zip(outs, invals)]
    if name in _LANE_SUMS:
        names = _names(params["axes"])
        positional = tuple(a for a in params["axes"] if isinstance(a, int))
        return [_lane_sum(o, v, names, positional) for o, v in zip(outs, invals)]
    if name in ("all_gather", "all_gather_invariant"):
        names = _names(params["axis_name"])
        if len(names) == 1 and not params.get("tiled") and len(outs) == 1:
            return [_gathered(eqn, outs[0], invals[0], names[0])]
    axes = params.get("axes", params.get("axis_name", ()))
    return [_coarse_lanes(o, v, _names(axes)) for o, v in zip(outs, invals)]


def _coarse_lanes(out, v: Val, names: tuple) -> Val:
    if not v.deps:
        return Val(out)
    deps = v.deps.coarsened()
    return Val(out, _deps.across_lanes(deps, names, lambda n: ALL) if names else deps)


def _lane_sum(out, v: Val, names: tuple, positional: tuple) -> Val:
    if not v.deps:
        return Val(out)
    deps, items = v.deps, v.term_items()
    for n in names:
        deps = _deps.across_lanes(deps, (n,), lambda _: ALL)
        gathered = []
        for d, t in items:
            axis = np.ndim(t)  # a new pending axis: the lanes
            gathered.append(
                (
                    _deps.across_lanes(d, (n,), lambda _, a=axis: Axis(a)),
                    _compat.all_gather(t, n, axis, invariant=n not in _compat.varying_axes(out)),
                )
            )
        items = gathered
    if positional:
        kept = [a for a in range(np.ndim(v.value)) if a not in positional]
        deps = deps.map_axes(lambda a: kept.index(a) if a in kept else None)
        reduced = _reduce_terms(Val(v.value, v.deps, _as_terms(items)), set(positional), kept)
        items = reduced if reduced is not None else [(deps, out)]
    return _graph.make_val(out, deps, items)


def _as_terms(items) -> dict:
    return _graph.merge_terms(items)


def _gathered(eqn, out, v: Val, name: str) -> Val:
    axis = eqn.params["all_gather_dimension"]

    def moved(d: Deps) -> Deps:
        d = d.map_axes(lambda a: a + 1 if a >= axis else a)
        return _deps.across_lanes(d, (name,), lambda _: Axis(axis))

    items = [(moved(d), lax.all_gather(t, name, axis=axis)) for d, t in v.term_items()]
    return _graph.make_val(out, moved(v.deps), items)


# -- Stochastic nodes --------------------------------------------------------------------


def _take(stacked, which):
    """Each element's alternative: `stacked` `(R, *shape, ...)` at `which` `(1, *shape)`
    (trailing axes of `stacked` beyond the site's shape are kept: a one-hot value, or
    the channels of a weight part)."""
    stacked = jnp.asarray(stacked)
    which = jnp.reshape(which, which.shape + (1,) * (stacked.ndim - which.ndim))
    return jnp.take_along_axis(stacked, which, axis=0)[0]


def sample_rule(ctx: Context, index: int, eqn, invals: list[Val]) -> Val:
    """Draws the value (or takes it from `ctx.draws`); for a score node also records its
    log-probability."""
    params = eqn.params
    n_leaves = params["spec"].treedef.num_leaves
    key = invals[0].value
    leaves = [v.value for v in invals[1 : 1 + n_leaves]]
    baseline = invals[1 + n_leaves] if params.get("has_baseline") else None
    # The estimator's own operands (learned control-variate parameters) come last.
    operands = invals[1 + n_leaves + (baseline is not None) :]
    spec, n_batch = params["spec"], params["n_batch"]
    method = params["method"]
    pathwise = params["estimator"] == "pathwise"
    node_id, source = ctx.path + (index,), _compat.source_info(eqn)
    name = params.get("name")
    replayed = ctx.draws.get(node_id) if ctx.draws else None
    piece = None
    if pathwise:
        if replayed is not None:
            raise ValueError(
                f"scgjax: cannot replay the pathwise {spec.name} draw"
                f"{f' {name!r}' if name else ''}{_at(eqn)}: its gradient flows through its "
                "value, which a replayed value would cut. Replay score-function draws only "
                "(or pass estimator='score' for this site)."
            )
        value = _sample.draw(
            key,
            leaves,
            spec=spec,
            sample_shape=params["sample_shape"],
            n_batch=n_batch,
            method=method,
            reparameterized=True,
        )
        deps = _parent_deps(eqn, invals[: 1 + n_leaves], value)
        note_fallbacks(
            eqn, [v.deps for v in invals[: 1 + n_leaves]], [deps], f"the parameters of {spec.name}"
        )
        node = StochasticNode(
            node_id, spec.name, "pathwise", jnp.shape(value), source, name, method
        )
        record = None
        if ctx.graph.record:
            lp = _sample.log_prob(
                value, leaves, spec=spec, n_batch=n_batch, score_log_prob=method.record_log_prob
            )
            record = (value, lp, jnp.ones(jnp.shape(lp), bool))
        ctx.graph.add(node, record=record)
        return Val(value, _influence(node_id, invals[1 : 1 + n_leaves], deps))
    if replayed is not None:
        shape = eqn.outvars[0].aval.shape
        # (An alternatives site's `replayed` is the plan's own: one index per element.)
        alternatives_site = isinstance(method, _estimators.Alternatives) and (
            node_id in ctx.enumerated
        )
        if not alternatives_site and tuple(np.shape(replayed)) != tuple(shape):
            raise ValueError(
                f"scgjax: the replayed value of the {spec.name} draw"
                f"{f' {name!r}' if name else ''}{_at(eqn)} has shape {np.shape(replayed)}, "
                f"but the draw has shape {tuple(shape)}"
                f"{' (per iteration of its loop)' if ctx.loop_levels else ''}."
            )
        if alternatives_site:
            # `replayed` is each element's alternative (`_enumerate.plan`).
            which = jnp.asarray(replayed).astype(jnp.int32)[None]
            values, pieces, extra = _sample.alternatives(
                key,
                leaves,
                [v.value for v in operands],
                spec=spec,
                sample_shape=params["sample_shape"],
                n_batch=n_batch,
                method=method,
            )
            replayed = _take(values, which)
            piece = _take(pieces, which)
            if method.has_extra_term:
                ctx.graph.baseline_terms.append(extra)
        value = jnp.asarray(replayed).astype(eqn.outvars[0].aval.dtype)
        if not (piece is not None and method.differentiable_values):
            value = lax.stop_gradient(value)
    else:
        # A score draw is bound as `sample_p` again, with its baseline: when this
        # transform runs inside another scgjax transform, the outer one sees the draw as
        # a node of its own graph (MAML, LOLA), and `scg_grad(surrogate(f))` is
        # `scg_grad(f)`.
        extra = [] if baseline is None else [jnp.asarray(baseline.value)]
        value = lax.stop_gradient(
            _sample.sample_p.bind(
                key,
                *map(jnp.asarray, leaves),
                *extra,
                *(jnp.asarray(v.value) for v in operands),
                spec=spec,
                sample_shape=params["sample_shape"],
                estimator="score",
                method=method,
                n_batch=n_batch,
                has_baseline=baseline is not None,
                name=name,
            )
        )
    deps = _parent_deps(eqn, invals[: 1 + n_leaves], value)
    note_fallbacks(
        eqn, [v.deps for v in invals[: 1 + n_leaves]], [deps], f"the parameters of {spec.name}"
    )
    if replayed is not None and ctx.enumerated and not method.enumerates:
        upstream = {_deps.base_node(k) for k in deps} & ctx.enumerated
        if upstream:
            raise ValueError(
                f"scgjax: draws= replays the {spec.name} draw{f' {name!r}' if name else ''}"
                f"{_at(eqn)}, whose distribution depends on a site evaluated at several "
                f"values (estimator {_estimators.several_values()}): one "
                "replayed value cannot follow that site's alternatives. Replay only sites "
                "upstream of (or independent of) that one."
            )
    support = ()
    if method.enumerates:
        # Per element (a `to_event` does not sum): the weights of the alternatives.
        score_log_prob = method.element_log_prob
        support = method.support(spec.unflatten(leaves))
    else:
        score_log_prob = _logprob.score_log_prob
    channels = 0
    if piece is not None:
        # An alternatives site's weight part at this alternative (`_weights.weight`),
        # on a trailing axis of `method.weight_channels` channels where it has some.
        log_prob = piece
        channels = 1 if method.weight_channels else 0
    else:
        log_prob = _sample.log_prob(
            value, leaves, spec=spec, n_batch=n_batch, score_log_prob=score_log_prob
        )
    shape = jnp.shape(log_prob)[: jnp.ndim(log_prob) - channels]
    own = Deps({node_id: _deps.node_rel(ctx.loop_levels, len(shape))})
    b, parents = None, None
    if baseline is not None:
        try:
            np.broadcast_shapes(np.shape(baseline.value), np.shape(log_prob))
        except ValueError:
            raise ValueError(
                f"scgjax.sample: the baseline of this {spec.name} draw has shape "
                f"{np.shape(baseline.value)}, which does not broadcast to the shape of its "
                f"log-probability, {np.shape(log_prob)}{_at(eqn)}. Give one baseline per "
                "log-probability element, or one that broadcasts (e.g. shape (B, 1))."
            ) from None
        if ctx.box_baselines and piece is None and not method.enumerates:
            b = jnp.broadcast_to(baseline.value, jnp.shape(log_prob))
            b = b.astype(jnp.result_type(log_prob))
            parents = _strict_parents(_deps.scored_part(deps), node_id, shape, ctx.loop_levels)
        else:
            ctx.graph.baseline_terms.append(_graph.baseline_term(log_prob, baseline.value))
    node = StochasticNode(
        node_id,
        spec.name,
        "score",
        shape,
        source,
        name,
        method,
        support,
        has_baseline=baseline is not None,
        parents=parents,
    )
    record = (value, log_prob, jnp.ones(jnp.shape(log_prob), bool)) if ctx.graph.record else None
    ctx.graph.add(node, log_prob, record, b)
    return Val(value, _influence(node_id, invals[1 : 1 + n_leaves], _deps.join([deps, own])))


# Wrappers whose batch element `i` is drawn from batch element `i` of each inner
# distribution that has the wrapper's batch shape (and from element `i` of the wrapper's
# own batch-shaped parameters). The inner distributions of any other wrapper are treated
# as reaching every element.
_ELEMENTWISE_WRAPPERS = (
    dist.ExpandedDistribution,
    dist.MaskedDistribution,
    dist.ZeroInflatedProbs,
    dist.MixtureSameFamily,
    dist.MixtureGeneral,
    dist.LeftTruncatedDistribution,
    dist.RightTruncatedDistribution,
    dist.TwoSidedTruncatedDistribution,
)


def _inner_distributions(d: dist.Distribution) -> list[dist.Distribution]:
    inner = []
    for v in vars(d).values():
        for x in v if isinstance(v, (list, tuple)) else (v,):
            if isinstance(x, dist.Distribution):
                inner.append(x)
    return inner


def _event_dim(constraint: Any) -> int | None:
    """A constraint's `event_dim`, or None where it is not static (`Delta`'s `v` is
    `constraints.dependent`, whose `event_dim` raises)."""
    try:
        event_dim = getattr(constraint, "event_dim", None)
    except (NotImplementedError, ValueError, TypeError):
        return None
    return event_dim if isinstance(event_dim, int) else None


def _elementwise_leaves(d: dist.Distribution, n_batch: int = 0) -> set[int]:
    """The `id`s of the leaves of `d` whose leading axes are `d`'s batch axes, element
    for element: batch element `i` of a draw reads element `i` of the leaf only.

    A parameter qualifies when it has exactly `batch_shape` followed by as many axes as
    its constraint's `event_dim` (a Categorical's logits are `batch_shape + (K,)`, a
    MultivariateNormal's loc `batch_shape + (D,)`, a Dirichlet's concentration
    `batch_shape + (K,)`), and a wrapper's leaves when they qualify for an inner
    distribution of the same batch shape (for `Independent`, one whose batch shape starts
    with `Independent`'s). Anything else (a leaf no constraint names, a shared
    `scale_tril`, an inner distribution of another batch shape, such as the base of
    `Categorical(l).expand((B,))` whose logits are `(K,)`) reaches every element: the
    sound default. A leaf in two roles qualifies only if it qualifies in both. The
    leaves carry `n_batch` leading vmapped axes of their own.
    """
    good: set[int] = set()
    bad: set[int] = set()

    def visit(d: dist.Distribution) -> None:
        batch = tuple(d.batch_shape)
        inner = _inner_distributions(d)
        independent = isinstance(d, dist.Independent)
        if inner and not (independent or isinstance(d, _ELEMENTWISE_WRAPPERS)):
            bad.update(id(x) for x in jax.tree_util.tree_leaves(d))
            return
        for child in inner:
            # `Independent`'s base has more batch axes (reinterpreted as event axes):
            # its batch element `(i, j)` is element `j` of the event of batch element `i`.
            base = tuple(child.batch_shape)
            if base == batch or (independent and base[: len(batch)] == batch):
                visit(child)
            else:
                bad.update(id(x) for x in jax.tree_util.tree_leaves(child))
        constraints: dict[str, Any] = {}
        for cls in reversed(type(d).__mro__):  # a subclass's constraint wins
            constraints.update(getattr(cls, "arg_constraints", None) or {})
        for name, value in vars(d).items():
            if isinstance(value, dist.Distribution) or not hasattr(value, "shape"):
                continue
            if name == "_mask" and isinstance(d, dist.MaskedDistribution):
                event_dim = 0
            else:
                event_dim = _event_dim(constraints.get(name))
            shape = tuple(np.shape(value))[n_batch:]
            ok = (
                event_dim is not None
                and len(shape) == len(batch) + event_dim
                and shape[: len(batch)] == batch
            )
            (good if ok else bad).add(id(value))

    visit(d)
    return good - bad


def _strict_parents(deps: Deps, node_id, shape: tuple[int, ...], loop_levels: tuple) -> Deps:
    """A baseline's parents (`StochasticNode.parents`): what the draw depends on through
    its parameters, but on its own node only through relations that exclude each
    element itself (strictly earlier steps of its loop). The parents must not include
    the node's own element: `⊡(log p(w_i))·(1 − ⊡(log p(w_i)))·b` would bias the
    second derivatives by `−2b·E[s_i s_iᵀ]`. A rule's fallback `ALL` on its own loop
    axis would include it, so such a relation is dropped (unbiased: τ_W may be any set
    of the nodes drawn before `w`; leaving one out costs variance only)."""
    if all(_deps.base_node(k) != node_id for k in deps):
        return deps
    n_loops = len(loop_levels)

    def excludes_self(rel) -> bool:
        # A strict entry on one of the node's axes that relates it to itself: its own
        # loop's axis (`Loop` of that level, inside the body) or the same axis (`Axis`).
        for k, e in enumerate(rel):
            if e is ALL or e.kind not in ("lt", "gt"):
                continue
            if isinstance(e, Loop) and k < n_loops and e.level == loop_levels[k]:
                return True
            if isinstance(e, Axis) and k >= n_loops and e.axis == k - n_loops:
                return True
        return False

    # (its other lanes of a named axis: dropped too, as `ALL` lanes include its own)
    kept = {k: list(r) for k, r in deps._map.items() if _deps.base_node(k) != node_id}
    strict = [r for r in deps._map.get(node_id, []) if excludes_self(r)]
    if strict:
        kept[node_id] = strict
    return Deps._of(kept)


def _parent_deps(eqn, invals: list[Val], value) -> Deps:
    """What a draw depends on through its key and parameters: elementwise along the
    vmapped axes, and along the batch axes for the parameters `_elementwise_leaves`
    accepts; every element otherwise."""
    params = eqn.params
    n_batch, sample_shape = params["n_batch"], params["sample_shape"]
    leaves = [v.value for v in invals[1:]]
    d = params["spec"].unflatten(leaves)  # shapes are static aux data
    n_axes = len(d.batch_shape)
    # `d` holds these very objects: a leaf is known by its `id` (a copy would be a leaf
    # no rule names, so it would reach every element)
    good = _elementwise_leaves(d, n_batch)
    parts = []
    for i, v in enumerate(invals):
        if not v.deps:
            continue
        elementwise = i > 0 and id(leaves[i - 1]) in good

        def axis_map(a, elementwise=elementwise):
            if a < n_batch:
                return a
            if elementwise and a < n_batch + n_axes:
                return a + len(sample_shape)
            return None

        parts.append(v.deps.map_axes(axis_map))
    return _deps.join(parts)


# -- Linear equations: how cost terms pass through them ----------------------------------


def _term_items_through(
    eqn, invals: list[Val], out, position: int, others: list | None = None
) -> list[tuple[Deps, Any]]:
    """The terms of `invals[position]` pushed through `eqn` (the other operands fixed to
    `others`, default their values), vmapped over each term's pending axes."""
    values = [v.value for v in invals] if others is None else list(others)
    in_shapes = [np.shape(v.value) for v in invals]
    n_in, n_out = len(in_shapes[position]), np.ndim(out)
    axis_map = _deps.axis_rule(eqn, in_shapes, np.shape(out))[position]
    items = []
    for deps, t in invals[position].term_items():

        def fn(x):
            args = list(values)
            args[position] = x
            return _compat.bind_equation(eqn, args)[0]

        for _ in range(np.ndim(t) - n_in):
            fn = jax.vmap(fn, in_axes=-1, out_axes=-1)
        items.append((_deps.move(eqn, deps, axis_map, n_in, n_out), fn(t)))
    return items


def _unary_linear(eqn, invals, out):
    if not invals[0].has_terms:
        return None
    if any(_deps.scored(v.deps) for v in invals[1:]):
        return None
    return _deps.with_sources(_term_items_through(eqn, invals, out, 0), invals[1:])


def _sum_of_operands(eqn, invals, out, positions):
    """Operands at `positions` enter linearly and jointly (add, sub, concatenate, the
    cases of select_n): each operand's terms pushed through `eqn` itself with zeros in
    place of the others, so the equation applies its own signs (`sub(0, t) = -t`)."""
    zeros = [jnp.zeros_like(v.value) if i in positions else v.value for i, v in enumerate(invals)]
    items = []
    for p in positions:
        items.extend(_term_items_through(eqn, invals, out, p, others=zeros))
    return items


def _needs_split(invals, positions) -> bool:
    vals = [invals[p] for p in positions]
    return any(v.has_terms for v in vals) or len({_deps.scored_part(v.deps) for v in vals}) > 1


def _add(eqn, invals, out):
    if not _needs_split(invals, (0, 1)):
        return None
    if all(np.shape(v.value) == np.shape(out) for v in invals):
        # Cheaper than pushing through `add` with zeros: terms line up as they are.
        return [it for v in invals for it in v.term_items()]
    return _sum_of_operands(eqn, invals, out, (0, 1))


def _sub(eqn, invals, out):
    if not _needs_split(invals, (0, 1)):
        return None
    a, b = invals
    if all(np.shape(v.value) == np.shape(out) for v in invals):
        return a.term_items() + [(d, -t) for d, t in b.term_items()]
    return _sum_of_operands(eqn, invals, out, (0, 1))


def _joint(first: int):
    """concatenate/stack (every operand) and select_n (the cases after the predicate)."""

    def rule(eqn, invals, out):
        positions = tuple(range(first, len(invals)))
        if any(_deps.scored(v.deps) for v in invals[:first]) or not _needs_split(invals, positions):
            return None
        items = _sum_of_operands(eqn, invals, out, positions)
        return _deps.with_sources(items, invals[:first])

    return rule


def _linear_in_one(*positions):
    """Linear in the operand at one of `positions` when every other operand is sample-free."""

    def rule(eqn, invals, out):
        for p in positions:
            others = [v for i, v in enumerate(invals) if i != p]
            if invals[p].has_terms and not any(_deps.scored(v.deps) for v in others):
                return _deps.with_sources(_term_items_through(eqn, invals, out, p), others)
        return None

    return rule


def _reduce_terms(v: Val, axes: set, kept: list[int], weight=None):
    """The terms of `v` summed over `axes`, the output's axes being `kept` (in that
    order). Axes that a node is aligned with are not summed but moved to the pending
    axes, so each cost element keeps its own weight (automatic plates). `weight(t)`, if
    given, scales each term elementwise first. None when nothing needs to be split."""
    n_in = np.ndim(v.value)
    items, split = [], v.has_terms
    for deps, t in v.term_items():
        aligned = sorted(
            {
                e.axis
                for _, rel in deps.items()
                for e in rel
                if isinstance(e, Axis) and e.axis in axes
            }
        )
        split = split or bool(aligned)
        summed = sorted(axes - set(aligned))
        order = list(kept) + aligned + list(range(n_in, np.ndim(t))) + summed
        if weight is not None:
            t = weight(t)
        t = jnp.transpose(t, order) if order != list(range(np.ndim(t))) else t
        if summed:
            t = jnp.sum(t, axis=tuple(range(np.ndim(t) - len(summed), np.ndim(t))))
        items.append((deps.map_axes(lambda a: order.index(a) if a not in summed else None), t))
    return items if split else None


def _reduce_sum(eqn, invals, out):
    (v,) = invals
    axes = set(eqn.params["axes"])
    return _reduce_terms(v, axes, [a for a in range(np.ndim(v.value)) if a not in axes])


def _dot_general(eqn, invals, out):
    """Linear in a term operand whose partner is sample-free. When the partner has no
    free axes (a weighted sum: `jnp.dot(discounts, rewards)`, `costs @ weights`), the
    contraction is a product and a `reduce_sum`, so aligned axes stay pending."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    for p in (0, 1):
        x, w = invals[p], invals[1 - p]
        if _deps.scored(w.deps):
            continue
        xc, wc, xb, wb = (lc, rc, lb, rb) if p == 0 else (rc, lc, rb, lb)
        n_x, w_value = np.ndim(x.value), w.value
        if np.ndim(w_value) != len(wc) + len(wb):
            return _linear_in_one(p)(eqn, invals, out)  # adds w's sources
        # The partner laid out on x's axes.
        dims = tuple(
            xc[list(wc).index(k)] if k in wc else xb[list(wb).index(k)]
            for k in range(np.ndim(w_value))
        )

        def weight(t, dims=dims, w_value=w_value):
            full = dims + tuple(range(n_x, np.ndim(t)))
            shaped = (
                jnp.transpose(w_value, tuple(int(a) for a in np.argsort(dims))) if dims else w_value
            )
            return t * lax.broadcast_in_dim(shaped, np.shape(t), tuple(sorted(full[: len(dims)])))

        free = [a for a in range(n_x) if a not in xc and a not in xb]
        items = _reduce_terms(x, set(xc), list(xb) + free, weight)
        return None if items is None else _deps.with_sources(items, [w])
    return None


def _exact(rule, position: int = 0):
    """`rule` only where the operation is exactly linear: on inexact (float, complex)
    operands, or converting into an inexact dtype. Rounding (float to int, integer
    division, reduced precision) does not distribute over a sum."""

    def checked(eqn, invals, out):
        ins = jnp.result_type(invals[position].value)
        if not (
            jnp.issubdtype(jnp.result_type(out), jnp.inexact)
            and (jnp.issubdtype(ins, jnp.inexact) or eqn.primitive.name == "convert_element_type")
        ):
            return None
        return rule(eqn, invals, out)

    return checked


# A scatter-add keeps a row axis pending while its output has at most this many elements
# per row.
SCATTER_PENDING_MAX = 1 << 22


def _scatter_add(eqn, invals, out):
    """`zeros.at[ids].add(v)`, `jax.ops.segment_sum(v, ids)` with sample-free ids: linear
    in the updates. Each update row `j` keeps its own weight: its terms are scattered row
    by row onto a new pending axis (like a `reduce_sum` over an aligned axis), so a cost
    summed per segment and then over segments is weighted per row."""
    op, idx, upd = invals
    dn = eqn.params["dimension_numbers"]
    upd_shape = np.shape(upd.value)
    scatter_axes = [u for u in range(len(upd_shape)) if u not in dn.update_window_dims]
    if (
        _deps.scored(op.deps)
        or _deps.scored(idx.deps)
        or not _deps.scored(upd.deps)
        or len(scatter_axes) != 1
        or np.shape(idx.value)[-1:] != (1,)
        or np.ndim(idx.value) != 2
        or getattr(dn, "operand_batching_dims", ())
        or not jnp.issubdtype(jnp.result_type(out), jnp.inexact)
    ):
        return None
    (u0,) = scatter_axes
    rows = upd_shape[u0]
    maps = _deps.axis_rule(eqn, [np.shape(v.value) for v in invals], np.shape(out))
    upd_map, n_out, n_upd = maps[2], np.ndim(out), len(upd_shape)
    zeros = jnp.zeros_like(op.value)
    items = [(EMPTY, op.value)]
    for deps, t in upd.term_items():
        n_pending = np.ndim(t) - n_upd
        aligned = any(isinstance(e, Axis) and e.axis == u0 for _, rel in deps.items() for e in rel)
        size = np.size(out) * rows * int(np.prod(np.shape(t)[n_upd:]))
        if not aligned or size > SCATTER_PENDING_MAX:

            def whole(x):
                return _compat.bind_equation(eqn, [zeros, idx.value, x])[0]

            for _ in range(n_pending):
                whole = jax.vmap(whole, in_axes=-1, out_axes=-1)
            moved_deps = deps.map_axes(lambda a: upd_map(a) if a < n_upd else n_out + a - n_upd)
            items.append((moved_deps, whole(t)))
            continue

        def one_row(x, i):  # row j of the update (axis u0 removed) and its index row
            return _compat.bind_equation(eqn, [zeros, i[None], jnp.expand_dims(x, u0)])[0]

        fn = one_row
        for _ in range(n_pending):
            fn = jax.vmap(fn, in_axes=(-1, None), out_axes=-1)
        scattered = jax.vmap(fn, in_axes=(u0, 0), out_axes=-1)(t, idx.value)

        def moved(a, n_pending=n_pending):
            if a == u0:
                return n_out + n_pending  # the new pending axis: update row j
            if a >= n_upd:
                return n_out + a - n_upd  # an existing pending axis
            return upd_map(a)

        items.append((deps.map_axes(moved), scattered))
    return _deps.with_sources(items, [op, idx])


# Keyed by primitive name: some (e.g. `stack`) are not exported by every JAX version.
for _name in (
    "neg",
    "broadcast_in_dim",
    "reshape",
    "squeeze",
    "expand_dims",
    "transpose",
    "copy",
    "copy_p",
    "real",
    "cumsum",
    # Placement only (`with_sharding_constraint`, `jax.sharding.reshard`): the values,
    # and so the terms, are unchanged.
    "sharding_constraint",
    "reshard",
    "mesh_cast",
):
    term_rules[_name] = _unary_linear
term_rules["convert_element_type"] = _exact(_unary_linear)
term_rules["reduce_sum"] = _reduce_sum
term_rules["add"] = term_rules["add_any"] = _add
term_rules["sub"] = _sub
term_rules["concatenate"] = term_rules["stack"] = _joint(0)
term_rules["select_n"] = _joint(1)
term_rules["mul"] = _linear_in_one(0, 1)
term_rules["div"] = _exact(_linear_in_one(0))
term_rules["dot_general"] = _dot_general
term_rules["scatter-add"] = term_rules["scatter_add"] = _scatter_add

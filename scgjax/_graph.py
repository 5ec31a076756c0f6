"""The stochastic computation graph: stochastic nodes, cost terms and the DiCE objective.

While the interpreter (`_interpret.py`) evaluates a program, every value is a `Val`:

* `deps`: which elements of which score nodes it depends on (`_deps.Deps`), and
* `terms`: an additive decomposition of the value along the cost's additive tail
  (add, sub, neg, reduce_sum, scaling by sample-independent factors, ...). Each term is
  an array with the value's axes followed by *pending* axes that the value has already
  summed over, and its own `Deps` over all those axes. A `reduce_sum` over an axis that
  a node is aligned with moves that axis to the pending ones instead of summing it, so
  cost element `i` keeps its alignment with sample element `i` (automatic plates).

At the end, each term `c` gets `⊡(τ)·c` elementwise, where `τ` gathers, for each element
of `c`, the log-probabilities of exactly the node elements upstream of it
(Rao-Blackwellization by dataflow, Schulman et al. 2015; DiCE, Foerster et al. 2018).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex
from jax.interpreters import ad, batching, mlir

from . import _compat, _deps
from ._deps import EMPTY, Axis, Deps

NodeId = tuple[int, ...]
"""Where a `sample` equation sits: its index in each enclosing jaxpr, outermost first."""


@dataclasses.dataclass(frozen=True)
class StochasticNode:
    """A `sample` site of the graph.

    Score-function nodes carry a log-probability and weight their downstream costs;
    pathwise nodes are differentiated through and are recorded only to be described.

    Attributes:
      id: where its `sample` equation sits.
      distribution: the distribution's class name.
      estimator: `"score"` or `"pathwise"`: how the interpreter treats it (an
        enumerated site is a score node whose log-probability weights instead of
        joining τ; a relaxed one is pathwise).
      shape: for a score node the shape of its log-probability, for a pathwise node the
        shape of its value, as seen at the top level (draws inside a `scan` are stacked
        along a leading axis per loop).
      source: file and line of the `scg.sample` call, where JAX records it.
      name: the `name=` given to `scg.sample`, if any.
      method: the estimator object (`scgjax.estimators`) the site was drawn with.
      support: for an enumerated site, the values each element takes.
      has_baseline: whether the program gave it a `baseline=` of its own.
      parents: for a node with a baseline whose term is built at the top level, the
        score-node elements its distribution depends on (laid out on its
        log-probability's shape, lifted out of loops as costs are): the baseline term
        is `⊡(τ_parents)·(1 − ⊡(log p(w)))·b` (Mao et al. 2019). None where the term
        is built where the node is drawn, `(1 − ⊡(log p(w)))·b` (inside a `while_loop`
        or `shard_map`, and for sites evaluated at several values).
    """

    id: NodeId
    distribution: str
    estimator: str
    shape: tuple[int, ...]
    source: str = ""
    name: str | None = None
    method: Any = None
    support: tuple = ()
    has_baseline: bool = False
    parents: Deps | None = None

    @property
    def enumerated(self) -> bool:
        return bool(getattr(self.method, "enumerates", False))


TermKey = tuple  # (Deps, shape)


@dataclasses.dataclass
class Val:
    """A value in the interpreter, with its dependencies and additive cost terms."""

    value: Any
    deps: Deps = EMPTY
    terms: dict[TermKey, Any] | None = None  # None: one term, the value itself
    # The value as a NumPy array when it is known while tracing (an integer index array
    # built from `iota`, literals and constants, e.g. `jnp.arange(B)`): the axis rules of
    # gathers and scatters read it to prove alignment. None when unknown.
    known: Any = None

    def term_items(self) -> list[tuple[Deps, Any]]:
        if self.terms is None:
            return [(self.deps, self.value)]
        return [(k[0], t) for k, t in self.terms.items()]

    @property
    def has_terms(self) -> bool:
        return self.terms is not None

    def collapsed(self) -> Val:
        return Val(self.value, self.deps, known=self.known) if self.terms is not None else self


def make_val(value: Any, deps: Deps, items: Iterable[tuple[Deps, Any]]) -> Val:
    """A value whose additive decomposition is `items`, merged by (deps, shape)."""
    terms = merge_terms(items)
    if len(terms) == 1:
        ((d, shape),) = terms
        if shape == tuple(np.shape(value)):
            return Val(value, deps)
    return Val(value, deps, terms)


def merge_terms(items: Iterable[tuple[Deps, Any]]) -> dict[TermKey, Any]:
    """Terms keyed by (deps, shape), those with the same key added. In `scg.draw`'s
    influence pass, terms that differ only in their sources merge too (their sources
    joined), as they do without sources."""
    terms: dict[TermKey, Any] = {}
    full: dict[TermKey, Deps] = {}
    for d, t in items:
        key = (_deps.scored_part(d), tuple(np.shape(t)))
        if key in terms:
            terms[key] = terms[key] + t
            full[key] = _deps.join([full[key], d])
        else:
            terms[key], full[key] = t, d
    return {(full[k], k[1]): t for k, t in terms.items()}


class Graph:
    """The sample sites met while evaluating one (sub-)jaxpr, the score nodes'
    log-probabilities (in the order of `score_nodes`), the baselines `b_w` of the nodes
    whose baseline term is built at the top level (`StochasticNode.parents`), and the
    other terms of value 0 added to the surrogate (`baseline_terms`: the baselines built
    where their node is drawn, the alternatives estimators' extra terms).

    With `record=True` (for `scgjax.trace`) it also keeps, for every node, its value,
    its log-probability and whether it was drawn (`False` in a `cond` branch not taken).
    """

    def __init__(self, record: bool = False):
        self.nodes: dict[NodeId, StochasticNode] = {}
        self.log_probs: dict[NodeId, Any] = {}
        self.baseline_terms: list[Any] = []
        self.baselines: dict[NodeId, Any] = {}
        self.record = record
        self.records: dict[NodeId, tuple[Any, Any, Any]] = {}

    def add(
        self,
        node: StochasticNode,
        log_prob: Any = None,
        record: tuple | None = None,
        baseline: Any = None,
    ) -> None:
        assert node.id not in self.nodes, node.id
        assert (baseline is None) == (node.parents is None), node.id
        self.nodes[node.id] = node
        if node.estimator == "score":
            self.log_probs[node.id] = log_prob
        if node.parents is not None:
            self.baselines[node.id] = baseline
        if self.record:
            assert record is not None and len(record) == 3, node.id
            self.records[node.id] = tuple(record)

    @property
    def score_nodes(self) -> list[StochasticNode]:
        return [n for n in self.nodes.values() if n.estimator == "score"]

    def node_arrays(self) -> list[Any]:
        """The arrays a sub-graph hands to its parent, node by node: a score node's
        log-probability, its baseline (for a node with `parents`), then (when
        recording) value, log-probability, drawn flag."""
        out = []
        for node in self.nodes.values():
            if node.estimator == "score":
                out.append(self.log_probs[node.id])
            if node.parents is not None:
                out.append(self.baselines[node.id])
            if self.record:
                out.extend(self.records[node.id])
        return out

    def merge(self, nodes: Iterable[StochasticNode], arrays: Iterable[Any]) -> None:
        """Adds `nodes`; `arrays` is a sub-graph's `node_arrays()` (stacked, selected or
        summed by the control-flow rule that ran it)."""
        arrays = iter(arrays)
        for node in nodes:
            log_prob = next(arrays) if node.estimator == "score" else None
            baseline = next(arrays) if node.parents is not None else None
            record = (next(arrays), next(arrays), next(arrays)) if self.record else None
            self.add(node, log_prob, record, baseline)

    @property
    def has_baselines(self) -> bool:
        """Whether any node of the graph was drawn with a `baseline=`."""
        return any(n.has_baseline for n in self.nodes.values())

    def baseline_total(self) -> Any:
        """The sum of `baseline_terms` (0.0 when there are none): the terms built where
        their nodes were drawn, which a sub-graph hands to its parent as one sum."""
        return sum(self.baseline_terms[1:], self.baseline_terms[0]) if self.baseline_terms else 0.0

    def node_baselines(
        self, log_probs: dict[NodeId, Any], cache: dict, without: frozenset = frozenset()
    ) -> Any:
        """Σ_w Σ_i ⊡(τ_{W,i})·(1 − ⊡(log p(w_i)))·b_{w,i} over the nodes with `parents`,
        `τ_{W,i}` the log-probabilities (from `log_probs`) of the parents of element
        `i` (Mao et al. 2019). Value 0; the first derivative subtracts `b` from the
        node's downstream cost, and the higher ones subtract it from the products of
        the node's score with its parents' too (the terms DiCE's `⊡(τ_c)·c` has for a
        cost downstream of both). `without`: nodes left out of τ (summed out)."""
        total = 0.0
        for node in self.nodes.values():
            if node.parents is None:
                continue
            lp = self.log_probs[node.id]
            term = (1.0 - magic_box(lp)) * self.baselines[node.id]
            parents = _deps.without_nodes(node.parents, without) if without else node.parents
            total = total + jnp.sum(weighted_term(parents, term, log_probs, cache))
        return total


magic_box_p = jex.Primitive("scg_magic_box")


def magic_box(tau: jax.Array) -> jax.Array:
    """DiCE's ⊡(τ) = exp(τ − ⊥τ): value 1, derivative ⊡(τ)·∇τ (Foerster et al. 2018).

    It is a primitive of its own (`magic_box_p`) so that an scgjax transform around
    this one can recognise it: there the outer transform holds the inner boxes at their
    value 1 with no derivative (`_interpret.frozen_box_rule`), so the inner gradient
    estimate is differentiated as the function of θ and the draws that it is, while the
    outer graph adds the inner draws' own score terms (MAML, LOLA written naturally).
    Under plain JAX transforms (`jax.hessian(scg.surrogate(f))`, `jax.jacfwd` of
    `scg_grad`) it differentiates like `exp(τ − ⊥τ)`, at every order. Its value is 1
    without reading τ, so the forward pass of a surrogate computes no log-probability.
    """
    return magic_box_p.bind(tau)


def _magic_box_value(tau):
    # 1 without reading τ: the forward pass computes no log-probability for a score
    # term (XLA drops it), only the backward pass its derivative. exp(τ − ⊥τ) would be
    # NaN where τ = −∞ (a replayed draw of probability 0, weighed by p = 0 in an
    # exact expectation).
    return jnp.ones(jnp.shape(tau), jnp.result_type(tau))


def _magic_box_jvp(primals, tangents):
    (tau,), (dtau,) = primals, tangents
    out = magic_box_p.bind(tau)
    if type(dtau) is ad.Zero:
        return out, ad.Zero(dtau.aval)
    return out, out * dtau


magic_box_p.def_impl(_magic_box_value)
# The box has τ's type: shape, dtype, sharding and varying manual axes (`shard_map`).
magic_box_p.def_abstract_eval(lambda tau: tau.update(weak_type=False))
batching.primitive_batchers[magic_box_p] = lambda args, dims: (magic_box_p.bind(*args), dims[0])
ad.primitive_jvps[magic_box_p] = _magic_box_jvp
mlir.register_lowering(magic_box_p, mlir.lower_fun(_magic_box_value, multiple_results=False))


def baseline_term(log_prob: jax.Array, baseline: jax.Array) -> jax.Array:
    """Σ (1 − ⊡(log p))·b: value 0; subtracts `b` from the node's downstream cost in the
    first derivative and keeps every order unbiased (Mao et al. 2019)."""
    b = jnp.broadcast_to(baseline, jnp.shape(log_prob)).astype(jnp.result_type(log_prob))
    return jnp.sum((1.0 - magic_box(log_prob)) * b)


def _cumulative(x, axis: int, kind: str):
    """For each index i along `axis`, the sum of x[j] over the j related to i by `kind`."""
    if kind == "eq":
        return x
    if kind in ("ge", "gt"):
        return jnp.flip(_cumulative(jnp.flip(x, axis), axis, "le" if kind == "ge" else "lt"), axis)
    total = jnp.cumsum(x, axis=axis)
    return total if kind == "le" else total - x


def tau(
    deps: Deps,
    shape: tuple[int, ...],
    log_probs: dict[NodeId, Any],
    cache: dict | None = None,
    varying: frozenset = frozenset(),
) -> Any:
    """For each element of a term of `shape`, the sum of the log-probabilities of the
    node elements it depends on (a node's relations are disjoint, so they add). A
    dependency through other lanes of named axes (`_deps.Lanes`) sums or gathers the
    log-probabilities over those lanes (`lax.psum`, `lax.all_gather`). Inside a
    `shard_map`, `varying` is the term's varying manual axes: gathered over an axis the
    term does not vary along, τ is typed invariant too, as the term is (the same on
    every shard), so the surrogate keeps the cost's type and its transpose does not
    sum the shards' copies.

    `cache` (shared by the terms of one surrogate) memoises each node's contribution and
    the partial sums over the nodes in program order, so terms whose dependencies extend
    each other's (a chain of sites: term `i` depends on sites `0..i`) add one
    log-probability each: the emitted program grows linearly with the sites."""
    cache = {} if cache is None else cache
    total, prefix = None, ("prefix", shape, varying)  # a partial sum is known by its id
    for key, rel in _in_program_order(deps.items()):
        step = (prefix, key, rel)
        found = cache.get(step)
        if found is not None:
            prefix, total = found
            continue
        piece = cache.get((key, rel, shape, varying))
        if piece is None:
            piece = cache[(key, rel, shape, varying)] = _contribution(
                key, rel, shape, log_probs, varying
            )
        total = piece if total is None else total + piece
        prefix = ("prefix", len(cache))
        cache[step] = (prefix, total)
    return total


def _in_program_order(items: list) -> list:
    """Dependency items sorted by node id (program order); the few that share a node
    (several relations, lanes) by their text, so that every term sees the same order."""
    items = sorted(items, key=lambda kr: _deps.base_node(kr[0]))
    nodes = [_deps.base_node(k) for k, _ in items]
    if len(set(nodes)) == len(nodes):
        return items
    return sorted(items, key=lambda kr: (_deps.base_node(kr[0]), repr(kr)))


def _contribution(
    key, rel, shape: tuple[int, ...], log_probs: dict[NodeId, Any], varying: frozenset
) -> Any:
    """One node's log-probabilities laid out on a term of `shape` (see `tau`)."""
    x = log_probs[_deps.base_node(key)]
    names = _deps.lane_names(key)
    node_rel, lane_rel = rel[: len(rel) - len(names)], rel[len(rel) - len(names) :]
    kept = []  # (node axis, term axis)
    for k, entry in enumerate(node_rel):
        if (
            isinstance(entry, Axis)
            and entry.axis < len(shape)
            and np.shape(x)[k] == shape[entry.axis]
            and entry.axis not in {a for _, a in kept}
        ):
            x = _cumulative(x, k, entry.kind)
            kept.append((k, entry.axis))
    summed = tuple(k for k in range(np.ndim(x)) if k not in {k for k, _ in kept})
    x = jnp.sum(x, axis=summed) if summed else x
    # Remaining node axes are in node order; put them in term-axis order.
    order = sorted(range(len(kept)), key=lambda i: kept[i][1])
    x = jnp.transpose(x, order) if kept else x
    term_axes = sorted(a for _, a in kept)
    for name, entry in zip(names, lane_rel):
        if (
            isinstance(entry, Axis)
            and entry.kind == "eq"
            and entry.axis < len(shape)
            and entry.axis not in term_axes
        ):
            # lane j -> element j of the term axis
            x = _compat.all_gather(x, name, 0, invariant=name not in varying)
            if np.shape(x)[0] == shape[entry.axis]:
                term_axes = [entry.axis] + term_axes
                continue
            x = jnp.sum(x, axis=0)
        else:
            x = lax.psum(x, name)  # every lane (a cover for other kinds)
    perm = sorted(range(len(term_axes)), key=lambda i: term_axes[i])
    x = jnp.transpose(x, perm) if perm != list(range(len(perm))) else x
    return lax.broadcast_in_dim(x, shape, tuple(sorted(term_axes)))


def surrogate_sum(
    items: Iterable[tuple[Deps, Any]],
    log_probs: dict[NodeId, Any],
    boxed: bool = True,
    cache: dict | None = None,
) -> Any:
    """Σ_terms Σ_elements ⊡(τ)·c (or τ·c with `boxed=False`, linear in the log-probs)."""
    pieces, cache = [], {} if cache is None else cache
    for deps, term in items:
        pieces.append(jnp.sum(weighted_term(deps, term, log_probs, cache, boxed)))
    return sum(pieces[1:], pieces[0])


def weighted_term(deps: Deps, term: Any, log_probs: dict[NodeId, Any], cache: dict, boxed=True):
    """`⊡(τ)·c` elementwise for one cost term (`τ·c` with `boxed=False`); `c` itself when
    it depends on no score node."""
    if not deps:
        return term
    varying = _compat.varying_axes(term)
    t = tau(deps, tuple(np.shape(term)), log_probs, cache, varying)
    t = t.astype(jnp.result_type(term))
    return (magic_box(t) if boxed else t) * term


def dice_objective(
    cost: Val, graph: Graph, log_probs: dict[NodeId, Any] | None = None, extra: Any = 0.0
) -> jax.Array:
    """Σ_c Σ_i ⊡(τ_ci)·c_i + Σ_w ⊡(τ_W)·(1 − ⊡(log p(w)))·b_w over the cost terms `c`
    and the nodes `w` drawn with a baseline (`Graph.node_baselines`), plus the terms
    built where nodes were drawn (`Graph.baseline_total`).

    The value is exactly `cost.value` (the rounding of a re-associated sum is cancelled
    by a stop-gradient), and derivatives of every order are unbiased.

    `log_probs` replaces `graph.log_probs` in τ (the same values, other derivatives: a
    learning signal scaled per node, `scgjax.baselines.nvil`), and `extra` joins the
    baseline terms (baselines given outside the program, built on those log-probs).
    """
    lps = graph.log_probs if log_probs is None else log_probs
    cache: dict = {}
    baselines = graph.node_baselines(lps, cache) + graph.baseline_total() + extra
    # Inside a `shard_map`, a cost that is the same on every shard (after a `psum`) has
    # terms typed the same way; the baseline terms of each shard's own nodes join them
    # summed over the shards, so the surrogate is the global one on every shard.
    extra = _compat.varying_axes(baselines) - _compat.varying_axes(cost.value)
    if extra:
        baselines = lax.psum(baselines, tuple(sorted(extra)))
    surrogate = surrogate_sum(cost.term_items(), lps, cache=cache) + baselines
    surrogate = surrogate.astype(jnp.result_type(cost.value))  # baselines are in float32
    return lax.stop_gradient(cost.value) + (surrogate - lax.stop_gradient(surrogate))


def downstream_costs(cost: Val, graph: Graph) -> dict[NodeId, Any]:
    """Q̂_w for every score node: for each element of its log-probability, the sum of the
    cost elements that depend on it (the regression target of a baseline for `w`).

    It is the gradient of the linear map `log_probs ↦ Σ_c Σ_i τ_ci·c_i` (costs held fixed),
    so plates and causality give each element exactly its downstream costs.
    """
    items = [(d, lax.stop_gradient(t)) for d, t in cost.term_items()]
    lps = {n: lax.stop_gradient(lp) for n, lp in graph.log_probs.items()}
    if not lps:
        return {}
    zeros = jax.tree.map(jnp.zeros_like, lps)
    return jax.grad(lambda l: surrogate_sum(items, l, boxed=False))(zeros)


def node_weights(cost: Val) -> dict[NodeId, int]:
    """How many cost terms each score node weights."""
    out: dict[NodeId, int] = {}
    for deps, _ in cost.term_items():
        for n in {_deps.base_node(k) for k in deps}:
            out[n] = out.get(n, 0) + 1
    return out

"""The stochastic computation graph: stochastic nodes, dependencies and cost terms.

While the interpreter (`_interpret.py`) evaluates a program, every value carries

* `deps`: the score-function nodes it depends on (the nodes *upstream* of it), and
* `terms`: an additive decomposition of the value, `value = Σ_k terms[k]`, keyed by the
  dependencies of each term. A value on the additive tail of the cost (add, sub, neg,
  reduce_sum, scaling by sample-independent factors, ...) keeps one term per distinct
  dependency set, so that at the end each score node is weighted only by the cost terms
  that depend on it (Rao-Blackwellization by dataflow, Schulman et al. 2015, §3).

A dependency set is a `frozenset` of `NodeId`s: a node's log-probability is taken whole
(summed over all its elements). This is the safe over-approximation; the roadmap refines
it with per-axis alignment (plates) and per-iteration causality, which only has to change
how dependencies are represented and combined here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import jax
import jax.numpy as jnp
from jax import lax

NodeId = tuple[int, ...]
"""Where a `sample` equation sits: its index in each enclosing jaxpr, outermost first."""

Deps = frozenset
NO_DEPS: Deps = frozenset()


def union(deps: Iterable[Deps]) -> Deps:
    out = NO_DEPS
    for d in deps:
        out = out | d
    return out


@dataclasses.dataclass(frozen=True)
class StochasticNode:
    """A `sample` site of the graph.

    Score-function nodes carry a log-probability and weight their downstream costs;
    pathwise nodes are differentiated through and are recorded only to be described.

    Attributes:
      id: where its `sample` equation sits.
      distribution: the distribution's class name.
      estimator: `"score"` or `"pathwise"`.
      shape: for a score node the shape of its log-probability, for a pathwise node the
        shape of its value, as seen at the top level (draws inside a `scan` are stacked
        along a leading axis per loop).
      source: file and line of the `scg.sample` call, where JAX records it.
    """

    id: NodeId
    distribution: str
    estimator: str
    shape: tuple[int, ...]
    source: str = ""


@dataclasses.dataclass
class Val:
    """A value in the interpreter, with its dependencies and additive cost terms."""

    value: Any
    deps: Deps = NO_DEPS
    terms: dict[Deps, Any] | None = None  # None: one term, the value itself

    def term_items(self) -> list[tuple[Deps, Any]]:
        return list(self.terms.items()) if self.terms else [(self.deps, self.value)]

    @property
    def has_terms(self) -> bool:
        return bool(self.terms) and len(self.terms) > 1

    def collapsed(self) -> Val:
        return Val(self.value, self.deps) if self.terms else self


def make_val(value: Any, terms: dict[Deps, Any]) -> Val:
    """A value whose additive decomposition is `terms` (merged to one when possible)."""
    deps = union(terms)
    if len(terms) <= 1:
        return Val(value, deps)
    return Val(value, deps, terms)


def add_terms(*term_lists: Iterable[tuple[Deps, Any]], shape=None) -> dict[Deps, Any]:
    """Sums term lists, merging terms with the same dependencies."""
    out: dict[Deps, Any] = {}
    for items in term_lists:
        for deps, t in items:
            if shape is not None and jnp.shape(t) != tuple(shape):
                t = jnp.broadcast_to(t, shape)
            out[deps] = t if deps not in out else out[deps] + t
    return out


class Graph:
    """The sample sites met while evaluating one (sub-)jaxpr, with the score nodes'
    log-probabilities (in the order of `score_nodes`)."""

    def __init__(self):
        self.nodes: dict[NodeId, StochasticNode] = {}
        self.log_probs: dict[NodeId, Any] = {}

    def add(self, node: StochasticNode, log_prob: Any = None) -> None:
        assert node.id not in self.nodes, node.id
        self.nodes[node.id] = node
        if node.estimator == "score":
            self.log_probs[node.id] = log_prob

    @property
    def score_nodes(self) -> list[StochasticNode]:
        return [n for n in self.nodes.values() if n.estimator == "score"]

    def merge(self, nodes: Iterable[StochasticNode], log_probs: Iterable[Any]) -> None:
        """Adds `nodes`; `log_probs` holds one entry per score node among them."""
        log_probs = iter(log_probs)
        for node in nodes:
            self.add(node, next(log_probs) if node.estimator == "score" else None)


def magic_box(tau: jax.Array) -> jax.Array:
    """DiCE's ⊡(τ) = exp(τ − ⊥τ): value 1, derivative ⊡(τ)·∇τ (Foerster et al. 2018)."""
    return jnp.exp(tau - lax.stop_gradient(tau))


def dice_objective(cost: Val, graph: Graph) -> jax.Array:
    """Σ_c ⊡(Σ_{w upstream of c} log p(w)) · c over the cost terms c of `cost`.

    The value is exactly `cost.value` (the rounding of a re-associated sum is cancelled
    by a stop-gradient), and derivatives of every order are unbiased.
    """
    totals: dict[NodeId, Any] = {}

    def total(node_id):
        if node_id not in totals:
            totals[node_id] = jnp.sum(graph.log_probs[node_id])
        return totals[node_id]

    pieces = []
    for deps, term in cost.term_items():
        if deps:
            tau = sum(total(n) for n in sorted(deps))
            term = magic_box(tau).astype(jnp.result_type(term)) * term
        pieces.append(term)
    surrogate = sum(pieces[1:], pieces[0])
    return lax.stop_gradient(cost.value) + (surrogate - lax.stop_gradient(surrogate))


def downstream_costs(cost: Val) -> dict[NodeId, list[Deps]]:
    """For each score node, the dependency keys of the cost terms that weight it."""
    out: dict[NodeId, list[Deps]] = {}
    for deps, _ in cost.term_items():
        for n in deps:
            out.setdefault(n, []).append(deps)
    return out

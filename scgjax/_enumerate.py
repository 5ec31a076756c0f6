"""Enumerated sites (`estimator="enum"`): the downstream computation at every value.

A site drawn with `Enum` is summed out of the surrogate exactly. The program is evaluated
under `jax.vmap` over *alternatives*: each enumerated site is replayed at one of its
values per alternative, so only what depends on the sites carries the new axis (the rest
of the program is evaluated once, as `vmap` leaves unbatched values alone). Each cost
term `c` is then contracted with the sites' probabilities over the alternatives,

    Σ_r  Π_s w_s(r, c) · ⊡(τ_c(r)) · c(r),

where τ holds the other score nodes (as usual) and `w_s` is site `s`'s probability at
alternative `r`, normalised over `s`'s own alternatives (the other sites held):

* *per element*: when every cost term depends on the site only through automatic
  plates (element `i` of the term on element `i` of the site), alternative `k` puts
  value `k` at every element of the site and the term's element `i` is weighted by
  `p_i(k)`: K alternatives for any number of elements;
* *jointly*: otherwise, the site's elements take every joint configuration (K^N
  alternatives, refused beyond `Enum.max_joint`), each weighted by its joint
  probability.

A term that does not depend on a site takes `1/R_s` for each of its `R_s` alternatives
(its value is the same in all of them). The normalisation is exact (the probabilities of
a full support sum to 1 at every parameter, so every derivative of the sum is 0), and it
makes a site in a `cond` branch not taken (log-probability 0 for every value) weigh
`1/K` per value. Derivatives of every order are exact in the enumerated sites; the other
score nodes' terms are DiCE's, per alternative.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _compat, _deps, _estimators
from ._deps import Axis, Deps
from ._estimators import Alternatives
from ._graph import StochasticNode


@functools.lru_cache(maxsize=4096)
def _jaxpr_enumerates(jaxpr: _compat.Jaxpr) -> bool:
    from ._sample import sample_p

    for eqn in jaxpr.eqns:
        if eqn.primitive is sample_p:
            if getattr(eqn.params.get("method"), "enumerates", False):
                return True
        elif any(_jaxpr_enumerates(j) for j in _compat.iter_subjaxprs(eqn.params)):
            return True
    return False


def has_enumerated_sites(closed) -> bool:
    """Whether a closed jaxpr draws a site with an enumerating estimator."""
    return _jaxpr_enumerates(_compat.open_jaxpr(closed)[0])


@dataclasses.dataclass(frozen=True)
class Plan:
    """The enumerated sites and their alternatives.

    Attributes:
      sites: the enumerated nodes that some cost term depends on, in program order.
      joint: per site, the axes along which its elements are enumerated jointly (the
        others are plates: every cost element depends on one element along them); `()`
        per element.
      sizes: per site, its number of alternatives `R_s`.
      draws: node id → values, shape `(R, *site shape)`, `R = Π R_s` (a product grid);
        for an `Alternatives` site, each element's alternative.
      base: per site, `None` for an enumerated one, else its weights' values `v_r`
        at each of the `R` alternatives (`estimators.Alternatives`).
    """

    sites: tuple[StochasticNode, ...]
    joint: tuple[tuple[int, ...], ...]
    sizes: tuple[int, ...]
    draws: dict
    base: tuple = ()


def _items_of(deps: Deps, node_id) -> list:
    return [(k, rel) for k, rel in deps.items() if _deps.base_node(k) == node_id]


def _plate_axes(node: StochasticNode, dependent: list) -> set:
    """The axes of `node` along which every dependent cost term (`(deps, shape)`)
    depends on it element by element: each along a term axis of its size (distinct
    axes within a term). Axes of size 1 are left out."""
    plates = {k for k, size in enumerate(node.shape) if size != 1}
    for deps, shape in dependent:
        items = _items_of(deps, node.id)
        if len(items) != 1 or items[0][0] != node.id:
            return set()
        seen: dict = {}
        for k in sorted(plates):
            entry = items[0][1][k]
            if (
                isinstance(entry, Axis)
                and entry.kind == "eq"
                and entry.axis < len(shape)
                and shape[entry.axis] == node.shape[k]
            ):
                seen.setdefault(entry.axis, []).append(k)
            else:
                plates.discard(k)
        for ks in seen.values():
            if len(ks) > 1:  # two site axes on one term axis: a diagonal, not a plate
                plates.difference_update(ks)
    return plates


def _spread(block, node: StochasticNode, joint: tuple) -> np.ndarray:
    """`block` (`(R, *the joint axes' sizes)`) broadcast along the site's other axes:
    `(R, *site shape)`."""
    others = [k + 1 for k in range(len(node.shape)) if k not in joint]
    return np.broadcast_to(np.expand_dims(block, others), (block.shape[0], *node.shape))


def _joint_what(node: StochasticNode, joint: tuple, n: int) -> str:
    every = len(joint) == sum(1 for x in node.shape if x != 1)
    along = "" if every else f" along axes {joint} (per element along the others)"
    return (
        f"has cost elements that depend on several of its elements{along} (or on elements "
        f"of other loop iterations), so {n} of them go together"
    )


def plan(
    nodes: dict, terms: list[tuple[Deps, tuple]], user_draws: dict | None, names: dict
) -> Plan:
    """The alternatives for the enumerated nodes among `nodes` that the cost terms
    (`(deps, shape)` each) depend on; a clear error where there would be too many."""
    enumerated = [n for n in nodes.values() if n.enumerated]
    replayed = [names[n.id] for n in enumerated if user_draws and n.id in user_draws]
    if replayed:
        raise ValueError(
            f"scgjax: draws= replays {replayed}, which are evaluated at several values "
            f"(estimator {_estimators.several_values()}), not drawn once. Drop them from "
            "draws=."
        )
    sites, joint, sizes, values, bases = [], [], [], [], []
    for node in enumerated:
        dependent = [(d, s) for d, s in terms if _items_of(d, node.id)]
        if not dependent:
            continue  # it reaches no cost: nothing to sum
        plates = _plate_axes(node, dependent)
        together = tuple(k for k, x in enumerate(node.shape) if x != 1 and k not in plates)
        support = np.asarray(node.support)
        n = int(np.prod([node.shape[k] for k in together], dtype=int))
        if isinstance(node.method, Alternatives):
            size, vals, base = _alternatives(node, together, n, names)
            sites.append(node)
            joint.append(together)
            sizes.append(size)
            values.append(vals)
            bases.append(base)
            continue
        bases.append(None)
        if together:
            size = len(support) ** n
            limit = node.method.max_joint
            if size > limit:
                raise ValueError(
                    f"scgjax: the enumerated site {names[node.id]!r} ({node.distribution}, "
                    f"shape {node.shape}{f', at {node.source}' if node.source else ''}) "
                    f"{_joint_what(node, together, n)}, enumerated jointly: "
                    f"{len(support)}^{n} alternatives, more than max_joint={limit}. Make "
                    "each cost element depend on one element of the site (per-element costs, "
                    "summed: automatic plates), use estimator='score' for it, or raise the "
                    "limit with estimator=scg.estimators.Enum(max_joint=...)."
                )
            configs = np.array(list(itertools.product(support, repeat=n)), support.dtype)
            vals = _spread(
                configs.reshape((size, *[node.shape[k] for k in together])), node, together
            )
        else:
            size = len(support)
            vals = np.broadcast_to(
                support.reshape((size,) + (1,) * len(node.shape)), (size, *node.shape)
            )
        sites.append(node)
        joint.append(together)
        sizes.append(size)
        values.append(vals)
    total = int(np.prod(sizes, dtype=np.int64)) if sizes else 1
    limit = max((n.method.max_joint for n in sites), default=1)
    if total > limit:
        raise ValueError(
            f"scgjax: the enumerated sites {[names[n.id] for n in sites]} together take "
            f"{' x '.join(map(str, sizes))} = {total} alternatives, more than "
            f"max_joint={limit}. Use estimator='score' for some of them, or raise the limit "
            "with estimator=scg.estimators.Enum(max_joint=...)."
        )
    grids = np.meshgrid(*[np.arange(s) for s in sizes], indexing="ij") if sizes else []
    draws = {n.id: v[g.ravel()] for n, v, g in zip(sites, values, grids)}
    base = tuple(None if b is None else b[g.ravel()] for b, g in zip(bases, grids))
    return Plan(tuple(sites), tuple(joint), tuple(sizes), draws, base)


def _alternatives(node: StochasticNode, together: tuple, n: int, names: dict):
    """(R, each element's alternative `(R, *shape)`, `v_r` `(R,)`) for a site drawn
    with an `Alternatives` estimator, jointly along the axes `together`: every element
    at alternative `r` at once (per element, or coupled), or, along the joint axes, one
    element at a time away from alternative 0 (the same one in every plate element)."""
    method = node.method
    count = len(node.support)
    v = np.asarray(method.base_weights(count), float)
    if together and method.per_element_only:
        raise ValueError(
            f"scgjax: the site {names[node.id]!r} ({node.distribution}, estimator="
            f"{str(method)!r}, shape {node.shape}"
            f"{f', at {node.source}' if node.source else ''}) "
            f"{_joint_what(node, together, n)}; this "
            "estimator draws each element's samples on their own and needs each cost element "
            "to depend on one element of the site (per-element costs, summed: automatic "
            "plates). Use estimator='score' or 'enum' for it."
        )
    if not together or method.coupled:
        index = np.broadcast_to(
            np.arange(count).reshape((count,) + (1,) * len(node.shape)), (count, *node.shape)
        )
        return count, index, v
    size = 1 + (count - 1) * n
    if size > method.max_joint:
        raise ValueError(
            f"scgjax: the site {names[node.id]!r} ({node.distribution}, estimator="
            f"{str(method)!r}, shape {node.shape}"
            f"{f', at {node.source}' if node.source else ''}) "
            f"{_joint_what(node, together, n)}: they move one at a time, "
            f"1 + {count - 1}x{n} = {size} evaluations, more "
            f"than max_joint={method.max_joint}. Make each cost element depend on one element "
            "of the site (per-element costs, summed: automatic plates), use "
            "estimator='score' for it, or raise the limit with "
            f"estimator=scg.estimators.{type(method).__name__}(max_joint=...)."
        )
    index = np.zeros((size, n), np.int32)
    which = np.arange(size - 1)
    index[1 + which, which % n] = 1 + which // n
    block = index.reshape((size, *[node.shape[k] for k in together]))
    return size, _spread(block, node, together), v[np.r_[0, 1 + which // n]]


def site_weights(plan: Plan, log_probs: list) -> list:
    """Per site, its normalised probability at each alternative: `(R, *site shape)`,
    size 1 along the axes enumerated jointly. `log_probs[s]` is site `s`'s
    per-element log-probability at each alternative, `(R, *site shape)`."""
    grid = plan.sizes
    out = []
    for s, (node, together, lp) in enumerate(zip(plan.sites, plan.joint, log_probs)):
        if plan.base[s] is not None:
            # An alternatives site: its weights from their parts (`lp`), e.g.
            # `v_r + weight(θ, a_r)` summed over the joint axes.
            out.append(node.method.site_weight(plan.base[s], lp, tuple(1 + k for k in together)))
            continue
        lp = jnp.reshape(lp, grid + tuple(node.shape))
        lp = jnp.sum(lp, axis=tuple(len(grid) + k for k in together), keepdims=True)
        w = jax.nn.softmax(lp, axis=s)
        out.append(jnp.reshape(w, (-1,) + tuple(w.shape[len(grid) :])))
    return out


def _base_weight(base, w):
    """An alternatives site's `v_r` at each alternative, shaped like its weights `w`."""
    v = jnp.asarray(base, w.dtype)
    return jnp.broadcast_to(jnp.reshape(v, (-1,) + (1,) * (w.ndim - 1)), w.shape)


def _laid_out(w, node: StochasticNode, rel, shape: tuple):
    """`w` (`(R, *site shape)`, size 1 along the joint axes) on a term of `shape` that
    depends on the site element by element along the others through `rel`:
    `(R, *shape)`-broadcastable."""
    keep = [(k, e.axis) for k, e in enumerate(rel) if w.shape[1 + k] != 1]
    w = jnp.reshape(w, (w.shape[0],) + tuple(node.shape[k] for k, _ in keep))
    order = sorted(range(len(keep)), key=lambda i: keep[i][1])
    w = jnp.transpose(w, (0, *[i + 1 for i in order]))
    dims = (0, *[keep[i][1] + 1 for i in order])
    return lax.broadcast_in_dim(w, (w.shape[0], *shape), dims)


def term_weight(plan: Plan, weights: list, deps: Deps, shape: tuple):
    """Π_s w_s for one cost term: `(R, *shape)`-broadcastable."""
    total = None
    for node, size, w in zip(plan.sites, plan.sizes, weights):
        items = _items_of(deps, node.id)
        if not items:
            piece = jnp.full((1,) * (1 + len(shape)), 1.0 / size, w.dtype)
        elif all(x == 1 for x in w.shape[1:]):  # jointly along every axis
            piece = jnp.reshape(w, (-1,) + (1,) * len(shape))
        else:  # per element along the plate axes
            piece = _laid_out(w, node, items[0][1], shape)
        total = piece if total is None else total * piece
    assert total is not None  # only terms that depend on some site are weighted
    return total


def objective(run, plan: Plan, cost_dtype):
    """The enumerated surrogate. `run(draws)` evaluates the program with the sites
    replayed at `draws` and returns `(terms, deps_and_shapes, site log-probs,
    baseline total, aux)`, `terms` each `⊡(τ)·c` over the other score nodes."""
    box: dict = {}

    def one(draws):
        terms, meta, lps, baselines, aux = run(draws)
        box["meta"] = meta
        return terms, lps, baselines, aux

    terms, lps, baselines, aux = jax.vmap(one)(plan.draws)
    weights = site_weights(plan, lps)
    # Sites whose weights' values are not the surrogate's (`Alternatives.value_at_draw`:
    # REBAR's control variates) have the difference taken off under stop-gradient.
    shifted = [b is not None and n.method.value_at_draw for n, b in zip(plan.sites, plan.base)]
    values = [
        _base_weight(b, w) if moved else lax.stop_gradient(w)
        for b, w, moved in zip(plan.base, weights, shifted)
    ]
    pieces = []
    for t, (deps, shape) in zip(terms, box["meta"]):
        w = term_weight(plan, weights, deps, shape).astype(jnp.result_type(t))
        piece = jnp.sum(w * t)
        if any(moved and _items_of(deps, n.id) for n, moved in zip(plan.sites, shifted)):
            v = term_weight(plan, values, deps, shape).astype(jnp.result_type(t))
            piece = piece - lax.stop_gradient(jnp.sum((w - v) * t))
        pieces.append(piece)
    total = sum(pieces[1:], pieces[0]) + jnp.mean(baselines)
    return total.astype(cost_dtype), aux

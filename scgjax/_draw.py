"""`scg.draw`: the stochastic computation graph of a program, in the paper's notation.

`draw(f)(*args)` traces `f` abstractly (nothing is computed) and returns a `Drawing`:
squares for the inputs (array arguments, leaves grouped per argument when they feed the
same nodes), circles for the stochastic nodes (name, distribution, estimator, shape and
source line, as `describe` lists them), diamonds for the cost terms that scgjax tells
apart (one per term of `describe`'s "weights" column; an array of cost elements is one
diamond labelled with its shape). Deterministic intermediates are collapsed, as in the
figures of Schulman et al. (2015): a solid edge `a → b` means that `a` influences `b`
through deterministic computation only. A dashed edge `w ⇢ c` says that the score term of
node `w` is weighted by cost term `c` (labelled with the node axes along which each
element weights only its own cost elements: `plate`, `time ≤`, ...).

Where the edges come from. Both kinds come from the interpreter that builds the
surrogate (`_interpret.py`), so the picture cannot disagree with the estimator:

* dashed edges and the diamonds are the cost terms of the very pass `describe` and
  `surrogate` run, with their dependencies on the score nodes;
* solid edges come from a second pass of the same interpreter in which the inputs and
  every draw (pathwise ones too) are extra *sources* of dependencies, and a draw stops
  its parents' sources (so they reach further only through it). A source has no axes,
  so it never aligns anything, and every decision that shapes the cost terms reads only
  the score nodes (`_deps.scored`): the second pass splits the cost exactly as the first,
  and each of its terms is one of the first pass's, with its sources.

Sharp edges:

* Should a term of the second pass match none of the first's (a rule that decides on
  sources after all), its sources are drawn into every term of the first pass whose
  score nodes it covers and `Drawing.approximate` is True: an edge too many rather than
  one missing. The tests require it to be False.
* The PRNG key is not drawn (it feeds every draw), unless it also feeds the program
  otherwise (a `numpyro.plate`'s subsample indices are drawn from it with `jax.random`);
  baselines (`baseline=`) are not drawn.
* Inside loops, nodes and cost terms are drawn once, stacked (shape `(T, ...)`); a node
  whose parameters depend on its own earlier draws gets a self-loop ("earlier steps").
* A node's shape is `describe`'s: for a score node, that of its log-probability (a
  `to_event` site shows its batch shape), and its distribution is the class name
  (`Independent` for `to_event`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import pathlib
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from . import _deps, _interpret, _surrogate
from ._deps import Axis, Deps
from ._graph import Graph, Val

INFLUENCES = "influences"
WEIGHTS = "weights"


@dataclasses.dataclass(frozen=True)
class DrawnNode:
    """One node of a `Drawing`.

    Attributes:
      id: its DOT id (`i0, i1, ...` inputs, `s0, ...` stochastic nodes, `c0, ...` costs).
      kind: `"input"`, `"stochastic"` or `"cost"`.
      name: an input's argument path, a stochastic node's `describe` name (`node0` or
        `name=`), a cost term's `c<i>`.
      shape: a node's shape as in `describe`, a cost term's element shape (`()` for
        an input).
      distribution, estimator, source: for stochastic nodes (`estimator` as `describe`
        writes it: `score`, `pathwise`, `enum`, ...), else `""`.
      score: whether a stochastic node has a score term (enumerated sites included).
      leaves: for an input, how many array leaves it groups.
      type: for an input, its leaf's type as JAX writes it (`f32[3,2]`); for a cost
        term that nothing influences (a constant), `"constant"`.
    """

    id: str
    kind: str
    name: str
    shape: tuple
    distribution: str = ""
    estimator: str = ""
    source: str = ""
    score: bool = False
    leaves: int = 1
    type: str = ""


@dataclasses.dataclass(frozen=True)
class Edge:
    """`tail → head`: `kind` is `"influences"` (solid: through deterministic
    computation) or `"weights"` (dashed: the score node `tail` is weighted by cost term
    `head`); `label` is the alignment of a weights edge (`"0: plate"`), else `""`."""

    tail: str
    head: str
    kind: str
    label: str = ""


class Drawing:
    """The stochastic computation graph of one program (see `draw`).

    Attributes:
      nodes: DOT id → `DrawnNode`.
      edges: every `Edge`.
      approximate: whether some solid edges into cost terms were attributed from a
        coarser split of the cost (module docstring, "Sharp edges").
      source: the DOT text.
    """

    def __init__(self, nodes: dict[str, DrawnNode], edges: list[Edge], approximate: bool):
        self.nodes = nodes
        self.edges = tuple(edges)
        self.approximate = approximate
        self.source = _dot_source(nodes, self.edges)

    def by_name(self, name: str) -> DrawnNode:
        """The node called `name` (`node0`, `c1`, an input's argument path)."""
        found = [n for n in self.nodes.values() if n.name == name]
        if len(found) != 1:
            raise KeyError(
                f"scgjax.draw: {len(found)} nodes are called {name!r}; names: "
                f"{sorted(n.name for n in self.nodes.values())}."
            )
        return found[0]

    def graphviz(self):
        """The drawing as a `graphviz.Source` (needs the `graphviz` package)."""
        return _graphviz().Source(self.source)

    def pipe(self, format: str = "svg") -> bytes:
        """The rendered drawing (`"svg"`, `"png"`, `"pdf"`, ...); needs Graphviz's `dot`."""
        gv = _graphviz()
        try:
            return gv.Source(self.source).pipe(format=format)
        except gv.ExecutableNotFound:
            raise RuntimeError(
                "scgjax.draw: rendering needs Graphviz's `dot` program, which is not on "
                "PATH (apt install graphviz, brew install graphviz, conda install "
                "graphviz). The DOT text is in `.source`."
            ) from None

    def save(self, path: str | os.PathLike, format: str | None = None) -> pathlib.Path:
        """Writes the drawing to `path`: rendered for `.svg`, `.png`, `.pdf` (or
        `format`), the DOT text for `.dot` and `.gv`. Returns the path."""
        path = pathlib.Path(path)
        fmt = (format or path.suffix.lstrip(".") or "svg").lower()
        if fmt in ("dot", "gv"):
            path.write_text(self.source)
        else:
            path.write_bytes(self.pipe(fmt))
        return path

    def _repr_mimebundle_(self, include=None, exclude=None):
        out = {"text/plain": repr(self)}
        if shutil.which("dot"):
            out["image/svg+xml"] = self.pipe("svg").decode()
        return out

    def __repr__(self) -> str:
        kinds = [n.kind for n in self.nodes.values()]
        return (
            f"<scgjax Drawing: {kinds.count('input')} inputs, {kinds.count('stochastic')} "
            f"stochastic nodes, {kinds.count('cost')} cost terms; .source has the DOT text>"
        )


def draw(f: Callable, *, has_aux: bool = False) -> Callable[..., Drawing]:
    """The stochastic computation graph of `f`, in the notation of Schulman et al.

    Traces `f` abstractly, as `describe` does: nothing is computed.

    Args:
      f: a stochastic program (see `surrogate`).
      has_aux: whether `f` returns `(cost, aux)` (the aux is not drawn).

    Returns:
      A function with `f`'s signature returning a `Drawing`: `.source` is Graphviz DOT,
      `.save("g.svg")` / `.save("g.png")` render it (with Graphviz's `dot` installed),
      and in Jupyter it displays itself. `.nodes` and `.edges` hold the structure.

    Example:
      >>> d = scg.draw(f)(theta, key)
      >>> d.save("graph.svg")
      >>> print(d.source)
    """

    @functools.wraps(f)
    def wrapped(*args, **kwargs) -> Drawing:
        dyn_leaves, rebuild = _surrogate._split_static((args, kwargs))
        paths = [
            p
            for p, x in jax.tree_util.tree_flatten_with_path((args, kwargs))[0]
            if _surrogate._is_array_like(x)
        ]
        box: dict = {}

        def run(*dyn):
            a, kw = rebuild(dyn)
            closed, leaves, _ = _surrogate._prepare(f, a, kw, has_aux)
            cost, _, graph = _surrogate._interpret_program(closed, leaves, None)
            box["cost"], box["graph"] = cost, graph
            box["influence"] = _influence_pass(closed, leaves, box)
            return cost.value

        jax.eval_shape(run, *dyn_leaves)
        names = _argument_names(f, len(args))
        inputs = [(_path_name(p, names), _type_text(x)) for p, x in zip(paths, dyn_leaves)]
        return _build(box["cost"], box["graph"], box["influence"], box["parents"], inputs)

    return wrapped


def _influence_pass(closed, leaves, box: dict) -> Val:
    """The interpreter again, with each input leaf `i` a source `("input", i)`; fills
    `box["parents"]` (node id → its parameters' dependencies); returns the cost."""
    parents: dict = {}
    token = _interpret._INFLUENCE.set(parents)
    try:
        ctx = _interpret.Context((), Graph())
        outs = _interpret.eval_jaxpr(
            ctx,
            closed.jaxpr,
            [_interpret.const_val(c) for c in closed.consts],
            [Val(x, Deps({("input", i): ()})) for i, x in enumerate(leaves)],
        )
    finally:
        _interpret._INFLUENCE.reset(token)
    box["parents"] = parents
    return outs[0]


def _split(deps: Deps) -> tuple[Deps, set]:
    """(the score-node part of `deps`, the sources in it)."""
    real, sources = {}, set()
    for key, rels in deps._map.items():
        base = _deps.base_node(key)
        if _deps.is_source(base):
            sources.add(base)
        else:
            real[key] = list(rels)
    return Deps._of(real), sources


def _build(cost: Val, graph: Graph, influence: Val, parents: dict, inputs: list) -> Drawing:
    names = _surrogate._node_names(graph)
    node_ids = {n: f"s{i}" for i, n in enumerate(graph.nodes)}
    if not graph.nodes:
        warnings.warn(
            "scgjax.draw: f draws no sample with scg.sample; the graph has only inputs and "
            "costs (a jax.random draw is invisible to scgjax).",
            UserWarning,
            stacklevel=3,
        )
    nodes: dict[str, DrawnNode] = {}
    for node_id, node in graph.nodes.items():
        nodes[node_ids[node_id]] = DrawnNode(
            node_ids[node_id],
            "stochastic",
            names[node_id],
            tuple(node.shape),
            node.distribution,
            str(node.method) if node.method is not None else node.estimator,
            node.source,
            node.estimator == "score",
        )
    terms = cost.term_items()
    index = {(d, tuple(np.shape(t))): i for i, (d, t) in enumerate(terms)}
    for i, (_, t) in enumerate(terms):
        nodes[f"c{i}"] = DrawnNode(f"c{i}", "cost", f"c{i}", tuple(np.shape(t)))

    # Solid edges: sources → node (its parameters), sources → cost term.
    targets: dict[Any, set] = {}  # source → DOT ids it influences
    for node_id, deps in parents.items():
        for src in _split(deps)[1]:
            targets.setdefault(src, set()).add(node_ids[node_id])
    # The influence pass splits the cost as the first pass does (its sources never
    # decide a split): each of its terms is one of the first pass's, plus sources.
    approximate = False
    matched: set = set()
    for d2, t2 in influence.term_items():
        real, sources = _split(d2)
        i = index.get((real, tuple(np.shape(t2))))
        if i is not None:
            covered = [i]
            matched.add(i)
        else:
            # Not expected: then its sources reach every term of the first pass whose
            # score nodes it covers (an edge too many rather than one missing).
            approximate = True
            mine = {_deps.base_node(k) for k in real}
            covered = [
                j for j, (d1, _) in enumerate(terms) if {_deps.base_node(k) for k in d1} <= mine
            ] or list(range(len(terms)))
        for src in sources:
            for j in covered:
                if src[0] == "draw" and graph.nodes[src[1]].estimator == "score":
                    # a score node influences exactly the terms it weights
                    if src[1] not in {_deps.base_node(k) for k in terms[j][0]}:
                        continue
                targets.setdefault(src, set()).add(f"c{j}")
    approximate = approximate or len(matched) < len(terms)

    edges: list[Edge] = []
    # Inputs: leaves of one argument that feed the same nodes are one box.
    groups: dict[tuple, list[int]] = {}
    for i, (path, _) in enumerate(inputs):
        heads = targets.get(("input", i))
        if heads:
            groups.setdefault((path[0], frozenset(heads)), []).append(i)
    for k, ((_, heads), members) in enumerate(sorted(groups.items(), key=lambda kv: kv[1][0])):
        iid = f"i{k}"
        member_paths = [inputs[i][0] for i in members]
        nodes[iid] = DrawnNode(
            iid,
            "input",
            _common_prefix(member_paths),
            (),
            leaves=len(members),
            type=inputs[members[0]][1],
        )
        edges += [Edge(iid, h, INFLUENCES) for h in sorted(heads, key=_order)]
    for src, heads in sorted(targets.items(), key=lambda kv: repr(kv[0])):
        if src[0] == "draw":
            edges += [Edge(node_ids[src[1]], h, INFLUENCES) for h in sorted(heads, key=_order)]

    # Dashed edges: the cost terms each score node's score term is weighted by.
    for i, (d1, _) in enumerate(terms):
        for node_id, label in _alignments(d1).items():
            edges.append(Edge(node_ids[node_id], f"c{i}", WEIGHTS, label))
    influenced = {e.head for e in edges}
    for i in range(len(terms)):
        if f"c{i}" not in influenced:
            nodes[f"c{i}"] = dataclasses.replace(nodes[f"c{i}"], type="constant")
    return Drawing(nodes, edges, approximate)


_KIND_NAMES = {"eq": "plate", "le": "time ≤", "lt": "time <", "ge": "time ≥", "gt": "time >"}


def _alignments(deps: Deps) -> dict:
    """Score node id → the node axes along which each element weights only its own
    elements of the term (`"0: plate"`; `""` when every element weights every one)."""
    kinds: dict = {}
    for key, rel in deps.items():
        node = _deps.base_node(key)
        axes = kinds.setdefault(node, {})
        n_node = len(rel) - len(_deps.lane_names(key))
        for k, e in enumerate(rel[:n_node]):
            if isinstance(e, Axis):
                axes.setdefault(k, set()).add(_KIND_NAMES.get(e.kind, e.kind))
    return {
        node: ", ".join(
            f"{k}: {names.pop() if len(names) == 1 else 'mixed'}" for k, names in sorted(ax.items())
        )
        for node, ax in kinds.items()
    }


def _order(dot_id: str) -> tuple:
    return ("isc".index(dot_id[0]), int(dot_id[1:]))


def _argument_names(f: Callable, n_args: int) -> list[str]:
    try:
        params = list(inspect.signature(f).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = []
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        elif p.kind == p.VAR_POSITIONAL:
            break
    return names + [f"args[{j}]" for j in range(len(names), n_args)]


def _path_name(path, names: list[str]) -> tuple:
    """(argument name, then the key path inside it) for a leaf of `(args, kwargs)`."""
    where, head, *rest = path
    if where.idx == 0:
        arg = names[head.idx] if head.idx < len(names) else f"args[{head.idx}]"
    else:
        arg = str(head.key)
    return (arg,) + tuple(jax.tree_util.keystr((k,)) for k in rest)


def _common_prefix(paths: list[tuple]) -> str:
    first = paths[0]
    n = 0
    while n < len(first) and all(len(p) > n and p[n] == first[n] for p in paths):
        n += 1
    return "".join(first[:n])


# -- DOT -------------------------------------------------------------------------------------


def _type_text(x) -> str:
    """`f32[3,2]`, as JAX writes an array's type."""
    shape = _shape_text(tuple(np.shape(x)))
    try:
        dtype = np.dtype(x.dtype)
    except TypeError:  # a typed PRNG key
        return f"key{shape}"
    if dtype.kind == "b":
        return f"bool{shape}"
    short = {"f": "f", "i": "i", "u": "u", "c": "c"}.get(dtype.kind, dtype.name)
    return f"{short}{dtype.itemsize * 8}{shape}"


def _shape_text(shape: tuple) -> str:
    return "[" + ",".join(str(s) for s in shape) + "]"


def _html(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _label(n: DrawnNode) -> str:
    """An HTML-like label: the name, then the details in a smaller font (so that a
    circle stays small)."""
    if n.kind == "input":
        details = [f"{n.leaves} arrays" if n.leaves > 1 else n.type]
    elif n.kind == "cost":
        details = [] if n.shape == () else [_shape_text(n.shape)]
        details += [n.type] if n.type else []
    else:
        details = [f"{n.distribution}", n.estimator]
        if n.shape:
            details.append(_shape_text(n.shape))
        if n.source:
            details.append(_short_source(n.source))
    small = "<br/>".join(_html(d) for d in details)
    body = f"<b>{_html(n.name or 'args')}</b>"
    return f'<{body}<br/><font point-size="8">{small}</font>>' if small else f"<{body}>"


def _short_source(source: str) -> str:
    """`path/to/file.py:12:4 (fn)` → `file.py:12 (fn)`."""
    where, _, fn = source.partition(" ")
    parts = where.split(":")
    name = os.path.basename(parts[0])
    line = f"{name}:{parts[1]}" if len(parts) > 1 else name
    return f"{line} {fn.replace('.<locals>', '')}".strip()


_STYLE = {
    "input": dict(shape="box", style="filled", fillcolor="#f2f2f2"),
    "cost": dict(shape="diamond", style="filled", fillcolor="#fdebd0"),
}
_LEGEND = (
    "squares: inputs · circles: stochastic nodes (shaded: with a score term) · diamonds: "
    "cost terms\\nsolid: influences through deterministic computation · dashed: the cost "
    "terms a score term is weighted by"
)


def _dot_source(nodes: dict[str, DrawnNode], edges: tuple) -> str:
    """The DOT text, built with the `graphviz` package (which quotes labels)."""
    g = _graphviz().Digraph("scg")
    g.attr("graph", rankdir="LR", fontsize="10", labelloc="b", label=_LEGEND)
    g.attr("node", fontname="Helvetica", fontsize="11")
    g.attr("edge", fontname="Helvetica", fontsize="9")
    for n in nodes.values():
        if n.kind == "stochastic":
            fill = "#d6eaf8" if n.score else "white"
            style = dict(shape="circle", style="filled", fillcolor=fill)
        else:
            style = _STYLE[n.kind]
        g.node(n.id, _label(n), **style)
    for e in edges:
        if e.kind == INFLUENCES:
            # A draw that depends on itself: on its earlier draws, in a loop.
            g.edge(e.tail, e.head, label="earlier steps" if e.tail == e.head else None)
            continue
        alternatives = nodes[e.tail].estimator not in ("score",) and nodes[e.tail].score
        label = "evaluated at alternatives" if alternatives else "weights"
        g.edge(
            e.tail,
            e.head,
            label=label + (f" ({e.label})" if e.label else ""),
            style="dashed",
            color="#c0392b",
            fontcolor="#c0392b",
            constraint="false",
        )
    return g.source


def _graphviz():
    try:
        import graphviz
    except ImportError:
        raise ImportError(
            "scgjax.draw: rendering needs the `graphviz` package (pip install "
            "'scgjax[draw]' or pip install graphviz) and Graphviz's `dot` program. The DOT "
            "text is in `.source` without them."
        ) from None
    return graphviz

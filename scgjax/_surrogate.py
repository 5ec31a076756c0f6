"""The public transforms: `surrogate`, `scg_grad`, `scg_value_and_grad`.

`surrogate(f)` traces `f` to a jaxpr, evaluates it with the SCG interpreter (which draws
every sample, records the score-function nodes and splits the cost into terms) and
returns the DiCE objective `Σ_c ⊡(Σ_{w upstream of c} log p(w)) · c`. Its value is the
cost, and `jax.grad` of it is the estimator of Schulman et al. (2015); because of the magic
box, `jax.hessian`/`jax.jacfwd` of it are unbiased too (Foerster et al. 2018).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import (
    _compat,
    _control_flow,  # noqa: F401  (registers the higher-order rules)
    _deps,
    _enumerate,
    _estimators,
    _graph,
    _interpret,
    _keys,
    _lint,
    _shard_map,  # noqa: F401  (registers the shard_map rule)
)
from ._graph import Graph, Val


def _is_array_like(x: Any) -> bool:
    """Arrays and tracers are traced; everything else, Python scalars included, is held
    static, as `jax.grad` does with the arguments it does not differentiate (a
    differentiated Python scalar reaches us as a tracer)."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic, _compat.Tracer))


def _split_static(tree):
    """The array leaves of `tree`, and a function rebuilding `tree` from new array leaves
    (non-array leaves, e.g. strings and flags, are held as they are)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    dynamic = [_is_array_like(x) for x in leaves]

    def rebuild(dyn):
        it = iter(dyn)
        return jax.tree_util.tree_unflatten(
            treedef, [next(it) if d else x for x, d in zip(leaves, dynamic)]
        )

    return [x for x, d in zip(leaves, dynamic) if d], rebuild


def _trace(f: Callable, args: tuple, kwargs: dict, has_aux: bool):
    """Traces `f`. Returns the closed jaxpr (outputs: the cost, then aux's array leaves),
    its dynamic input leaves, and `rebuild_aux(values)` for the aux (whose non-array
    leaves, e.g. strings, pass through unchanged, as with `jax.grad`)."""
    dyn_leaves, rebuild = _split_static((args, kwargs))
    box: dict = {}

    def flat_f(*dyn):
        a, kw = rebuild(dyn)
        out = f(*a, **kw)
        if not has_aux:
            return out
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(
                "scgjax: with has_aux=True, f must return a pair (cost, aux), got "
                f"{jax.tree_util.tree_structure(out)}."
            )
        cost, aux = out
        aux_dyn, box["rebuild_aux"] = _split_static(aux)
        return cost, aux_dyn

    closed, out_shape = jax.make_jaxpr(flat_f, return_shape=True)(*dyn_leaves)
    _check_cost(out_shape[0] if has_aux else out_shape)
    return closed, dyn_leaves, box.get("rebuild_aux")


def _check_cost(cost_shape: Any) -> None:
    if not isinstance(cost_shape, jax.ShapeDtypeStruct):
        raise TypeError(
            "scgjax: f must return a scalar cost (a single float array of shape ()), got "
            f"a {jax.tree_util.tree_structure(cost_shape)}. To return more, use "
            "has_aux=True and return (cost, aux)."
        )
    if cost_shape.shape != ():
        raise ValueError(
            f"scgjax: f must return a scalar cost, got an array of shape {cost_shape.shape}. "
            "Reduce it, e.g. with .sum() or .mean(), to the quantity whose expectation you "
            "want to differentiate."
        )
    if not jnp.issubdtype(cost_shape.dtype, jnp.floating):
        raise TypeError(
            f"scgjax: f must return a floating-point scalar cost, got dtype "
            f"{cost_shape.dtype}. Convert it, e.g. with .astype(jnp.float32)."
        )


def _prepare(f, args, kwargs, has_aux):
    """Traces `f` and runs the trace-time checks (key reuse, lost gradients)."""
    closed, dyn_leaves, rebuild_aux = _trace(f, args, kwargs, has_aux)
    _keys.check_key_reuse(closed)
    _lint.check_program(closed, _lint.differentiated_inputs(dyn_leaves))
    return closed, dyn_leaves, rebuild_aux


def _interpret_program(
    closed, dyn_leaves, rebuild_aux, ids=None, record=False, enumerated=frozenset()
):
    """The SCG interpreter on a traced program: (cost `Val`, aux values, graph). `ids`
    maps node ids to values used instead of drawing; `enumerated` names the ids among
    them that are enumerated sites' alternatives."""
    graph = Graph(record)
    ctx = _interpret.Context((), graph, draws=ids or None, enumerated=enumerated)
    outs = _interpret.eval_jaxpr(
        ctx,
        closed.jaxpr,
        [_interpret.const_val(c) for c in closed.consts],
        [Val(x) for x in dyn_leaves],
    )
    aux = rebuild_aux([v.value for v in outs[1:]]) if rebuild_aux is not None else None
    return outs[0], aux, graph


def _evaluate(f, args, kwargs, has_aux, draws=None, record=False):
    """Runs the SCG interpreter on `f`: (cost `Val`, aux values, graph). `draws` maps
    site names to values used instead of drawing; `record` keeps every node's value and
    log-probability in the graph."""
    closed, dyn_leaves, rebuild_aux = _prepare(f, args, kwargs, has_aux)
    ids = _draws_by_id(_abstract_pass(closed, dyn_leaves), draws) if draws else None
    return _interpret_program(closed, dyn_leaves, rebuild_aux, ids, record)


@dataclasses.dataclass(frozen=True)
class _Abstract:
    """What one abstract pass of the interpreter sees: the nodes, their names, and each
    cost term's dependencies and shape."""

    nodes: dict
    names: dict  # node id -> name
    terms: list


def _abstract_pass(closed, dyn_leaves) -> _Abstract:
    box: dict = {}

    def nodes(*leaves):
        cost, _, graph = _interpret_program(closed, leaves, None)
        box["out"] = _Abstract(
            graph.nodes,
            _node_names(graph),
            [(d, tuple(np.shape(t))) for d, t in cost.term_items()],
        )

    jax.eval_shape(nodes, *[_shape_struct(x) for x in dyn_leaves])
    return box["out"]


def _draws_by_id(info: _Abstract, draws: dict) -> dict:
    """`draws` (site name → value) keyed by node id, the names being those of
    `describe` (`name=`, else `node<i>`)."""
    if not isinstance(draws, dict):
        raise TypeError(
            f"scgjax: draws must be a dict of site name -> value, got {type(draws).__name__}."
        )
    by_name = {name: n for n, name in info.names.items()}
    unknown = [k for k in draws if k not in by_name]
    if unknown:
        raise ValueError(
            f"scgjax: draws names {unknown}, which are not sample sites of f; "
            f"its sites are {sorted(by_name)} (see scg.describe)."
        )
    return {by_name[k]: v for k, v in draws.items()}


def _shape_struct(x) -> jax.ShapeDtypeStruct:
    # With its sharding: on an Explicit mesh the abstract pass must see what `f` sees.
    return _compat.shape_struct(jax.typeof(x))


BASELINES = (None, "leave_one_out")


def _node_names(graph: Graph) -> dict:
    """NodeId → name: the `name=` given to `scg.sample`, else `node<i>` as in `describe`
    (repeated names get a suffix `_1`, `_2`, ...)."""
    names, seen = {}, {}
    for i, node in enumerate(graph.nodes.values()):
        base = node.name or f"node{i}"
        k = seen.get(base, 0)
        seen[base] = k + 1
        names[node.id] = base if k == 0 else f"{base}_{k}"
    return names


def _one_sample(f, has_aux, need_downstream, draws=None):
    """The surrogate of one run of `f`: (surrogate, aux, downstream costs, log-probs),
    the last two keyed by node name.

    `adjust(graph, names)`, given to the returned `run`, returns the score nodes'
    log-probabilities to use in τ (by node id) and extra baseline terms: how
    `scgjax.baselines.nvil` adds baselines and scales learning signals from outside the
    program (downstream costs and log-probs are returned as without it)."""

    def run(args, kwargs, draws=draws, adjust=None):
        closed, dyn_leaves, rebuild_aux = _prepare(f, args, kwargs, has_aux)
        if _enumerate.has_enumerated_sites(closed):
            info = _abstract_pass(closed, dyn_leaves)
            ids = _draws_by_id(info, draws) if draws else None
            plan = _enumerate.plan(info.nodes, info.terms, ids, info.names)
            if plan.sites:
                if need_downstream:
                    raise ValueError(
                        "scgjax: downstream=True, baseline='leave_one_out' and "
                        "scg.baselines.nvil are not "
                        "supported yet with sites evaluated at several values (estimator "
                        f"{_estimators.several_values()}): "
                        f"{[info.names[n.id] for n in plan.sites]}. Give the other score "
                        "sites a baseline= of their own, or use estimator='score'."
                    )
                value, aux = _enumerated(closed, dyn_leaves, rebuild_aux, ids, plan)
                return value, aux, {}, {}
        else:
            ids = _draws_by_id(_abstract_pass(closed, dyn_leaves), draws) if draws else None
        cost, aux, graph = _interpret_program(closed, dyn_leaves, rebuild_aux, ids)
        names = _node_names(graph)
        if adjust is None:
            value = _graph.dice_objective(cost, graph)
        else:
            value = _graph.dice_objective(cost, graph, *adjust(graph, names))
        if not need_downstream:
            return value, aux, {}, {}
        q = _graph.downstream_costs(cost, graph)
        return (
            value,
            aux,
            {names[n]: v for n, v in q.items()},
            {names[n]: v for n, v in graph.log_probs.items()},
        )

    return run


def _enumerated(closed, dyn_leaves, rebuild_aux, ids, plan):
    """The surrogate with `plan`'s sites summed out (`_enumerate`); aux values get a
    leading axis of the alternatives."""
    enumerated = [n.id for n in plan.sites]

    def one(alternative):
        cost, aux, graph = _interpret_program(
            closed,
            dyn_leaves,
            rebuild_aux,
            {**(ids or {}), **alternative},
            enumerated=frozenset(enumerated),
        )
        lps = {n: lp for n, lp in graph.log_probs.items() if n not in enumerated}
        cache: dict = {}
        terms, meta = [], []
        for deps, t in cost.term_items():
            rest = _deps.without_nodes(deps, enumerated)
            terms.append(_graph.weighted_term(rest, t, lps, cache))
            meta.append((deps, tuple(np.shape(t))))
        site_lps = [graph.log_probs[n] for n in enumerated]
        baselines = graph.baseline_total() + graph.node_baselines(lps, cache, frozenset(enumerated))
        return terms, meta, site_lps, jnp.asarray(baselines), aux

    return _enumerate.objective(one, plan, closed.out_avals[0].dtype)


def _check_options(num_samples, baseline, key_argnum) -> int:
    """Validates the estimator options when a transform is built; returns num_samples."""
    if baseline not in BASELINES:
        raise ValueError(
            f"scgjax: unknown baseline {baseline!r}; choose None or "
            "'leave_one_out' (per-node baselines go to scg.sample(..., baseline=b))."
        )
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, (int, np.integer))
        or num_samples < 1
    ):
        raise ValueError(f"scgjax: num_samples must be a positive int, got {num_samples!r}.")
    if baseline == "leave_one_out" and num_samples < 2:
        raise ValueError(
            "scgjax: baseline='leave_one_out' needs num_samples >= 2 (each "
            f"sample's baseline is the mean of the others), got {num_samples}."
        )
    if isinstance(key_argnum, bool) or not isinstance(key_argnum, (int, np.integer)):
        raise TypeError(
            f"scgjax: key_argnum must be the position (an int) of f's key "
            f"argument, got {key_argnum!r}."
        )
    return int(num_samples)


def _key_at(args: tuple, key_argnum: int):
    """f's key argument; a clear error when `key_argnum` does not point at a key."""
    if not -len(args) <= key_argnum < len(args):
        raise ValueError(
            f"scgjax: key_argnum={key_argnum} does not name one of the {len(args)} "
            "positional arguments f was called with. Pass the key positionally and set "
            "key_argnum to its position."
        )
    key = args[key_argnum]
    legacy = (
        isinstance(key, (jax.Array, np.ndarray)) and key.dtype == np.uint32 and key.shape == (2,)
    )
    typed = isinstance(key, jax.Array) and _compat.is_key_array(key) and key.ndim == 0
    if not (legacy or typed):
        raise TypeError(
            f"scgjax: the argument at key_argnum={key_argnum} must be a single PRNG key "
            f"(jax.random.key or PRNGKey), got {type(key).__name__} "
            f"{getattr(key, 'dtype', '')}{list(np.shape(key))}. Set key_argnum to the "
            "position of f's key argument."
        )
    return key


def _with_key(args: tuple, key_argnum: int, key) -> tuple:
    out = list(args)
    out[key_argnum] = key
    return tuple(out)


def surrogate(
    f: Callable,
    *,
    has_aux: bool = False,
    num_samples: int = 1,
    baseline: str | None = None,
    key_argnum: int = -1,
    downstream: bool = False,
    draws: dict | None = None,
    particle_axes: str | tuple[str, ...] | None = None,
) -> Callable:
    """The DiCE surrogate objective of a stochastic program.

    Args:
      f: a function of arrays (and pytrees of arrays) that draws samples with
        `scgjax.sample` and returns a scalar cost (or `(cost, aux)` with `has_aux`).
      has_aux: whether `f` returns `(cost, aux)`.
      num_samples: run `f` this many times under `vmap`, with keys split from its key
        argument (`key_argnum`); the value is the mean of the costs and the derivatives
        are the mean of the single-sample ones. Aux values then have a leading axis.
      baseline: `"leave_one_out"` (with `num_samples >= 2`): each node's downstream cost
        in sample `k` gets the mean of the same node's downstream costs in the other
        samples as baseline (unbiased, every order).
      key_argnum: the position of `f`'s key argument, for `num_samples > 1`.
      downstream: also return each score node's downstream cost `Q̂_w` (stop-gradient,
        shaped like its log-probability, keyed by `name=` or `node<i>`), the regression
        target of a learned or moving-average baseline.
      draws: evaluate the estimator at chosen draws: a dict from site name (`name=`, or
        `node<i>` as `describe` lists them) to the value that score-function site takes
        instead of drawing (stacked along the loop axis for a site inside `scan`, with
        the batch axes of a site under `vmap`; with `num_samples=K`, one more leading
        axis of K). The other sites draw from the key as usual. Pathwise sites cannot be
        replayed (their gradient flows through the value).
      particle_axes: with `num_samples=K`, the mesh axis (or axes) of the current mesh
        (`jax.set_mesh`) to shard the K samples over, so that each device runs K/n of
        them; the estimate, leave-one-out baselines included, is the same as on one
        device (the samples' keys are split before they are sharded).

    Returns:
      A function with `f`'s signature whose value equals `f`'s cost for the same
      arguments (and key), and whose derivatives of every order with respect to any
      argument (`jax.grad`, `jax.hessian`, `jax.jacfwd`) are unbiased estimates of the
      derivatives of `E[cost]`. Sites evaluated at several values change the value:
      `"enum"` gives the expectation over the site, the others an average over their
      alternatives; `"arm"`, `"disarm"`, `"arsm"`, `"measure_valued"`, `"unordered_set"`
      and `"score_wor"` estimate first derivatives only (a second derivative through their
      parameters raises). With `has_aux` it returns `(surrogate, aux)`; with
      `downstream`, `(surrogate, downstream)` or `(surrogate, (aux, downstream))`.

    Example:
      >>> L = scg.surrogate(f)(theta, key)        # == f(theta, key)
      >>> H = jax.hessian(scg.surrogate(f))(theta, key)
    """
    num_samples = _check_options(num_samples, baseline, key_argnum)
    if particle_axes is not None and num_samples == 1:
        raise ValueError(
            "scgjax: particle_axes shards the num_samples samples over mesh axes; it needs "
            "num_samples > 1."
        )
    loo = baseline == "leave_one_out"
    run = _one_sample(f, has_aux, downstream or loo)

    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        if num_samples == 1:
            value, aux, q, _ = run(args, kwargs, draws)
        else:
            keys = jax.random.split(_key_at(args, key_argnum), num_samples)
            if particle_axes is not None:
                keys = _compat.shard_leading(keys, particle_axes)
            values, aux, q, log_probs = jax.vmap(
                lambda k, d: run(_with_key(args, key_argnum, k), kwargs, d)
            )(keys, draws)
            value = jnp.mean(values)
            if loo:
                extra = 0.0
                for name, qs in q.items():
                    others = (jnp.sum(qs, axis=0, keepdims=True) - qs) / (num_samples - 1)
                    extra = extra + _graph.baseline_term(log_probs[name], others)
                value = (value + extra / num_samples).astype(jnp.result_type(value))
        if downstream:
            aux = (aux, q) if has_aux else q
            return value, aux
        return (value, aux) if has_aux else value

    return wrapped


def scg_value_and_grad(
    f: Callable,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    holomorphic: bool = False,
    allow_int: bool = False,
    **options,
) -> Callable:
    """Like `jax.value_and_grad`, with an unbiased estimate of the gradient of `E[f]`.

    Args:
      f: a stochastic program (see `surrogate`).
      argnums: which positional argument(s) to differentiate, as in `jax.grad`.
      has_aux: whether `f` returns `(cost, aux)`.
      holomorphic: as in `jax.value_and_grad`.
      allow_int: as in `jax.value_and_grad`.
      **options: `num_samples`, `baseline`, `key_argnum`, `downstream`, `draws`,
        `particle_axes`, as in
        `surrogate`.

    Returns:
      A function returning `(cost, grad)`, or `((cost, aux), grad)` with `has_aux`; with
      `downstream`, the aux slot holds `downstream` or `(aux, downstream)`.
    """
    aux = has_aux or options.get("downstream", False)
    return jax.value_and_grad(
        surrogate(f, has_aux=has_aux, **options),
        argnums=argnums,
        has_aux=aux,
        holomorphic=holomorphic,
        allow_int=allow_int,
    )


def scg_grad(
    f: Callable,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    holomorphic: bool = False,
    allow_int: bool = False,
    **options,
) -> Callable:
    """Like `jax.grad`: an unbiased estimate of the gradient of `E[f]`.

    Score-function (REINFORCE) terms are added for draws that are not reparameterized,
    each element weighted only by the cost elements downstream of it (automatic plates,
    causality in `scan`); reparameterized draws are differentiated through.

    Args:
      f: a stochastic program (see `surrogate`).
      argnums: which positional argument(s) to differentiate, as in `jax.grad`.
      has_aux: whether `f` returns `(cost, aux)`; then this returns `(grad, aux)`.
      holomorphic: as in `jax.grad`.
      allow_int: as in `jax.grad`.
      **options: `num_samples`, `baseline`, `key_argnum`, `downstream`, `draws`,
        `particle_axes`, as
        in `surrogate`. With `downstream=True` this returns `(grad, downstream)` (or
        `(grad, (aux, downstream))`).

    Example:
      >>> g = scg.scg_grad(f)(theta, key)
      >>> g = scg.scg_grad(f, num_samples=8, baseline="leave_one_out")(theta, key)
      >>> g = jax.jit(jax.vmap(scg.scg_grad(f), (None, 0)))(theta, keys).mean(0)
    """
    aux = has_aux or options.get("downstream", False)
    return jax.grad(
        surrogate(f, has_aux=has_aux, **options),
        argnums=argnums,
        has_aux=aux,
        holomorphic=holomorphic,
        allow_int=allow_int,
    )


def gradient_variance(
    f: Callable,
    argnums: int | Sequence[int] = 0,
    num_draws: int = 1000,
    *,
    has_aux: bool = False,
    key_argnum: int = -1,
    **options,
) -> Callable:
    """The mean and variance of the gradient estimator, from `num_draws` draws.

    Args:
      f: a stochastic program (see `surrogate`).
      argnums: as in `scg_grad`.
      num_draws: how many independent estimates, batched with `vmap` under one `jit`,
        with keys split from `f`'s key argument.
      has_aux: whether `f` returns `(cost, aux)` (the aux is dropped).
      key_argnum: the position of `f`'s key argument.
      **options: estimator options as in `scg_grad` (`num_samples`, `baseline`).

    Returns:
      A function with `f`'s signature returning `(mean, variance)`, pytrees shaped like
      the gradient; the variance is the per-entry variance of one estimate (ddof=0).

    Example:
      >>> mean, var = scg.gradient_variance(f, num_draws=10_000)(theta, key)
      >>> _, var_loo = scg.gradient_variance(f, num_draws=10_000, num_samples=4,
      ...                                    baseline="leave_one_out")(theta, key)
    """
    if isinstance(num_draws, bool) or not isinstance(num_draws, (int, np.integer)) or num_draws < 2:
        raise ValueError(f"scgjax: num_draws must be an int >= 2, got {num_draws!r}.")
    grad = scg_grad(f, argnums, has_aux=has_aux, key_argnum=key_argnum, **options)
    drop_aux = has_aux or options.get("downstream", False)

    def stats(args, kwargs):
        keys = jax.random.split(_key_at(args, key_argnum), int(num_draws))
        draws = jax.vmap(lambda k: grad(*_with_key(args, key_argnum, k), **kwargs))(keys)
        if drop_aux:
            draws = draws[0]
        return (
            jax.tree.map(lambda d: jnp.mean(d, axis=0), draws),
            jax.tree.map(lambda d: jnp.var(d, axis=0), draws),
        )

    jitted = _jit_array_args(stats)

    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        _key_at(args, key_argnum)
        return jitted(args, kwargs)

    return wrapped


def variance_gradient(
    f: Callable,
    argnums: int | Sequence[int] = 0,
    control_argnums: int | Sequence[int] = 1,
    *,
    has_aux: bool = False,
    **options,
) -> Callable:
    """The gradient estimate of `E[f]` and, for training control variates (REBAR's and
    RELAX's `eta`, `temperature`, `params`; a learned baseline), the gradient of its
    variance with respect to them.

    The estimate `ĝ = scg_grad(f, argnums)` is unbiased whatever the control-variate
    arguments are, so `∇_φ Σ Var(ĝ) = ∇_φ E[|ĝ|²]`, which `∇_φ |ĝ|²` (differentiating
    the estimate itself) estimates without bias (Grathwohl et al. 2018). Minimise it
    with any optimiser (Optax).

    Args:
      f: a stochastic program (see `surrogate`) whose control-variate parameters are
        among its positional arguments, e.g. `f(theta, phi, key)` drawing with
        `estimator=scg.estimators.RELAX(control=net, params=phi["net"], eta=phi["eta"])`.
      argnums: the parameters whose gradient is estimated, as in `scg_grad`.
      control_argnums: the control-variate arguments (disjoint from `argnums`).
      has_aux: whether `f` returns `(cost, aux)`.
      **options: as in `scg_grad` (`num_samples`, `baseline`, `key_argnum`).

    Returns:
      A function with `f`'s signature returning `(grad, variance_grad)` (`((grad, aux),
      variance_grad)` with `has_aux`): `grad` as `scg_grad`'s, `variance_grad` the
      gradient of `Σ ĝ²` (over every entry of `grad`) with respect to the control
      arguments, one per `control_argnums` entry (a tuple when it is a sequence).

    Example:
      >>> g, dphi = scg.estimators.variance_gradient(f, 0, 1)(theta, phi, key)
      >>> theta_updates, s1 = opt.update(g, s1); phi_updates, s2 = opt2.update(dphi, s2)
    """
    single = isinstance(control_argnums, (int, np.integer))
    controls = (int(control_argnums),) if single else tuple(int(a) for a in control_argnums)
    targets = (argnums,) if isinstance(argnums, (int, np.integer)) else tuple(argnums)
    if set(controls) & {int(a) for a in targets}:
        raise ValueError(
            f"scgjax: variance_gradient's control_argnums {control_argnums!r} overlap argnums "
            f"{argnums!r}: the control-variate parameters are trained on the variance, not on "
            "the objective. Pass them as separate arguments."
        )
    if options.get("downstream"):
        raise ValueError("scgjax: variance_gradient does not take downstream=True.")
    grad = scg_grad(f, argnums, has_aux=has_aux, **options)

    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        for a in controls:
            if not -len(args) <= a < len(args):
                raise ValueError(
                    f"scgjax: control_argnums={control_argnums!r}, but the function got "
                    f"{len(args)} positional arguments."
                )

        def square(*values):
            full = list(args)
            for a, v in zip(controls, values):
                full[a] = v
            out = grad(*full, **kwargs)
            g = out[0] if has_aux else out
            total = sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(g))
            return total, out

        dphi, out = jax.grad(square, argnums=tuple(range(len(controls))), has_aux=True)(
            *(args[a] for a in controls)
        )
        return out, dphi[0] if single else dphi

    return wrapped


def _jit_array_args(fn: Callable) -> Callable:
    """`jax.jit(fn)` with every non-array leaf of the arguments held static; compiled
    once per argument structure and static values (when those are hashable)."""
    cache: dict = {}

    def call(*args):
        dyn_leaves, rebuild = _split_static(args)
        leaves, treedef = jax.tree_util.tree_flatten(args)
        static = tuple(x for x in leaves if not _is_array_like(x))
        try:
            key = (treedef, static)
            hash(key)
        except TypeError:
            return jax.jit(lambda *dyn: fn(*rebuild(dyn)))(*dyn_leaves)
        if key not in cache:
            cache[key] = jax.jit(lambda *dyn: fn(*rebuild(dyn)))
        return cache[key](*dyn_leaves)

    return call


def describe(f: Callable, *, has_aux: bool = False) -> Callable[..., str]:
    """A table of the sample sites of `f`: estimator, shape, the cost terms each score
    node weights, the node axes each stays aligned with (plates, time order), and where
    alignment fell back to "every element". Traces `f` abstractly; nothing is computed.

    The `aligned` column lists, for a score node, the axes of its log-probability along
    which cost elements are weighted by their own elements only: `plate` (element `i`
    with element `i`), `time ≤`/`time <` (causality in a scan, or a cumsum), `time ≥`/
    `time >` (a reverse scan). `-` means every cost element depends on every element of
    the node. Below the table, each node axis that is not aligned is traced to the
    equations where alignment was lost (primitive and source line), and a cost that is
    not split into terms says which operation stopped the split.

    Example:
      >>> print(scg.describe(f)(theta, key))
      node   distribution     estimator  shape  weights            aligned  source
      node0  BernoulliLogits  score      ()     1 of 1 cost terms  -        quickstart.py:20:8 (f)
      node1  Normal           pathwise   ()     -                  -        quickstart.py:21:8 (f)
    """

    @functools.wraps(f)
    def wrapped(*args, **kwargs) -> str:
        box: dict = {}
        dyn_leaves, rebuild = _split_static((args, kwargs))

        def run(*dyn):
            a, kw = rebuild(dyn)
            box["closed"] = _trace(f, a, kw, has_aux)[0]
            cost, _, graph = _evaluate(f, a, kw, has_aux)
            box["cost"], box["graph"] = cost, graph
            return cost.value

        fallbacks: dict = {}
        token = _interpret._FALLBACKS.set(fallbacks)
        try:
            jax.eval_shape(run, *dyn_leaves)
        finally:
            _interpret._FALLBACKS.reset(token)
        cost, graph = box["cost"], box["graph"]
        weights = _graph.node_weights(cost)
        names = _node_names(graph)
        items = cost.term_items()
        n_terms = len(items)
        aligned, dependent = _aligned_axes(items)
        rows = [("node", "distribution", "estimator", "shape", "weights", "aligned", "source")]
        notes = []
        for node in graph.nodes.values():
            score = node.estimator == "score"
            weighted = f"{weights.get(node.id, 0)} of {n_terms} cost terms" if score else "-"
            kinds = aligned.get(node.id, {})
            n_dep = dependent.get(node.id, 0)
            cells = (
                ", ".join(
                    f"{k}: {kind}" + (f" in {n} of {n_dep} terms" if n < n_dep else "")
                    for k, (kind, n) in sorted(kinds.items())
                )
                or "-"
            )
            rows.append(
                (
                    names[node.id],
                    node.distribution,
                    str(node.method),
                    str(node.shape),
                    weighted,
                    cells if score else "-",
                    node.source,
                )
            )
            if not score or not n_dep:
                continue
            for k in range(len(node.shape)):
                if k in kinds and kinds[k][1] == n_dep:
                    continue
                where = fallbacks.get((node.id, k), [])
                at = (
                    "; ".join(f"{p} ({src})" if src else p for p, src in where[:3])
                    or "a loop carry, a branch or an enclosing transform"
                )
                some = f" in {n_dep - kinds[k][1]} of {n_dep} terms" if k in kinds else ""
                notes.append(f"  {names[node.id]} axis {k}: every element{some}, from {at}")
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        out = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        if notes:
            out += ["", "alignment fell back to every element:"] + notes
        # One term of the cost's own shape (no pending axes that keep elements apart).
        if n_terms == 1 and items[0][0] and np.shape(items[0][1]) == np.shape(cost.value):
            stop = _cost_producer(box["closed"].jaxpr)
            if stop:
                out += ["", f"the cost is one term: it is not split at {stop}"]
        return "\n".join(out)

    return wrapped


_KIND_NAMES = {"eq": "plate", "le": "time ≤", "lt": "time <", "ge": "time ≥", "gt": "time >"}


def _aligned_axes(items) -> tuple[dict, dict]:
    """({node id: {node axis: (kind, number of terms aligned with it)}}, {node id:
    number of cost terms that depend on it})."""
    out: dict = {}
    dependent: dict = {}
    for deps, _ in items:
        seen: dict = {}
        for key, rel in deps.items():
            node = _deps.base_node(key)
            seen.setdefault(node, {})
            n_node = len(rel) - len(_deps.lane_names(key))
            for k, e in enumerate(rel[:n_node]):
                if isinstance(e, _deps.Axis):
                    seen[node].setdefault(k, set()).add(_KIND_NAMES.get(e.kind, e.kind))
        for node, axes in seen.items():
            dependent[node] = dependent.get(node, 0) + 1
            kinds = out.setdefault(node, {})
            for k, names in axes.items():
                name = names.pop() if len(names) == 1 else "mixed"
                old = kinds.get(k)
                kinds[k] = (
                    name if old is None or old[0] == name else "mixed",
                    (old[1] if old else 0) + 1,
                )
    return out, dependent


def _cost_producer(jaxpr, position: int = 0) -> str:
    """The operation that produced the returned cost (output `position` of `jaxpr`),
    with its source line; looks inside calls (`jax.jit(f)`), whose terms pass through."""
    out = jaxpr.outvars[position]
    for eqn in reversed(jaxpr.eqns):
        if out in eqn.outvars:
            if eqn.primitive.name in _interpret.term_rules:
                return ""  # a linear operation whose terms all have the same weight
            call = _interpret.STATIC_CALLS.get(eqn.primitive.name)
            if call in eqn.params and eqn.primitive.name in _interpret.DATAFLOW_RULES:
                inner, _ = _compat.open_jaxpr(eqn.params[call])
                return _cost_producer(inner, eqn.outvars.index(out))
            src = _compat.source_info(eqn)
            return f"{eqn.primitive.name} ({src})" if src else eqn.primitive.name
    return ""


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["value", "log_prob", "drawn"],
    meta_fields=["name", "distribution", "estimator", "source", "method"],
)
@dataclasses.dataclass(frozen=True)
class Site:
    """One sample site of a traced run (`scgjax.trace`).

    Attributes:
      name: `name=` given to `scg.sample`, else `node<i>` (as in `describe`).
      distribution: the distribution's class name.
      estimator: `"score"` or `"pathwise"` (an enumerated site is `"score"`, a relaxed
        one `"pathwise"`).
      source: file and line of the `scg.sample` call.
      value: the draw (stacked along a leading axis per enclosing `scan`).
      log_prob: its log-density under the distribution it was drawn from, shaped like
        `d.log_prob(value)` (for score sites, with the derivatives scgjax uses). For
        `d.mask(m)` it is the base distribution's log-density, also where `m` is False
        (numpyro's masked `log_prob` is 0 there): the value was drawn from the base.
      drawn: a boolean array like `log_prob`: False where the site sits in a `cond`
        branch that was not taken (then `value` and `log_prob` are 0 there).
      method: the estimator as `scg.sample` was given it (`"score"`, `"enum"`,
        `"gumbel_softmax"`, ...; with its options when they are not the defaults). For
        `"enum"`, `log_prob` is per element (a `to_event` does not sum); for a
        relaxation, it is the log-density of the hard draw the value rounds to.
    """

    name: str
    distribution: str
    estimator: str
    source: str
    value: Any
    log_prob: Any
    drawn: Any
    method: str = ""


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["cost", "aux", "sites"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class Trace:
    """A traced run of a stochastic program: its cost, aux and every sample site."""

    cost: Any
    aux: Any
    sites: dict

    @property
    def log_joint(self) -> Any:
        """`Σ_sites Σ log p(value)` over the elements that were drawn: the log-probability
        of this run's draws."""
        total = jnp.zeros((), jnp.result_type(float))
        for site in self.sites.values():
            total = total + jnp.sum(jnp.where(site.drawn, site.log_prob, 0.0))
        return total

    @property
    def score_log_joint(self) -> Any:
        """`log_joint` over the score-function sites only: the weight of replayed draws
        when enumerating them (`Σ_z exp(score_log_joint)·scg_grad(f, draws=z)` is the
        estimator's expectation over the score-function draws)."""
        total = jnp.zeros((), jnp.result_type(float))
        for site in self.sites.values():
            if site.estimator == "score":
                total = total + jnp.sum(jnp.where(site.drawn, site.log_prob, 0.0))
        return total


def trace(f: Callable, *, has_aux: bool = False, draws: dict | None = None) -> Callable:
    """Runs `f` and returns its cost with every sample site's value and log-probability.

    With `draws`, the named score-function sites take the given values instead of
    drawing (see `surrogate`): `trace(f, draws=z)(θ, key).score_log_joint` is
    `log p(z; θ)` of the score-function draws, differentiable in θ, and `.cost` is `f`'s
    cost at `z`. Together with `scg_grad(f, draws=z)` this evaluates an estimator at
    chosen draws; summing `exp(score_log_joint)·scg_grad(f, draws=z)` over every `z` of
    a finite support gives its exact expectation over the score-function draws (given
    the key's pathwise noise, if any). `log_joint` also counts the pathwise sites.

    Args:
      f: a stochastic program (see `surrogate`).
      has_aux: whether `f` returns `(cost, aux)`.
      draws: a dict site name → value, as in `surrogate`.

    Returns:
      A function with `f`'s signature returning a `Trace` (a pytree: it passes through
      `jit` and `vmap`) with `cost`, `aux` and `sites` (name → `Site`).

    Example:
      >>> t = scg.trace(f)(theta, key)
      >>> t.sites["z"].value, t.log_joint
      >>> p = jnp.exp(scg.trace(f, draws={"z": 1})(theta, key).score_log_joint)
    """

    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        cost, aux, graph = _evaluate(f, args, kwargs, has_aux, draws, record=True)
        names = _node_names(graph)
        sites = {}
        for node_id, node in graph.nodes.items():
            value, log_prob, drawn = graph.records[node_id]
            sites[names[node_id]] = Site(
                names[node_id],
                node.distribution,
                node.estimator,
                node.source,
                value,
                log_prob,
                drawn,
                str(node.method),
            )
        return Trace(cost.value, aux, sites)

    return wrapped

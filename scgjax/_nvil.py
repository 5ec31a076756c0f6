"""NVIL: learned input-dependent baselines, centring and variance normalisation.

Mnih & Gregor (2014) reduce the variance of a score-function estimator in three ways,
all of which `nvil` applies per score node `w` of a program, on top of the downstream
costs `Q̂_w` that `scg_grad(..., downstream=True)` returns:

* an input-dependent baseline `b_w = baseline_fn(φ, inputs)[name]`, computed outside
  the program from its arguments (never from a draw, nor from the key), regressed onto
  the downstream cost with a squared loss;
* a running mean `c̄_w` of the residual `Q̂_w − b_w`, subtracted too (the learning signal
  is `A_w = Q̂_w − b_w − c̄_w`);
* a running mean square `v_w` of `A_w`, and the signal divided by `s_w = max(1, √v_w)`.

The baselines and scales reach the surrogate from outside the program (`_surrogate`'s
`adjust` hook): node `w`'s log-probability joins τ as `⊥lp + (lp − ⊥lp)/s_w` (its value,
`1/s_w` times its derivative) and the baseline term `(1 − ⊡(lp'))·(b_w + c̄_w)` joins the
surrogate, so the first derivative of node `w`'s score term is `∇lp_w·A_w/s_w`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _graph, _interpret, _surrogate


class NVILState(NamedTuple):
    """NVIL's running statistics, one scalar per score node (keyed by node name, as the
    downstream costs are: `name=`, else `node<i>` as in `describe`).

    Attributes:
      mean: `c̄_w`, the running mean of the residual `Q̂_w − b_w` (subtracted from the
        learning signal when `center=True`).
      var: `v_w`, the running mean of the squared learning signal `A_w²` (NVIL's variance
        of the centred signal; the signal is divided by `max(1, √v_w)` when
        `normalize=True`).
    """

    mean: dict[str, jax.Array]
    var: dict[str, jax.Array]


class NVILInfo(NamedTuple):
    """What one `update` measured besides the gradients.

    Attributes:
      cost: the program's cost at this draw.
      loss: the baseline's regression loss `Σ_w mean((Q̂_w − c̄_w − b_w)²)` over the nodes
        that `baseline_fn` gave a baseline (broadcast to the node's shape), whose gradient
        is `baseline_grads`.
      downstream: `Q̂_w` per score node (stop-gradient), as `downstream=True` returns it.
      aux: `f`'s aux with `has_aux=True`, else None.
    """

    cost: Any
    loss: Any
    downstream: dict[str, Any]
    aux: Any


class NVIL(NamedTuple):
    """The pair `nvil` returns (as an Optax `GradientTransformation` is a pair).

    Attributes:
      init: `init(*args)` → `NVILState`, zeros for every score node of `f` (traced
        abstractly with `f`'s arguments; nothing is computed).
      update: `update(baseline_params, state, *args)` → `(grads, baseline_grads,
        new_state, info)`: a plain JAX function (use it under `jit` and `vmap`).
    """

    init: Callable[..., NVILState]
    update: Callable[..., tuple[Any, Any, NVILState, NVILInfo]]


def nvil(
    f: Callable,
    baseline_fn: Callable[..., Mapping[str, Any]],
    argnums: int | Sequence[int] = 0,
    *,
    has_aux: bool = False,
    key_argnum: int = -1,
    center: bool = True,
    normalize: bool = False,
    decay: float = 0.8,
    draws: dict | None = None,
) -> NVIL:
    """Neural variational inference and learning's baselines (Mnih & Gregor 2014).

    Args:
      f: a stochastic program (see `scg.surrogate`), unchanged: the one you would give
        `scg_grad`. Its score-function sites must not have a `baseline=` of their own
        (this helper sets every score node's baseline).
      baseline_fn: `baseline_fn(baseline_params, *inputs)` → a dict from node name
        (`name=` of `scg.sample`, else `node<i>` as `scg.describe` lists them) to that
        node's learned baseline, an array that broadcasts to the node's log-probability
        shape (`(B, 1)` for a `(B, H)` node: one per row; `(T, ...)` stacked for a node
        in a `scan`), as `scg.sample`'s `baseline=` does. `inputs` are `f`'s positional
        arguments without the key: the baseline cannot see the key, nor any draw, so it
        cannot depend on the draws it corrects. Nodes it leaves out get `c̄_w` only. It
        must not draw (`scg.sample` inside it is refused).
      argnums: the arguments of `f` whose gradient is estimated, as in `scg_grad`.
      has_aux: whether `f` returns `(cost, aux)`.
      key_argnum: the position of `f`'s key among its positional arguments.
      center: subtract the running mean `c̄_w` of the residual `Q̂_w − b_w` (NVIL's
        data-independent baseline).
      normalize: divide node `w`'s learning signal by `max(1, √v_w)` (NVIL's variance
        normalisation). See "What is guaranteed".
      decay: the running statistics' decay `α`: `c̄ ← α·c̄ + (1 − α)·mean(Q̂ − b)`, `v ← α·v
        + (1 − α)·mean(A²)` (NVIL's 0.8).
      draws: evaluate at chosen draws, as `scg_grad`'s `draws=`.

    Returns:
      `NVIL(init, update)`. `update(baseline_params, state, *args)` returns `(grads,
      baseline_grads, new_state, info)`: `grads` shaped like `f`'s `argnums` arguments
      (as `scg_grad`'s), `baseline_grads` like `baseline_params`, `new_state` an
      `NVILState`, `info` an `NVILInfo`. Train both parameter sets with any optimiser.

    What is guaranteed. Write `A_w = Q̂_w − b_w − c̄_w` for node `w`'s learning signal
    (elementwise, `c̄_w = 0` without `center`) and `s_w = max(1, √v_w)` (1 without
    `normalize`). `b_w`, `c̄_w` and `s_w` are fixed before the draw: `b_w` is a function
    of the inputs and `baseline_params`, and `c̄_w`, `v_w` come from the state, i.e. from
    earlier steps' draws. The estimate of node `w`'s score term is `∇log p_w · A_w / s_w`
    (summed over its elements); pathwise and direct terms are unchanged. So, conditional
    on the state:

    * `normalize=False`: `E[grads] = ∇E[f]` exactly, for any `baseline_fn`,
      `baseline_params` and state (the baselines only change the variance).
    * `normalize=True`: `E[grads] = Σ_w g_w / s_w + g_rest`, where `g_w = E[∇log p_w ·
      Q̂_w]` is the part of `∇E[f]` through node `w`'s density and `g_rest` the pathwise
      and direct part. For a parameter that reaches `E[f]` only through score nodes
      sharing one scale `s` (an amortised encoder's parameters in an ELBO, where the
      direct `∇ log q` term has mean 0), this is `∇E[f] / s`: unbiased up to a positive
      scale that does not depend on the draw. Other parameters get a reweighted sum of
      their gradient's parts (as in NVIL, where only the inference network's signal is
      normalised); with Adam, which rescales each parameter itself, it changes little.
    * `baseline_grads = ∇_φ Σ_w mean((Q̂_w − c̄_w − b_w(φ))²)` at this draw, an unbiased
      estimate of the gradient of the expected regression loss: its minimiser is `b_w =
      E[Q̂_w | inputs] − c̄_w` (the NVIL regression).
    * `new_state` is computed from this draw and only affects later steps.

    These hold at first order (the gradients this returns); they are proved by exact
    enumeration in `tests/test_nvil.py`.

    Example:
      >>> def f(params, x, key):                    # the program, as for scg_grad
      ...     z = scg.sample(key, dist.Bernoulli(logits=x @ params["enc"]), name="z")
      ...     return neg_elbo(params, x, z)
      >>> def baseline_fn(phi, params, x):          # f's arguments without the key
      ...     return {"z": mlp(phi, x)}             # (B, 1): one baseline per row
      >>> nv = scg.baselines.nvil(f, baseline_fn)
      >>> state = nv.init(params, x, key)
      >>> g, g_phi, state, info = jax.jit(nv.update)(phi, state, params, x, key)

    References:
      A. Mnih, K. Gregor. Neural Variational Inference and Learning in Belief Networks.
      ICML 2014.
    """
    if not callable(baseline_fn):
        raise TypeError(
            "scgjax: nvil's baseline_fn must be a function (baseline_params, *inputs) -> "
            f"{{node name: baseline}}, got {type(baseline_fn).__name__}."
        )
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise ValueError(f"scgjax: nvil's decay must be a float in [0, 1), got {decay!r}.")
    if isinstance(key_argnum, bool) or not isinstance(key_argnum, (int, np.integer)):
        raise TypeError(
            f"scgjax: key_argnum must be the position (an int) of f's key argument, got "
            f"{key_argnum!r}."
        )
    run = _surrogate._one_sample(f, has_aux, True, draws)

    def init(*args, **kwargs) -> NVILState:
        _surrogate._key_at(args, key_argnum)
        q = jax.eval_shape(lambda: run(args, kwargs, adjust=_check_only)[2])
        zeros = {n: jnp.zeros((), s.dtype) for n, s in q.items()}
        return NVILState(dict(zeros), dict(zeros))

    @functools.wraps(f)
    def update(baseline_params, state, *args, **kwargs):
        _surrogate._key_at(args, key_argnum)
        k = key_argnum % len(args)
        inputs = args[:k] + args[k + 1 :]
        if not isinstance(state, NVILState):
            raise TypeError(
                f"scgjax: nvil's state must be an NVILState (from nvil(...).init(*args)), "
                f"got {type(state).__name__}."
            )

        def baselines_of(p):
            return _as_dict(baseline_fn(p, *inputs))

        if _interpret.jaxpr_has_sample(jax.make_jaxpr(baselines_of)(baseline_params)):
            raise ValueError(
                "scgjax: nvil's baseline_fn draws with scg.sample: a baseline must be a "
                "deterministic function of the inputs (drawn values could depend on the "
                "draws it corrects). Compute it without sampling."
            )
        b, pullback = jax.vjp(baselines_of, baseline_params)
        b = {n: lax.stop_gradient(v) for n, v in b.items()}
        centre = state.mean if center else {n: jnp.zeros_like(v) for n, v in state.mean.items()}
        scale = {n: jnp.maximum(1.0, jnp.sqrt(v)) for n, v in state.var.items()}

        def adjust(graph, names):
            score = _check_program(graph, names, b, state)
            log_probs, extra = dict(graph.log_probs), 0.0
            for name, node_id in score.items():
                lp = graph.log_probs[node_id]
                if normalize:
                    s = scale[name].astype(jnp.result_type(lp))
                    lp = lax.stop_gradient(lp) + (lp - lax.stop_gradient(lp)) / s
                    log_probs[node_id] = lp
                total = centre[name] + b[name] if name in b else centre[name]
                if center or name in b:
                    extra = extra + _graph.baseline_term(lp, total)
            return log_probs, extra

        def objective(*a):
            value, aux, q, _ = run(a, kwargs, adjust=adjust)
            return value, (value, aux, q)

        grads, (value, aux, q) = jax.grad(objective, argnums=argnums, has_aux=True)(*args)

        def loss_of(bs):
            total = jnp.zeros((), jnp.result_type(*q.values()) if q else jnp.float32)
            for name, bn in bs.items():
                target = q[name] - centre[name]
                pred = jnp.broadcast_to(bn, jnp.shape(target)).astype(jnp.result_type(target))
                total = total + jnp.mean(jnp.square(target - pred))
            return total

        loss, g_b = jax.value_and_grad(loss_of)(b)
        (baseline_grads,) = pullback(g_b)
        mean, var = {}, {}
        for name, qn in q.items():
            r = qn - (jnp.broadcast_to(b[name], jnp.shape(qn)) if name in b else 0.0)
            c, v = state.mean[name], state.var[name]
            a = r - c if center else r
            mean[name] = (decay * c + (1 - decay) * jnp.mean(r)).astype(jnp.result_type(c))
            var[name] = (decay * v + (1 - decay) * jnp.mean(jnp.square(a))).astype(
                jnp.result_type(v)
            )
        info = NVILInfo(value, loss, q, aux if has_aux else None)
        return grads, baseline_grads, NVILState(mean, var), info

    return NVIL(init, update)


def _as_dict(out) -> dict[str, Any]:
    if not isinstance(out, Mapping):
        raise TypeError(
            "scgjax: nvil's baseline_fn must return a dict from node name (name= of "
            "scg.sample, else node<i> as scg.describe lists them) to baseline, got "
            f"{type(out).__name__}."
        )
    bad = [k for k in out if not isinstance(k, str)]
    if bad:
        raise TypeError(f"scgjax: nvil's baseline_fn returned non-string node names {bad}.")
    return {k: jnp.asarray(v) for k, v in out.items()}


def _check_only(graph, names):
    _check_program(graph, names, {}, None)
    return None, 0.0


def _check_program(graph, names, baselines, state) -> dict[str, Any]:
    """The score nodes by name; clear errors for baselines `f` cannot take."""
    by_name = {names[i]: i for i in graph.nodes}
    score = {names[i]: i for i in graph.log_probs}
    unknown = sorted(n for n in baselines if n not in by_name)
    if unknown:
        raise ValueError(
            f"scgjax: nvil's baseline_fn returned baselines for {unknown}, which are not "
            f"sample sites of f; its score-function sites are {sorted(score)} (names are "
            "name= of scg.sample, else node<i>, as scg.describe lists them)."
        )
    not_score = sorted(n for n in baselines if n not in score)
    if not_score:
        kinds = {n: str(graph.nodes[by_name[n]].method) for n in not_score}
        raise ValueError(
            f"scgjax: nvil's baseline_fn returned baselines for {not_score}, which are not "
            f"score-function sites (estimators {kinds}): a baseline only applies to "
            f"score-function nodes. Its score-function sites are {sorted(score)}."
        )
    own = sorted(names[i] for i, node in graph.nodes.items() if node.has_baseline)
    if own:
        raise ValueError(
            f"scgjax: the sites {own} of f have a baseline= of their own, but nvil sets "
            "every score node's baseline. Drop baseline= there and return it from "
            "baseline_fn (if it depends on the inputs only), or keep it and use "
            "scg_grad(..., downstream=True) with a regression of your own."
        )
    for name, b in baselines.items():
        shape = tuple(np.shape(graph.log_probs[score[name]]))
        try:
            ok = np.broadcast_shapes(np.shape(b), shape) == shape
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"scgjax: nvil's baseline for {name!r} has shape {tuple(np.shape(b))}, which "
                f"does not broadcast to the shape of its log-probability, {shape}. Give one "
                "baseline per log-probability element, or one that broadcasts (e.g. (B, 1) "
                "for a (B, H) site; a site in a scan has a leading axis per iteration)."
            )
    if state is not None and (set(state.mean) != set(score) or set(state.var) != set(score)):
        raise ValueError(
            f"scgjax: nvil's state has entries for {sorted(state.mean)}, but f's "
            f"score-function sites are {sorted(score)}: build it with "
            "nvil(f, ...).init(*args) for this program."
        )
    return score

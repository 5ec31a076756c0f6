"""NumPyro models and guides: `TraceSCG_ELBO`, an ELBO loss for `numpyro.infer.SVI`.

A NumPyro guide draws with `numpyro.sample`, which scgjax cannot see. `TraceSCG_ELBO`
routes every latent sample site of the guide through `scgjax.sample`, replays the model
against the guide's draws, and makes `log p(x, z) − log q(z)` the cost of one scgjax
program. Its loss is that program's DiCE surrogate, so SVI's `jax.value_and_grad` gets the
value of −ELBO and an unbiased gradient estimate (every order: `jax.hessian` of the loss
is unbiased too)::

    import numpyro
    from numpyro.infer import SVI
    import scgjax

    svi = SVI(model, guide, numpyro.optim.Adam(1e-2),
              loss=scgjax.infer.TraceSCG_ELBO(num_particles=4, baseline="leave_one_out"))

What the guide says, per site, in `infer=`:

* `infer={"estimator": ...}`: the site's estimator, as `scgjax.sample` takes it (a name
  or an `scgjax.estimators` object); `"auto"` (default) is pathwise where the
  distribution has `rsample`, the score function otherwise.
* `infer={"baseline": b}`: a per-site baseline for a score-function site (computed before
  the draw: a parameter, a moving average, a function of the data), in the loss's units
  (−ELBO), subtracted from the site's downstream cost. Each score-function site also
  gets the baseline that cancels the pathwise derivative of its own `log q` term (zero
  in expectation), so that its gradient has the variance of Pyro's and NumPyro's
  `TraceGraph_ELBO` (whose entropy term drops that derivative) while its second
  derivatives stay unbiased.

Nothing else is declared. The ELBO's terms stay per element: each site's `log p` and
`log q` array, scaled (`numpyro.plate` subsampling, `handlers.scale`) and masked
(`handlers.mask`, `obs_mask`) as NumPyro scales and masks them, is summed into the cost,
so scgjax's dataflow analysis weights each guide draw only by the terms that depend on it
(automatic plates; causality inside `numpyro.contrib.control_flow.scan`). Check what it
found with `scgjax.describe(elbo.program(model, guide))(params, key, *args)`.

The log-densities of the ELBO's own terms are derivative-safe (`numpyro`'s Bernoulli and
Binomial with logits have a wrong derivative at logit 0 in pathwise terms as well).

Sharp edges:

* The guide's draws are those of `numpyro.infer.Trace_ELBO` for the same key (the
  particles' keys and the model/guide split are the same), so the loss's value equals
  Trace_ELBO's; the gradients differ (Trace_ELBO has no score-function terms).
* Model-side enumeration (`infer={"enumerate": "parallel"}`, `config_enumerate`) is not
  supported: a site of the model must be observed or drawn by the guide. A guide site
  summed out exactly is `infer={"estimator": "enum"}`.
* Distributions with sample intermediates (`TransformedDistribution`) are scored by
  `log_prob(value)`, without the intermediates.
* Mutable state is returned with `num_particles=1` only (as NumPyro's ELBOs do).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax import lax
from numpyro import handlers

from . import _compat, _estimators, _logprob
from ._sample import sample
from ._surrogate import surrogate

__all__ = ["TraceSCG_ELBO"]


class TraceSCG_ELBO(_compat.NumpyroELBO):
    """The ELBO of a NumPyro model and guide, estimated by scgjax (Schulman et al. 2015).

    `loss(rng_key, param_map, model, guide, *args, **kwargs)` returns −ELBO averaged over
    `num_particles` particles; its derivatives with respect to `param_map` (every order)
    are unbiased estimates of those of −ELBO. The guide's latent sites are drawn with
    `scgjax.sample` (estimator and baseline from each site's `infer=`), the model is
    replayed against them, and each score-function draw is weighted only by the terms of
    `log p − log q` downstream of it.

    Args:
      num_particles: the number of particles (samples of the guide) per step.
      vectorize_particles: `True` (default) runs the particles under `jax.vmap`; `False`
        under `jax.lax.map`; a callable `fn(f, keys)` maps them as NumPyro's ELBOs do.
        `baseline="leave_one_out"` needs `True` (the particles' baselines read each other).
      baseline: `None`, or `"leave_one_out"` (`num_particles >= 2`): each site's downstream
        cost in particle `k` gets the mean of the same site's downstream costs in the other
        particles as baseline (unbiased, every order).

    Example:
      >>> svi = numpyro.infer.SVI(model, guide, numpyro.optim.Adam(1e-2),
      ...                         loss=scgjax.infer.TraceSCG_ELBO(num_particles=4))
      >>> result = svi.run(jax.random.key(0), 1000, data)
    """

    can_infer_discrete = True

    def __init__(
        self,
        num_particles: int = 1,
        vectorize_particles: bool | Callable = True,
        *,
        baseline: str | None = None,
    ):
        if baseline not in (None, "leave_one_out"):
            raise ValueError(
                f"TraceSCG_ELBO: unknown baseline {baseline!r}; choose None or "
                "'leave_one_out' (per-site baselines go to the guide's "
                "numpyro.sample(..., infer={'baseline': b}))."
            )
        if baseline == "leave_one_out":
            if num_particles < 2:
                raise ValueError(
                    "TraceSCG_ELBO: baseline='leave_one_out' needs num_particles >= 2 (each "
                    f"particle's baseline is the mean of the others), got {num_particles}."
                )
            if vectorize_particles is not True:
                raise ValueError(
                    "TraceSCG_ELBO: baseline='leave_one_out' needs vectorize_particles=True "
                    "(the particles' baselines are computed from each other under vmap)."
                )
        super().__init__(num_particles=num_particles, vectorize_particles=vectorize_particles)
        self.baseline = baseline

    def program(self, model: Callable, guide: Callable) -> Callable:
        """The scgjax program of one particle: `cost(param_map, rng_key, *args, **kwargs)`
        returns `log q(z) − log p(x, z)` (−ELBO) at the guide's draws `z`, drawn with
        `scgjax.sample` under the site names. Use it with `scgjax.describe` (which sites
        weight which terms), `scgjax.draw` (the graph: the guide's sites by name, at the
        guide's lines), `scgjax.trace` and `draws=` (evaluate the estimator at chosen
        guide draws). Its signature names the model's arguments after `param_map` and
        `rng_key`, so `draw` labels the data by the model's names.

        Example:
          >>> program = elbo.program(model, guide)
          >>> print(scgjax.describe(program)(svi.get_params(state), key, data))
          >>> scgjax.draw(program)(svi.get_params(state), key, data).save("model.svg")
        """
        particle = _particle(model, guide)

        def cost(param_map, rng_key, *args, **kwargs):
            return particle(param_map, rng_key, *args, **kwargs)[0]

        cost.__signature__ = _program_signature(model)  # type: ignore[attr-defined]
        return cost

    def loss_with_mutable_state(
        self,
        rng_key: jax.Array,
        param_map: dict[str, Any],
        model: Callable,
        guide: Callable,
        *args: Any,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """−ELBO (the DiCE surrogate: its value is −ELBO, its derivatives of every order
        are unbiased) and the values of the `numpyro.mutable` sites (`None` when there are
        none, or with `num_particles > 1`)."""
        particle = _particle(model, guide)
        k = self.num_particles
        if k == 1 or self.vectorize_particles is True:
            loss = surrogate(
                particle, has_aux=True, num_samples=k, baseline=self.baseline, key_argnum=1
            )
            value, mutable = loss(param_map, rng_key, *args, **kwargs)
        else:
            one = surrogate(particle, has_aux=True)
            keys = jax.random.split(rng_key, k)
            values, mutable = self.vectorize_particles_fn(
                lambda key: one(param_map, key, *args, **kwargs), keys
            )
            value = jnp.mean(values)
        if not mutable:
            return {"loss": value, "mutable_state": None}
        if k > 1:
            warnings.warn(
                "TraceSCG_ELBO: mutable state is ignored when num_particles > 1.",
                stacklevel=2,
            )
            return {"loss": value, "mutable_state": None}
        return {"loss": value, "mutable_state": mutable}


def _program_signature(model: Callable) -> inspect.Signature:
    """`(param_map, rng_key, <the model's parameters>)`, or `(param_map, rng_key, *args,
    **kwargs)` where the model's cannot follow those two."""
    P = inspect.Parameter
    head = [P("param_map", P.POSITIONAL_OR_KEYWORD), P("rng_key", P.POSITIONAL_OR_KEYWORD)]
    generic = [P("args", P.VAR_POSITIONAL), P("kwargs", P.VAR_KEYWORD)]
    try:
        rest = list(inspect.signature(model).parameters.values())
    except (TypeError, ValueError):
        return inspect.Signature(head + generic)
    if any(p.name in ("param_map", "rng_key") or p.kind == P.POSITIONAL_ONLY for p in rest):
        return inspect.Signature(head + generic)
    return inspect.Signature(head + rest)


def _particle(model: Callable, guide: Callable) -> Callable:
    """`particle(param_map, rng_key, *args, **kwargs) -> (−ELBO, mutable state)` of one
    particle, drawing the guide's latent sites with `scgjax.sample`."""

    def particle(param_map, rng_key, *args, **kwargs):
        model_key, guide_key = jax.random.split(rng_key)  # as numpyro's Trace_ELBO
        drawn = handlers.substitute(handlers.seed(guide, guide_key), substitute_fn=_draw)
        guide_trace = handlers.trace(handlers.substitute(drawn, data=param_map)).get_trace(
            *args, **kwargs
        )
        mutable = _mutable(guide_trace)
        params = {**param_map, **mutable}
        replayed = handlers.replay(handlers.seed(model, model_key), trace=guide_trace)
        model_trace = handlers.trace(handlers.substitute(replayed, data=params)).get_trace(
            *args, **kwargs
        )
        _check_model(model_trace, guide_trace)
        mutable.update(_mutable(model_trace))
        elbo = _log_density(model_trace) - _log_density(guide_trace)
        return -elbo, mutable

    return particle


def _draw(msg: dict) -> Any:
    """The value of a guide site: `scgjax.sample` for a latent sample site (also inside
    `numpyro.contrib.control_flow.scan`, whose body applies this as a substitution), `None`
    (left to numpyro) for everything else."""
    if msg["type"] != "sample" or msg.get("is_observed") or msg.get("value") is not None:
        return None
    name, infer = msg["name"], msg.get("infer") or {}
    if infer.get("enumerate") is not None:
        raise ValueError(
            f"TraceSCG_ELBO: guide site {name!r} has infer={{'enumerate': "
            f"{infer['enumerate']!r}}}, which this ELBO does not read. To sum the site out "
            "exactly, use infer={'estimator': 'enum'} (and drop config_enumerate)."
        )
    baseline = infer.get("baseline")
    if isinstance(baseline, dict):
        raise TypeError(
            f"TraceSCG_ELBO: guide site {name!r}: infer['baseline'] must be an array "
            "broadcastable to the site's log-probability (computed before the draw), not a "
            "dict of Pyro baseline options; for a baseline shared by particles use "
            "TraceSCG_ELBO(num_particles=K, baseline='leave_one_out')."
        )
    if msg["kwargs"].get("rng_key") is None:
        raise ValueError(f"TraceSCG_ELBO: guide site {name!r} has no PRNG key to draw with.")
    fn, estimator = msg["fn"], infer.get("estimator", "auto")
    try:
        method = _estimators.resolve(fn, estimator)
        if method.kind == "score" and not method.enumerates:
            baseline = _entropy_baseline(msg, baseline)
        return sample(
            msg["kwargs"]["rng_key"],
            fn,
            msg["kwargs"].get("sample_shape", ()),
            estimator=estimator,
            baseline=baseline,
            name=name,
        )
    except (TypeError, ValueError) as e:
        raise type(e)(
            f"TraceSCG_ELBO: guide site {name!r} ({type(msg['fn']).__name__}), infer={infer!r}: {e}"
        ) from None


def _entropy_baseline(msg: dict, baseline: Any) -> Any:
    """The baseline of a score-function guide site: the user's, plus the site's weight
    (scale, and mask) in the cost.

    The cost holds the site's own term `s·log q(z; θ)`, whose pathwise derivative
    `s·∇θ log q(z)` has expectation 0 and only adds variance. A baseline `b = s` on the
    site adds `(1 − ⊡(log q))·s` (Mao et al. 2019), whose first derivative `−s·∇θ log q(z)`
    cancels it exactly, and which keeps the derivatives of every order unbiased (it does
    not depend on the draw) — where dropping the term by `stop_gradient`, as Pyro's
    entropy term does, would bias the second derivatives by the Fisher information."""
    weight = jnp.ones(())
    if msg.get("scale") is not None:
        weight = weight * msg["scale"]
    fn = msg["fn"]
    if isinstance(fn, dist.MaskedDistribution) and not isinstance(fn._mask, bool):
        weight = weight * jnp.asarray(fn._mask, weight.dtype)
    elif isinstance(fn, dist.MaskedDistribution) and fn._mask is False:
        weight = weight * 0.0
    weight = lax.stop_gradient(weight)
    return weight if baseline is None else baseline + weight


def _mutable(tr: dict) -> dict:
    return {name: site["value"] for name, site in tr.items() if site["type"] == "mutable"}


def _check_model(model_trace: dict, guide_trace: dict) -> None:
    for name, site in model_trace.items():
        if site["type"] != "sample" or site.get("is_observed") or name in guide_trace:
            continue
        if (site.get("infer") or {}).get("enumerate") is not None:
            raise ValueError(
                f"TraceSCG_ELBO: model site {name!r} is enumerated "
                f"(infer={{'enumerate': {site['infer']['enumerate']!r}}}) but TraceSCG_ELBO "
                "does not marginalize model sites. Draw it in the guide (with "
                "infer={'estimator': 'enum'} to sum it out exactly), or use "
                "numpyro.infer.TraceEnum_ELBO."
            )
        raise ValueError(
            f"TraceSCG_ELBO: model site {name!r} is neither observed nor drawn by the guide. "
            "Add numpyro.sample(" + repr(name) + ", ...) to the guide, or observe it (obs=)."
        )


def _log_density(tr: dict) -> jax.Array:
    """Σ over the sample sites of `tr` of their scaled, masked log-density elements, with
    derivative-safe log-probs, summed element by element so that scgjax splits the sum
    into per-element cost terms."""
    total = jnp.zeros(())
    for site in tr.values():
        if site["type"] != "sample":
            continue
        log_prob = _logprob.log_density(site["fn"], site["value"])
        if site.get("scale") is not None:
            log_prob = site["scale"] * log_prob
        total = total + jnp.sum(log_prob)
    return total

"""Log-probabilities for score-function terms, with derivatives right at every order.

A score-function term needs the *derivatives* of `log p(w | θ)` to be right, not only its
value, and it needs the log-density of what was actually drawn. Two numpyro 0.22
behaviours break that:

* `Bernoulli(logits=l).log_prob` and `Binomial(logits=l).log_prob` go through
  `binary_cross_entropy_with_logits`, whose `max`/`abs` kinks give the derivative 0 (or
  1) instead of `v − 1/2` at exactly `l = 0`: the most common initialisation of a logit
  layer gets a biased gradient.
* `Geometric(logits=l)`, `NegativeBinomialLogits` and `ZeroInflatedDistribution(...,
  gate_logits=g)` use `jax.nn.softplus`, whose custom JVP is right at 0 only where JAX
  keeps it: inside a `scan` whose logit depends on the carry, forward-over-reverse
  derivatives (`jax.hessian` of a surrogate) differentiate its `max`/`abs` kinks instead
  (a Geometric at logit 0: −14.8 for an exact second derivative of 5).
* `d.mask(m)` draws from its base distribution but its `log_prob` is 0 where `m` is
  False, which would drop the score term of a masked-out draw that reaches the cost.

A guard keeps numpyro's own *value* (what `scgjax.trace` reports) and takes every
derivative from a smooth formula with no kink at 0: `⊥(numpyro) + (smooth − ⊥(smooth))`.
(In a surrogate the value is never computed: the magic box is 1 without reading its
argument, so XLA keeps only the derivative, in the backward pass.) It does not use a
`jax.custom_jvp`: JAX's partial evaluation of a `scan` body can replace a custom-JVP
function by its primal implementation, so forward-over-reverse derivatives inside a loop
(`jax.hessian` of a surrogate with a `scan`) would differentiate numpyro's kinks again.
Here the primal implementation *is* the smooth formula, at every order, in and out of
loops. Masked distributions use their base distribution's log-density.

A new guard is one small function registered with `register_score_log_prob`.
"""

from __future__ import annotations

import copy
import functools
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax import lax
from jax.scipy.special import gammaln

_GUARDS: dict[type, Callable[[dist.Distribution, jax.Array], jax.Array]] = {}


def register_score_log_prob(cls: type):
    """Registers `fn(d, value) -> log p(value)` used for score terms of `cls`."""

    def register(fn):
        _GUARDS[cls] = fn
        return fn

    return register


def score_log_prob(d: dist.Distribution, value: jax.Array) -> Any:
    """The log-density of `value` as `d` draws it, with derivatives that are right at
    every parameter value and every order, also when the guarded distribution is
    wrapped (`to_event`, `mask`, `expand`, ...)."""
    return _guarded(d).log_prob(value)


def log_density(d: dist.Distribution, value: jax.Array) -> Any:
    """`d.log_prob(value)` as numpyro defines it, masks included (0 where masked), with
    the guarded derivatives of `score_log_prob`: the log-density *terms* of an objective
    (an ELBO's log p and log q), where a masked element must contribute nothing."""
    return _guarded(d, keep_masks=True).log_prob(value)


def _guarded(d: dist.Distribution, keep_masks: bool = False) -> dist.Distribution:
    """A shallow copy of `d` whose guarded parts (itself, or its inner distributions:
    `base_dist`, mixture components, recursively) compute `log_prob` with the registered
    guard, with masks removed (a masked distribution draws from its base) unless
    `keep_masks`; `d` itself when nothing changes."""
    if isinstance(d, dist.MaskedDistribution) and not keep_masks:
        return _guarded(d.base_dist)  # numpyro has expanded it to the mask's batch shape
    guard = _GUARDS.get(type(d))
    if guard is not None:
        out = copy.copy(d)
        out.__class__ = _guarded_class(type(d))
        return out
    # Inner distributions: a wrapper's `base_dist`, a mixture's components (a list for
    # `MixtureGeneral`), ...: every Distribution-valued attribute.
    changed = {}
    for name, value in vars(d).items():
        if isinstance(value, dist.Distribution):
            new = _guarded(value, keep_masks)
            if new is not value:
                changed[name] = new
        elif isinstance(value, (list, tuple)) and any(
            isinstance(x, dist.Distribution) for x in value
        ):
            new = [
                _guarded(x, keep_masks) if isinstance(x, dist.Distribution) else x for x in value
            ]
            if any(a is not b for a, b in zip(new, value)):
                changed[name] = type(value)(new)
    if not changed:
        return d
    out = copy.copy(d)
    for name, value in changed.items():
        setattr(out, name, value)
    return out


@functools.cache
def _guarded_class(cls: type) -> type:
    guard = _GUARDS[cls]
    return types.new_class(
        f"Guarded{cls.__name__}",
        (cls,),
        {},
        lambda ns: ns.update(log_prob=lambda self, value: guard(self, value)),
    )


def softplus(x: jax.Array) -> jax.Array:
    """`log(1 + exp(x))`, stable, and analytic on each side of 0 with no `max`/`abs`:
    every derivative is right everywhere, 0 included (`σ(0) = 1/2`, `σ'(0) = 1/4`).
    Each branch sees a safe input, so the branch not taken gives no NaN gradient."""
    pos = x > 0
    x_pos = jnp.where(pos, x, jnp.zeros_like(x))
    x_neg = jnp.where(pos, jnp.zeros_like(x), x)
    return jnp.where(pos, x_pos + jnp.log1p(jnp.exp(-x_pos)), jnp.log1p(jnp.exp(x_neg)))


def log_sigmoid(x: jax.Array) -> jax.Array:
    """`log σ(x) = −softplus(−x)`, with `softplus`'s derivatives."""
    return -softplus(-x)


def with_derivatives_of(value: jax.Array, smooth: jax.Array) -> jax.Array:
    """`value` exactly, with the derivatives (every order) of `smooth`."""
    smooth = smooth.astype(jnp.result_type(value))
    return lax.stop_gradient(value) + (smooth - lax.stop_gradient(smooth))


@register_score_log_prob(dist.BernoulliLogits)
def _bernoulli_logits(d, value):
    out = dist.BernoulliLogits.log_prob(d, value)
    return with_derivatives_of(out, value * d.logits - softplus(d.logits))


@register_score_log_prob(dist.BinomialLogits)
def _binomial_logits(d, value):
    out = dist.BinomialLogits.log_prob(d, value)
    n, l = d.total_count, d.logits
    # the log binomial coefficient keeps the derivative in `n` (numpyro's own formula has
    # kinks in `l`, so it cannot be subtracted out as for the negative binomial)
    log_coef = gammaln(n + 1) - gammaln(value + 1) - gammaln(n - value + 1)
    return with_derivatives_of(out, log_coef + value * l - n * softplus(l))


@register_score_log_prob(dist.GeometricLogits)
def _geometric_logits(d, value):
    out = dist.GeometricLogits.log_prob(d, value)
    return with_derivatives_of(out, d.logits - (value + 1) * softplus(d.logits))


@register_score_log_prob(dist.NegativeBinomialLogits)
def _negative_binomial_logits(d, value):
    out = dist.NegativeBinomialLogits.log_prob(d, value)
    r, l = d.total_count, d.logits
    # numpyro's value minus its softplus terms is smooth (log-gamma functions of r and
    # value): keep it, and put the softplus terms back in smooth form
    rest = out + r * jax.nn.softplus(l) + value * jax.nn.softplus(-l)
    return with_derivatives_of(out, rest - r * softplus(l) - value * softplus(-l))


@register_score_log_prob(dist.ZeroInflatedLogits)
def _zero_inflated_logits(d, value):
    out = dist.ZeroInflatedLogits.log_prob(d, value)
    g = d.gate_logits
    minus_log_gate = -g + _guarded(d.base_dist).log_prob(value)
    log_gate = log_sigmoid(g)
    smooth = jnp.where(value == 0, softplus(minus_log_gate) + log_gate, minus_log_gate + log_gate)
    return with_derivatives_of(out, smooth)

"""Log-probabilities for score-function terms, guarded against wrong derivatives.

A score-function term needs the *derivative* of `log p(w | θ)` to be right, not only its
value. numpyro 0.22 computes `Bernoulli(logits=l).log_prob` and
`Binomial(logits=l).log_prob` through `binary_cross_entropy_with_logits`, whose
`max`/`abs` kinks give the derivative 0 (or 1) instead of `v - 1/2` at exactly `l = 0`:
the most common initialisation of a logit layer gets a biased gradient.

The guard keeps numpyro's own value (so XLA can share it with a cost that computes the
same log-probability, as an ELBO does) and replaces its derivative with the smooth, exact
one, `d/dl log p = v − n·σ(l)`, through a `jax.custom_jvp`; that derivative is itself
differentiable, so every order is right. Other distributions use their own `log_prob`.

A new guard is one small function registered with `register_score_log_prob`.
"""

from __future__ import annotations

import copy
import functools
import types
from typing import Callable

import jax
import numpyro.distributions as dist

_GUARDS: dict[type, Callable[[dist.Distribution, jax.Array], jax.Array]] = {}


def register_score_log_prob(cls: type):
    """Registers `fn(d, value) -> log p(value)` used for score terms of `cls`."""

    def register(fn):
        _GUARDS[cls] = fn
        return fn

    return register


def score_log_prob(d: dist.Distribution, value: jax.Array) -> jax.Array:
    """`d.log_prob(value)` with derivatives that are right at every parameter value, also
    when the guarded distribution is wrapped (`to_event`, `mask`, `expand`, ...)."""
    return _guarded(d).log_prob(value)


def _guarded(d: dist.Distribution) -> dist.Distribution:
    """A shallow copy of `d` whose guarded parts (itself, or its `base_dist`, recursively)
    compute `log_prob` with the registered guard; `d` itself when nothing is guarded."""
    guard = _GUARDS.get(type(d))
    if guard is not None:
        out = copy.copy(d)
        out.__class__ = _guarded_class(type(d))
        return out
    base = getattr(d, "base_dist", None)
    if isinstance(base, dist.Distribution):
        guarded_base = _guarded(base)
        if guarded_base is not base:
            out = copy.copy(d)
            out.base_dist = guarded_base
            return out
    return d


@functools.lru_cache(maxsize=None)
def _guarded_class(cls: type) -> type:
    guard = _GUARDS[cls]
    return types.new_class(f"Guarded{cls.__name__}", (cls,), {},
                           lambda ns: ns.update(log_prob=lambda self, value: guard(self, value)))


def _logit_family(make, count):
    """A log-prob in the logits `l`, with numpyro's value and the derivative
    `(v − count·σ(l))·dl`."""

    @jax.custom_jvp
    def log_prob(logits, value, *static):
        return make(logits, *static).log_prob(value)

    @log_prob.defjvp
    def log_prob_jvp(primals, tangents):
        logits, value, *static = primals
        dlogits = tangents[0]
        out = log_prob(logits, value, *static)
        score = value - count(*static) * jax.nn.sigmoid(logits)
        return out, (score * dlogits).astype(out.dtype)

    return log_prob


_bernoulli = _logit_family(lambda l: dist.BernoulliLogits(l), lambda: 1.0)
_binomial = _logit_family(lambda l, n: dist.BinomialLogits(l, total_count=n), lambda n: n)


@register_score_log_prob(dist.BernoulliLogits)
def _bernoulli_logits(d, value):
    return _bernoulli(d.logits, value)


@register_score_log_prob(dist.BinomialLogits)
def _binomial_logits(d, value):
    return _binomial(d.logits, value, d.total_count)

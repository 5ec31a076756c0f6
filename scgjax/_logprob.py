"""Log-probabilities for score-function terms, guarded against wrong derivatives.

A score-function term needs the *derivative* of `log p(w | θ)` to be right, not only its
value. numpyro 0.22 computes `Bernoulli(logits=l).log_prob` and
`Binomial(logits=l).log_prob` through `binary_cross_entropy_with_logits`, whose
`max`/`abs` kinks give the derivative 0 (or 1) instead of `v - 1/2` at exactly `l = 0`:
the most common initialisation of a logit layer gets a biased gradient. Here those
log-probabilities are rewritten in a form that is smooth everywhere; every other
distribution uses its own `log_prob`.

A new guard is one small function registered with `register_score_log_prob`.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpyro.distributions as dist
from jax.scipy.special import gammaln

_GUARDS: dict[type, Callable[[dist.Distribution, jax.Array], jax.Array]] = {}


def register_score_log_prob(cls: type):
    """Registers `fn(d, value) -> log p(value)` used for score terms of `cls`."""

    def register(fn):
        _GUARDS[cls] = fn
        return fn

    return register


def score_log_prob(d: dist.Distribution, value: jax.Array) -> jax.Array:
    """`d.log_prob(value)` with derivatives that are right at every parameter value."""
    guard = _GUARDS.get(type(d))
    return d.log_prob(value) if guard is None else guard(d, value)


@register_score_log_prob(dist.BernoulliLogits)
def _bernoulli_logits(d, value):
    # log σ(l)^v (1-σ(l))^(1-v) = v·l − softplus(l); softplus is smooth at 0.
    logits = d.logits
    return value * logits - jax.nn.softplus(logits)


@register_score_log_prob(dist.BinomialLogits)
def _binomial_logits(d, value):
    logits, n = d.logits, d.total_count
    log_comb = gammaln(n + 1.0) - gammaln(value + 1.0) - gammaln(n - value + 1.0)
    return log_comb + value * logits - n * jax.nn.softplus(logits)

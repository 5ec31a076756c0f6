"""Estimators per site: one small object each, registered by name.

An estimator says what the program sees at a `scg.sample` site and what the site adds to
the surrogate. Every estimator has a `kind`, which is all the interpreter needs:

* `"score"`: the value under stop-gradient; the site's log-probability joins τ of the
  costs downstream of it (`Score`), or, for an enumerating estimator, the costs that
  depend on it are summed over the site's support with its probabilities as weights
  (`Enum`, assembled by `_enumerate.py`);
* `"pathwise"`: a value differentiated through; nothing else joins the surrogate. The
  value is the reparameterized draw (`Pathwise`) or a relaxation of a discrete one
  (`GumbelSoftmax`, `StraightThrough`: biased by design).

`sample(key, d, estimator=...)` takes a registered name (the estimator with its default
options) or an estimator object (options with values): `estimator="gumbel_softmax"` or
`estimator=scg.estimators.GumbelSoftmax(temperature=0.3)`. Objects are frozen dataclasses,
so they are hashable and travel in the `sample` primitive's static params.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, ClassVar, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax import lax

from . import _compat, _logprob, _weights

_REGISTRY: dict[str, type[Estimator]] = {}
_E = TypeVar("_E", bound="type[Estimator]")


def register(cls: _E) -> _E:
    """Registers an estimator class under its `name` (so `estimator=cls.name` builds
    `cls()`, its defaults)."""
    if not cls.name:
        raise ValueError(f"estimator class {cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> tuple[str, ...]:
    """The registered estimator names, and `"auto"`."""
    return ("auto", *_REGISTRY)


def several_values() -> str:
    """The registered estimators that evaluate a site at several values, for messages:
    `"'enum', 'arm', ..."`."""
    return ", ".join(repr(n) for n, c in _REGISTRY.items() if c.enumerates)


@dataclasses.dataclass(frozen=True)
class Estimator:
    """The base of every estimator. Subclasses set `name` and `kind` and may override
    `check`, `sample` and `rsample`."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "score"  # "score" | "pathwise"
    enumerates: ClassVar[bool] = False  # sums the site out (`Enum`)
    biased: ClassVar[bool] = False
    # Fields whose values may be arrays (traced: learned control-variate parameters):
    # `sample` binds their leaves as operands of the sample primitive (`split`/`join`).
    operand_fields: ClassVar[tuple[str, ...]] = ()

    def split(self) -> tuple[Estimator, list]:
        """(this estimator with its operand fields held out, hashable, for the sample
        primitive's params; their leaves, as arrays, for its operands)."""
        if not self.operand_fields:
            return self, []
        values = tuple(getattr(self, f) for f in self.operand_fields)
        leaves, tree = jax.tree_util.tree_flatten(values)
        held = _Held(tree)
        return dataclasses.replace(self, **dict.fromkeys(self.operand_fields, held)), [
            jnp.asarray(x) for x in leaves
        ]

    def join(self, leaves: list) -> Estimator:
        """The estimator `split` held out, with its operand fields set from `leaves`."""
        if not self.operand_fields:
            return self
        held = getattr(self, self.operand_fields[0])
        assert isinstance(held, _Held), "join() of an estimator that was not split"
        values = jax.tree_util.tree_unflatten(held.tree, list(leaves))
        return dataclasses.replace(self, **dict(zip(self.operand_fields, values)))

    def check(self, d: dist.Distribution) -> None:
        """Raises a `ValueError` naming the problem when `d` cannot use this estimator."""

    def sample(self, d: dist.Distribution, key: jax.Array, sample_shape: tuple) -> Any:
        """The value the program sees (outside the transforms too)."""
        return d.sample(key, sample_shape)

    def rsample(self, d: dist.Distribution, key: jax.Array, sample_shape: tuple) -> Any:
        """For `kind == "pathwise"`: the same value, differentiable in `d`'s parameters."""
        return d.rsample(key, sample_shape)

    def record_log_prob(self, d: dist.Distribution, value: jax.Array) -> Any:
        """The log-density `scgjax.trace` reports for a draw of this estimator."""
        return d.log_prob(value)

    def __str__(self) -> str:
        fields = dataclasses.fields(self)
        if not fields:
            return self.name
        defaults = type(self)()

        def differs(f) -> bool:
            a, b = getattr(self, f.name), getattr(defaults, f.name)
            if f.name in self.operand_fields:
                # Held out of the primitive (`split`): the values are operands, unknown here.
                return not isinstance(a, _Held) and not (isinstance(a, (int, float)) and a == b)
            return a != b

        changed = [f for f in fields if differs(f)]
        if not changed:
            return self.name
        shown = ", ".join(f"{f.name}={_shown(getattr(self, f.name))}" for f in changed)
        return f"{self.name}({shown})"


@dataclasses.dataclass(frozen=True)
class _Held:
    """An operand field held out of the sample primitive's params (`Estimator.split`):
    the pytree structure of the operand fields' values."""

    tree: Any

    def __repr__(self) -> str:
        return "<operand>"


def _shown(x: Any) -> str:
    if isinstance(x, _compat.Tracer):
        return "<traced>"
    if isinstance(x, (jax.Array, np.ndarray)):
        return repr(np.asarray(x).tolist()) if np.size(x) <= 4 else f"<array {np.shape(x)}>"
    if callable(x):
        return getattr(x, "__name__", repr(x))
    return repr(x) if not isinstance(x, (dict, list, tuple)) or len(str(x)) < 40 else "<pytree>"


@register
@dataclasses.dataclass(frozen=True)
class Score(Estimator):
    """The score-function (REINFORCE, likelihood-ratio) estimator: `log p(w)` weights the
    costs downstream of the draw. Unbiased for any distribution whose support does not
    depend on the differentiated parameters."""

    name: ClassVar[str] = "score"
    kind: ClassVar[str] = "score"


@register
@dataclasses.dataclass(frozen=True)
class Pathwise(Estimator):
    """The reparameterization (pathwise) estimator: differentiates the draw itself."""

    name: ClassVar[str] = "pathwise"
    kind: ClassVar[str] = "pathwise"

    def check(self, d):
        if not d.has_rsample:
            raise ValueError(
                f"scgjax.sample: estimator='pathwise' needs a reparameterizable distribution, "
                f"but {type(d).__name__} has no rsample (has_rsample=False). Use "
                "estimator='score' (or 'auto'), 'enum' for a finite support, or a relaxation "
                "('gumbel_softmax', 'straight_through') for a Bernoulli or Categorical."
            )

    def sample(self, d, key, sample_shape):
        return d.sample(key, sample_shape)


# -- Enumeration -------------------------------------------------------------------------

_ENUMERABLE = (
    dist.BernoulliLogits,
    dist.BernoulliProbs,
    dist.CategoricalLogits,
    dist.CategoricalProbs,
    dist.BinomialLogits,
    dist.BinomialProbs,
)
_WRAPPERS = (dist.Independent, dist.ExpandedDistribution)


def base_of(d: dist.Distribution) -> Any:
    """`d` without its `to_event` / `expand` wrappers."""
    while isinstance(d, _WRAPPERS):
        d = d.base_dist
    return d


@register
@dataclasses.dataclass(frozen=True)
class Enum(Estimator):
    """Sums the site out exactly over its finite support: each cost term that depends on
    the site is evaluated at every value and weighted by its probability (no variance
    from this site; derivatives of every order exact). With automatic plates, cost
    elements that depend on one element of the site each are enumerated per element (K
    evaluations of what depends on the site, not K^N); a cost element that depends on
    several elements makes them enumerated jointly, K^N alternatives, refused beyond
    `max_joint` (which also bounds the product over several enumerated sites).

    For Bernoulli, Categorical and Binomial (a `total_count` known while tracing), and
    their `to_event` / `expand` forms. The surrogate's value is the cost's expectation
    over the enumerated sites, not the cost at one draw."""

    name: ClassVar[str] = "enum"
    kind: ClassVar[str] = "score"
    enumerates: ClassVar[bool] = True
    max_joint: int = 4096

    def check(self, d):
        base = base_of(d)
        if not isinstance(base, _ENUMERABLE):
            raise ValueError(
                f"scgjax.sample: estimator='enum' sums a finite support out; it supports "
                f"Bernoulli, Categorical and Binomial (and their to_event / expand forms), "
                f"not {type(base).__name__}"
                f"{'' if base is d else f' inside {type(d).__name__}'}. Use 'score' "
                "(or 'auto') for this site."
            )
        if not (isinstance(self.max_joint, int) and self.max_joint >= 1):
            raise ValueError(
                f"scgjax: Enum(max_joint=...) must be a positive int, got {self.max_joint!r}."
            )

    def support(self, d: dist.Distribution) -> tuple:
        """The values every element of the site can take (a superset for a Binomial with
        several total counts; the extra values get probability 0)."""
        base = base_of(d)
        if isinstance(base, (dist.BernoulliLogits, dist.BernoulliProbs)):
            return (0, 1)
        if isinstance(base, (dist.CategoricalLogits, dist.CategoricalProbs)):
            return tuple(
                range(
                    jnp.shape(
                        base.logits if isinstance(base, dist.CategoricalLogits) else base.probs
                    )[-1]
                )
            )
        n = base.total_count
        if isinstance(n, _compat.Tracer):
            raise ValueError(
                "scgjax.sample: estimator='enum' on a Binomial needs its total_count known "
                "while tracing (a Python int or a constant array), to know the support; it "
                "is a traced value here. Pass it as a constant, or use 'score'."
            )
        return tuple(range(int(np.max(np.asarray(n))) + 1))

    def element_log_prob(self, d: dist.Distribution, value: jax.Array) -> Any:
        """log p of each element of `value` (its full shape: `to_event` does not sum),
        with derivatives right at every order (`_logprob.score_log_prob`)."""
        base = base_of(d)
        if isinstance(base, (dist.BinomialLogits, dist.BinomialProbs)):
            valid = value <= jnp.asarray(base.total_count)
            safe = jnp.where(valid, value, jnp.zeros_like(value))
            lp = _logprob.score_log_prob(base, safe)
            lp = jnp.where(valid, lp, -jnp.inf)
        else:
            lp = _logprob.score_log_prob(base, value)
        return jnp.broadcast_to(lp, jnp.shape(value))


# -- Relaxations -------------------------------------------------------------------------

_BERNOULLI = (dist.BernoulliLogits, dist.BernoulliProbs)
_CATEGORICAL = (dist.CategoricalLogits, dist.CategoricalProbs)


def _check_relaxable(name: str, d: dist.Distribution, temperature: Any) -> None:
    base = base_of(d)
    if not isinstance(base, _BERNOULLI + _CATEGORICAL):
        raise ValueError(
            f"scgjax.sample: estimator={name!r} relaxes a Bernoulli or a Categorical "
            f"(and their to_event / expand forms), not "
            f"{type(base).__name__}. Use 'score' or 'enum' for this site, or 'pathwise' for "
            "a reparameterizable distribution."
        )
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(
            f"scgjax: the temperature of {name!r} must be a positive Python float, got "
            f"{temperature!r}."
        )


def _hard_log_prob(d: dist.Distribution, value: jax.Array) -> Any:
    """The log-density of the hard draw a relaxed (or straight-through) value rounds to."""
    base = base_of(d)
    if isinstance(base, _BERNOULLI):
        return d.log_prob((value > 0.5).astype(value.dtype))
    return d.log_prob(jnp.argmax(value, axis=-1))


def _noise_key(key: jax.Array) -> Any:
    return jax.random.fold_in(key, 0x5CA1AB1E)


def _relaxed(d: dist.Distribution, key, sample_shape, temperature):
    """(hard draw, relaxed draw): the hard draw is `d.sample(key, sample_shape)` (as a
    one-hot vector for a Categorical), the relaxed one `σ((l + G)/τ)` / `softmax((l +
    G)/τ)` with logistic / Gumbel noise `G` drawn conditionally on the hard draw (Tucker
    et al. 2017), so that together they are distributed as the Gumbel-max pair and the
    relaxed draw rounds to the hard one. `G` is held fixed: the relaxed draw is
    differentiable in the logits."""
    base = base_of(d)
    hard: Any = jnp.asarray(d.sample(key, sample_shape))
    if isinstance(base, _BERNOULLI):
        logits = jnp.broadcast_to(jnp.asarray(base.logits), jnp.shape(hard))
        p = lax.stop_gradient(jax.nn.sigmoid(logits))
        v = jax.random.uniform(_noise_key(key), jnp.shape(hard), p.dtype)
        # u ~ U(0, 1) conditioned on (u < p) == hard
        u = jnp.where(hard > 0, v * p, p + v * (1 - p))
        noise = lax.stop_gradient(jnp.log1p(-u) - jnp.log(u))  # −logit(u): logistic
        relaxed = jax.nn.sigmoid((logits + noise) / temperature)
        return hard.astype(relaxed.dtype), relaxed
    logits = base.logits
    index = hard
    onehot = jax.nn.one_hot(hard, jnp.shape(logits)[-1], dtype=logits.dtype)
    logits = jnp.broadcast_to(logits, jnp.shape(onehot))
    log_theta = lax.stop_gradient(jax.nn.log_softmax(logits, axis=-1))
    tiny = jnp.finfo(logits.dtype).tiny
    v = jax.random.uniform(_noise_key(key), jnp.shape(onehot), logits.dtype, minval=tiny)
    e = -jnp.log(v)  # Exp(1) variates
    e_top = jnp.take_along_axis(e, index[..., None], axis=-1)
    # The top perturbed logit z_b = −log E_b; the others are Gumbels truncated below it.
    z = jnp.where(onehot > 0, -jnp.log(e), -jnp.log(e / jnp.exp(log_theta) + e_top))
    noise = lax.stop_gradient(z - log_theta)
    relaxed = jax.nn.softmax((logits + noise) / temperature, axis=-1)
    return onehot, relaxed


@register
@dataclasses.dataclass(frozen=True)
class GumbelSoftmax(Estimator):
    """The Gumbel-softmax / concrete relaxation (Jang et al. 2017; Maddison et al. 2017):
    the program sees the relaxed draw, `σ((l + G)/τ)` for a Bernoulli, `softmax((l +
    G)/τ)` over the last axis for a Categorical (whose value becomes a point of the
    simplex, shape `(..., K)`), and it is differentiated through. Biased: it estimates
    the gradient of the relaxed program's expectation, not of the discrete one's.
    The relaxed draw rounds (argmax) to `d.sample(key)`."""

    name: ClassVar[str] = "gumbel_softmax"
    kind: ClassVar[str] = "pathwise"
    biased: ClassVar[bool] = True
    temperature: float = 0.5

    def check(self, d):
        _check_relaxable(self.name, d, self.temperature)

    def record_log_prob(self, d, value):
        return _hard_log_prob(d, lax.stop_gradient(value))

    def sample(self, d, key, sample_shape):
        return self.rsample(d, key, sample_shape)

    def rsample(self, d, key, sample_shape):
        return _relaxed(d, key, sample_shape, self.temperature)[1]


@register
@dataclasses.dataclass(frozen=True)
class StraightThrough(Estimator):
    """Straight-through Gumbel-softmax (Bengio et al. 2013; Jang et al. 2017): the program
    sees the hard draw, `d.sample(key)` (one-hot, shape `(..., K)`, for a Categorical),
    and its derivative is the relaxed draw's. Biased by design."""

    name: ClassVar[str] = "straight_through"
    kind: ClassVar[str] = "pathwise"
    biased: ClassVar[bool] = True
    temperature: float = 1.0

    def check(self, d):
        _check_relaxable(self.name, d, self.temperature)

    def record_log_prob(self, d, value):
        return _hard_log_prob(d, lax.stop_gradient(value))

    def sample(self, d, key, sample_shape):
        return _relaxed(d, key, sample_shape, self.temperature)[0]

    def rsample(self, d, key, sample_shape):
        hard, relaxed = _relaxed(d, key, sample_shape, self.temperature)
        return hard + (relaxed - lax.stop_gradient(relaxed))


# -- Alternatives with first-order weights: antithetic and measure-valued ---------------


def _element_log_prob(d: dist.Distribution, value: jax.Array) -> Any:
    """log p of each element of `value` (a `to_event` does not sum), derivative-safe."""
    lp = _logprob.score_log_prob(base_of(d), value)
    return jnp.broadcast_to(lp, jnp.shape(value))


def _param(x: Any, shape: tuple) -> Any:
    return jnp.broadcast_to(jnp.asarray(x), shape)


@dataclasses.dataclass(frozen=True)
class Alternatives(Estimator):
    """The base of the estimators that evaluate what depends on a site at a few
    alternative values of it (`_enumerate.py`, as for `Enum`) and weight the cost at
    alternative `r` by `v_r + weight(θ, a_r)`: `v_r` averages the costs (the surrogate's
    value), and `weight` (`_weights.py`) is 0 with derivative `a_r · dθ`, so that the
    first derivative is the estimator's. **First derivatives only**: a second derivative
    through the site's parameters raises a clear error.

    Per element (cost elements aligned with one element of the site each, automatic
    plates) every element takes alternative `r` at once. Otherwise the alternatives are
    *coupled* (antithetic: the same few whole draws, each cost weighted by the sum over
    the site's elements) or changed *one element at a time* (measure-valued: `1 + (R −
    1)·N` alternatives for `N` elements, refused beyond `max_joint`).

    Subclasses give `count(d)` (R), `base_weights()` (`v`, summing to 1) and
    `alternatives(d, key, sample_shape)`: the values `(R, *shape)` and the weights'
    derivative parts `(R, *shape)` (0 for an alternative without one)."""

    kind: ClassVar[str] = "score"
    enumerates: ClassVar[bool] = True
    coupled: ClassVar[bool] = True
    per_element_only: ClassVar[bool] = False  # a cost of several elements is refused
    families: ClassVar[tuple] = ()
    # The alternative values carry derivatives (REBAR's relaxed draws); otherwise they
    # are held fixed.
    differentiable_values: ClassVar[bool] = False
    # Trailing channels of the weight parts (`site_weight` reads them); 0: none.
    weight_channels: ClassVar[int] = 0
    # The weights' values are not `v_r`: the surrogate takes the difference off (under
    # stop-gradient) so that its value stays the average `Σ_r v_r c_r`.
    value_at_draw: ClassVar[bool] = False
    # `extra_term` adds a term of its own to the surrogate (RELAX's control variate).
    has_extra_term: ClassVar[bool] = False
    max_joint: int = 4096

    def check(self, d):
        base = base_of(d)
        if not isinstance(base, self.families):
            raise ValueError(
                f"scgjax.sample: estimator={self.name!r} supports "
                f"{', '.join(sorted({_family(c) for c in self.families}))} (and their "
                f"to_event / expand forms), not {type(base).__name__}"
                f"{'' if base is d else f' inside {type(d).__name__}'}. Use 'score' (or "
                "'auto') for this site, or 'enum' for a finite support."
            )
        if not (isinstance(self.max_joint, int) and self.max_joint >= 1):
            raise ValueError(
                f"scgjax: {type(self).__name__}(max_joint=...) must be a positive int, got "
                f"{self.max_joint!r}."
            )

    def count(self, d: dist.Distribution) -> int:
        raise NotImplementedError

    def base_weights(self, count: int) -> np.ndarray:
        raise NotImplementedError

    def support(self, d: dist.Distribution) -> tuple:
        """The alternatives' indices (what `_enumerate.plan` lays out)."""
        return tuple(range(self.count(d)))

    def element_log_prob(self, d: dist.Distribution, value: jax.Array) -> Any:
        return _element_log_prob(d, value)

    def noise(self, key: jax.Array, shape: tuple, dtype: Any) -> Any:
        """The uniforms the Bernoulli alternatives are built from: `d.sample(key)` is
        `noise < p`."""
        return jax.random.uniform(key, shape, dtype)

    def alternatives(self, d: dist.Distribution, key: jax.Array, sample_shape: tuple):
        raise NotImplementedError

    def site_weight(self, base: np.ndarray, parts: Any, axes: tuple) -> Any:
        """The site's weight at each alternative, `(R, *site shape)` with size 1 along
        `axes` (the axes its elements go together along): from `base` (`v_r` at each
        alternative, `(R,)`) and the weight parts of its elements (`(R, *site shape,
        *channels)`). Here `v_r + Σ_axes weight(θ, a_r)`."""
        v = jnp.asarray(base, parts.dtype)
        summed = jnp.sum(parts, axis=axes, keepdims=True)
        return jnp.reshape(v, (-1,) + (1,) * (parts.ndim - 1)) + summed

    def extra_term(self, d: dist.Distribution, key: jax.Array, sample_shape: tuple) -> Any:
        """A term of the site's own added to the surrogate (0 here), from the same noise
        as `alternatives`."""
        return jnp.zeros(())


def _family(cls: type) -> str:
    return cls.__name__.removesuffix("Logits").removesuffix("Probs")


def _bernoulli(method: Alternatives, d: dist.Distribution, key, sample_shape):
    """(p, logits, u, shape) of a Bernoulli site: the draw `d.sample(key)` is `u < p`."""
    base = base_of(d)
    shape = tuple(sample_shape) + tuple(d.batch_shape) + tuple(d.event_shape)
    p = _param(base.probs, shape)
    u = method.noise(key, shape, p.dtype)
    return p, _param(base.logits, shape), u, shape


@dataclasses.dataclass(frozen=True)
class _Antithetic(Alternatives):
    """A Bernoulli draw and its antithetic partner, half each; the logits get `a` at
    the draw and `−a` at the partner (`_pair`)."""

    families: ClassVar[tuple] = _BERNOULLI

    def count(self, d):
        return 2

    def base_weights(self, count):
        return np.array([0.5, 0.5])

    def _pair(self, logits, a):
        return jnp.stack(
            [_weights.weight(logits, a, self.name), _weights.weight(logits, -a, self.name)]
        )


@register
@dataclasses.dataclass(frozen=True)
class ARM(_Antithetic):
    """Augment-REINFORCE-merge (Yin & Zhou 2019) for a (multivariate) Bernoulli: with
    `u ~ U(0, 1)` per element, the costs at `b = 1[u < σ(φ)]` (the draw) and its
    antithetic partner `b' = 1[u > σ(−φ)]` give the logits `φ` the derivative
    `(f(b') − f(b))(u − ½)`; the value is `(f(b) + f(b'))/2`. Unbiased, first order."""

    name: ClassVar[str] = "arm"

    def alternatives(self, d, key, sample_shape):
        p, logits, u, _ = _bernoulli(self, d, key, sample_shape)
        a = lax.stop_gradient(u - 0.5)
        values = jnp.stack([u < p, u > 1 - p])
        return values, self._pair(logits, -a)


@register
@dataclasses.dataclass(frozen=True)
class DisARM(_Antithetic):
    """DisARM (Dong, Mnih & Tucker 2020) for a (multivariate) Bernoulli: the draw
    `b = 1[u < σ(φ)]` and its antithetic partner `b' = 1[1 − u < σ(φ)]` give the logits
    the derivative `½(f(b) − f(b'))·(−1)^{b'}·1[b ≠ b']·σ(|φ|)` (ARM with the uniform
    integrated out: lower variance); the value is `(f(b) + f(b'))/2`. Unbiased, first
    order."""

    name: ClassVar[str] = "disarm"

    def alternatives(self, d, key, sample_shape):
        p, logits, u, _ = _bernoulli(self, d, key, sample_shape)
        b, b2 = u < p, u > 1 - p
        s = jnp.where(b != b2, jnp.where(b2, -1.0, 1.0), 0.0).astype(logits.dtype)
        a = lax.stop_gradient(0.5 * s * jax.nn.sigmoid(jnp.abs(logits)))
        return jnp.stack([b, b2]), self._pair(logits, a)


@register
@dataclasses.dataclass(frozen=True)
class ARSM(Alternatives):
    """Augment-REINFORCE-swap-merge (Yin, Yue & Zhou 2019), the antithetic estimator of
    a (multivariate) Categorical with `C` categories. The draw is `z = argmin_i (log π_i −
    φ_i)` with `π ~ Dirichlet(1_C)` (the Gumbel-max trick; `π` is drawn given the draw,
    so `z` is `d.sample(key)`); `z^{m⇌j}` swaps `π_m` and `π_j`. The logits get

        ∂/∂φ_c = (1/C) Σ_j (1 − C·π_j) (f(z^{c⇌j}) − (1/C) Σ_m f(z^{m⇌j})),

    (ARSM: every reference category `j`, `C(C − 1)/2 + 1` evaluations of what depends
    on the site, the distinct swaps and the draw), or, with `reference=j`, that term of
    the sum alone times `C` (ARS: `C` evaluations). The value is the cost at the draw.
    Several elements that a cost mixes swap together (the same `m, j`), each with its own
    `π`. Unbiased, first order; the estimate is 0 wherever every swap leaves the draw
    unchanged."""

    name: ClassVar[str] = "arsm"
    families: ClassVar[tuple] = _CATEGORICAL
    coupled: ClassVar[bool] = True
    reference: int | None = None

    def check(self, d):
        super().check(d)
        n = self._categories(d)
        if self.reference is not None and not (
            isinstance(self.reference, int)
            and not isinstance(self.reference, bool)
            and 0 <= self.reference < n
        ):
            raise ValueError(
                f"scgjax: ARSM(reference=...) must be a category, an int in [0, {n}), or "
                f"None (every category: ARSM), got {self.reference!r}."
            )

    @staticmethod
    def _categories(d) -> int:
        return int(jnp.shape(base_of(d).logits)[-1])

    def _swaps(self, n: int) -> list[tuple[int, int]]:
        """The swaps `(m, j)` behind alternatives 1, 2, ... (alternative 0 is the draw)."""
        if self.reference is None:
            return [(m, j) for m in range(n) for j in range(m + 1, n)]
        return [(m, self.reference) for m in range(n) if m != self.reference]

    def count(self, d):
        return 1 + len(self._swaps(self._categories(d)))

    def base_weights(self, count):
        return np.eye(count)[0]

    def perturbed(self, d, key, sample_shape, log_p):
        """`log p + G` whose argmax is the draw (`_perturbed_given_draw`)."""
        return _perturbed_given_draw(d, key, sample_shape, log_p)

    def alternatives(self, d, key, sample_shape):
        base = base_of(d)
        n = self._categories(d)
        shape = tuple(sample_shape) + tuple(d.batch_shape) + tuple(d.event_shape)
        logits = jnp.broadcast_to(base.logits, shape + (n,))
        log_p = lax.stop_gradient(jax.nn.log_softmax(logits, axis=-1))
        perturbed = lax.stop_gradient(self.perturbed(d, key, sample_shape, log_p))
        hard = jnp.argmax(perturbed, axis=-1)  # the draw, d.sample(key, sample_shape)
        # The Gumbels behind it. A category of probability 0 (a masked one, or one whose
        # probability underflows: logits of -1e9) takes any (a fresh one).
        allowed = jnp.isfinite(perturbed) & jnp.isfinite(log_p)
        fresh = jax.random.gumbel(jax.random.fold_in(key, 0xA75), jnp.shape(log_p), log_p.dtype)
        g = lax.stop_gradient(jnp.where(allowed, perturbed - log_p, fresh))
        log_pi = -g - jax.nn.logsumexp(-g, axis=-1, keepdims=True)  # π ~ Dirichlet(1)
        w = 1.0 - n * jnp.exp(log_pi)  # (..., C): 1 − C π_j
        eye = jnp.eye(n, dtype=log_p.dtype)
        values, coefs = [hard], []
        if self.reference is None:
            coefs.append(w / n)
        else:
            j = self.reference
            coefs.append(w[..., j : j + 1] * (eye[j] - 1.0 / n))
        for m, j in self._swaps(n):
            order = list(range(n))
            order[m], order[j] = j, m
            swapped = log_pi[..., order]
            values.append(jnp.argmin(swapped - log_p, axis=-1).astype(hard.dtype))
            wm, wj = w[..., m : m + 1], w[..., j : j + 1]
            if self.reference is None:
                coefs.append((wj * eye[m] + wm * eye[j]) / n - (wj + wm) / n**2)
            else:
                coefs.append(wj * (eye[m] - 1.0 / n))
        # Each logit's estimate is unbiased on its own: a category of probability 0, whose
        # derivative is 0 (below float precision), gets exactly 0 instead of noise.
        coefs = [jnp.where(allowed, c, 0.0) for c in coefs]
        pieces = [jnp.sum(_weights.weight(logits, c, self.name), axis=-1) for c in coefs]
        return jnp.stack(values), jnp.stack(pieces)


_MVD = _BERNOULLI + (dist.Normal,)


@register
@dataclasses.dataclass(frozen=True)
class MeasureValued(Alternatives):
    """Measure-valued (weak) derivatives (Pflug 1989; Mohamed et al. 2020). The value
    is the cost at the draw; the derivative of each parameter is the difference of the
    costs at the two parts of its density's derivative:

    * Bernoulli (GenJAX's `flip_mvd`): `∂f/∂p = f(1) − f(0)`;
    * Normal (optax's former `measure_valued_jacobians`, coupled): `∂/∂μ =
      (f(μ + σW) − f(μ − σW)) / (σ√(2π))` with `W` Rayleigh, `∂/∂σ = (f(μ + σM) −
      f(μ + σMU)) / σ` with `M` double-sided Maxwell and `U ~ U(0, 1)` (`MU` is normal).

    Unbiased, first order. With automatic plates every element moves at once (3
    evaluations for a Bernoulli, 5 for a Normal); a cost element that depends on several
    elements makes them move one at a time (`1 + 2N` or `1 + 4N`, refused beyond
    `max_joint`)."""

    name: ClassVar[str] = "measure_valued"
    coupled: ClassVar[bool] = False
    families: ClassVar[tuple] = _MVD

    def count(self, d):
        return 3 if isinstance(base_of(d), _BERNOULLI) else 5

    def base_weights(self, count):
        return np.eye(count)[0]

    def alternatives(self, d, key, sample_shape):
        base = base_of(d)
        if isinstance(base, _BERNOULLI):
            p, _, u, _ = _bernoulli(self, d, key, sample_shape)
            one = jnp.ones_like(p)
            values = jnp.stack([u < p, one > 0, one < 0])
            pieces = jnp.stack(
                [
                    jnp.zeros_like(p),
                    _weights.weight(p, one, self.name),
                    _weights.weight(p, -one, self.name),
                ]
            )
            return values, pieces
        x = jnp.asarray(d.sample(key, sample_shape))
        shape = jnp.shape(x)
        mu, sigma = _param(base.loc, shape), _param(base.scale, shape)
        k1, k2, k3 = (jax.random.fold_in(key, i) for i in (0x3D0, 0x3D1, 0x3D2))
        w = jax.random.weibull_min(k1, math.sqrt(2.0), 2.0, shape, x.dtype)  # Rayleigh
        m = jax.random.double_sided_maxwell(k2, 0.0, 1.0, shape, x.dtype)
        v = jax.random.uniform(k3, shape, x.dtype)
        values = lax.stop_gradient(
            jnp.stack([x, mu + sigma * w, mu - sigma * w, mu + sigma * m, mu + sigma * m * v])
        )
        c_mu = lax.stop_gradient(1.0 / (sigma * math.sqrt(2.0 * math.pi)))
        c_sigma = lax.stop_gradient(1.0 / sigma)
        pieces = jnp.stack(
            [
                jnp.zeros_like(x),
                _weights.weight(mu, c_mu, self.name),
                _weights.weight(mu, -c_mu, self.name),
                _weights.weight(sigma, c_sigma, self.name),
                _weights.weight(sigma, -c_sigma, self.name),
            ]
        )
        return values, pieces


def _perturbed_given_draw(d, key, sample_shape, log_p):
    """Perturbed log-probabilities `log p + G` (`G` Gumbels, `log_p` shaped `(*draw
    shape, K)`) whose argmax is the draw `d.sample(key, sample_shape)`: the Gumbels are
    drawn conditionally on it (the top one `−log E_b`, the others truncated below it:
    Tucker et al. 2017), so together they are distributed as in the Gumbel-max trick, for
    any parameterization. Categories of probability 0 get `−inf`."""
    hard = jnp.asarray(d.sample(key, sample_shape))
    onehot = jax.nn.one_hot(hard, log_p.shape[-1], dtype=bool)
    tiny = jnp.finfo(log_p.dtype).tiny
    e = -jnp.log(jax.random.uniform(_noise_key(key), log_p.shape, log_p.dtype, minval=tiny))
    e_top = jnp.take_along_axis(e, hard[..., None], axis=-1)
    return jnp.where(onehot, -jnp.log(e_top), -jnp.log(e / jnp.exp(log_p) + e_top))


# -- Control variates: REBAR and RELAX ----------------------------------------------------


def _check_operand(owner: str, field: str, x: Any, shape: tuple, positive: bool) -> None:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        if positive and not x > 0:
            raise ValueError(
                f"scgjax: {owner}({field}=...) must be positive, got {x!r}; a learned one "
                f"can be passed as jnp.exp(log_{field})."
            )
        return
    if isinstance(x, bool) or not hasattr(x, "shape") or not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"scgjax: {owner}({field}=...) must be a Python float or a float array (it may "
            f"be traced: a learned parameter), got {type(x).__name__}: {x!r}."
        )
    try:
        np.broadcast_shapes(tuple(x.shape), shape)
    except ValueError:
        raise ValueError(
            f"scgjax: {owner}({field}=...) has shape {tuple(x.shape)}, which does not "
            f"broadcast to the draw's shape {shape}. Give a scalar (one per site), or one "
            "per element of the draw."
        ) from None


@register
@dataclasses.dataclass(frozen=True)
class REBAR(Alternatives):
    """REBAR (Tucker et al. 2017) for a (multivariate) Bernoulli or a Categorical: the
    costs at the draw `b = H(z)` are corrected by a control variate, the same costs at
    relaxed values of it, `σ(z/λ)` and `σ(z̃/λ)` (`softmax` over the categories for a
    Categorical), with `z` the perturbed logits behind `b` (`logit p − logit u`; `log p
    + Gumbels`) and `z̃` a second draw of them conditioned on `b` (differentiated
    through its conditional reparameterization). For each cost `c` the surrogate is

        ⊡(log p(b))·c(b) + η·c(σ(z/λ)) − η·⊡(log p(b))·c(σ(z̃/λ)),

    with the control variate's value taken off (under stop-gradient) so that the value
    is the cost at the draw. `E[c(σ(z/λ))] = E[⊡·c(σ(z̃/λ))]` as functions of every
    parameter, so the estimate is unbiased **at every order**, for any η and λ; they
    set its variance. The program sees the draw as a float (a one-hot vector for a
    Categorical, shape `(..., K)`, as with `"straight_through"`) and must accept the
    relaxed values too (in [0, 1]; points of the simplex), **differentiably**: a
    program that rounds the draw (`argmax`, `round`, an int cast, indexing with it) gets
    `(1 − η)×` the score estimate, biased: `scg_grad` warns at trace time
    (`LostGradientWarning`). Three evaluations of what
    depends on the site; with automatic plates, per element, otherwise for the elements
    that go together at once (their log-probabilities summed in ⊡).

    `eta` (η) and `temperature` (λ) may be Python floats (the defaults, 1 and 0.5, work
    unlearned) or arrays, traced ones included: pass learned values (e.g.
    `temperature=jnp.exp(log_t)`) and train them to minimise the estimate's variance
    with `scg.estimators.variance_gradient`. Scalars, or one per element of the draw
    (averaged over elements that go together)."""

    name: ClassVar[str] = "rebar"
    families: ClassVar[tuple] = _BERNOULLI + _CATEGORICAL
    coupled: ClassVar[bool] = True
    differentiable_values: ClassVar[bool] = True
    weight_channels: ClassVar[int] = 2  # (log-probability in ⊡, coefficient)
    value_at_draw: ClassVar[bool] = True
    operand_fields: ClassVar[tuple[str, ...]] = ("eta", "temperature")
    eta: Any = 1.0
    temperature: Any = 0.5

    def check(self, d):
        super().check(d)
        owner = type(self).__name__
        shape = tuple(d.batch_shape) + tuple(d.event_shape)
        _check_operand(owner, "eta", self.eta, shape, positive=False)
        _check_operand(owner, "temperature", self.temperature, shape, positive=True)

    def count(self, d):
        return 3

    def base_weights(self, count):
        return np.array([1.0, 0.0, 0.0])

    def element_log_prob(self, d, value):
        if isinstance(base_of(d), _CATEGORICAL):
            value = jnp.argmax(value, axis=-1)
        return _element_log_prob(d, value)

    def record_log_prob(self, d, value):
        return _hard_log_prob(d, lax.stop_gradient(value))

    def conditional_noise(self, key: jax.Array, shape: tuple, dtype: Any) -> Any:
        """The uniforms behind `z̃` (given the draw), in (0, 1)."""
        tiny = jnp.finfo(dtype).tiny
        return jax.random.uniform(_noise_key(key), shape, dtype, minval=tiny)

    def sample(self, d, key, sample_shape):
        if isinstance(base_of(d), _CATEGORICAL):
            logits = base_of(d).logits
            hard = d.sample(key, sample_shape)
            return jax.nn.one_hot(hard, jnp.shape(logits)[-1], dtype=logits.dtype)
        p, _, u, _ = _bernoulli(self, d, key, sample_shape)
        return (u < p).astype(p.dtype)

    def relaxations(self, d, key, sample_shape):
        """(the draw `b` as a float (one-hot for a Categorical), `z`, `z̃`, each
        element's log p(b)). Bernoulli: `z` moves with the logits one for one (its
        noise `−logit u` held), `z̃ = logit p − logit ũ` with `ũ` uniform on `b`'s side
        of `1 − p`, differentiated through `p`. Categorical: `z = log p + G` with the
        Gumbels `G` drawn given the draw and held, `z̃` a second such draw,
        differentiated through the truncation (`_categorical_relaxations`)."""
        if isinstance(base_of(d), _CATEGORICAL):
            return self._categorical_relaxations(d, key, sample_shape)
        p, logits, u, shape = _bernoulli(self, d, key, sample_shape)
        b = u < p
        v = self.conditional_noise(key, shape, p.dtype)
        tiny = jnp.finfo(p.dtype).tiny
        z = logits + lax.stop_gradient(jnp.log1p(-u) - jnp.log(jnp.maximum(u, tiny)))
        log_p, log_q = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
        log_v, log_1mv = jnp.log(v), jnp.log1p(-v)
        # b = 1: ũ = v·p, 1 − ũ = (1 − v) + v·(1 − p);  b = 0: ũ = p + v·(1 − p),
        # 1 − ũ = (1 − v)(1 − p). In log space, without cancellation (all finite).
        log_u = jnp.where(b, log_v + log_p, jnp.logaddexp(log_p, log_v + log_q))
        log_1mu = jnp.where(b, jnp.logaddexp(log_1mv, log_v + log_q), log_1mv + log_q)
        z_cond = logits + log_1mu - log_u
        hard = b.astype(p.dtype)
        return hard, z, z_cond, _element_log_prob(d, hard)

    def _categorical_relaxations(self, d, key, sample_shape):
        base = base_of(d)
        index = jnp.asarray(d.sample(key, sample_shape))
        n = jnp.shape(base.logits)[-1]
        hard = jax.nn.one_hot(index, n, dtype=base.logits.dtype)
        logits = jnp.broadcast_to(base.logits, jnp.shape(hard))
        log_p = jax.nn.log_softmax(logits, axis=-1)
        dtype = logits.dtype
        # Exp(1) variates, two sets: the top perturbed log-probability is −log E_b, the
        # others Gumbels truncated below it, −log(E_k / p_k + E_b) (Tucker et al. 2017).
        # (Both independent of the draw: not `noise(key)`, which `d.sample` shares.)
        e1 = -jnp.log(self.conditional_noise(jax.random.fold_in(key, 1), jnp.shape(hard), dtype))
        e2 = -jnp.log(self.conditional_noise(key, jnp.shape(hard), dtype))

        def given(e, log_p):
            e_b = jnp.sum(jnp.where(hard > 0, e, 0.0), axis=-1, keepdims=True)
            return jnp.where(hard > 0, -jnp.log(e), -jnp.log(e * jnp.exp(-log_p) + e_b))

        fixed = lax.stop_gradient(log_p)
        z = log_p + lax.stop_gradient(given(e1, fixed) - fixed)
        z_cond = given(e2, log_p)
        lp = jnp.take_along_axis(log_p, index[..., None], axis=-1)[..., 0]
        return hard, z, z_cond, lp

    def alternatives(self, d, key, sample_shape):
        hard, z, z_cond, lp = self.relaxations(d, key, sample_shape)
        lam = _param(jnp.asarray(self.temperature, z.dtype), jnp.shape(lp))
        if isinstance(base_of(d), _CATEGORICAL):
            relax = lambda x: jax.nn.softmax(x / lam[..., None], axis=-1)
        else:
            relax = lambda x: jax.nn.sigmoid(x / lam)
        eta = _param(jnp.asarray(self.eta, z.dtype), jnp.shape(lp))
        values = jnp.stack([hard, relax(z), relax(z_cond)])
        zero, one = jnp.zeros_like(lp), jnp.ones_like(lp)
        pieces = jnp.stack(
            [jnp.stack([lp, one], -1), jnp.stack([zero, eta], -1), jnp.stack([lp, -eta], -1)]
        )
        return values, pieces

    def site_weight(self, base, parts, axes):
        # coefficient · ⊡(Σ log p(b)) over the elements that go together.
        from ._graph import magic_box

        lp = jnp.sum(parts[..., 0], axis=axes, keepdims=True)
        coef = jnp.mean(parts[..., 1], axis=axes, keepdims=True)
        return coef * magic_box(lp)


@register
@dataclasses.dataclass(frozen=True)
class RELAX(REBAR):
    """RELAX (Grathwohl et al. 2018) for a (multivariate) Bernoulli or a Categorical:
    REBAR's control variate plus a learned one, `control(params, z)` (a scalar,
    differentiable in `z`, the perturbed logits of the draw, shaped as the value the
    program sees): the surrogate adds

        r(z) − ⊡(Σ log p(b))·r(z̃)      (its value taken off: 0),

    unbiased at every order for any `control` and `params`. `control` is called once per
    draw (under `jax.vmap` inside the program, once per mapped element), and `r(z̃)`
    weights the log-probabilities of all the draw's elements: for a per-example control
    variate, draw per example (`jax.vmap`). `eta` (default 1) scales REBAR's part
    (`eta=0.0`: the learned control variate alone). Train `params` (and `eta`,
    `temperature`) to minimise the variance with `scg.estimators.variance_gradient`."""

    name: ClassVar[str] = "relax"
    has_extra_term: ClassVar[bool] = True
    operand_fields: ClassVar[tuple[str, ...]] = ("eta", "temperature", "params")
    control: Any = None
    params: Any = None

    def check(self, d):
        super().check(d)
        if self.control is None:
            return
        if not callable(self.control):
            raise TypeError(
                f"scgjax: RELAX(control=...) must be a function control(params, z) -> scalar, "
                f"got {type(self.control).__name__}: {self.control!r}."
            )

    def extra_term(self, d, key, sample_shape):
        if self.control is None:
            return jnp.zeros(())
        from ._graph import magic_box

        _, z, z_cond, lp = self.relaxations(d, key, sample_shape)
        r = [jnp.asarray(self.control(self.params, x)) for x in (z, z_cond)]
        if jnp.shape(r[0]) != ():
            raise ValueError(
                f"scgjax: RELAX's control(params, z) must return a scalar for one draw (z has "
                f"shape {jnp.shape(z)}), got shape {jnp.shape(r[0])}. Sum its outputs, or draw "
                "per example under jax.vmap so that control sees one example's z."
            )
        box = magic_box(jnp.sum(lp))
        return (r[0] - lax.stop_gradient(r[0])) - (box * r[1] - lax.stop_gradient(r[1]))


# -- Sampling without replacement (Categorical) -------------------------------------------


def _log_set_prob(log_p: Any, members: list, excluded: list) -> Any:
    """log P(the unordered set of categories `members` (index arrays `(...)`), drawn
    `len(members)` times without replacement from the categories but `excluded`):
    `log Σ_orders Π_i p(s_i) / p(D ∖ excluded ∖ {s_1..s_{i-1}})`. Each denominator is
    the log-sum-exp of the categories left (no `1 − Σ p`: it stays exact when the
    draws take almost all of the mass). `log_p` `(..., K)`."""
    if not members:
        return jnp.zeros(log_p.shape[:-1], log_p.dtype)
    n = log_p.shape[-1]
    hot = [jax.nn.one_hot(m, n, dtype=bool) for m in members]
    gone = jnp.zeros(log_p.shape, bool)
    for e in excluded:
        gone = gone | jax.nn.one_hot(e, n, dtype=bool)
    member_lp = [jnp.take_along_axis(log_p, m[..., None], -1)[..., 0] for m in members]
    per_order = []
    for order in itertools.permutations(range(len(members))):
        taken, total = gone, jnp.zeros(log_p.shape[:-1], log_p.dtype)
        for i in order:
            left = jax.nn.logsumexp(jnp.where(taken, -jnp.inf, log_p), axis=-1)
            total = total + member_lp[i] - left
            taken = taken | hot[i]
        per_order.append(total)
    return jax.nn.logsumexp(jnp.stack(per_order), axis=0)


@dataclasses.dataclass(frozen=True)
class _WithoutReplacement(Alternatives):
    """`k` categories drawn without replacement (Gumbel-top-k, with Gumbels drawn
    conditionally on the draw: the first is `d.sample(key)`), the costs evaluated at
    each, per element."""

    families: ClassVar[tuple] = _CATEGORICAL
    coupled: ClassVar[bool] = True
    per_element_only: ClassVar[bool] = True
    k: int | None = None  # None: min(4, the number of categories)

    def check(self, d):
        super().check(d)
        n = jnp.shape(base_of(d).logits)[-1]
        if self.k is not None and not (
            isinstance(self.k, int) and not isinstance(self.k, bool) and 1 <= self.k <= n
        ):
            raise ValueError(
                f"scgjax: {type(self).__name__}(k=...) must be an int between 1 and the "
                f"number of categories ({n}), or None (min(4, {n})), got {self.k!r}."
            )

    def count(self, d):
        n = jnp.shape(base_of(d).logits)[-1]
        return min(4, n) if self.k is None else self.k

    def base_weights(self, count):
        return np.zeros(count)  # the values are in the weights' parts (data-dependent)

    def perturbed(self, d, key, sample_shape, log_p):
        """`log p + G` whose argmax is the draw (`_perturbed_given_draw`)."""
        return _perturbed_given_draw(d, key, sample_shape, log_p)

    def _top(self, d, key, sample_shape):
        """(the k categories in order (..., k), the logits and log p (..., K), κ, the
        (k+1)-th largest perturbed log-probability (...), −inf when k = K, and which of
        the k have nonzero probability (..., k))."""
        base = base_of(d)
        shape = tuple(sample_shape) + tuple(d.batch_shape)
        logits = jnp.broadcast_to(base.logits, shape + jnp.shape(base.logits)[-1:])
        n = logits.shape[-1]
        k = self.count(d)
        log_p = jax.nn.log_softmax(logits, axis=-1)
        z = lax.stop_gradient(self.perturbed(d, key, sample_shape, lax.stop_gradient(log_p)))
        values, top = lax.top_k(z, min(k + 1, n))
        if k < n:
            kappa = values[..., k]
        else:
            kappa = jnp.full(shape, -jnp.inf, logits.dtype)
        top = top[..., :k]
        # With fewer than k categories of nonzero probability, the k include some of
        # probability 0: they get weight 0, and are evaluated at the first (a category
        # the program can take) so that a cost undefined there stays out.
        valid = jnp.exp(jnp.take_along_axis(lax.stop_gradient(log_p), top, -1)) > 0
        top = jnp.where(valid, top, top[..., :1])
        return top, log_p, logits, kappa, valid

    def _pieces(self, logits, value_weight, coef):
        """Each alternative's weight: its value plus `weight(logits, coef)` summed over
        the categories (`coef` (..., k, K), held fixed)."""
        pieces = []
        for j in range(coef.shape[-2]):
            w = _weights.weight(logits, coef[..., j, :], self.name)
            pieces.append(lax.stop_gradient(value_weight[..., j]) + jnp.sum(w, axis=-1))
        return jnp.stack(pieces)


@register
@dataclasses.dataclass(frozen=True)
class UnorderedSet(_WithoutReplacement):
    """The unordered set estimator (Kool, van Hoof & Welling 2020) for a Categorical:
    `k` categories `S` drawn without replacement, the costs at each weighted as
    `Σ_{s∈S} p(s) R(S, s) f(s)` (unbiased for `E[f]`; `R(S, s) = p^{D∖s}(S∖s) / p(S)`),
    whose derivative is `Σ_s ∇p(s) R(S, s) (f(s) − B_s)` with the built-in baseline
    `B_s = p(s) f(s) + (1 − p(s))·(the estimate from S∖s over D∖s)` (`baseline=False`:
    none). Per element (a cost of several elements of the site is refused); `k!`
    orders are summed, so keep `k` small (default `min(4, K)` for K categories; `k = K`
    is exact). Unbiased, first order."""

    name: ClassVar[str] = "unordered_set"
    baseline: bool = True
    max_k: ClassVar[int] = 5

    def check(self, d):
        super().check(d)
        if self.count(d) > self.max_k:
            raise ValueError(
                f"scgjax: UnorderedSet(k={self.k}) sums over the k! orders of the k draws "
                f"(with k-1 and k-2 of them for its baseline); k is limited to {self.max_k}. "
                "Use a smaller k, estimator=scg.estimators.ScoreWOR(k=...) (no such sum), "
                "or 'enum' to sum every category out."
            )

    def alternatives(self, d, key, sample_shape):
        top, log_p, logits, _, valid = self._top(d, key, sample_shape)
        lp = lax.stop_gradient(log_p)
        p = jnp.exp(lp)
        k = top.shape[-1]
        s = [top[..., j] for j in range(k)]
        ps = jnp.take_along_axis(p, top, -1)  # (..., k)
        log_set = _log_set_prob(lp, s, [])
        # p(s_j) R(S, s_j) = p(s_j) p^{D∖s_j}(S∖s_j) / p(S)
        rest = [[x for i, x in enumerate(s) if i != j] for j in range(k)]
        log_r = jnp.stack([_log_set_prob(lp, rest[j], [s[j]]) - log_set for j in range(k)], -1)
        value = ps * jnp.exp(log_r)
        dp = ps[..., :, None] * (jax.nn.one_hot(top, p.shape[-1], dtype=p.dtype) - p[..., None, :])
        lead = jnp.exp(log_r)[..., :, None] * dp  # (..., k, K): ∇p(s_j) R(S, s_j)
        coef = lead
        if self.baseline and k > 1:
            # B_r = p(s_r) f(s_r) + Σ_{j≠r} β_rj f(s_j), β_rj = p(s_j)·p^{D∖{s_r,s_j}}(S∖{s_r,
            # s_j}) / p^{D∖s_r}(S∖s_r): the estimate from S∖s_r over D∖s_r, times 1 − p(s_r).
            beta = []
            for r in range(k):
                denom = _log_set_prob(lp, rest[r], [s[r]])
                row = []
                for j in range(k):
                    if j == r:
                        row.append(ps[..., r])
                        continue
                    both = [x for i, x in enumerate(s) if i not in (r, j)]
                    row.append(ps[..., j] * jnp.exp(_log_set_prob(lp, both, [s[r], s[j]]) - denom))
                beta.append(jnp.stack(row, -1))
            # the coefficient of f(s_j) loses Σ_r β_rj ∇p(s_r) R(S, s_r)
            coef = lead - jnp.einsum("...rj,...rK->...jK", jnp.stack(beta, -2), lead)
        # Where the k take every category of nonzero probability (some of them have
        # probability 0), the estimate is the exact sum over those categories.
        covered = jnp.any(~valid, axis=-1)
        value = jnp.where(covered[..., None], jnp.where(valid, ps, 0.0), value)
        exact = jnp.where(valid[..., None], dp, 0.0)
        coef = jnp.where(covered[..., None, None], exact, coef)
        pieces = self._pieces(logits, value, lax.stop_gradient(coef))
        return jnp.moveaxis(top, -1, 0), pieces


@register
@dataclasses.dataclass(frozen=True)
class ScoreWOR(_WithoutReplacement):
    """The score function with `k` samples without replacement (priority sampling;
    Kool, van Hoof & Welling 2019): with `κ` the `(k+1)`-th largest perturbed
    log-probability and `q(s) = 1 − exp(−exp(log p(s) − κ))` the probability that `s`
    is among the `k`, the costs are weighted `Σ_{s∈S} p(s)/q(s)·f(s)` (unbiased for
    `E[f]`) and the derivative is `Σ_s p(s)/q(s)·∇log p(s)·f(s)`. Per element; `k`
    defaults to `min(4, K)`. Unbiased, first order."""

    name: ClassVar[str] = "score_wor"

    def alternatives(self, d, key, sample_shape):
        top, log_p, logits, kappa, valid = self._top(d, key, sample_shape)
        lp = lax.stop_gradient(jnp.take_along_axis(log_p, top, -1))  # (..., k)
        gap = jnp.where(valid, lp - kappa[..., None], 0.0)  # inf when κ = −inf: q = 1
        q = jnp.where(valid, -jnp.expm1(-jnp.exp(gap)), 1.0)
        w = jnp.where(valid, jnp.exp(lp) / q, 0.0)
        p = lax.stop_gradient(jnp.exp(log_p))
        score = jax.nn.one_hot(top, p.shape[-1], dtype=p.dtype) - p[..., None, :]
        coef = w[..., None] * score
        return jnp.moveaxis(top, -1, 0), self._pieces(logits, w, coef)


def resolve(d: dist.Distribution, estimator: str | Estimator) -> Estimator:
    """The estimator object for `estimator` (a name or an object) at a draw from `d`;
    a clear error for an unknown name or an impossible choice."""
    if isinstance(estimator, Estimator):
        out = estimator
    elif isinstance(estimator, str):
        if estimator == "auto":
            return Pathwise() if d.has_rsample else Score()
        cls = _REGISTRY.get(estimator)
        if cls is None:
            raise ValueError(
                f"scgjax.sample: unknown estimator {estimator!r}; choose one of "
                f"{', '.join(map(repr, names()))}, or pass an estimator object "
                "(e.g. scg.estimators.GumbelSoftmax(temperature=0.3))."
            )
        out = cls()
    else:
        raise TypeError(
            f"scgjax.sample: estimator must be a name ({', '.join(map(repr, names()))}) or "
            f"an scgjax.estimators object, got {type(estimator).__name__}: {estimator!r}."
        )
    out.check(d)
    return out

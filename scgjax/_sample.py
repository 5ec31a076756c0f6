"""The `sample` primitive: a random draw that the scgjax transforms can see.

`scgjax.sample(key, d)` binds `sample_p` with the key and the leaves of the numpyro
distribution `d` as operands; the distribution's class and static fields travel in the
primitive's params. Outside the transforms the primitive draws exactly what
`d.sample(key, sample_shape)` draws. Its rules, in order: impl → abstract eval → batching
(re-binds itself with one more leading batch axis, so `jax.vmap` keeps it visible) → JVP
(pathwise for reparameterized draws, zero for score-function draws) → lowering.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.interpreters import ad, batching, mlir

from . import _compat, _estimators


@dataclasses.dataclass(frozen=True, eq=False)
class DistributionSpec:
    """The static part of a distribution: its pytree structure (class and static fields)."""

    treedef: Any
    name: str

    def unflatten(self, leaves: Sequence[Any]) -> dist.Distribution:
        return jax.tree_util.tree_unflatten(self.treedef, list(leaves))

    def __hash__(self):
        try:
            return hash(self.treedef)
        except TypeError:  # static fields that are not hashable
            return id(self)

    def __eq__(self, other):
        if not isinstance(other, DistributionSpec):
            return NotImplemented
        try:
            return self is other or self.treedef == other.treedef
        except Exception:
            return False

    def __repr__(self):
        return self.name


sample_p = _compat.Primitive("scg_sample")


def sample(
    key: jax.Array,
    d: dist.Distribution,
    sample_shape: Sequence[int] = (),
    *,
    estimator: str | _estimators.Estimator = "auto",
    baseline: jax.typing.ArrayLike | None = None,
    name: str | None = None,
    out_sharding: jax.sharding.Sharding | jax.sharding.PartitionSpec | None = None,
) -> jax.Array:
    """Draws `d.sample(key, sample_shape)` as a stochastic node of the computation graph.

    Args:
      key: a PRNG key, typed (`jax.random.key`) or legacy `uint32[2]`
        (`jax.random.PRNGKey`).
      d: any `numpyro.distributions.Distribution`.
      sample_shape: leading shape of i.i.d. draws, as in `Distribution.sample`.
      estimator: how `scg_grad` differentiates through this draw: a name, or an
        estimator object from `scgjax.estimators` for options with values.
        `"pathwise"` differentiates the reparameterized draw (needs `d.has_rsample`);
        `"score"` adds a score-function (REINFORCE) term `log p(w) · downstream cost`;
        `"auto"` (default) is `"pathwise"` when `d.has_rsample` and `"score"` otherwise.
        `"enum"` sums a finite support out exactly (`estimators.Enum`);
        `"gumbel_softmax"` and `"straight_through"` relax a Bernoulli or Categorical
        (biased by design; `estimators.GumbelSoftmax(temperature=...)`), and change
        what the program sees: the relaxed draw, or, for a Categorical, a one-hot
        vector. `"arm"`, `"disarm"` (Bernoulli), `"arsm"` (Categorical),
        `"measure_valued"` (Bernoulli, Normal), `"unordered_set"` and `"score_wor"`
        (Categorical) evaluate what depends on the draw at a few alternative values
        (first derivatives only); `"rebar"`, `"relax"` (Bernoulli, Categorical) add
        control variates from relaxed values (every order).
      baseline: for a score node, a value broadcastable to `d.log_prob(value)`'s shape
        that is subtracted from the node's downstream cost. It is computed before the
        draw, so it cannot depend on it and the estimator stays unbiased; the surrogate
        gets `Σ ⊡(τ_W)·(1 − ⊡(log p(w)))·b` (Mao et al. 2019; `τ_W` the log-probabilities
        of the draws `w`'s distribution depends on; no parents inside `while_loop`
        and `shard_map` bodies), which keeps the value and the
        derivatives of every order unbiased. Only for score nodes (a `ValueError` on a
        pathwise draw).
      name: a name for the node, used by `describe` and as the key of the downstream
        costs that `scg_grad(..., downstream=True)` returns.
      out_sharding: where the draw lives, as for `jax.random` samplers: a `Sharding`, or a
        `PartitionSpec` of the current mesh (`jax.set_mesh`). The draw is resharded
        (Explicit axes) or constrained (Auto axes) to it; under the partitionable
        threefry its values do not depend on it.

    Returns:
      The draw, identical to `d.sample(key, sample_shape)` for the same key, inside and
      outside the scgjax transforms.

    Example:
      >>> z = scg.sample(key, dist.Bernoulli(logits=theta))   # score function
      >>> x = scg.sample(key, dist.Normal(theta, 1.0))        # pathwise
    """
    if not isinstance(d, dist.Distribution):
        raise TypeError(
            "scgjax.sample expects a numpyro.distributions.Distribution as its second "
            f"argument, got {type(d).__name__}: {d!r}. Wrap the parameters in a "
            "distribution, e.g. scg.sample(key, numpyro.distributions.Normal(loc, scale))."
        )
    method = _estimators.resolve(d, estimator)
    estimator = method.kind
    try:
        sample_shape = tuple(int(s) for s in sample_shape)
    except TypeError:
        raise TypeError(
            f"scgjax.sample: sample_shape must be a tuple of ints, got {sample_shape!r}."
        ) from None
    if baseline is not None and (estimator == "pathwise" or method.enumerates):
        raise ValueError(
            f"scgjax.sample: a baseline only applies to score-function nodes, but this "
            f"{type(d).__name__} draw is {method}"
            f"{'' if method.name == 'pathwise' else ' (no score term)'}. Drop baseline=, "
            "or pass estimator='score'."
        )
    key = _check_key(key)
    leaves, treedef = jax.tree_util.tree_flatten(d)
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    extra = [] if baseline is None else [jnp.asarray(baseline)]
    # Operands of the estimator (learned control-variate parameters) come last.
    method, method_operands = method.split()
    value = sample_p.bind(
        key,
        *leaves,
        *extra,
        *method_operands,
        spec=DistributionSpec(treedef, type(d).__name__),
        sample_shape=sample_shape,
        estimator=estimator,
        method=method,
        n_batch=0,
        has_baseline=baseline is not None,
        name=name,
    )
    return value if out_sharding is None else _compat.place(value, out_sharding)


def _check_key(key: Any) -> jax.Array:
    if _compat.is_key_array(key):
        if jnp.ndim(key) != 0:
            raise TypeError(
                f"scgjax.sample expects a single key, got a batch of shape {jnp.shape(key)}; "
                "use jax.vmap over the keys, or sample_shape for i.i.d. draws."
            )
        return key
    key = jnp.asarray(key)
    if key.dtype != jnp.uint32 or key.ndim < 1 or key.shape[-1] != 2:
        raise TypeError(
            "scgjax.sample expects a PRNG key (jax.random.key(...) or "
            f"jax.random.PRNGKey(...)), got an array of dtype {key.dtype} and shape "
            f"{key.shape}."
        )
    if key.ndim != 1:
        raise TypeError(
            f"scgjax.sample expects a single key, got a batch of shape {key.shape[:-1]}; "
            "use jax.vmap over the keys, or sample_shape for i.i.d. draws."
        )
    return key


def draw(key, leaves, *, spec, sample_shape, n_batch, method, reparameterized):
    """The draw itself, vmapped over `n_batch` leading axes of every operand: what the
    program sees (`method.sample`), or its differentiable form (`method.rsample`)."""

    def one(key, *leaves):
        d = spec.unflatten(leaves)
        if reparameterized:
            return method.rsample(d, key, sample_shape)
        return method.sample(d, key, sample_shape)

    fn = one
    for _ in range(n_batch):
        fn = jax.vmap(fn)
    return fn(key, *leaves)


def alternatives(key, leaves, operands, *, spec, sample_shape, n_batch, method):
    """`method.alternatives(d, key, sample_shape)` (an `estimators.Alternatives`, its
    operand fields set from `operands`), vmapped over `n_batch` leading axes: values and
    weight parts, `(R, *draw shape)` each; and the sum of its extra surrogate terms
    (`Alternatives.extra_term`, 0 for most)."""

    def one(key, leaves, operands):
        m, d = method.join(operands), spec.unflatten(leaves)
        values, pieces = m.alternatives(d, key, sample_shape)
        return values, pieces, m.extra_term(d, key, sample_shape)

    fn = one
    for _ in range(n_batch):
        fn = jax.vmap(fn, out_axes=(1, 1, 0))
    values, pieces, extra = fn(key, list(leaves), list(operands))
    return values, pieces, jnp.sum(extra)


def log_prob(value, leaves, *, spec, n_batch, score_log_prob):
    """`score_log_prob(d, value)`, vmapped over `n_batch` leading axes."""

    def one(value, *leaves):
        return score_log_prob(spec.unflatten(leaves), value)

    fn = one
    for _ in range(n_batch):
        fn = jax.vmap(fn)
    return fn(value, *leaves)


def _impl(key, *operands, spec, sample_shape, estimator, method, n_batch, has_baseline, name):
    # The operands: the distribution's leaves, then the baseline, then the estimator's.
    del estimator, name, has_baseline
    leaves = operands[: spec.treedef.num_leaves]
    return draw(
        key,
        leaves,
        spec=spec,
        sample_shape=sample_shape,
        n_batch=n_batch,
        method=method,
        reparameterized=False,
    )


def _abstract_eval(
    key, *leaves, spec, sample_shape, estimator, method, n_batch, has_baseline, name
):
    out = jax.eval_shape(
        partial(
            _impl,
            spec=spec,
            sample_shape=sample_shape,
            estimator=estimator,
            method=method,
            n_batch=n_batch,
            has_baseline=has_baseline,
            name=name,
        ),
        _compat.shape_struct(key),
        *map(_compat.shape_struct, leaves),
    )
    # The draw's sharding (Explicit meshes) and varying manual axes (`shard_map`) are
    # what the draw itself would have.
    return _compat.aval_of(out)


def _batch(args, dims, *, spec, sample_shape, estimator, method, n_batch, has_baseline, name):
    # An operand may be a literal (a Python scalar in a jaxpr, `TypedFloat` on JAX 0.10):
    # `np.shape`, not `.shape`.
    size, axis_spec = next(
        (np.shape(x)[d], _compat.batch_axis_spec(x, d)) for x, d in zip(args, dims) if d is not None
    )
    moved = [
        _compat.broadcast_leading(x, size, axis_spec) if d is None else jnp.moveaxis(x, d, 0)
        for x, d in zip(args, dims)
    ]
    out = sample_p.bind(
        *moved,
        spec=spec,
        sample_shape=sample_shape,
        estimator=estimator,
        method=method,
        n_batch=n_batch + 1,
        has_baseline=has_baseline,
        name=name,
    )
    return out, 0


def _jvp(primals, tangents, *, spec, sample_shape, estimator, method, n_batch, has_baseline, name):
    if estimator != "pathwise":
        # The value does not move with the parameters. The primal stays a `sample_p`
        # equation, so a transform that traces this derivative (an scgjax transform
        # around `jax.grad` of another) still sees the draw.
        out = sample_p.bind(
            *primals,
            spec=spec,
            sample_shape=sample_shape,
            estimator=estimator,
            method=method,
            n_batch=n_batch,
            has_baseline=has_baseline,
            name=name,
        )
        return out, _compat.zero_tangent(out)
    n = 1 + spec.treedef.num_leaves
    key, *leaves = primals[:n]
    leaf_tangents = [ad.instantiate_zeros(t) for t in tangents[1:n]]

    def fn(*leaves):
        return draw(
            key,
            leaves,
            spec=spec,
            sample_shape=sample_shape,
            n_batch=n_batch,
            method=method,
            reparameterized=True,
        )

    return jax.jvp(fn, leaves, leaf_tangents)


sample_p.def_impl(_impl)
sample_p.def_abstract_eval(_abstract_eval)
batching.primitive_batchers[sample_p] = _batch
ad.primitive_jvps[sample_p] = _jvp
mlir.register_lowering(sample_p, mlir.lower_fun(_impl, multiple_results=False))

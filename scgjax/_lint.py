"""Trace-time checks for programs that scgjax cannot estimate as written.

One forward dataflow pass over the traced program (`check_program`), before the
interpreter runs, with a small state per variable:

* `prng`: derived from PRNG bits (`random_bits`, `random_gamma`, ...: a draw that bypasses
  `scg.sample`; the outputs of `scg_sample` are not PRNG bits);
* `diff`: has a differentiable path from a differentiated input. Operations without a
  derivative (comparisons, integer or boolean outputs, casts to them, floor/ceil/round/sign)
  drop it, and so do `stop_gradient` and score-function `scg_sample` outputs (their
  parameters' gradient is the score term's); pathwise draws and primitives with JVP rules
  (e.g. `random_gamma`) keep it;
* `lost`: the sites whose gradient is lost, carried forward to whatever the value reaches;
* `guard`: the same for a comparison of one PRNG-and-differentiable value with a constant,
  whose result is only a predicate so far: in `jnp.where(x > 0, x, a * x)` (ELU, leaky
  ReLU, Huber, clipping written with `where`) the cases are functions of `x` and the
  branches usually meet at the threshold, so the predicate loses nothing; used as a
  number, in a `cond`, or to select constants, it becomes `lost`;
  The same holds for a guard cast to a number or a step between constants
  (`(x > 0).astype(float)`, `where(x > 0, 1., -1.)`, `sign(x)`) multiplied by a function
  of `x` (`x * (x > 0)`, symlog), and for `lax.cond(x > 0, f, g, x)`. Not detected: a
  jump written this way (`where(x > 1, x, 0)`): the branches are assumed to meet;
* `paths`: the `scg.sample` draws whose estimator differentiates the program through the
  value (pathwise, relaxations, straight-through, REBAR/RELAX) that the value derives
  from, differentiated parameters or not (`t + eps` is a reparameterization by hand):
  random as PRNG bits are, for the rules above;
* `const`: a predicate that is almost surely constant (`isfinite(x)`, `isnan(x)`,
  `x == inf`): a numerical guard, not a site; `where` on it keeps only the case taken.

A site is an operation without a derivative whose inputs carry both PRNG bits and a
differentiable path: the draw's distribution depends on the differentiated inputs, and
its gradient is lost (`jax.random.bernoulli(k, p(θ))` is `uniform(k) < p(θ)`;
`jax.random.categorical` is an `argmax`). `LostGradientWarning` is raised when a site
reaches the cost (output 0), and when the cost depends on PRNG bits in a program without
a single `scg.sample`. A score-function `scg.sample` whose support moves with the
differentiated parameters (`Uniform(low, high)`) is refused with a `ValueError`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from . import _compat, _sample, _weights


class LostGradientWarning(UserWarning):
    """A PRNG draw that bypasses `scgjax.sample` meets a differentiable path from a
    differentiated input in a non-differentiable operation: its gradient is lost."""


def differentiated_inputs(leaves: Sequence[Any]) -> list[bool]:
    """For each traced input leaf, whether it is being differentiated (a floating-point
    value traced by `jax.grad`, `jax.jvp`, `jax.jacfwd`, `jax.hessian`, ..., seen through
    `vmap` and `jit`)."""
    return [_is_inexact(x) and _compat.is_differentiated(x) for x in leaves]


# -- The per-variable state ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Site:
    """An operation where a draw's gradient is lost: where, and what it is."""

    source: str
    what: str
    # The `scg.sample` draws whose derivative the operation loses (their estimators
    # differentiate the program through the drawn value); empty for raw PRNG bits.
    via: frozenset = frozenset()


EMPTY: frozenset = frozenset()


class State(NamedTuple):
    prng: bool = False  # derived from PRNG bits
    diff: bool = False  # a differentiable path from a differentiated input
    lost: frozenset = EMPTY  # sites whose lost gradient this value carries
    guard: frozenset = EMPTY  # sites of a threshold predicate (lost unless a piecewise select)
    const: bool | None = None  # a predicate that is almost surely True/False (isfinite, isnan)
    # `scg.sample` draws whose estimator differentiates through the value (pathwise,
    # relaxations, straight-through, REBAR/RELAX) that this value is derived from.
    paths: frozenset = EMPTY

    @property
    def random(self) -> bool:
        return self.prng or bool(self.paths)


CLEAN = State()

# Primitives whose outputs are PRNG bits (or draws made from them).
PRNG_SOURCES = frozenset(
    {"random_bits", "random_gamma", "threefry2x32", "rng_bit_generator", "rng_uniform"}
)
# Floating-point outputs whose derivative is zero.
ZERO_DERIVATIVE = frozenset({"floor", "ceil", "round", "sign", "nextafter"})
COMPARISONS = frozenset({"eq", "ne", "lt", "le", "gt", "ge"})
# Higher-order primitives with their own derivative rules, continuous in their inputs.
OPAQUE_HIGHER_ORDER = frozenset({"custom_linear_solve"})
# Integer outputs that only organise a continuous computation (LU's pivots: a solve, an
# inverse or a determinant is continuous in the matrix): not sites.
STRUCTURAL = frozenset({"lu", "lu_pivots_to_permutation"})
# Operations that keep a predicate a predicate (a `guard`, an a.s. constant), on booleans.
PREDICATE_OPS = frozenset(
    {
        "not",
        "and",
        "or",
        "xor",
        "broadcast_in_dim",
        "reshape",
        "squeeze",
        "expand_dims",
        "transpose",
        "copy",
        "copy_p",
        "convert_element_type",
        "reduce_or",
        "reduce_and",
        "slice",
        "dynamic_slice",
        "concatenate",
        "rev",
    }
)
# Call-like primitives: the param holding the sub-jaxpr, whose inputs are the equation's.
CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "shard_map": "jaxpr",
}
# Custom derivative rules: their derivative is the user's, so nothing inside is a site
# and every floating-point output is differentiable in every input (conservative).
CUSTOM_CALLS = {
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}


def _union(sets) -> frozenset:
    out = EMPTY
    for s in sets:
        if s:
            out = out | s
    return out


def _join(states) -> State:
    states = list(states)
    return State(
        any(s.prng for s in states),
        any(s.diff for s in states),
        _union(s.lost for s in states),
        _union(s.guard for s in states),
        paths=_union(s.paths for s in states),
    )


def _is_inexact(x) -> bool:
    try:
        return bool(jnp.issubdtype(jnp.result_type(x), jnp.inexact))
    except Exception:
        return False


def _aval_inexact(v) -> bool:
    dtype = getattr(getattr(v, "aval", None), "dtype", None)
    try:
        return dtype is not None and bool(jnp.issubdtype(dtype, jnp.inexact))
    except Exception:
        return False


def _aval_bool(v) -> bool:
    dtype = getattr(getattr(v, "aval", None), "dtype", None)
    return dtype is not None and dtype == jnp.bool_


# -- Where a site is -----------------------------------------------------------------------


def _describe_frames(frames) -> str:
    """The innermost user frame, and the innermost outside installed libraries when that
    differs (numpyro's `Distribution.sample`, called from the user's model)."""
    if not frames:
        return "<unknown location>"
    inner = frames[0][1]
    for file_name, text in frames:
        if not _compat.in_installed_library(file_name):
            return inner if text == inner else f"{text}, inside {_short(frames[0])}"
    return inner


def _short(frame) -> str:
    """A library frame with its path from the packages folder (numpyro/distributions/...)."""
    file_name, text = frame
    for marker in ("site-packages", "dist-packages"):
        _, found, rest = file_name.rpartition(os.sep + marker + os.sep)
        if found:
            return text.replace(file_name, rest, 1)
    return text


def _what(eqn, out) -> str:
    name = eqn.primitive.name
    if name in COMPARISONS:
        return f"comparison {name}"
    if name in ZERO_DERIVATIVE:
        return f"{name} (zero derivative)"
    if name == "convert_element_type":
        return f"cast to {out.aval.dtype}"
    dtype = getattr(out.aval, "dtype", None)
    return f"{name} ({dtype} output)" if dtype is not None else name


# -- The pass ------------------------------------------------------------------------------


class _Pass:
    def __init__(self):
        self.memo: dict = {}
        self.keep: list = []  # keeps the memo's jaxprs alive (keyed by id)
        self.has_sample = False

    # A jaxpr, on the states of its consts and inputs; `frames` are the source frames of
    # the nearest enclosing equation that has them, `opaque` marks a custom-derivative
    # region (no sites).
    def jaxpr(self, jaxpr, const_states, in_states, frames, opaque) -> list[State]:
        key = (id(jaxpr), tuple(const_states), tuple(in_states), frames, opaque)
        hit = self.memo.get(key)
        if hit is not None:
            return hit
        env: dict = {}
        env.update(zip(jaxpr.constvars, const_states))
        env.update(zip(jaxpr.invars, in_states))

        def read(v) -> State:
            if isinstance(v, _compat.Literal):
                return CLEAN
            return env.get(v, CLEAN)

        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            outs = self.equation(eqn, ins, frames, opaque)
            for v, s in zip(eqn.outvars, outs):
                if not isinstance(v, _compat.DropVar):
                    env[v] = s
        result = [read(v) for v in jaxpr.outvars]
        self.memo[key] = result
        self.keep.append(jaxpr)
        return result

    def closed(self, j, in_states, frames, opaque) -> list[State]:
        jaxpr, consts = _compat.open_jaxpr(j)
        return self.jaxpr(jaxpr, [CLEAN] * len(consts), in_states, frames, opaque)

    def equation(self, eqn, ins: list[State], frames, opaque) -> list[State]:
        prim = eqn.primitive
        name = prim.name
        if prim is _sample.sample_p:
            return [self.sample(eqn, ins, _frames(eqn, frames))]
        if prim is _weights.weight_p:
            # An inner scgjax surrogate's site evaluated at alternatives ("arm", ...): its
            # randomness is already accounted for by the weights.
            self.has_sample = True
        subjaxprs = _has_subjaxprs(eqn)
        if not subjaxprs:
            if name in COMPARISONS or name == "is_finite":
                const = _constant_predicate(eqn)
                if const is not None:  # isfinite, isnan, x == inf: no site
                    return [
                        State(
                            any(s.prng for s in ins),
                            False,
                            _union(s.lost | s.guard for s in ins),
                            EMPTY,
                            const,
                            _union(s.paths for s in ins),
                        )
                    ]
            if all(s == CLEAN for s in ins) and name not in PRNG_SOURCES:
                return [CLEAN] * len(eqn.outvars)
            if name == "stop_gradient":  # the user's declaration: no gradient wanted here
                return [State(prng=ins[0].prng)] * len(eqn.outvars)  # paths: no derivative
            if name == "select_n":
                return [self.select(eqn, ins)]
            if name == "mul" and len(ins) == 2:
                masked = self.mask_product(ins)
                if masked is not None:
                    return [masked]
            return self.first_order(eqn, ins, frames, opaque)
        here = _frames(eqn, frames)
        if name in CALLS and CALLS[name] in eqn.params:
            j = eqn.params[CALLS[name]]
            if len(_compat.open_jaxpr(j)[0].invars) == len(ins):
                return self.closed(j, ins, here, opaque)
        if name in CUSTOM_CALLS and CUSTOM_CALLS[name] in eqn.params:
            j = eqn.params[CUSTOM_CALLS[name]]
            if len(_compat.open_jaxpr(j)[0].invars) == len(ins):
                outs = self.closed(j, ins, here, True)
                diff = any(s.diff for s in ins)
                return [
                    s._replace(diff=diff and _aval_inexact(v)) for s, v in zip(outs, eqn.outvars)
                ]
        if name == "scan":
            return self.scan(eqn, ins, here, opaque)
        if name == "while":
            return self.while_loop(eqn, ins, here, opaque)
        if name == "cond":
            return self.cond(eqn, ins, here, opaque)
        # A linear solve with its own derivative rule (`jnp.linalg.solve`): LU pivots
        # inside, continuous outside.
        return self.unknown_higher_order(eqn, ins, here, opaque or name in OPAQUE_HIGHER_ORDER)

    def first_order(self, eqn, ins, frames, opaque) -> list[State]:
        name = eqn.primitive.name
        prng = any(s.prng for s in ins) or name in PRNG_SOURCES
        diff = any(s.diff for s in ins)
        lost = _union(s.lost for s in ins)
        guard = _union(s.guard for s in ins)
        paths = _union(s.paths for s in ins)
        outs = []
        for v in eqn.outvars:
            inexact = _aval_inexact(v)
            no_derivative = not inexact or name in ZERO_DERIVATIVE
            predicate = name in PREDICATE_OPS and _aval_bool(v)
            # Casts and reshapes keep a guard: a predicate cast to a number (`(x >
            # 0).astype(float)`) is a step, which a product with a function of the value
            # may make piecewise (`mask_product`); as an integer it may choose a `cond`
            # branch. Any other use loses it.
            keep = name in PREDICATE_OPS
            out_lost, out_guard = (lost, guard) if keep else (lost | guard, EMPTY)
            structural = name in STRUCTURAL and not inexact
            if no_derivative and diff and (prng or paths) and not opaque and not structural:
                where = _describe_frames(_frames(eqn, frames))
                site = frozenset({Site(where, _what(eqn, v))} if prng else set()) | frozenset(
                    {Site(where, _what(eqn, v), paths)} if paths else set()
                )
                if (name in COMPARISONS and _is_threshold(ins)) or (
                    name == "sign" and ins[0].random and ins[0].diff
                ):
                    out_guard = out_guard | site
                else:
                    out_lost = out_lost | site
            const = _combine_constants(name, ins) if predicate else None
            outs.append(State(prng, diff and not no_derivative, out_lost, out_guard, const, paths))
        return outs

    def select(self, eqn, ins) -> State:
        pred, cases = ins[0], ins[1:]
        if pred.const is not None and len(cases) == 2:
            # A numerical guard (`where(isfinite(x), f(x), fallback)`): the other case is
            # almost surely never taken; its labels do not reach the output.
            taken = cases[int(pred.const)]
            labels = [taken]
        else:
            labels = list(cases)
        prng = any(s.prng for s in ins)
        diff = any(s.diff for s in labels) and _aval_inexact(eqn.outvars[0])
        lost = pred.lost | _union(s.lost for s in labels)
        case_guard = _union(s.guard for s in labels)
        out_guard = EMPTY
        if _aval_bool(eqn.outvars[0]):
            out_guard = case_guard
        else:
            lost = lost | case_guard
        if not _aval_bool(eqn.invars[0]):
            # An integer index (`select_n((x > 1).astype(int), ...)`): not a piecewise
            # definition that meets at the threshold.
            lost = lost | pred.guard
        elif all(s == CLEAN for s in cases) and not _aval_bool(eqn.outvars[0]):
            # A step between constants (`where(x > 0, 1., -1.)`): a guard still, which a
            # product with a function of the value may make piecewise.
            out_guard = out_guard | pred.guard
        elif not _piecewise(cases):
            lost = lost | pred.guard
        return State(prng, diff, lost, out_guard, paths=_union(s.paths for s in labels))

    def mask_product(self, ins) -> State | None:
        """`step · f(x)` (`x * (x > 0)`, `sign(x) * log1p(abs(x))`): the step of a guard
        times a function of the noisy, differentiable value, read as `where(x > c, f(x),
        0)` (piecewise, as in `select`); None when the rule does not apply."""
        a, b = ins
        if a.guard and not b.guard:
            step, other = a, b
        elif b.guard and not a.guard:
            step, other = b, a
        else:
            return None
        if not (other.random and other.diff):
            return None
        return State(
            step.prng or other.prng,
            True,
            step.lost | other.lost,
            EMPTY,
            paths=step.paths | other.paths,
        )

    def sample(self, eqn, ins, frames) -> State:
        self.has_sample = True
        params = eqn.params
        spec = params["spec"]
        n_leaves = spec.treedef.num_leaves
        key, leaves = ins[0], ins[1 : 1 + n_leaves]
        if params["estimator"] == "score" and any(s.diff for s in leaves):
            _check_support(eqn, [s.diff for s in leaves], frames)
        lost = _union(s.lost | s.guard for s in (key, *leaves))
        method = params["method"]
        # The estimators that differentiate the program through the drawn value (pathwise,
        # relaxed, straight-through) or through relaxed values standing for it (REBAR's
        # control variate): an operation without a derivative on it loses their gradient.
        through_value = params["estimator"] == "pathwise" or getattr(
            method, "differentiable_values", False
        )
        inexact = _aval_inexact(eqn.outvars[0])
        diff = through_value and any(s.diff for s in leaves) and inexact
        # Also for fixed parameters: `t + eps` of a draw `eps ~ Normal(0, 1)` is a
        # reparameterization by hand, differentiated through the value.
        paths = (
            frozenset({_describe_sample(eqn, method, frames)})
            if through_value and inexact
            else EMPTY
        )
        return State(False, diff, lost, paths=paths)

    def scan(self, eqn, ins, frames, opaque) -> list[State]:
        num_consts, num_carry = _compat.scan_layout(eqn.params)
        consts, init, xs = (
            ins[:num_consts],
            ins[num_consts : num_consts + num_carry],
            ins[num_consts + num_carry :],
        )
        carry = list(init)
        while True:
            outs = self.closed(eqn.params["jaxpr"], consts + carry + xs, frames, opaque)
            grown = [_join([c, o]) for c, o in zip(carry, outs[:num_carry])]
            if grown == carry:
                return carry + outs[num_carry:]
            carry = grown

    def while_loop(self, eqn, ins, frames, opaque) -> list[State]:
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cconsts, bconsts, carry = ins[:cn], ins[cn : cn + bn], [_join([s]) for s in ins[cn + bn :]]
        while True:
            (pred,) = self.closed(p["cond_jaxpr"], cconsts + carry, frames, opaque)
            # How many iterations run depends on the predicate.
            trip = State(pred.prng, False, pred.lost | pred.guard, paths=pred.paths)
            outs = self.closed(p["body_jaxpr"], bconsts + carry, frames, opaque)
            grown = [_join([c, o, trip]) for c, o in zip(carry, outs)]
            if grown == carry:
                return carry
            carry = grown

    def cond(self, eqn, ins, frames, opaque) -> list[State]:
        index, ops = ins[0], ins[1:]
        branches = [self.closed(b, ops, frames, opaque) for b in eqn.params["branches"]]
        which = State(index.prng, False, index.lost, paths=index.paths)
        results = []
        for outs in zip(*branches):
            joined = _join([*outs, which])
            # `cond(x > c, f, g, x)` with branches that are functions of `x` is piecewise
            # as `where` is; otherwise the predicate's guard is lost.
            if index.guard and not _piecewise(outs):
                joined = joined._replace(lost=joined.lost | index.guard)
            results.append(joined)
        return results

    def unknown_higher_order(self, eqn, ins, frames, opaque) -> list[State]:
        """A higher-order primitive without a rule: every output depends on every input,
        and on what each sub-jaxpr makes of all of them."""
        joined = _join(ins)
        results = [joined]
        for j in _compat.iter_subjaxprs(eqn.params):
            results.extend(
                self.jaxpr(j, [CLEAN] * len(j.constvars), [joined] * len(j.invars), frames, opaque)
            )
        s = _join(results)
        return [
            State(s.prng, s.diff and _aval_inexact(v), s.lost | s.guard, paths=s.paths)
            for v in eqn.outvars
        ]


def _piecewise(cases) -> bool:
    """The cases of a choice on a threshold are functions of the compared value (random
    and differentiable) or constants: a piecewise definition, assumed to meet there."""
    return any(s.random and s.diff for s in cases) and all(s.random == s.diff for s in cases)


def _is_threshold(ins) -> bool:
    """A comparison of one PRNG-and-differentiable value with a clean one (a constant,
    or an input that is not differentiated)."""
    if len(ins) != 2:
        return False
    a, b = ins
    return (a.random and a.diff and b == CLEAN) or (b.random and b.diff and a == CLEAN)


def _describe_sample(eqn, method, frames) -> str:
    name = eqn.params.get("name")
    label = f"{eqn.params['spec'].name} ({method}{', ' + repr(name) if name else ''})"
    return f"{label} at {_describe_frames(frames)}"


def _frames(eqn, enclosing) -> tuple:
    """The source frames of `eqn`, else those of the nearest enclosing equation (inner
    equations of a cached `jit` have none)."""
    return tuple(_compat.source_frames(eqn)) or enclosing


def _has_subjaxprs(eqn) -> bool:
    return any(True for _ in _compat.iter_subjaxprs(eqn.params))


# `x OP inf` for a value that is finite (almost surely, for a continuous draw).
_AGAINST_INF = {
    ("eq", 1): False,
    ("ne", 1): True,
    ("lt", 1): True,
    ("le", 1): True,
    ("gt", 1): False,
    ("ge", 1): False,
    ("eq", -1): False,
    ("ne", -1): True,
    ("lt", -1): False,
    ("le", -1): False,
    ("gt", -1): True,
    ("ge", -1): True,
}
_FLIPPED = {"eq": "eq", "ne": "ne", "lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}


def _constant_predicate(eqn) -> bool | None:
    """True/False for a predicate that holds (fails) for every finite, non-NaN value:
    `isfinite(x)`, `x == x`, `x != x` (isnan), `x == inf`; else None."""
    name = eqn.primitive.name
    if name == "is_finite":
        return True
    a, b = eqn.invars
    if a is b:
        return name in ("eq", "le", "ge")
    for op, x, other in ((name, a, b), (_FLIPPED[name], b, a)):
        if isinstance(other, _compat.Literal) and not isinstance(x, _compat.Literal):
            try:
                value = float(other.val)
            except (TypeError, ValueError):
                return None
            if value in (float("inf"), float("-inf")):
                return _AGAINST_INF[(op, 1 if value > 0 else -1)]
    return None


def _combine_constants(name, ins) -> bool | None:
    consts = [s.const for s in ins]
    if name == "not" and consts and consts[0] is not None:
        return not consts[0]
    if name == "and":
        if False in consts:
            return False
        return True if all(c is True for c in consts) else None
    if name == "or":
        if True in consts:
            return True
        return False if all(c is False for c in consts) else None
    if name == "xor":
        return None if None in consts else bool(sum(consts) % 2)
    if name in (
        "reduce_or",
        "reduce_and",
        "broadcast_in_dim",
        "reshape",
        "squeeze",
        "expand_dims",
        "transpose",
        "copy",
        "copy_p",
        "convert_element_type",
        "slice",
        "dynamic_slice",
        "rev",
    ):
        return consts[0] if consts else None
    return None


# -- Supports that move with the parameters ------------------------------------------------

_support_cache: dict = {}


def _support_of(spec, avals):
    """Which leaves of the distribution its support's bounds depend on, the support's
    name and whether the distribution is reparameterizable; None when unknown."""
    key = (spec, avals)
    try:
        if key in _support_cache:
            return _support_cache[key]
    except TypeError:
        key = None
    box: dict = {}

    def bounds(*leaves):
        d = spec.unflatten(leaves)
        support = d.support
        box["name"] = _constraint_name(support)
        box["rsample"] = bool(d.has_rsample)
        return [
            jnp.asarray(x)
            for x in jax.tree_util.tree_leaves(support)
            if isinstance(x, (jax.Array, _compat.Tracer))
        ]

    try:
        closed = jax.make_jaxpr(bounds)(*(jax.ShapeDtypeStruct(s, d) for s, d in avals))
    except Exception:  # a support numpyro cannot give (`dependent`), or an odd class
        result = None
    else:
        result = (_reaching_inputs(closed.jaxpr), box["name"], box["rsample"])
    if key is not None:
        if len(_support_cache) > 4096:  # specs with unhashable static fields hash by id
            _support_cache.clear()
        _support_cache[key] = result
    return result


def _constraint_name(c) -> str:
    while hasattr(c, "base_constraint"):  # independent(...)
        c = c.base_constraint
    return type(c).__name__.lstrip("_")


def _reaching_inputs(jaxpr) -> frozenset:
    """The indices of the inputs that the outputs depend on."""
    env = {v: frozenset({i}) for i, v in enumerate(jaxpr.invars)}

    def read(v):
        return EMPTY if isinstance(v, _compat.Literal) else env.get(v, EMPTY)

    for eqn in jaxpr.eqns:
        deps = frozenset().union(*(read(v) for v in eqn.invars))
        for v in eqn.outvars:
            env[v] = deps
    return frozenset().union(*(read(v) for v in jaxpr.outvars))


def _check_support(eqn, leaf_diff, frames) -> None:
    params = eqn.params
    spec, n_batch = params["spec"], params["n_batch"]
    n_leaves = spec.treedef.num_leaves
    avals = tuple(
        (tuple(v.aval.shape[n_batch:]), v.aval.dtype) for v in eqn.invars[1 : 1 + n_leaves]
    )
    found = _support_of(spec, avals)
    if found is None:
        return
    depends, support_name, rsample = found
    if not any(leaf_diff[i] for i in depends):
        return
    fix = (
        "Use estimator='pathwise' (or 'auto'): " + spec.name + " is reparameterizable, "
        "and the pathwise derivative accounts for the moving support."
        if rsample
        else "It has no reparameterized sampler: hold the support's bounds fixed (e.g. with "
        "jax.lax.stop_gradient) or reparameterize the draw by hand."
    )
    raise ValueError(
        f"scgjax.sample: estimator='score' on {spec.name} at {_describe_frames(frames)}, "
        f"whose support ({support_name}) depends on parameters that are being "
        "differentiated. The score-function estimator assumes a support that does not "
        "move, and misses the boundary term: its gradient would be biased. " + fix
    )


# -- The check ------------------------------------------------------------------------------


def check_program(closed_jaxpr: Any, differentiated: Sequence[bool]) -> None:
    """Warns (`LostGradientWarning`) or raises for a program whose gradient scgjax
    cannot estimate as written. `differentiated` has one flag per jaxpr input."""
    jaxpr = closed_jaxpr.jaxpr
    const_diff = differentiated_inputs(list(closed_jaxpr.consts))
    if not any(differentiated) and not any(const_diff):
        return  # nothing is differentiated: no gradient to lose
    in_states = [
        State(diff=bool(d) and _aval_inexact(v)) for v, d in zip(jaxpr.invars, differentiated)
    ]
    const_states = [State(diff=d) for d in const_diff]
    run = _Pass()
    outs = run.jaxpr(jaxpr, const_states, in_states, (), False)
    if not outs:
        return
    cost = outs[0]
    sites = sorted(cost.lost | cost.guard, key=lambda s: (s.source, s.what))
    no_sample = cost.prng and not run.has_sample
    if sites or no_sample:
        warnings.warn(
            _message(sites, no_sample), LostGradientWarning, stacklevel=_user_stacklevel()
        )


def _message(sites, no_sample: bool) -> str:
    lines = []
    through = [s for s in sites if s.via]
    sites = [s for s in sites if not s.via]
    if through:
        draws = sorted(_union(s.via for s in through))
        many = len(draws) > 1
        lines.append(
            f"scgjax: the cost depends on {'draws' if many else 'a draw'} of scg.sample whose "
            "estimator differentiates the program through the drawn value (pathwise, a "
            "relaxation, straight-through, or REBAR/RELAX's relaxed control variate):"
        )
        lines.extend(f"  {d}" for d in draws)
        lines.append(
            "but the value meets an operation without a derivative on its way to the cost, "
            "where that derivative is zero and the estimate leaves out how the draw's "
            "distribution moves the cost (biased, often zero):"
        )
        by_source: dict = {}
        for site in through:
            by_source.setdefault(site.source, []).append(site.what)
        lines.extend(f"  {source}: {', '.join(whats)}" for source, whats in by_source.items())
        lines.append(
            "Pass estimator='score' to that scg.sample (the score-function estimator needs no "
            "derivative of the cost; 'enum', 'arm' or 'disarm' on a finite support), or keep "
            "the program differentiable in the value (jnp.where(x > 0, x, a * x) is fine, "
            "(x > 0).astype(float) and x.astype(int) are not). If the discontinuity is "
            "intended, put it under jax.lax.stop_gradient."
        )
    if sites:
        by_source: dict = {}
        for site in sites:
            by_source.setdefault(site.source, []).append(site.what)
        many = len(by_source) > 1
        lines.append(
            f"scgjax: the cost depends on {'random draws' if many else 'a random draw'} made "
            "without scg.sample whose distribution depends on the differentiated inputs; "
            f"the gradient through {'them' if many else 'it'} is lost (scg_grad's estimate "
            "leaves it out). The draw meets the differentiable path in an operation without "
            "a derivative at:"
        )
        lines.extend(f"  {source}: {', '.join(whats)}" for source, whats in by_source.items())
        lines.append(
            "Draw it with scg.sample(key, d) and a numpyro distribution, so that its "
            "score-function term is added: scg.sample(key, dist.Bernoulli(probs=p)) for "
            "jax.random.bernoulli(key, p), scg.sample(key, dist.Categorical(logits=l)) for "
            "jax.random.categorical(key, l), scg.sample(key, d) for d.sample(key) and for "
            "numpyro.sample. If the discontinuity is intended (e.g. a straight-through "
            "estimator), put the non-differentiable part under jax.lax.stop_gradient."
        )
    if no_sample:
        lines.append(
            "scgjax: the cost depends on jax.random draws, but the program has no "
            "scg.sample: scgjax sees no stochastic node, and its gradient is plain jax.grad's, "
            "right only for draws reparameterized by hand (e.g. loc + scale * "
            "jax.random.normal(key)). Draw the random variables with scg.sample."
        )
    return "\n".join(lines)


_OWN_DIRS = tuple(os.path.dirname(m.__file__ or "") + os.sep for m in (jax,))


def _user_stacklevel() -> int:
    """The stack level of the first frame outside scgjax and JAX: the user's call."""
    skip = (os.path.dirname(os.path.abspath(__file__)) + os.sep, *_OWN_DIRS)
    try:
        import jaxlib

        skip = skip + (os.path.dirname(jaxlib.__file__) + os.sep,)
    except Exception:  # pragma: no cover
        pass
    frame = sys._getframe(1)  # _user_stacklevel's caller is level 1 for warnings.warn
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame = frame.f_back
        level += 1
    return level

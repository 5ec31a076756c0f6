"""Mutation check of the test suite: does it notice when a rule is broken?

Each mutant breaks one term rule, axis rule or helper of scgjax (negates or drops a cost
term, misaligns an axis, keeps an axis that should become "every element", swaps a
causality kind, skips a discount, drops a branch's dependency, ...). For each mutant this
script runs the tests that exercise that rule with the mutant applied and reports whether
they fail (*killed*) or pass (*survived*). A survivor is either an *equivalent* mutant
(no program's gradient estimate can change; the table says why) or a missing test.

Usage (from the repository root; see tests/MUTATION.md):

    python tests/mutation.py                  # every mutant, then the table
    python tests/mutation.py term:sub:negate  # some (names, or prefixes ending in ':')
    python tests/mutation.py --list           # the mutants and their tests
    SCGJAX_MUTANT=term:sub:negate python -m pytest tests/test_transform.py  # by hand

`tests/conftest.py` applies the mutant named by `SCGJAX_MUTANT` when pytest starts (in
every xdist worker). A mutant monkeypatches a registry entry (`_interpret.term_rules`,
`_interpret.higher_order_rules`), wraps `_deps.axis_rule`, or rewrites one snippet of one
function's source (`rewrite`, which fails loudly when the snippet is no longer there, so a
refactoring cannot silently turn a mutant into a no-op). The patched code records that it
ran (`fired`), so a survivor that never ran says "not reached" in the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Test selections (pytest node ids), fastest and most likely to fail first: the
# deterministic transform tests, the exact table, the random programs (the test about the
# mutated feature first), then the statistical tests that exercise the rule.
TRANSFORM = ("tests/test_transform.py",)
EXACT_TABLE = ("tests/test_exact.py",)  # the table of exact rule tests, where present
RP = "tests/test_random_programs.py::"
RANDOM = tuple(
    RP + t
    for t in (
        "test_random_program_is_exact",
        "test_random_loop_program_is_exact",
        "test_random_branching_program_is_exact",
        "test_random_vmap_program_is_exact",
        "test_random_program_with_inner_scg_grad_is_exact",
        "test_no_score_reaching_the_cost_is_jax_grad_to_the_last_bit",
    )
)


def _first(name: str) -> tuple:
    """The random-program tests with `name` first."""
    return (RP + name,) + tuple(t for t in RANDOM if t != RP + name)


def _ids(module: str, names: str) -> tuple:
    return tuple(f"tests/{module}.py::{n}" for n in names.split())


PLATES = _ids(
    "test_variance_reduction",
    """test_plates_same_key_equal_per_row_hand_written_estimator
    test_plates_split_additive_tail_at_the_finest_grain test_plates_through_numpy_broadcasting
    test_mixing_rows_falls_back_to_the_whole_node test_per_row_same_key_and_downstream_per_element
    test_plates_are_unbiased test_mixing_rows_is_unbiased test_transposed_plate_is_unbiased
    test_non_aligned_ops_are_unbiased test_gather_with_sampled_index_is_unbiased
    test_plate_estimator_has_much_lower_variance_than_whole_node""",
)
LOOPS = _ids(
    "test_variance_reduction",
    """test_loop_same_key_equals_reward_to_go_estimator
    test_loop_with_independent_steps_weights_each_reward_by_its_own_action
    test_loop_downstream_of_in_loop_node_is_reward_to_go
    test_nested_scans_same_key_equal_flattened_time_order_estimator
    test_scan_under_vmap_has_per_environment_causality test_loop_causal_estimator_is_unbiased
    test_loop_causal_estimator_has_its_exact_variance
    test_nested_scans_are_unbiased_and_finer_than_whole_loop_weighting
    test_baseline_inside_scan_subtracts_per_step""",
) + _ids(
    "test_estimators",
    """
    test_samples_inside_scan_are_unbiased test_samples_inside_fori_loop_are_unbiased""",
)
CHAINS = _ids(
    "test_estimators",
    """test_rao_blackwellized_gradient_equals_hand_written_single_term_estimator_per_key
    test_rao_blackwellization_weights_each_score_node_by_its_own_costs
    test_chain_of_two_score_nodes_is_unbiased test_mixed_score_then_pathwise_chain_is_unbiased""",
)
BRANCHES = _ids(
    "test_estimators",
    """test_samples_inside_cond_branches_with_sampled_predicate_are_unbiased
    test_samples_inside_switch_branches_with_sampled_index_are_unbiased""",
)
CALLS = _ids(
    "test_estimators",
    """test_samples_inside_inner_jit_are_unbiased
    test_samples_under_vmap_inside_f_are_unbiased""",
)
DOWNSTREAM = _ids(
    "test_variance_reduction",
    """test_downstream_costs_of_independent_nodes
    test_leave_one_out_on_a_chain_uses_each_nodes_own_downstream_costs
    test_leave_one_out_value_and_same_key_gradient""",
)

TERM_TESTS = TRANSFORM + EXACT_TABLE + RANDOM + PLATES + CHAINS + LOOPS[:2]
ALIGNMENT = ("tests/test_alignment.py",)  # the indexing idioms (issue 7)
AXIS_TESTS = ALIGNMENT + TRANSFORM + EXACT_TABLE + RANDOM + PLATES + CHAINS + CALLS
CAUSAL_TESTS = (
    ALIGNMENT
    + TRANSFORM
    + EXACT_TABLE
    + _first("test_random_loop_program_is_exact")
    + LOOPS
    + PLATES
    + DOWNSTREAM
)
SCAN_TESTS = TRANSFORM + EXACT_TABLE + _first("test_random_loop_program_is_exact") + LOOPS
COND_TESTS = TRANSFORM + EXACT_TABLE + _first("test_random_branching_program_is_exact") + BRANCHES
CALL_TESTS = (
    TRANSFORM
    + EXACT_TABLE
    + _first("test_random_program_with_inner_scg_grad_is_exact")
    + CALLS
    + CHAINS
)
ALL_TESTS = TERM_TESTS


@dataclasses.dataclass
class Mutant:
    name: str
    what: str
    apply: Callable[[], None]
    tests: tuple = ()
    equivalent: str | None = None  # why no estimate can change


MUTANTS: dict[str, Mutant] = {}


def _default_tests(name: str) -> tuple:
    if name.startswith("axis:cumulative:"):
        return CAUSAL_TESTS
    family = name.split(":")[0]
    return {
        "term": TERM_TESTS,
        "axis": AXIS_TESTS,
        "causal": CAUSAL_TESTS,
        "scan": SCAN_TESTS,
        "cond": COND_TESTS,
        "call": CALL_TESTS,
        "nested": CALL_TESTS,
    }[family]


def mutant(name: str, what: str, tests=None, equivalent: str | None = None):
    def register(fn):
        MUTANTS[name] = Mutant(name, what, fn, tuple(tests or _default_tests(name)), equivalent)
        return fn

    return register


# -- Applying a mutant ----------------------------------------------------------------------

FIRED = [0]


def fired() -> None:
    FIRED[0] += 1


def counted(fn):
    """`fn`, recording each call as the mutant firing."""

    def wrapper(*args, **kwargs):
        fired()
        return fn(*args, **kwargs)

    wrapper.__name__ = getattr(fn, "__name__", "mutant")
    wrapper.__wrapped__ = fn
    return wrapper


class StaleMutant(RuntimeError):
    """The code a mutant rewrites has changed: update the mutant."""


def rewrite(owner, name: str, old, new, count: int = 1):
    """Replaces `old` by `new` (strings, or lists of strings replaced pairwise) in the
    source of `owner.name` (a module function or a class method), re-executes the
    definition in its module and installs it; returns the new function (recording its
    calls as the mutant firing)."""
    func = inspect.unwrap(getattr(owner, name))
    src = textwrap.dedent(inspect.getsource(func))
    for o, n in zip(*(([x] if isinstance(x, str) else x) for x in (old, new))):
        found = src.count(o)
        if found != count:
            raise StaleMutant(
                f"{getattr(owner, '__name__', owner)}.{name}: expected {count} "
                f"occurrence(s) of {o!r}, found {found}"
            )
        src = src.replace(o, n)
    namespace: dict = {}
    exec(compile(src, inspect.getsourcefile(func), "exec"), func.__globals__, namespace)
    new_func = counted(namespace[name])
    setattr(owner, name, new_func)
    return new_func


def apply(name: str) -> None:
    """Applies the mutant `name` (called from tests/conftest.py)."""
    if name not in MUTANTS:
        raise SystemExit(
            f"SCGJAX_MUTANT={name!r}: no such mutant (python tests/mutation.py --list)"
        )
    MUTANTS[name].apply()


def report_fired(log_path: str | None) -> None:
    """Appends this process's firing count to the log the runner reads."""
    if log_path:
        with open(log_path, "a") as f:
            f.write(f"{FIRED[0]}\n")


def _modules():
    from scgjax import _compat, _control_flow, _deps, _graph, _interpret

    return _interpret, _deps, _graph, _control_flow, _compat


# -- Term rules: negate or drop a term ---------------------------------------------------------

# Every primitive with a term rule. `expand_dims`, `copy_p` are names of other JAX versions.
TERM_PRIMITIVES = (
    "neg",
    "broadcast_in_dim",
    "reshape",
    "squeeze",
    "expand_dims",
    "transpose",
    "copy",
    "copy_p",
    "real",
    "cumsum",
    "convert_element_type",
    "reduce_sum",
    "add",
    "add_any",
    "sub",
    "concatenate",
    "stack",
    "select_n",
    "mul",
    "div",
    "dot_general",
)
UNREACHABLE = {
    "expand_dims": "JAX 0.10-0.12 have no expand_dims primitive (jnp.expand_dims binds "
    "broadcast_in_dim)",
    "copy_p": "the copy primitive is named 'copy' in JAX 0.10-0.12",
}


def _wrap_term_rule(prim: str, change: Callable[[list], list]) -> None:
    _interpret = _modules()[0]
    rule = _interpret.term_rules[prim]

    def mutated(eqn, invals, out):
        items = rule(eqn, invals, out)
        if not items:
            return items
        fired()
        return change(list(items))

    _interpret.term_rules[prim] = mutated


def _negate_last(items):
    d, t = items[-1]
    return items[:-1] + [(d, -t)]


for _prim in TERM_PRIMITIVES:
    mutant(
        f"term:{_prim}:negate",
        f"the {_prim} term rule negates its last term",
        equivalent=UNREACHABLE.get(_prim),
    )(lambda p=_prim: _wrap_term_rule(p, _negate_last))
    mutant(
        f"term:{_prim}:drop",
        f"the {_prim} term rule drops its last term",
        equivalent=UNREACHABLE.get(_prim),
    )(lambda p=_prim: _wrap_term_rule(p, lambda items: items[:-1]))


@mutant(
    "term:reduce_sum:pending_first",
    "reduce_sum puts the aligned (pending) axes before the output's axes",
)
def _():
    _interpret = _modules()[0]
    rewrite(
        _interpret,
        "_reduce_terms",
        "order = list(kept) + aligned + ",
        "order = aligned + list(kept) + ",
    )


@mutant(
    "term:reduce_sum:sum_aligned",
    "reduce_sum sums the axes a node is aligned with (no plates through sums)",
)
def _():
    _interpret = _modules()[0]
    rewrite(
        _interpret,
        "_reduce_terms",
        "summed = sorted(axes - set(aligned))",
        "summed = sorted(axes); aligned = []",
    )


@mutant(
    "term:pending_axes_front",
    "terms pushed through an equation get their pending axes moved to the front",
)
def _():
    _interpret = _modules()[0]
    rewrite(_interpret, "_term_items_through", "in_axes=-1, out_axes=-1", "in_axes=-1, out_axes=0")


@mutant(
    "term:operands_not_zeroed",
    "add/sub/concatenate/select_n push each operand's "
    "terms with the other operands at their values instead of zeros",
)
def _():
    _interpret = _modules()[0]
    rewrite(
        _interpret,
        "_sum_of_operands",
        "jnp.zeros_like(v.value) if i in positions else v.value",
        "v.value",
    )


@mutant(
    "term:add:broadcast_as_same",
    "add takes the same-shape shortcut with a broadcast operand (its terms are not broadcast)",
)
def _():
    _interpret = _modules()[0]
    new = rewrite(
        _interpret,
        "_add",
        "if all(np.shape(v.value) == np.shape(out) for v in invals):",
        "if True:",
    )
    _interpret.term_rules["add"] = _interpret.term_rules["add_any"] = new


@mutant("term:sub:broadcast_as_same", "sub takes the same-shape shortcut with a broadcast operand")
def _():
    _interpret = _modules()[0]
    _interpret.term_rules["sub"] = rewrite(
        _interpret,
        "_sub",
        "if all(np.shape(v.value) == np.shape(out) for v in invals):",
        "if True:",
    )


@mutant(
    "term:make_val:merge_subtracts", "terms with the same dependencies are merged by subtraction"
)
def _():
    _graph = _modules()[2]
    rewrite(_graph, "make_val", "terms[key] + t", "terms[key] - t")


@mutant(
    "term:exact:always",
    "the exactness guard is off: costs are split through float-"
    "to-int conversions and integer division",
)
def _():
    _interpret = _modules()[0]
    _interpret.term_rules["convert_element_type"] = _interpret._unary_linear
    _interpret.term_rules["div"] = counted(_interpret._linear_in_one(0))


@mutant(
    "term:mul:partner_with_samples",
    "mul splits a product whose other factor depends on a sample too",
)
def _():
    _interpret = _modules()[0]
    rewrite(
        _interpret,
        "_linear_in_one",
        "if invals[p].has_terms and all(not v.deps for i, v in enumerate(invals) if i != p):",
        "if invals[p].has_terms:",
    )
    _interpret.term_rules["mul"] = _interpret._linear_in_one(0, 1)
    _interpret.term_rules["div"] = _interpret._exact(_interpret._linear_in_one(0))


@mutant(
    "term:select_n:sampled_predicate",
    "select_n splits its cases even when the predicate depends on a sample",
)
def _():
    _interpret = _modules()[0]
    rewrite(_interpret, "_joint", "if any(v.deps for v in invals[:first]) or not", "if not")
    _interpret.term_rules["select_n"] = _interpret._joint(1)
    _interpret.term_rules["concatenate"] = _interpret.term_rules["stack"] = _interpret._joint(0)


@mutant(
    "term:dot_general:partner_with_samples",
    "dot_general splits when both operands depend on samples",
)
def _():
    _interpret = _modules()[0]
    _interpret.term_rules["dot_general"] = rewrite(
        _interpret, "_dot_general", "        if w.deps:\n            continue\n", ""
    )


@mutant(
    "term:dot_general:weight_axes",
    "dot_general lays a sample-free partner out on the term's axes without its permutation",
)
def _():
    _interpret = _modules()[0]
    _interpret.term_rules["dot_general"] = rewrite(
        _interpret,
        "_dot_general",
        "jnp.transpose(w_value, tuple(int(a) for a in np.argsort(dims)))",
        "jnp.transpose(w_value, tuple(int(a) for a in dims))",
    )


@mutant(
    "term:dot_general:no_weighted_sum",
    "dot_general with a partner without free axes "
    "is not treated as a weighted sum (aligned axes are summed)",
)
def _():
    _interpret = _modules()[0]
    _interpret.term_rules["dot_general"] = rewrite(
        _interpret, "_dot_general", "if np.ndim(w_value) != len(wc) + len(wb):", "if True:"
    )


# -- Axis rules: misalign, keep an axis that should be ALL, coarsen -----------------------------

AXIS_FAMILIES = {
    "elementwise": None,  # _deps.ELEMENTWISE
    "broadcast_in_dim": ("broadcast_in_dim",),
    "transpose": ("transpose",),
    "reduce": (
        "reduce_sum",
        "reduce_max",
        "reduce_min",
        "reduce_prod",
        "reduce_and",
        "reduce_or",
        "argmax",
        "argmin",
        "reduce_xor",
    ),
    "squeeze": ("squeeze",),
    "reshape": ("reshape",),
    "dot_general": ("dot_general",),
    "cumulative": ("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"),
    "concatenate": ("concatenate",),
    "pad": ("pad",),
    "stack": ("stack",),
    "slice": ("slice",),
    "gather": ("gather",),
    "scatter": ("scatter", "scatter-add"),
    "dynamic_slice": ("dynamic_slice", "dynamic_update_slice"),
    "conv": ("conv_general_dilated",),
    "other": (),  # the primitives without a rule of their own (rev, gather, sort, ...)
}


def _wrap_axis_rule(family: str, transform) -> None:
    _deps = _modules()[1]
    orig = _deps.axis_rule
    names = AXIS_FAMILIES[family]

    def selected(name):
        if family == "elementwise":
            return name in _deps.ELEMENTWISE
        if family == "other":
            known = set(_deps.ELEMENTWISE).union(*[set(v) for v in AXIS_FAMILIES.values() if v])
            return name not in known
        return name in names

    def axis_rule(eqn, in_shapes, out_shape, known=None):
        maps = orig(eqn, in_shapes, out_shape, known)
        if not selected(eqn.primitive.name):
            return maps

        def mutated(m, n_in):
            def new_map(a):
                before = m(a)
                after = transform(before, a, len(out_shape))
                if after != before:
                    fired()
                return after

            return new_map

        return [mutated(m, len(s)) for m, s in zip(maps, in_shapes)]

    _deps.axis_rule = axis_rule


def _shift(b, a, n_out):
    """An aligned axis moved to the next output axis."""
    return b if b is None or n_out < 2 else (b + 1) % n_out


def _keep(b, a, n_out):
    """An axis that is not aligned (ALL) kept as if it were."""
    return b if b is not None else (a if a < n_out else None)


def _coarsen(b, a, n_out):
    return None


SIZE_GUARD = (
    "equivalent: every axis this keeps changes size (or is broadcast from size "
    "1), and `_graph.tau` pairs a term axis with a node axis only when their sizes "
    "are equal, summing over the node axis otherwise, which is what ALL means; "
    "so the weights do not change"
)
ELEMENTWISE_SAME_SHAPES = (
    "equivalent: a jaxpr's elementwise operands have the output's shape (jnp inserts "
    "broadcast_in_dim first), so the elementwise rule never makes an axis ALL: the "
    "mutant is not reached"
)
for _family in AXIS_FAMILIES:
    mutant(
        f"axis:{_family}:shift",
        f"the {_family} axis rule maps an aligned axis to the next output axis",
    )(lambda f=_family: _wrap_axis_rule(f, _shift))
    mutant(
        f"axis:{_family}:keep",
        f"the {_family} axis rule keeps an axis that should be ALL",
        equivalent=SIZE_GUARD
        if _family
        in ("slice", "concatenate", "broadcast_in_dim", "stack", "squeeze", "dynamic_slice")
        else ELEMENTWISE_SAME_SHAPES
        if _family == "elementwise"
        else None,
    )(lambda f=_family: _wrap_axis_rule(f, _keep))
for _family in ("elementwise", "broadcast_in_dim", "transpose", "reduce", "dot_general"):
    mutant(
        f"axis:{_family}:coarsen",
        f"the {_family} axis rule makes every axis ALL (no plates through it: variance only)",
    )(lambda f=_family: _wrap_axis_rule(f, _coarsen))


@mutant(
    "axis:gather:any_column",
    "an index column known while tracing counts as jnp.arange whatever its values",
)
def _():
    _deps = _modules()[1]
    rewrite(
        _deps,
        "_iota_along",
        "if np.array_equal(col, np.broadcast_to(np.arange(size).reshape(shape), col.shape)):",
        "if True:",
    )


@mutant(
    "causal:loop_index:offset_ignored",
    "xs[t + c] at a loop counter is related to step t as xs[t] is (the offset dropped)",
    equivalent=(
        "equivalent: a read at t + c with c != 0 stays in bounds only when the array "
        "is longer than the loop, and `_graph.tau` pairs the loop's stacked axis with a "
        "node axis only when their lengths are equal, so the relation is never used"
    ),
)
def _():
    _interpret = _modules()[0]
    rewrite(_interpret, "_shifted_kind", "if offset == 0:", "if True:")


@mutant(
    "causal:loop_index:any_write",
    "buf.at[t].set(c) at a loop counter makes every step's value element t's (no offset check)",
)
def _():
    _interpret = _modules()[0]
    rewrite(
        _interpret,
        "_loop_index_deps",
        "if isinstance(li, LoopIndex) and li.offset == 0 and upd[a] == 1",
        "if isinstance(li, LoopIndex) and upd[a] == 1",
    )


@mutant("axis:transpose:inverse", "transpose maps axes by the permutation instead of its inverse")
def _():
    _deps = _modules()[1]
    rewrite(_deps, "axis_rule", "return [lambda a: perm.index(a)]", "return [lambda a: perm[a]]")


@mutant(
    "axis:elementwise:size1_aligned",
    "a size-1 axis broadcast by an elementwise op stays aligned",
    equivalent=SIZE_GUARD,
)
def _():
    _deps = _modules()[1]
    rewrite(
        _deps,
        "_elementwise",
        "return lambda a: a + offset if in_shape[a] == out_shape[a + offset] else None",
        "return lambda a: a + offset",
    )


@mutant(
    "axis:broadcast_in_dim:size1_aligned",
    "broadcast_in_dim keeps a size-1 axis aligned when it is broadcast",
    equivalent=SIZE_GUARD,
)
def _():
    _deps = _modules()[1]
    rewrite(
        _deps,
        "axis_rule",
        "return [lambda a: dims[a] if shape[a] == out_shape[dims[a]] else None]",
        "return [lambda a: dims[a]]",
    )


@mutant(
    "axis:reshape:fortran_order",
    "a reshape with a transpose first (order='F') is aligned like a row-major one",
)
def _():
    _deps = _modules()[1]
    rewrite(
        _deps,
        "axis_rule",
        "if dims is not None and tuple(dims) != tuple(range(len(in_shapes[0]))):",
        "if False:",
    )


@mutant("axis:reshape:by_position", "a reshape that merges or splits axes aligns them by position")
def _():
    _deps = _modules()[1]
    rewrite(
        _deps,
        "_reshape_map",
        "        if len(gi) == 1 and len(gj) == 1:",
        "        for gi0, gj0 in zip(gi, gj):\n            table[gi0] = gj0\n        if False:",
    )


@mutant("axis:pad:ignores_negative", "pad with a negative side (a shift) keeps the axis aligned")
def _():
    _deps = _modules()[1]
    rewrite(
        _deps, "axis_rule", "if (lo, hi, inner) != (0, 0, 0)\n", "if lo > 0 or hi > 0 or inner\n"
    )


@mutant("axis:parents:dropped", "a draw does not depend on its parameters' draws (chains)")
def _():
    _interpret = _modules()[0]
    rewrite(_interpret, "_parent_deps", "    return _deps.join(parts)", "    return _deps.EMPTY")


@mutant(
    "axis:parents:sample_shape",
    "a parameter's batch axes are aligned without the shift by the sample shape",
)
def _():
    _interpret = _modules()[0]
    rewrite(_interpret, "_parent_deps", "return a + len(sample_shape)", "return a")


@mutant(
    "axis:parents:always_elementwise",
    "a parameter is taken as elementwise whatever its shape (event axes, broadcast parameters)",
    tests=("tests/test_trust.py", "tests/test_exact.py"),
)
def _():
    _interpret = _modules()[0]
    rewrite(
        _interpret,
        "_parent_deps",
        "elementwise = i > 0 and id(leaves[i - 1]) in good",
        "elementwise = i > 0",
    )


@mutant(
    "axis:parents:wrapper_batch",
    "an inner distribution's parameters are aligned whatever its batch shape "
    "(Categorical(logits (K,)).expand((B,)))",
    tests=("tests/test_trust.py",),
)
def _():
    _interpret = _modules()[0]
    rewrite(
        _interpret,
        "_elementwise_leaves",
        "if base == batch or (independent and base[: len(batch)] == batch):",
        "if True:",
    )


@mutant(
    "axis:multi_output:not_coarsened",
    "multi-output primitives (sort with several operands, split, ...) keep their operands' axes",
)
def _():
    _deps = _modules()[1]
    rewrite(_deps.Deps, "coarsened", "return self.map_axes(lambda a: None)", "return self")


# -- Causality: the kinds of loop and cumulative relations ----------------------------------


@mutant("causal:cumsum:direction", "cumsum's causal kind is swapped (le for reverse, ge forward)")
def _():
    _deps = _modules()[1]
    rewrite(
        _deps,
        "cumulative_kind",
        '"ge" if eqn.params.get("reverse") else "le"',
        '"le" if eqn.params.get("reverse") else "ge"',
    )


@mutant("causal:cumsum:eq", "cumsum is taken as elementwise (no causal widening)")
def _():
    _deps = _modules()[1]
    rewrite(_deps, "cumulative_kind", '"ge" if eqn.params.get("reverse") else "le"', '"eq"')


@mutant("causal:compose:drops_eq", "composing relations never keeps j == i (le after le gives lt)")
def _():
    _deps = _modules()[1]
    rewrite(_deps, "compose_kind", 'if "=" in _ORDERS[k] and "=" in _ORDERS[step]:', "if False:")


@mutant(
    "causal:compose:keeps_eq",
    "composing relations always keeps j == i (lt after le gives le: variance only)",
)
def _():
    _deps = _modules()[1]
    rewrite(_deps, "compose_kind", 'if "=" in _ORDERS[k] and "=" in _ORDERS[step]:', "if True:")


@mutant("causal:union:first", "the union of two kinds is the first one")
def _():
    _deps = _modules()[1]
    rewrite(_deps, "union_kind", "return _KIND_OF.get(_ORDERS[k1] | _ORDERS[k2])", "return k1")


@mutant("causal:meet:first", "the entry covering two entries is the first one")
def _():
    _deps = _modules()[1]
    rewrite(_deps, "meet", "    if e1 == e2:\n        return e1\n", "    return e1\n")


@mutant(
    "causal:normalize:no_merge",
    "overlapping relations are kept side by side (their log-probabilities counted twice)",
)
def _():
    _deps = _modules()[1]
    rewrite(
        _deps,
        "_normalize",
        "    changed = True\n    while changed:",
        "    changed = False\n    while changed:",
    )


@mutant("causal:disjoint:always", "any two relations are taken as disjoint")
def _():
    _deps = _modules()[1]
    rewrite(_deps, "_disjoint", "return any(", "return True or any(")


@mutant(
    "causal:exact_union:never",
    "relations with an exact union (lt and eq) are not merged",
    equivalent="equivalent: lt and eq stay two disjoint relations of the "
    "node, and `tau` adds their log-probabilities: the same sum as one le relation",
)
def _():
    _deps = _modules()[1]
    rewrite(
        _deps, "_exact_union", "    if len(diff) != 1:\n        return None\n", "    return None\n"
    )


@mutant(
    "causal:max_relations:1",
    "a node keeps one relation per value (nested loops coarsened: variance only)",
)
def _():
    _deps = _modules()[1]
    _deps.MAX_RELATIONS = 1
    rewrite(_deps, "_normalize", "if len(out) > MAX_RELATIONS:", "if len(out) > MAX_RELATIONS:")


@mutant(
    "causal:join:first",
    "a value computed from several operands depends on the first one's nodes only",
)
def _():
    _deps = _modules()[1]
    rewrite(_deps, "join", "    for d in deps:\n", "    for d in list(deps)[:1]:\n")


@mutant(
    "causal:node_rel:loops_reversed",
    "a node drawn in nested loops pairs its stacked axes with the loops in reverse order",
)
def _():
    _deps = _modules()[1]
    rewrite(
        _deps,
        "node_rel",
        "tuple(Loop(l) for l in loop_levels)",
        "tuple(Loop(l) for l in reversed(loop_levels))",
    )


@mutant("causal:tau:le_as_lt", "tau weights a `le` (`lt`) relation as `lt` (`le`)")
def _():
    _graph = _modules()[2]
    rewrite(
        _graph,
        "_cumulative",
        'return total if kind == "le" else total - x',
        'return total - x if kind == "le" else total',
    )


@mutant("causal:tau:ge_as_gt", "tau weights a `ge` (`gt`) relation as `gt` (`ge`)")
def _():
    _graph = _modules()[2]
    rewrite(
        _graph, "_cumulative", '"le" if kind == "ge" else "lt"', '"lt" if kind == "ge" else "le"'
    )


@mutant(
    "causal:tau:axes_in_node_order",
    "tau lays a node's aligned axes out in node order, not in the term's",
)
def _():
    _graph = _modules()[2]
    rewrite(_graph, "_contribution", "x = jnp.transpose(x, order) if kept else x", "x = x")


@mutant("causal:tau:no_plates", "tau sums every node axis (no plates: variance only)")
def _():
    _graph = _modules()[2]
    rewrite(
        _graph,
        "_contribution",
        "            isinstance(entry, Axis)\n            and entry.axis < len(shape)\n",
        "            False\n            and entry.axis < len(shape)\n",
    )


# -- Control flow: scan, cond, calls, nested transforms -----------------------------------------


def _scan(old: str, new: str, count: int = 1) -> None:
    _interpret, _, _, _control_flow, _compat = _modules()
    _interpret.higher_order_rules[_compat.primitives.scan_p] = rewrite(
        _control_flow, "_scan_rule", old, new, count
    )


@mutant(
    "scan:carry_in:current",
    "what the carry brings from earlier iterations is taken as the current iteration's",
)
def _():
    _scan("kind = _deps.compose_kind(e.kind, before)", "kind = e.kind")


@mutant("scan:carry_in:le", "what the carry brings includes the current iteration (variance only)")
def _():
    _scan('before = "gt" if reverse else "lt"', 'before = "ge" if reverse else "le"')


@mutant("scan:carry_in:direction", "the iterations before this one are the later ones")
def _():
    _scan('before = "gt" if reverse else "lt"', 'before = "lt" if reverse else "gt"')


@mutant("scan:stacked:eq", "a stacked output at step t depends on the draws of step t only")
def _():
    _scan(
        "                Axis(0, e.kind)\n",
        "                Axis(0)\n",
    )


@mutant(
    "scan:stacked:axes_not_shifted",
    "a stacked output's own axes are not shifted past the loop axis",
)
def _():
    _scan(
        "else (Axis(e.axis + 1, e.kind) if isinstance(e, Axis) else e)",
        "else (Axis(e.axis, e.kind) if isinstance(e, Axis) else e)",
    )


@mutant("scan:xs:axes_not_shifted", "a scanned input's axes are not shifted down in the body")
def _():
    _scan("else Axis(e.axis - 1, e.kind))", "else Axis(e.axis, e.kind))")


@mutant(
    "scan:final:keeps_loop",
    "the final carry keeps loop entries instead of ALL",
    equivalent="equivalent: `tau` reads only `Axis` entries and sums a node over "
    "every other entry, so a `Loop` entry left on a top-level value means ALL",
)
def _():
    _scan(
        "return d.map_entries(lambda e: ALL if isinstance(e, Loop) and e.level == level else e)",
        "return d",
    )


@mutant("scan:discount:skipped", "an accumulator's increments are not discounted")
def _():
    _scan("t = t * _discount(g, steps_after, t)", "t = t")


@mutant("scan:discount:off_by_one", "an accumulator's increment at step t is discounted once more")
def _():
    _scan("else length - 1 - jnp.arange(length)", "else length - jnp.arange(length)")


@mutant("scan:discount:reverse_as_forward", "a reverse scan discounts like a forward one")
def _():
    _scan(
        "steps_after = jnp.arange(length) if reverse else",
        "steps_after = length - 1 - jnp.arange(length) if reverse else",
    )


@mutant("scan:discount:init_skipped", "an accumulator's initial value is not discounted")
def _():
    _scan("(d, t if g is None else t * _discount(g, length, t))", "(d, t)")


@mutant("scan:increments:dropped", "an accumulator keeps the initial value's terms only")
def _():
    _scan("        for d, t in inc.term_items():\n", "        for d, t in inc.term_items()[:0]:\n")


@mutant(
    "scan:increments:step_axis",
    "an increment's step axis is not moved to the pending axes in the dependencies",
)
def _():
    _scan(
        "moved = d.map_axes(lambda a, n=n: n - 1 if a == 0 else a - 1)",
        "moved = d.map_axes(lambda a, n=n: a)",
    )


@mutant("scan:accumulator:sampled_discount", "a discount that depends on a draw is accepted")
def _():
    _scan("or not invals[jaxpr.invars.index(g)].deps\n", "or True\n")


@mutant(
    "scan:accumulator:broadcast",
    "an increment that broadcasts into the carry is accepted as an accumulator",
)
def _():
    _control_flow = _modules()[3]
    rewrite(
        _control_flow,
        "_accumulators",
        "and tuple(other.aval.shape) == tuple(c_in.aval.shape)\n",
        "\n",
    )


@mutant(
    "scan:accumulator:body_discount",
    "a discount computed in the body (not a loop constant) is accepted",
)
def _():
    _control_flow = _modules()[3]
    rewrite(
        _control_flow,
        "_accumulators",
        "(isinstance(g_src, _compat.Literal) or g_src in consts)",
        "True",
    )


@mutant("scan:ys:no_terms", "stacked outputs lose their cost terms (variance only)")
def _():
    _scan(
        'ys_and_increments = unpack(list(ys_arrays), meta["struct"][num_carry:], lift_stacked)',
        "ys_and_increments = [v.collapsed() for v in unpack(list(ys_arrays), "
        'meta["struct"][num_carry:], lift_stacked)]',
    )


def _cond(old: str, new: str) -> None:
    _interpret, _, _, _control_flow, _compat = _modules()
    _interpret.higher_order_rules[_compat.primitives.cond_p] = rewrite(
        _control_flow, "_cond_rule", old, new
    )


@mutant("cond:predicate:dropped", "a cond's outputs do not depend on its predicate")
def _():
    _cond(
        [
            'deps_j = _deps.join([which.deps] + [m["struct"][j][0] for m in metas])',
            "items = [(_deps.join([k[0], which.deps]), t)",
        ],
        ['deps_j = _deps.join([m["struct"][j][0] for m in metas])', "items = [(k[0], t)"],
    )


@mutant(
    "cond:predicate:dropped_from_terms",
    "a cond's cost terms do not depend on its predicate (its value still does)",
)
def _():
    _cond("items = [(_deps.join([k[0], which.deps]), t)", "items = [(k[0], t)")


@mutant("cond:no_terms", "a cond's outputs lose their cost terms (variance only)")
def _():
    _cond(
        "outs.append(_graph.make_val(values[j], deps_j, items))",
        "outs.append(_graph.Val(values[j], deps_j))",
    )


@mutant("call:no_terms", "jit/checkpoint outputs lose their cost terms (variance only)")
def _():
    _interpret, _, _, _control_flow, _compat = _modules()
    rewrite(
        _control_flow,
        "_call_rule",
        'return _with_known(unpack(list(out_arrays), meta["struct"]), meta["known"])',
        'return [v.collapsed() for v in unpack(list(out_arrays), meta["struct"])]',
    )
    P = _compat.primitives
    _interpret.higher_order_rules[P.jit_p] = _control_flow._call_rule(
        lambda fn, params: jax_jit()(fn)
    )
    _interpret.higher_order_rules[P.remat_p] = _control_flow._call_rule(
        lambda fn, params: jax_checkpoint()(
            fn, prevent_cse=params.get("prevent_cse", True), policy=params.get("policy")
        )
    )
    _interpret.higher_order_rules[P.closed_call_p] = _control_flow._call_rule(lambda fn, params: fn)


def jax_jit():
    import jax

    return jax.jit


def jax_checkpoint():
    import jax

    return jax.checkpoint


@mutant(
    "nested:box_not_frozen",
    "an inner transform's magic box keeps its derivative inside the outer one",
)
def _():
    _interpret = _modules()[0]
    rewrite(
        _interpret,
        "frozen_box_rule",
        "return Val(lax.stop_gradient(_graph.magic_box_p.bind(tau.value)))",
        "return Val(_graph.magic_box_p.bind(tau.value))",
    )


# -- Log-densities: the guards against numpyro's kinks ---------------------------------------


def _drop_guard(cls_name: str) -> None:
    import numpyro.distributions as dist

    from scgjax import _logprob

    _logprob._GUARDS.pop(getattr(dist, cls_name))
    _logprob._guarded_class.cache_clear()
    fired()


for _cls in (
    "BernoulliLogits",
    "BinomialLogits",
    "GeometricLogits",
    "NegativeBinomialLogits",
    "ZeroInflatedLogits",
):
    mutant(
        f"logprob:guard:{_cls}",
        f"{_cls} uses numpyro's log_prob (softplus kinks at logit 0)",
        tests=("tests/test_trust.py", "tests/test_exact.py"),
    )(lambda _cls=_cls: _drop_guard(_cls))


@mutant(
    "logprob:guard:components_skipped",
    "the guards follow `base_dist` only, not a mixture's components",
    tests=("tests/test_trust.py",),
)
def _():
    from scgjax import _logprob

    rewrite(
        _logprob,
        "_guarded",
        "        if isinstance(value, dist.Distribution):",
        '        if name == "base_dist" and isinstance(value, dist.Distribution):',
    )


@mutant(
    "axis:parents:vmapped_shape",
    "the alignment check reads a vmapped leaf's shape with its vmapped axes (variance only)",
    tests=("tests/test_trust.py",),
)
def _():
    _interpret = _modules()[0]
    rewrite(
        _interpret,
        "_elementwise_leaves",
        "shape = tuple(np.shape(value))[n_batch:]",
        "shape = tuple(np.shape(value))",
    )


# -- Sharding: the shard_map rule, varying types ------------------------------------------

SHARDING_TESTS = ("tests/test_sharding.py",)


def _shard_map_module():
    from scgjax import _shard_map

    return _shard_map


@mutant(
    "shard:lift:sharded_axis_kept",
    "lifted out of a shard_map, an entry on an axis that out_specs shards stays aligned",
    tests=SHARDING_TESTS,
)
def _():
    rewrite(
        _shard_map_module()._Lift,
        "deps",
        "return e if e.axis < len(dim_axes) and not dim_axes[e.axis] else ALL",
        "return e if e.axis < len(dim_axes) else ALL",
    )


@mutant(
    "shard:lift:concat_any_axes",
    "a concatenated node lines up with a value axis sharded over any mesh axes",
    tests=SHARDING_TESTS,
)
def _():
    rewrite(
        _shard_map_module()._Lift,
        "deps",
        "and dim_axes[first.axis] == self.manual",
        "and bool(dim_axes[first.axis])",
    )


@mutant(
    "shard:lift:own_lane_any_block",
    "a stacked node's shard axis lines up with a sharded value axis of any block size",
    tests=SHARDING_TESTS,
)
def _():
    rewrite(
        _shard_map_module()._Lift,
        "_lane_entry",
        "if axes == (m,) and shape[k] == 1:",
        "if axes == (m,):",
    )


@mutant(
    "shard:entry:cumulative_view",
    "a cumulative relation on a sharded axis enters the body as a view of the shard's block",
    tests=SHARDING_TESTS,
    equivalent=(
        "equivalent (the guard is a cover): inside the body a kind survives only ops that "
        "keep the order within the block (elementwise ops, cumulative ops of a compatible "
        "kind); reversals, permutations and shifts give ALL. Lifted out, a view lines up "
        "only with an axis sharded over the same mesh axes in the same order, so the "
        "blocks are in global order and a within-block `le` read globally covers every "
        "earlier block too (`test_samples_inside_shard_map_exact[_reversed_blocks_outside]`)"
    ),
)
def _():
    rewrite(
        _shard_map_module()._Views,
        "entering",
        'if view is None and e.kind == "eq" and not own:',
        "if view is None and not own:",
    )


@mutant(
    "shard:lift:view_any_block",
    "a view of a node drawn outside lines up with a sharded output axis of any block size",
    tests=SHARDING_TESTS,
    equivalent=(
        "equivalent (the check is a cover): an axis entry survives only ops that keep the "
        "axis's length, so the output axis a view's entry lands on has the input block's "
        "length; the check only matters if a rule ever aligns axes of different lengths"
    ),
)
def _():
    rewrite(_shard_map_module()._Lift, "deps", "and shape[e.axis] == block", "")


@mutant(
    "shard:keys:unchecked",
    "a draw whose key is the same on every shard is not refused",
    tests=SHARDING_TESTS,
)
def _():
    module = _shard_map_module()
    module._check_keys_vary = counted(lambda eqn, jaxpr, manual: None)


@mutant(
    "shard:vma:varying_gather",
    "the gathered terms (and τ) of a psum'd cost stay typed varying",
    tests=SHARDING_TESTS,
)
def _():
    compat = _modules()[4]
    rewrite(compat, "all_gather", "if invariant and", "if False and")


@mutant(
    "shard:vma:baseline_not_summed",
    "each shard's baseline terms join a psum'd cost unsummed",
    tests=SHARDING_TESTS,
)
def _():
    _graph = _modules()[2]
    rewrite(_graph, "dice_objective", "    if extra:", "    if False:")


# -- Estimators per site (issue 9) -----------------------------------------------------------

ENUM_TESTS = ("tests/test_enum.py",)
RELAXED_TESTS = ("tests/test_relaxed.py",)


def _estimator_modules():
    from scgjax import _enumerate, _estimators

    return _enumerate, _estimators


@mutant(
    "enum:weights:unnormalised",
    "an enumerated site's weights are its probabilities, not normalised over its "
    "alternatives (a site in a branch not taken weighs 1 per value)",
    tests=ENUM_TESTS,
)
def _():
    rewrite(
        _estimator_modules()[0],
        "site_weights",
        "w = jax.nn.softmax(lp, axis=s)",
        "w = jnp.exp(lp)",
    )


@mutant(
    "enum:plan:always_per_element",
    "every enumerated site is enumerated per element, also where a cost element "
    "depends on several of its elements",
    tests=ENUM_TESTS,
)
def _():
    rewrite(
        _estimator_modules()[0],
        "_plate_axes",
        "    return plates\n",
        "    return {k for k, size in enumerate(node.shape) if size != 1}\n",
    )


@mutant(
    "enum:weight:independent_term_counted_per_alternative",
    "a cost term that does not depend on an enumerated site is counted once per "
    "alternative (weight 1 instead of 1/R)",
    tests=ENUM_TESTS,
)
def _():
    rewrite(_estimator_modules()[0], "term_weight", "1.0 / size", "1.0")


@mutant(
    "enum:layout:site_axes_in_node_order",
    "per-element weights keep the site's axis order instead of the term's",
    tests=ENUM_TESTS,
)
def _():
    rewrite(
        _estimator_modules()[0],
        "_laid_out",
        "order = sorted(range(len(keep)), key=lambda i: keep[i][1])",
        "order = list(range(len(keep)))",
    )


@mutant(
    "relax:bernoulli:noise_not_conditioned",
    "the relaxed Bernoulli's uniform is conditioned on the opposite of the hard draw",
    tests=RELAXED_TESTS,
)
def _():
    rewrite(_estimator_modules()[1], "_relaxed", "jnp.where(hard > 0,", "jnp.where(hard <= 0,")


@mutant(
    "relax:categorical:top_not_truncating",
    "the categorical relaxation's other Gumbels are not truncated below the top one",
    tests=RELAXED_TESTS,
)
def _():
    rewrite(
        _estimator_modules()[1],
        "_relaxed",
        "-jnp.log(e / jnp.exp(log_theta) + e_top)",
        "-jnp.log(e / jnp.exp(log_theta))",
    )


@mutant(
    "relax:straight_through:relaxed_forward",
    "straight-through's forward value is the relaxed draw",
    tests=RELAXED_TESTS,
)
def _():
    rewrite(
        _estimator_modules()[1].StraightThrough,
        "sample",
        "_relaxed(d, key, sample_shape, self.temperature)[0]",
        "_relaxed(d, key, sample_shape, self.temperature)[1]",
    )


ALT_TESTS = ("tests/test_alternatives.py",)


def _weights_module():
    from scgjax import _weights

    return _weights


@mutant(
    "alt:disarm:sign",
    "DisARM's coefficient takes the opposite sign of (−1)^{b'}",
    tests=ALT_TESTS,
)
def _():
    rewrite(
        _estimator_modules()[1].DisARM,
        "alternatives",
        "jnp.where(b2, -1.0, 1.0)",
        "jnp.where(b2, 1.0, -1.0)",
    )


@mutant(
    "alt:arm:partner",
    "ARM's antithetic partner is 1[u > p] instead of 1[u > 1 − p] (a centring of u − ½ "
    "at another constant would be equivalent: both draws are Bernoulli(p), so a constant "
    "coefficient has expectation 0)",
    tests=ALT_TESTS,
)
def _():
    rewrite(_estimator_modules()[1].ARM, "alternatives", "u > 1 - p", "u > p")


@mutant(
    "alt:plan:one_at_a_time_coupled",
    "the measure-valued estimator's elements move all at once also where a cost "
    "depends on several of them",
    tests=ALT_TESTS,
)
def _():
    rewrite(
        _estimator_modules()[0],
        "_alternatives",
        "if not together or method.coupled:",
        "if True:",
    )


@mutant(
    "alt:weights:joint_not_summed",
    "a cost of several elements of a coupled site takes one element's weight, not the sum",
    tests=ALT_TESTS,
)
def _():
    rewrite(
        _estimator_modules()[0],
        "site_weights",
        "v + jnp.sum(jnp.reshape(lp, (lp.shape[0], -1)), axis=1)",
        "v + jnp.reshape(lp, (lp.shape[0], -1))[:, 0]",
    )


@mutant(
    "alt:mvd:base_weights_uniform",
    "the measure-valued costs are averaged over the alternatives instead of taken at the draw",
    tests=ALT_TESTS,
)
def _():
    rewrite(
        _estimator_modules()[1].MeasureValued,
        "base_weights",
        "np.eye(count)[0]",
        "np.full(count, 1.0 / count)",
    )


@mutant(
    "alt:mvd:normal_scale_coefficient",
    "the Normal's scale coefficient is 1/(2σ) instead of 1/σ",
    tests=ALT_TESTS,
)
def _():
    rewrite(
        _estimator_modules()[1].MeasureValued,
        "alternatives",
        "c_sigma = lax.stop_gradient(1.0 / sigma)",
        "c_sigma = lax.stop_gradient(0.5 / sigma)",
    )


@mutant(
    "alt:guard:second_order_allowed",
    "a second derivative through an alternatives site's parameters is taken, not refused",
    tests=ALT_TESTS,
)
def _():
    w = _weights_module()
    from jax.interpreters import ad

    def jvp(primals, tangents, *, what):
        dparam, coef, param = primals
        t = ad.instantiate_zeros(tangents[0])
        return w.scaled_p.bind(dparam, coef, param, what=what), coef * t

    ad.primitive_jvps[w.scaled_p] = counted(jvp)


@mutant(
    "alt:unordered_set:baseline_own_weight",
    "the unordered set's built-in baseline leaves out the draw's own p(s)·f(s)",
    tests=ALT_TESTS,
)
def _():
    rewrite(
        _estimator_modules()[1].UnorderedSet,
        "alternatives",
        "row.append(ps[..., r])",
        "row.append(jnp.zeros_like(ps[..., r]))",
    )


@mutant(
    "alt:unordered_set:ratio_not_renormalised",
    "R(S, s) uses p(S∖s) over the whole domain instead of over D∖s",
    tests=ALT_TESTS,
)
def _():
    rewrite(
        _estimator_modules()[1].UnorderedSet,
        "alternatives",
        "_log_set_prob(lp, rest[j], [s[j]]) - log_set",
        "_log_set_prob(lp, rest[j], []) - log_set",
    )


@mutant(
    "alt:score_wor:threshold_kth",
    "the without-replacement threshold κ is the k-th perturbed log-probability, not the (k+1)-th",
    tests=ALT_TESTS,
)
def _():
    rewrite(
        _estimator_modules()[1]._WithoutReplacement,
        "_top",
        "kappa = values[..., k]\n",
        "kappa = values[..., k - 1]\n",
    )


@mutant(
    "alt:wor:gumbels_not_truncated",
    "the without-replacement Gumbels below the draw's are not truncated below its own",
    tests=ALT_TESTS,
)
def _():
    rewrite(
        _estimator_modules()[1]._WithoutReplacement,
        "perturbed",
        "-jnp.log(e / jnp.exp(log_p) + e_top)",
        "-jnp.log(e / jnp.exp(log_p))",
    )


@mutant(
    "iwae:vimco:own_particle_in_baseline",
    "VIMCO's baseline of particle k keeps particle k's own log-weight (b_k = L)",
    tests=("tests/test_iwae.py",),
)
def _():
    import scgjax
    from scgjax import _multisample

    scgjax.iwae = rewrite(
        _multisample, "iwae", "others[:, None], lw[None, :]", "lw[None, :], lw[None, :]"
    )


@mutant(
    "iwae:tau:only_first_particle",
    "the bound's DiCE factor holds the first particle's log-probabilities only",
    tests=("tests/test_iwae.py",),
)
def _():
    import scgjax
    from scgjax import _multisample

    scgjax.iwae = rewrite(
        _multisample,
        "iwae",
        "_graph.magic_box(jnp.sum(tau)) * bound",
        "_graph.magic_box(tau[0]) * bound",
    )


# -- scg.draw (issue 10): the influence pass and the drawn edges -----------------------------

DRAW_TESTS = ("tests/test_draw.py",)


@mutant(
    "draw:influence:parents_pass_through",
    "a draw lets its parents' sources through (theta drawn into the costs behind x)",
    tests=DRAW_TESTS,
)
def _():
    _interpret = _modules()[0]
    rewrite(_interpret, "_influence", "_deps.scored_part(deps), Deps(", "deps, Deps(")


@mutant(
    "draw:influence:no_factor_sources",
    "a sample-free factor of a linear rule (theta * (z1 + z2), a discount) adds no source",
    tests=DRAW_TESTS,
)
def _():
    _deps = _modules()[1]
    rewrite(_deps, "with_sources", "extra = sources_of([v.deps for v in factors])", "extra = EMPTY")


@mutant(
    "draw:influence:decisions_read_sources",
    "the term decisions read the sources too (the influence pass splits the cost otherwise)",
    tests=DRAW_TESTS,
)
def _():
    _deps = _modules()[1]
    rewrite(_deps, "scored", "any(not is_source(k) for k in deps._map)", "bool(deps)")


@mutant(
    "draw:influence:key_is_a_parent",
    "a draw's key counts among its parameters (the key argument drawn into every node)",
    tests=DRAW_TESTS,
)
def _():
    _interpret = _modules()[0]
    rewrite(  # eval_equation reads the module's sample_rule when it runs
        _interpret,
        "sample_rule",
        "_influence(node_id, invals[1 : 1 + n_leaves], deps)",
        "_influence(node_id, invals[: 1 + n_leaves], deps)",
    )


@mutant(
    "draw:edges:weights_from_influence_pass",
    "dashed edges read from the influence pass's terms, coarsened (plates and time lost)",
    tests=DRAW_TESTS,
)
def _():
    from scgjax import _draw

    rewrite(
        _draw,
        "_build",
        "    for i, (d1, _) in enumerate(terms):\n        for node_id, label in _alignments(d1)",
        "    for i, (d1, _) in enumerate(influence.term_items()):\n"
        "        for node_id, label in _alignments(_split(d1)[0].coarsened())",
    )


@mutant(
    "draw:edges:pathwise_to_cost_dropped",
    "a pathwise draw's edges into the cost terms are dropped",
    tests=DRAW_TESTS,
)
def _():
    from scgjax import _draw

    rewrite(
        _draw,
        "_build",
        "        for src in sources:\n            for j in covered:",
        "        for src in [s for s in sources if not (s[0] == 'draw' and "
        "graph.nodes[s[1]].estimator != 'score')]:\n            for j in covered:",
    )


# -- scg.baselines.nvil (issue 9, item 5): learned baselines, centring, normalisation --------

NVIL_TESTS = ("tests/test_nvil.py",)


def _nvil_mutant(old, new):
    import scgjax
    from scgjax import _nvil

    scgjax.baselines.nvil = rewrite(_nvil, "nvil", old, new)


@mutant(
    "nvil:baseline_sign",
    "the baseline term enters with the wrong sign (Q̂ + b instead of Q̂ − b)",
    tests=NVIL_TESTS,
)
def _():
    _nvil_mutant(
        "extra = extra + _graph.baseline_term(lp, total)",
        "extra = extra - _graph.baseline_term(lp, total)",
    )


@mutant(
    "nvil:baseline_unscaled",
    "the baseline term keeps the unscaled log-probability (signal Q̂/s − b, not (Q̂ − b)/s)",
    tests=NVIL_TESTS,
)
def _():
    _nvil_mutant(
        "extra = extra + _graph.baseline_term(lp, total)",
        "extra = extra + _graph.baseline_term(graph.log_probs[node_id], total)",
    )


@mutant(
    "nvil:scale_inverted",
    "the learning signal is multiplied by the scale instead of divided",
    tests=NVIL_TESTS,
)
def _():
    _nvil_mutant(
        "(lp - lax.stop_gradient(lp)) / s",
        "(lp - lax.stop_gradient(lp)) * s",
    )


@mutant(
    "nvil:centre_not_subtracted",
    "the running mean is left out of the learning signal (unbiased, other estimate)",
    tests=NVIL_TESTS,
)
def _():
    _nvil_mutant(
        "total = centre[name] + b[name] if name in b else centre[name]",
        "total = b[name] if name in b else 0.0 * centre[name]",
    )


@mutant(
    "nvil:target_not_centred",
    "the regression target is Q̂ instead of Q̂ − c̄",
    tests=NVIL_TESTS,
)
def _():
    _nvil_mutant("target = q[name] - centre[name]", "target = q[name]")


@mutant(
    "nvil:var_from_residual",
    "the running variance tracks the uncentred residual Q̂ − b, not the signal Q̂ − b − c̄",
    tests=NVIL_TESTS,
)
def _():
    _nvil_mutant("a = r - c if center else r", "a = r")


# -- Running -------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    mutant: Mutant
    outcome: str  # killed | survived | timeout | error | stale
    by: str = ""  # the first failing test
    fired: bool = False
    seconds: float = 0.0


def _existing(tests) -> list[str]:
    return list(
        dict.fromkeys(t for t in tests if os.path.exists(os.path.join(ROOT, t.split("::")[0])))
    )


def run_one(m: Mutant, timeout: float, workers: str) -> Result:
    start = time.time()
    with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
        env = dict(
            os.environ,
            SCGJAX_MUTANT=m.name,
            SCGJAX_MUTANT_LOG=log.name,
            PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            *(["-n", workers] if workers != "0" else []),
            *_existing(m.tests),
        ]
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return Result(m, "timeout", "", True, time.time() - start)
        fired = any(int(x) > 0 for x in log.read().split() if x.strip().isdigit())
    out = proc.stdout + proc.stderr
    if "StaleMutant" in out:
        return Result(m, "stale", _last_line(out, "StaleMutant"), False, time.time() - start)
    failed = re.findall(r"^FAILED (\S+)", out, re.M)  # (-x under xdist exits with 2)
    errors = re.findall(r"^ERROR (\S+)", out, re.M)
    if proc.returncode == 0:
        outcome, by = "survived", ""
    elif failed:
        outcome, by = "killed", failed[0]
    else:  # the suite did not run: a crash at collection or in a worker (still noticed)
        outcome, by = "error", (errors or [_last_line(out, "Error")])[0]
    return Result(m, outcome, by, fired, time.time() - start)


def _last_line(out: str, marker: str) -> str:
    lines = [ln for ln in out.splitlines() if marker in ln and ln.strip()]
    return lines[-1].strip()[:160] if lines else ""


def table(results: list[Result]) -> str:
    rows = ["| mutant | breaks | result | killed by / why equivalent |", "|---|---|---|---|"]
    for r in results:
        m = r.mutant
        if r.outcome in ("killed", "timeout", "error"):
            verdict = r.outcome if not m.equivalent else f"{r.outcome} (marked equivalent!)"
            why = r.by.replace("tests/", "")
        elif m.equivalent:
            verdict, why = "equivalent", m.equivalent.removeprefix("equivalent: ")
        else:
            verdict = "**SURVIVED**" + ("" if r.fired else " (not reached)")
            why = "missing test"
        rows.append(f"| `{m.name}` | {m.what} | {verdict} | {why} |")
    killed = sum(r.outcome in ("killed", "timeout", "error") for r in results)
    equivalent = sum(1 for r in results if r.mutant.equivalent and r.outcome == "survived")
    live = len(results) - equivalent
    rate = 100.0 * killed / live if live else 100.0
    rows.append("")
    rows.append(
        f"{len(results)} mutants: {killed} killed, {equivalent} equivalent, "
        f"{live - killed} survived; kill rate {rate:.1f}% of the non-equivalent "
        "mutants."
    )
    return "\n".join(rows)


REBAR_TESTS = ("tests/test_rebar.py",)


@mutant(
    "rebar:control_sign",
    "REBAR's pathwise control-variate term enters with the wrong sign (−η at z)",
    tests=REBAR_TESTS,
)
def _():
    rewrite(
        _estimator_modules()[1].REBAR,
        "alternatives",
        "jnp.stack([zero, eta], -1)",
        "jnp.stack([zero, -eta], -1)",
    )


@mutant(
    "rebar:no_box_on_ztilde",
    "the control variate at z̃ is not weighted by ⊡(log p(b)) (its score term dropped)",
    tests=REBAR_TESTS,
)
def _():
    rewrite(
        _estimator_modules()[1].REBAR,
        "alternatives",
        "jnp.stack([lp, -eta], -1)",
        "jnp.stack([zero, -eta], -1)",
    )


@mutant(
    "rebar:ztilde_held",
    "z̃ is not differentiated through its conditional reparameterization (p held fixed)",
    tests=REBAR_TESTS,
)
def _():
    rewrite(
        _estimator_modules()[1].REBAR,
        "relaxations",
        "log_p, log_q = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)",
        "log_p, log_q = lax.stop_gradient(jax.nn.log_sigmoid(logits)), "
        "lax.stop_gradient(jax.nn.log_sigmoid(-logits))",
    )


@mutant(
    "rebar:joint_box_per_element",
    "elements that go together get the mean of their log-probabilities in ⊡, not the sum",
    tests=REBAR_TESTS,
)
def _():
    rewrite(
        _estimator_modules()[1].REBAR,
        "site_weight",
        "lp = jnp.sum(parts[..., 0], axis=axes, keepdims=True)",
        "lp = jnp.mean(parts[..., 0], axis=axes, keepdims=True)",
    )


@mutant(
    "rebar:relax_box_dropped",
    "RELAX's learned term at z̃ has no ⊡(log p(b)): the score part of its correction is lost",
    tests=REBAR_TESTS,
)
def _():
    rewrite(
        _estimator_modules()[1].RELAX,
        "extra_term",
        "box = magic_box(jnp.sum(lp))",
        "box = 1.0",
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="mutants (or prefixes ending in ':')")
    parser.add_argument("--list", action="store_true", help="list the mutants")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per mutant")
    parser.add_argument("-n", dest="workers", default="2", help="pytest-xdist workers (0: none)")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="first check that the selected tests pass without a mutant",
    )
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    chosen = [
        m
        for m in MUTANTS.values()
        if not args.names
        or any(m.name == n or (n.endswith(":") and m.name.startswith(n)) for n in args.names)
    ]
    if args.list:
        for m in chosen:
            print(f"{m.name:45s} {m.what}" + (" [equivalent]" if m.equivalent else ""))
        return 0
    if args.baseline:
        tests = _existing(dict.fromkeys(t for m in chosen for t in m.tests))
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-n",
                args.workers,
                *tests,
            ],
            cwd=ROOT,
        )
        if proc.returncode:
            print("baseline: the selected tests fail without a mutant")
            return 2
    results = []
    for i, m in enumerate(chosen):
        r = run_one(m, args.timeout, args.workers)
        results.append(r)
        print(
            f"[{i + 1}/{len(chosen)}] {m.name}: {r.outcome} {r.by} ({r.seconds:.0f}s"
            f"{', fired' if r.fired else ''})",
            flush=True,
        )
    report = table(results)
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report + "\n")
    live = [r for r in results if not (r.mutant.equivalent and r.outcome == "survived")]
    return 0 if all(r.outcome != "survived" for r in live) else 1


if __name__ == "__main__":
    sys.exit(main())

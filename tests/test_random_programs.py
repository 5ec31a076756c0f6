"""Random programs (hypothesis): every rule, in every composition, checked exactly.

Each example is a small random stochastic program (`random_programs.programs`: a tree of
operations compiled to Python source) whose score sites are Bernoulli with at most eight
joint elements. Two properties:

* `tests/exact.assert_exact`: the estimator's exact expectation (and the DiCE Hessian's)
  equals the gradient (Hessian) of the exact expectation in float64, by enumerating every
  joint draw. A wrong sign, a dropped term or a misaligned plate fails at once.
* When no score draw reaches the cost (its uses replaced by constants, the draws still
  made), `scg_grad(f)` is `jax.grad(f)` to the last bit, in float32 and float64.

The examples are fixed (`derandomize=True`); each test runs a small budget by default,
and `SCGJAX_HYPOTHESIS_EXAMPLES=2000` runs that many per test. A failure prints the
shrunk program as source, ready to paste into a test. `--hypothesis-show-statistics`
counts the examples and the features they used.

`SCGJAX_HYPOTHESIS_COLLECTIVES=1` also generates `lax.psum`/`lax.pmean` over the axis of a
`vmap` in the program (named-axis collectives).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st

import scgjax as scg

try:
    from . import exact
    from .random_programs import programs
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    import exact
    from random_programs import programs

EXAMPLES = int(os.environ.get("SCGJAX_HYPOTHESIS_EXAMPLES", "0"))
COLLECTIVES = os.environ.get("SCGJAX_HYPOTHESIS_COLLECTIVES") == "1"
# Under a mutant (tests/mutation.py) a failure only needs to be found, not shrunk.
PHASES = (
    (Phase.explicit, Phase.generate)
    if os.environ.get("SCGJAX_MUTANT")
    else (Phase.explicit, Phase.generate, Phase.shrink)
)
HESSIAN = st.integers(0, 2).map(lambda i: i == 2)  # a third of the examples

# A pathwise draw that reaches the cost through an operation without a derivative (a
# `to_int` of a Normal) makes scg_grad warn: its gradient there is biased. The identities
# checked here hold conditional on the pathwise noise (`tests/exact.py`) whatever the
# program does with it, so that warning is not this file's concern (tests/test_lint.py).
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*differentiates the program through the drawn value:scgjax.LostGradientWarning"
)


def budget(n: int):
    """Fixed examples: `n` of them, or `SCGJAX_HYPOTHESIS_EXAMPLES`."""
    return settings(
        max_examples=EXAMPLES or n,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=False,
        phases=PHASES,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


def check_exact(prog, hessian: bool) -> None:
    f = prog.compile()
    theta = jnp.asarray(prog.theta)
    for feature in sorted(prog.features):
        event(feature)
    event(f"hessian={hessian}")
    try:
        exact.assert_exact(f, theta, hessian=hessian)
    except AssertionError as err:
        if "degenerate test" not in str(err):
            raise
        # The exact gradient is zero: the estimator's expectation must be zero too.
        event("zero gradient")
        with jax.enable_x64(True):
            m = exact.exact_moments(
                f, jnp.asarray(prog.theta, jnp.float64), jax.random.key(0), hessian=False
            )
        np.testing.assert_allclose(np.asarray(m["est"]), np.asarray(m["grad"]), rtol=0, atol=1e-12)
    with jax.enable_x64(True):
        theta64, key = jnp.asarray(prog.theta, jnp.float64), jax.random.key(0)
        # (The interpreter keeps the traced program's value bit for bit; `f` run eagerly
        # can differ by an ulp where a jnp function compiled on its own lets XLA rewrite
        # x / 3 as x * (1/3).)
        np.testing.assert_allclose(
            scg.surrogate(f)(theta64, key),
            f(theta64, key),
            rtol=1e-13,
            atol=0,
            err_msg="the surrogate's value is the cost",
        )


@budget(6)
@given(programs(), HESSIAN)
def test_random_program_is_exact(prog, hessian):
    check_exact(prog, hessian)


@budget(5)
@given(programs(features={"scan", "jit"}), HESSIAN)
def test_random_loop_program_is_exact(prog, hessian):
    check_exact(prog, hessian)


@budget(3)
@given(programs(features={"cond", "jit", "checkpoint"}), HESSIAN)
def test_random_branching_program_is_exact(prog, hessian):
    check_exact(prog, hessian)


@budget(4)
@given(programs(features={"vmap"}), HESSIAN)
def test_random_vmap_program_is_exact(prog, hessian):
    check_exact(prog, hessian)


@budget(3)
@given(programs(features={"inner_grad"}))
def test_random_program_with_inner_scg_grad_is_exact(prog):
    check_exact(prog, hessian=False)


@pytest.mark.skipif(
    not COLLECTIVES,
    reason="named-axis collectives: set SCGJAX_HYPOTHESIS_COLLECTIVES=1 once they are supported",
)
@budget(15)
@given(programs(features={"vmap"}, collectives=True), HESSIAN)
def test_random_program_with_collectives_is_exact(prog, hessian):
    check_exact(prog, hessian)


@budget(12)
@given(programs(), st.booleans())
def test_no_score_reaching_the_cost_is_jax_grad_to_the_last_bit(prog, x64):
    """The program with every use of a score draw's value replaced by a constant: its
    draws still happen (inside loops, branches, vmaps, inner grads), but none reaches the
    cost, so there is no score term and the estimate is the pathwise gradient itself."""
    f = prog.compile(dead=True)
    note(prog.source(dead=True))
    event(f"x64={x64}")
    with jax.enable_x64(x64):
        theta, key = jnp.asarray(prog.theta), jax.random.key(1)
        # Both compiled: one XLA program each (op-by-op dispatch compiles every
        # primitive on its own, 5x the time); the same program, so the same bits.
        np.testing.assert_array_equal(
            jax.jit(scg.scg_grad(f))(theta, key), jax.jit(jax.grad(f))(theta, key)
        )
        np.testing.assert_allclose(
            jax.jit(scg.surrogate(f))(theta, key),
            jax.jit(f)(theta, key),
            rtol=1e-6 if not x64 else 1e-13,
            atol=0,
        )


# -- Regressions: programs the random tests found, shrunk -----------------------------------


def test_constants_inside_a_jit_next_to_a_draw():
    """The key-reuse check read the sub-jaxpr of a `jit` without its constants (the index
    array here) and failed with a KeyError on every program with an array constant inside
    a jit that draws."""

    def f(theta, key):
        ks = jax.random.split(key, 1)

        def _jit2(theta, ks):
            t3 = theta[np.array([0, 1])].sum()
            return scg.sample(ks[0], dist.Bernoulli(logits=t3), name="z1").astype(theta.dtype)

        return jax.jit(_jit2)(theta, ks) * theta[2]

    exact.assert_exact(f, jnp.array([0.3, -0.5, 0.8]))

"""Suite-wide settings: warnings are errors (pyproject's filterwarnings) and a key fixture
that covers both key flavours. (`jax_numpy_rank_promotion="raise"` is not set: numpyro's
own samplers rely on rank promotion.)

Every test process has four CPU devices (`--xla_force_host_platform_device_count=4`, set
before JAX starts), so the sharding tests run meshes on any machine; a test that does not
build a mesh runs on the default device as before.

With `SCGJAX_MUTANT=<name>` the suite runs against a deliberately broken scgjax (one rule
mutated, see tests/mutation.py and tests/MUTATION.md), in every xdist worker."""

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=4".strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

# The longest tests (the random-program property tests, the example scripts) first: with
# two xdist workers, one of them starting last leaves the other core idle for minutes.
_FIRST = ("tests/test_random_programs.py::", "tests/test_examples.py::")


def pytest_collection_modifyitems(config, items):
    del config
    items.sort(key=lambda item: not item.nodeid.startswith(_FIRST))  # stable


MUTANT = os.environ.get("SCGJAX_MUTANT")
if MUTANT:
    import mutation

    mutation.apply(MUTANT)


def pytest_sessionfinish(session, exitstatus):
    if MUTANT:
        mutation.report_fired(os.environ.get("SCGJAX_MUTANT_LOG"))


@pytest.fixture(params=["typed", "legacy"])
def any_key(request):
    """A typed key (`jax.random.key`) and a legacy `uint32[2]` key (`PRNGKey`)."""
    if request.param == "typed":
        return jax.random.key(0)
    return jax.random.PRNGKey(0)

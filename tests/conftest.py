"""Suite-wide settings: warnings are errors (pyproject's filterwarnings) and a key fixture
that covers both key flavours. (`jax_numpy_rank_promotion="raise"` is not set: numpyro's
own samplers rely on rank promotion.)"""

import jax
import pytest


@pytest.fixture(params=["typed", "legacy"])
def any_key(request):
    """A typed key (`jax.random.key`) and a legacy `uint32[2]` key (`PRNGKey`)."""
    if request.param == "typed":
        return jax.random.key(0)
    return jax.random.PRNGKey(0)

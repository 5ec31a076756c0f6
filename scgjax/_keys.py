"""Key reuse: two random draws from one PRNG key are refused at trace time.

(Skeleton: filled in by the key-reuse work of issue 6.)
"""

from __future__ import annotations

from typing import Any


def check_key_reuse(jaxpr: Any) -> None:
    """Raises a `ValueError` naming both source lines when two draws of the traced
    program (`jaxpr`, the open top-level jaxpr) consume the same key."""
    del jaxpr

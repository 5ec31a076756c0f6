"""Trace-time checks for programs that scgjax cannot estimate as written.

(Skeleton: filled in by the lost-gradient / moving-support work of issue 6.)
"""

from __future__ import annotations

from typing import Any, Sequence


class LostGradientWarning(UserWarning):
    """A PRNG draw that bypasses `scgjax.sample` meets a differentiable path from a
    differentiated input in a non-differentiable operation: its gradient is lost."""


def differentiated_inputs(leaves: Sequence[Any]) -> list[bool]:
    """For each traced input leaf, whether it is being differentiated."""
    return [False] * len(leaves)


def check_program(closed_jaxpr: Any, differentiated: Sequence[bool]) -> None:
    """Warns (`LostGradientWarning`) or raises for a program whose gradient scgjax
    cannot estimate as written."""
    del closed_jaxpr, differentiated

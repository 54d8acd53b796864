"""The monitoring package's errors, in a module of their own.

They derive from a built-in exception as well as :class:`CsosError`; a class
with two built-in bases cannot be compiled by mypyc, so they live outside the
compiled modules (README "Performance", compiled monitor).
"""
from __future__ import annotations

from streams.core.errors import CsosError


class RiverStateError(CsosError, RuntimeError):
    """river's internal state is not laid out as this module expects (river upgrade?)."""
    code = "RIVER_STATE"


class StateVersionError(CsosError, ValueError):
    """The stored state has a version this code cannot read or migrate."""
    code = "STATE_VERSION"

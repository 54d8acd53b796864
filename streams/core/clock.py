"""The wall clock the pipeline stamps its records with, in one never-compiled module.

Why a module of its own: the processors and the emitter are compiled with mypyc
(``streams.core.native``), and a compiled module's globals cannot be patched. Callers
look the function up here at call time (``clock.utcnow()``), so a test, or
``bench_worker --digest`` with its fixed clock, patches ``streams.core.clock.utcnow``
once and every stamp follows. Never add this module to ``native.COMPILED``.
"""
from __future__ import annotations

from datetime import datetime, timezone


def utcnow() -> datetime:
    """Now, as an aware UTC datetime."""
    return datetime.now(timezone.utc)

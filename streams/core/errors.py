"""The one root of the project's errors: each carries a stable code, and the CLI reports them in one place.

Why a root: callers (the CLI, the sink's /sql, an operator's log search) need to tell "the input or the
configuration is wrong, here is why" from a bug. Every error class the project raises on purpose derives
from :class:`CsosError` (besides the builtin it always was, e.g. ``ValueError``, so existing ``except``
clauses keep working), names a stable ``code`` (what a log search or a script matches on, unchanged when
the wording of a message changes) and an ``exit_code`` for the CLI. ``streams.cli.root`` turns any
``CsosError`` that reaches it into ``error [CODE]: message`` on stderr and that exit code.
"""
from __future__ import annotations

from typing import ClassVar

#: Exit codes of the ``csos`` command: 1 an operation failed on its input or data, 2 the configuration or
#: the command line is wrong (click's own usage errors exit 2 too).
EXIT_FAILED = 1
EXIT_CONFIG = 2


class CsosError(Exception):
    """Root of the project's deliberate errors; subclasses set ``code`` (stable) and ``exit_code``."""

    code: ClassVar[str] = "CSOS_ERROR"
    exit_code: ClassVar[int] = EXIT_FAILED

    def report(self) -> str:
        """The one-line form the CLI prints: ``[CODE] message``."""
        message = str(self).strip() or self.__class__.__name__
        return f"[{self.code}] {message}"


class ConfigError(CsosError):
    """A setting (environment variable, key, file) is missing or malformed: fix the configuration."""

    code = "CONFIG"
    exit_code = EXIT_CONFIG

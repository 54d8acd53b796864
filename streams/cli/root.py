"""The ``csos`` group itself: logging, settings, and the one place where an error becomes a message and an exit code.

Command modules (``streams.cli.pipeline``, ``.data``, ...) import ``settings`` from here and never each other;
``streams.cli`` adds their commands to ``main``.
"""
from __future__ import annotations

import logging
from typing import Any

import click

from streams.core.config import Settings
from streams.core.errors import CsosError


def settings() -> Settings:
    """This process's settings, read from the environment when a command runs (never at import)."""
    return Settings.from_env()


class _Csos(click.Group):
    """The one place where an error becomes a message and an exit code: any :class:`CsosError` that a command
    does not handle itself is printed as ``error [CODE]: message`` with the error's exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CsosError as exc:
            click.echo(f"error {exc.report()}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=_Csos, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log debug output.")
def main(verbose: bool) -> None:
    """Receive signed CSOS orders, verify them, and hold suspicious ones before they ship.

    Configuration comes from environment variables (KAFKA_BOOTSTRAP, CLICKHOUSE_URL,
    CSOS_DATA_DIR, ...); see the README.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:  # librdkafka reports transient broker states (e.g. coordinator loading) as warnings
        logging.getLogger("connectors.kafka.io.librdkafka").setLevel(logging.ERROR)

"""``csos review``: the review page for held orders, and its users.
"""
from __future__ import annotations

import logging

import click

from streams.cli.root import settings


@click.group(invoke_without_command=True)
@click.pass_context
def review(ctx: click.Context) -> None:
    """Serve the review page for held orders on 127.0.0.1:CSOS_REVIEW_PORT (default 6068).

    Users come from CSOS_REVIEW_USERS (default $CSOS_DATA_DIR/review-users.json; create them with
    `csos review add-user`); session cookies are sealed with CSOS_REVIEW_SECRET (`csos review
    new-secret` makes one). Analysts may release, report or cancel; viewers may only read.
    """
    if ctx.invoked_subcommand is not None:
        return
    from streams.apps.review.server import run_review
    from streams.apps.review.web import ReviewConfig

    logging.getLogger().setLevel(logging.INFO)
    s = settings()
    try:
        config = ReviewConfig.from_env(s)
        run_review(s, config)
    except ValueError as exc:  # e.g. a CSOS_REVIEW_SECRET that is not a Fernet key
        raise click.ClickException(f"{exc} (make a key with `csos review new-secret`)") from None


def _review_store():
    from streams.apps.review.auth import UserStore
    from streams.apps.review.web import users_path

    return UserStore(users_path(settings()))


@review.command("add-user")
@click.argument("name")
@click.option("--role", type=click.Choice(["analyst", "viewer"]), required=True,
              help="analyst: may release, report and cancel; viewer: read only.")
def review_add_user(name: str, role: str) -> None:
    """Create NAME (or replace its role and password). The password comes from CSOS_REVIEW_PASSWORD, else a prompt."""
    from streams.apps.review.auth import UserError

    password = settings().review.password or click.prompt(
        f"Password for {name}", hide_input=True, confirmation_prompt=True)
    store = _review_store()
    try:
        store.add(name, role, password)
    except UserError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{name} ({role}) saved in {store.path}")


@review.command("remove-user")
@click.argument("name")
def review_remove_user(name: str) -> None:
    """Remove NAME; a logged-in session of NAME ends at its next request."""
    store = _review_store()
    if not store.remove(name):
        raise click.ClickException(f"no user {name} in {store.path}")
    click.echo(f"{name} removed from {store.path}")


@review.command("users")
def review_users() -> None:
    """List the users and their roles."""
    for name, role in sorted(_review_store().users().items()):
        click.echo(f"{name}\t{role}")


@review.command("new-secret")
def review_new_secret() -> None:
    """Print a new key for CSOS_REVIEW_SECRET (Fernet: 32 random bytes, URL-safe base64)."""
    from cryptography.fernet import Fernet

    click.echo(Fernet.generate_key().decode("ascii"))


#: The top-level commands of this module, added to ``csos`` by ``streams.cli``.
COMMANDS = [review]

"""``csos`` commands for after the fact: the tamper-evident audit trail and the offline re-verification of
one order.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from streams.cli.root import settings


@click.group()
def audit() -> None:
    """The tamper-evident audit trail: every audit event is hash-chained as the sink stores it."""


@audit.command("verify")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (it doubles as an --anchors file).")
@click.option("--anchors", "anchors_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON from an earlier `csos audit verify --json`: each chain must still hold that head hash.")
@click.option("--allow-unsealed", is_flag=True, help="Do not count rows written before chaining as problems.")
@click.option("--chain", "chains", multiple=True, help="Check only this chain, e.g. audit.events/0 (repeatable).")
@click.option("--page-size", default=10_000, show_default=True, help="Events per query.")
@click.option("--key-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Keys for keyed chains, one per line (hex or base64; # comments), in addition to "
                   "CSOS_AUDIT_KEY and CSOS_AUDIT_OLD_KEYS.")
@click.option("--allow-unkeyed", is_flag=True,
              help="With keys: accept events sealed without a key before a chain's first keyed event.")
def audit_verify(as_json: bool, anchors_file: str | None, allow_unsealed: bool, chains: tuple[str, ...],
                 page_size: int, key_file: str | None, allow_unkeyed: bool) -> None:
    """Check every audit chain in ClickHouse; report each gap, edit, reordering or duplicate (exit 1 if any).

    Prints per chain the events checked, the seq and Kafka offset range, the
    ids of the keys that sealed it and the head hash. Keep the head hashes
    outside ClickHouse (e.g. save --json) and pass them back with --anchors:
    that also catches a rewritten or truncated chain. Keyed events are checked
    with the key they name (CSOS_AUDIT_KEY, CSOS_AUDIT_OLD_KEYS, --key-file):
    one whose key is not given is UNVERIFIABLE; with keys, one sealed without
    a key is UNKEYED. Reads like `csos sql`: through the running sink, else read-only.
    """
    from connectors.clickhouse.audit_chain import AuditKeyError, KeyRing, load_anchors, render, verify_store

    from connectors.clickhouse.query import open_reader

    config = settings()
    try:
        keys = KeyRing.from_settings(config, Path(key_file).read_text() if key_file else "")
    except AuditKeyError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    anchors = load_anchors(json.loads(Path(anchors_file).read_text())) if anchors_file else None
    try:
        with open_reader(config) as read:
            report = verify_store(lambda sql: read(sql)[1], anchors=anchors, page_size=page_size,
                                  allow_unsealed=allow_unsealed, only=chains, keys=keys, allow_unkeyed=allow_unkeyed)
    except Exception as exc:  # noqa: BLE001 - store unreachable or locked: say so, exit 2
        click.echo(f"Error: cannot read the audit trail: {str(exc).strip().splitlines()[0]}", err=True)
        sys.exit(2)
    click.echo(json.dumps(report.to_json(), indent=1) if as_json else render(report))
    sys.exit(0 if report.ok else 1)


@audit.command("new-key")
def audit_new_key() -> None:
    """Print a new key for CSOS_AUDIT_KEY (32 random bytes as 64 hex digits); its key id goes to stderr.

    Keep it in your secret store, not in ClickHouse or the repository. To
    rotate: move the current key to CSOS_AUDIT_OLD_KEYS (verifiers only),
    set the new one and restart the sink.
    """
    from connectors.clickhouse.audit_chain import AuditKey, new_key

    key = new_key()
    click.echo(key)
    click.echo(f"key id: {AuditKey.parse(key).key_id}", err=True)


@click.command("verify-offline")
@click.option("--document", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The order document (omit when the signature carries it).")
@click.option("--signature", type=click.Path(exists=True, dir_okay=False), default=None, help="CMS SignedData (DER).")
@click.option("--certificate", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Instead of an order: judge this certificate (DER or PEM) alone, path, validity and "
                   "revocation at --received-at.")
@click.option("--trust", "trust_dir", type=click.Path(exists=True, file_okay=False), required=True,
              help="Trust anchors (root*.pem) and intermediates (*.pem), or a PKI directory with trust/.")
@click.option("--crl", "crls", type=click.Path(exists=True, dir_okay=False), multiple=True,
              help="CRL current at receipt (repeatable): the sub-CA's and the root's.")
@click.option("--received-at", required=True, help="When the order was received (ISO 8601, UTC if no zone).")
@click.option("--format", "fmt", type=click.Choice(["csos-order/1", "x12-850"]), default="csos-order/1",
              show_default=True)
@click.option("--products", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Product master CSV (default CSOS_PRODUCTS).")
def verify_offline(document: str | None, signature: str | None, certificate: str | None, trust_dir: str,
                   crls: tuple[str, ...], received_at: str, fmt: str, products: str | None) -> None:
    """Re-verify one order offline and print every check with its result (exit 1 if invalid).

    Whatever the files hold, it prints a report (unusable CRLs and certificates as
    "refused" lines) or a one-line error, exit status 2; never a traceback.
    """
    from datetime import datetime, timezone

    from streams.apps.offline_verify import check_certificate_offline, render, render_certificate, reverify

    if (signature is None) == (certificate is None):
        raise click.UsageError("give --signature (an order) or --certificate (a certificate alone)")
    try:
        at = datetime.fromisoformat(received_at)
    except ValueError:
        raise click.BadParameter(f"{received_at!r} is not an ISO 8601 time", param_hint="--received-at") from None
    at = at if at.tzinfo else at.replace(tzinfo=timezone.utc)
    try:
        if certificate is not None:
            finding, refusals = check_certificate_offline(Path(certificate).read_bytes(), Path(trust_dir),
                                                          [Path(c) for c in crls], at)
            click.echo(render_certificate(finding, refusals, at=at))
            sys.exit(0 if finding.ok else 1)
        outcome = reverify(Path(document).read_bytes() if document else None, Path(signature).read_bytes(),
                           Path(trust_dir), [Path(c) for c in crls],
                           Path(products) if products else settings().products_path, at, fmt)
    except Exception as exc:  # noqa: BLE001 - any input gives a one-line error, never a traceback
        lines = str(exc).strip().splitlines()
        error = click.ClickException(f"cannot verify: {lines[0] if lines else exc.__class__.__name__}")
        error.exit_code = 2  # 1 means "verified: invalid"
        raise error from None
    click.echo(render(outcome, received_at=at))
    sys.exit(0 if outcome.ok else 1)


#: The top-level commands of this module, added to ``csos`` by ``streams.cli``.
COMMANDS = [audit, verify_offline]

"""``csos pki``: the test PKI (TEST ONLY, not DEA's): a root CA, a CSOS sub-CA, registrant certificates and
their CRL.
"""
from __future__ import annotations

import click

from streams.cli.root import settings


@click.group()
def pki() -> None:
    """A CSOS-like test PKI: root CA, CSOS sub-CA, registrant certificates, CRL (TEST ONLY, not DEA's)."""


@pki.command("init")
@click.option("--force", is_flag=True, help="Replace an existing PKI in CSOS_PKI_DIR.")
def pki_init(force: bool) -> None:
    """Create a root CA and a CSOS sub-CA with an empty CRL in CSOS_PKI_DIR."""
    from streams.tools.pki import TestPKI

    s = settings()
    if (s.pki_dir / "trust" / "root.pem").exists() and not force:
        raise click.ClickException(f"a PKI already exists in {s.pki_dir}; pass --force to replace it")
    TestPKI.create(s.pki_dir)
    click.echo(f"test PKI written to {s.pki_dir} (trust/root.pem is the trust anchor, crl/ the CRL)")


@pki.command("issue")
@click.option("--dea", "dea_number", required=True, help="The registrant's DEA number.")
@click.option("--name", required=True, help="Subscriber / registrant name.")
@click.option("--schedules", default="2,2N,3,3N,4,5", show_default=True, help="Authorized schedules, comma-separated.")
@click.option("--days", default=365, show_default=True, help="Validity in days from now.")
@click.option("--key-type", type=click.Choice(["rsa", "ec"]), default="rsa", show_default=True)
def pki_issue(dea_number: str, name: str, schedules: str, days: int, key_type: str) -> None:
    """Issue a registrant certificate carrying the DEA number and schedules in the configured extensions."""
    from datetime import datetime, timedelta, timezone

    from streams.tools.pki import load_pki

    from streams.domain.identifiers import is_valid_dea_number

    if not is_valid_dea_number(dea_number):
        raise click.ClickException(f"{dea_number} is not a valid DEA number (format or check digit)")
    s = settings()
    p = load_pki(s.pki_dir)
    now = datetime.now(timezone.utc)
    cred = p.issue_registrant(dea_number, name, [x.strip() for x in schedules.split(",") if x.strip()],
                              not_before=now - timedelta(minutes=5), not_after=now + timedelta(days=days),
                              key_type=key_type)
    p.write_pki(s.pki_dir)
    click.echo(f"issued serial {cred.serial:x} to {dea_number}: {s.pki_dir / 'registrants' / dea_number}")


@pki.command("revoke")
@click.option("--dea", "dea_number", required=True, help="Revoke this registrant's certificate.")
def pki_revoke(dea_number: str) -> None:
    """Revoke a registrant certificate and publish a new CRL file (workers read CRLs at start)."""
    from streams.tools.pki import load_pki

    s = settings()
    p = load_pki(s.pki_dir)
    cred = p.registrants.get(dea_number)
    if cred is None:
        raise click.ClickException(f"no certificate for {dea_number} in {s.pki_dir}")
    p.revoke(cred.serial)
    p.write_pki(s.pki_dir)
    click.echo(f"revoked serial {cred.serial:x} ({dea_number}); CRL rewritten in {s.pki_dir / 'crl'}")


#: The top-level commands of this module, added to ``csos`` by ``streams.cli``.
COMMANDS = [pki]

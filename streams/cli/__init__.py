"""``csos``: one entry point for operators, analysts and the demo.

Every subcommand reads the same environment (see ``streams.core.config``), so a
deployment is configured once; ``csos <command> --help`` explains each.

One module per command group, each importing only ``streams.cli.root`` (the
group, settings, error reporting) and the layers below:

* ``pipeline``: broker, topics, acls, worker, sink
* ``pki``: the test PKI
* ``data``: crl, registrants, simulate, demo, replay-arcos, archive, warehouse
* ``reports``: sql, summary, reports
* ``audit``: audit, verify-offline
* ``review``: the review page and its users
* ``evaluate``: evaluate, peers
* ``bench``: bench, bench-monitor, bench-verify, bench-dashboards, chaos, hostile
"""
from __future__ import annotations

from streams.cli import audit, bench, data, evaluate, pipeline, pki, reports, review
from streams.cli.root import main

for _module in (pipeline, pki, data, reports, audit, review, evaluate, bench):
    for _command in _module.COMMANDS:
        main.add_command(_command)

__all__ = ["main"]

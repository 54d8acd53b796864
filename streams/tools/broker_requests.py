"""Which clients load the broker: requests per second per client and request type, from its request log.

Why: the local broker's CPU follows the number of requests its clients send,
not the number of orders (issue 14); this counts them so a change to a
client's settings can be judged by the requests it saves. The broker writes
the log when started with ``KAFKA_LOG4J_CONFIG=deploy/kafka/log4j2-requests.properties``
(one JSON line per completed request; logging them costs the broker CPU, so
never measure CPU in the same run).

    python -m streams.tools.broker_requests var/bench/kafka/logs/requests.log [--from MS] [--to MS]

A client is one connection; librdkafka clients all call themselves ``rdkafka``, so each connection is
labelled by its client id with the consumer group and the topics its requests name.
"""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click

_LINE = re.compile(r"^\[(\d+)\] Completed request:(.*)$")


@dataclass
class Request:
    """One completed request: when (broker clock, ms), which connection and client, which API."""

    at_ms: int
    connection: str
    client_id: str
    api: str
    group: str | None
    topics: frozenset[str]


def _topics(body: dict) -> frozenset[str]:
    names: set[str] = set()
    for key in ("topics", "topicData"):
        for item in body.get(key) or []:
            if isinstance(item, dict) and item.get("name"):
                names.add(item["name"])
    return frozenset(names)


def parse(lines: Iterable[str]) -> Iterator[Request]:
    """The requests in a request log's lines (lines that are not completed requests are skipped)."""
    for line in lines:
        m = _LINE.match(line)
        if not m:
            continue
        try:
            desc = json.loads(m.group(2))
        except json.JSONDecodeError:
            continue
        header, body = desc.get("requestHeader", {}), desc.get("request") or {}
        yield Request(int(m.group(1)), str(desc.get("connection", "?")).rsplit("-", 2)[0],
                      str(header.get("clientId")), str(header.get("requestApiKeyName")),
                      body.get("groupId"), _topics(body))


@dataclass
class Client:
    """What one connection sent: counts per API, and what names it (its group, its topics)."""

    client_id: str
    apis: Counter = field(default_factory=Counter)
    groups: set[str] = field(default_factory=set)
    topics: set[str] = field(default_factory=set)

    def label(self) -> str:
        group = ",".join(sorted(self.groups)) or "-"
        topics = sorted(self.topics)
        shown = ",".join(topics[:3]) + (f",+{len(topics) - 3}" if len(topics) > 3 else "")
        return f"{self.client_id} group={group} topics={shown or '-'}"


def tally(requests: Iterable[Request], start_ms: int | None = None,
          end_ms: int | None = None) -> tuple[dict[str, Client], float]:
    """Per connection, the requests between ``start_ms`` and ``end_ms``; and the seconds they span."""
    clients: dict[str, Client] = {}
    first = last = None
    for r in requests:
        if (start_ms is not None and r.at_ms < start_ms) or (end_ms is not None and r.at_ms > end_ms):
            continue
        first = r.at_ms if first is None else first
        last = r.at_ms
        c = clients.setdefault(r.connection, Client(r.client_id))
        c.apis[r.api] += 1
        if r.group:
            c.groups.add(r.group)
        c.topics |= r.topics
    span = ((end_ms or last or 0) - (start_ms or first or 0)) / 1000.0
    return clients, max(span, 1e-9)


def report(clients: dict[str, Client], seconds: float, min_rate: float = 0.05) -> list[str]:
    """Lines: requests/s per client label and API, busiest first; then totals per API."""
    per_label: dict[str, Counter] = defaultdict(Counter)
    for c in clients.values():
        per_label[c.label()].update(c.apis)
    out = [f"{seconds:.0f} s, {sum(sum(c.values()) for c in per_label.values()) / seconds:.1f} requests/s"]
    for label, apis in sorted(per_label.items(), key=lambda kv: -sum(kv[1].values())):
        rates = ", ".join(f"{api} {n / seconds:.1f}" for api, n in apis.most_common() if n / seconds >= min_rate)
        out.append(f"  {sum(apis.values()) / seconds:6.1f}/s  {label}: {rates}")
    totals: Counter = Counter()
    for apis in per_label.values():
        totals.update(apis)
    out.append("  per API: " + ", ".join(f"{api} {n / seconds:.1f}" for api, n in totals.most_common()))
    return out


@click.command()
@click.argument("log", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--from", "start_ms", type=int, default=None, help="Broker clock, ms since the epoch.")
@click.option("--to", "end_ms", type=int, default=None, help="Broker clock, ms since the epoch.")
def main(log: Path, start_ms: int | None, end_ms: int | None) -> None:
    """Print requests per second per client and request type from a broker request log."""
    with log.open(errors="replace") as fh:
        clients, seconds = tally(parse(fh), start_ms, end_ms)
    for line in report(clients, seconds):
        click.echo(line)


if __name__ == "__main__":
    main()

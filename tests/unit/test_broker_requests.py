"""Which clients load the broker (issue 14): the request log is counted per connection and request type,
and the sink's fetch lets the broker gather a batch instead of answering every new record."""
from __future__ import annotations

import json

from streams.core.config import Settings
from streams.pipeline.sink_service import sink_fetch_config
from streams.tools.broker_requests import parse, report, tally


def _line(at_ms: int, api: str, client: str, port: int, request: dict) -> str:
    desc = {"requestHeader": {"requestApiKeyName": api, "clientId": client},
            "request": request, "connection": f"127.0.0.1:9092-127.0.0.1:{port}-0-1"}
    return f"[{at_ms}] Completed request:{json.dumps(desc)}\n"


def test_requests_are_counted_per_connection_and_api_within_the_window() -> None:
    lines = [
        "[1000] some other log line\n",
        _line(1000, "FETCH", "rdkafka", 5001, {"topics": [{"name": "a"}], "groupId": None}),
        _line(1500, "FETCH", "rdkafka", 5001, {"topics": []}),
        _line(1500, "OFFSET_COMMIT", "rdkafka", 5001, {"groupId": "sink", "topics": [{"name": "a"}]}),
        _line(2000, "PRODUCE", "rdkafka", 5002, {"topicData": [{"name": "b"}]}),
        _line(9000, "PRODUCE", "rdkafka", 5002, {"topicData": [{"name": "b"}]}),  # after the window
    ]
    clients, seconds = tally(parse(lines), 1000, 3000)
    assert seconds == 2.0
    sink = next(c for c in clients.values() if "sink" in c.groups)
    assert dict(sink.apis) == {"FETCH": 2, "OFFSET_COMMIT": 1}
    assert sink.label() == "rdkafka group=sink topics=a"
    out = report(clients, seconds)
    assert out[0] == "2 s, 2.0 requests/s"
    assert "FETCH 1.0, OFFSET_COMMIT 0.5" in out[1]
    assert out[-1].endswith("FETCH 1.0, OFFSET_COMMIT 0.5, PRODUCE 0.5")


def test_the_sinks_fetch_waits_at_the_broker_for_its_batch_window() -> None:
    conf = sink_fetch_config(Settings(sink_batch_seconds=0.25))
    assert conf["fetch.wait.max.ms"] == 250
    assert conf["fetch.min.bytes"] >= 64 * 1024  # not librdkafka's 1: one record no longer answers the fetch

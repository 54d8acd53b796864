"""Session-wide real infrastructure: one Kafka broker (KRaft, from Maven Central) per test session.

The broker runs on free ports with a temporary data directory, so the suite
neither needs nor disturbs a developer's broker on 9092.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from connectors.broker import LocalBroker, free_port
from connectors.topics import ensure_topics


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    b = LocalBroker(port=free_port(), data_dir=tmp_path_factory.mktemp("kafka"), controller_port=free_port())
    b.start(timeout=180)
    try:
        ensure_topics(b.bootstrap)
        yield b
    finally:
        b.stop()

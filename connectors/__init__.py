"""The I/O edges: Kafka (``kafka``: topic catalogue, producer/consumer, emit), ClickHouse (``clickhouse``: client,
query, sink writer, audit chain) and the sources that bring data in (``sources``: intake, reference data, ARCOS).

``streams.core.native`` runs first: it decides whether the mypyc-compiled modules (setup.py) or their
sources are imported.
"""
from streams.core import native  # before any module it may compile

__all__ = ["native"]

"""The topic catalogue is the one contract of the topics: every schema it names exists, and the code obeys it."""
from __future__ import annotations

import pytest

from connectors.kafka import catalogue
from connectors.kafka.emit import Emitter
from connectors.kafka.testing import MemoryPublisher
from streams.core.avro_codec import default_codec
from streams.pipeline import sink_service


def test_every_topic_names_an_avro_record_and_a_key() -> None:
    codec = default_codec()
    for spec in catalogue.TOPICS:
        codec.catalog.get(spec.schema)  # raises for a record not in schemas/avro
        assert spec.key, f"{spec.name}: the catalogue must say what the key is"
    assert len(catalogue.BY_NAME) == len(catalogue.TOPICS)  # no topic listed twice


def test_the_sink_stores_exactly_the_catalogues_sunk_topics_with_their_schemas() -> None:
    assert sink_service.EXPECTED == {s.name: s.schema for s in catalogue.TOPICS if s.sunk}
    assert catalogue.RECEIVED in sink_service.EXPECTED  # the order archive


def test_a_record_of_another_schema_is_refused_on_a_catalogue_topic() -> None:
    publisher = MemoryPublisher()
    emitter = Emitter(publisher, "test")
    with pytest.raises(ValueError, match="som.Hold"):
        emitter.send(catalogue.HOLD, "som.Release", "o-1", {})
    assert publisher.messages == []


def test_the_readmes_topic_table_says_what_the_catalogue_says() -> None:
    """README "Topics and schemas" is the users' copy of the catalogue: same topics, same records."""
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Topics and schemas"):readme.index("### Delivery after a crash")]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 4:
            rows[cells[0].strip("`")] = cells[2].split("`")[1]
    for spec in catalogue.TOPICS:
        assert rows.get(spec.name) == spec.schema, f"README's row for {spec.name}"

"""The processor interface: what an agent's processor takes, decides and owns.

An agent loop (``streams.pipeline.app``) hands its processor one
``InputMessage`` at a time inside a batch::

    proc.begin_batch()
    for message in batch:
        proc.handle(message)          # decide: state in its cache, outputs buffered in its emitter
    proc.end_batch()                  # changed state into the table; the loop then makes it durable, then publishes

A processor owns its counters (``counts``, shown on ``/health``) and its
emitter; the loop never edits them. Decoding is a visible step: ``decode``
returns a ``Decoded`` that is ok (the record) or an error (the reason), and
the processor branches on it, dead-lettering the message itself
(``ProcessorBase.dead_letter``) rather than as a side effect of decoding.
The same interface runs without a broker: give the processor an
``Emitter`` over ``connectors.kafka.testing.MemoryPublisher`` and a dict as
its table.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol, runtime_checkable

from connectors.kafka.emit import Emitter
from streams.core.avro_codec import AvroCodec, DecodeError
from streams.pipeline.outcomes import OutcomeBook, Position

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputMessage:
    """One input message as the broker delivered it.

    ``appended_at`` is the broker's append time (LogAppendTime) when known:
    the verify agent bounds a sender's stated receipt by it; None means
    unknown (tools and tests that replay messages), and the stated time is used.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    appended_at: datetime | None = None

    @property
    def position(self) -> Position:
        """(topic, partition, offset): where an outcome's input was, to recognise it when it comes again."""
        return self.topic, self.partition, self.offset


def broker_time(topic: str, appended_seconds: float | None) -> datetime:
    """When the broker took a message of ``topic`` in: its LogAppendTime, else this worker's clock now.

    Both runtimes call it with the record's time only when the broker stamped
    it (``message.timestamp.type=LogAppendTime``). Only such a time bounds a
    sender's claim; a CreateTime is the producer's. On a topic still
    configured for CreateTime the worker's clock stands in (later than the
    append, so it can only make an order look older, never younger: fail
    closed), with a warning once per topic.
    """
    if appended_seconds:
        return datetime.fromtimestamp(appended_seconds, tz=timezone.utc)
    if topic not in _warned_create_time:
        _warned_create_time.add(topic)
        log.warning("topic %s carries producer (CreateTime) timestamps; judging receipt against this worker's "
                    "clock. Run `csos topics` to set message.timestamp.type=LogAppendTime", topic)
    return datetime.now(timezone.utc)


_warned_create_time: set[str] = set()


@dataclass(frozen=True)
class Decoded:
    """The decode step's result: ok (``schema`` and ``record``) or not (``error``, the dead letter's reason)."""

    schema: str = ""
    record: dict[str, Any] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def decode(codec: AvroCodec, message: InputMessage, expect: str | tuple[str, ...], *,
           label: str | None = None) -> Decoded:
    """Read ``message`` as one of the ``expect``-ed record types; never emits anything.

    The error says what was expected (``label``, by default the schema's
    short name) and why the bytes are not that: the reason a dead letter
    carries. Only a ``DecodeError`` is an error result; anything else is a
    bug and propagates (the loop dead-letters it as ``unhandled``).
    """
    try:
        if isinstance(expect, str):
            schema, record = codec.decode(message.value, expect=expect)
        else:
            schema, record = codec.decode(message.value)
            if schema not in expect:
                raise DecodeError(f"expected one of {', '.join(expect)}, got {schema}")
    except DecodeError as exc:
        what = label or (expect.rsplit(".", 1)[-1] if isinstance(expect, str) else "input")
        return Decoded(error=f"undecodable {what}: {exc}")
    return Decoded(schema, record)


@runtime_checkable
class Processor(Protocol):
    """What an agent loop needs of a processor (``streams.pipeline.app.decide_batch``)."""

    stage: str  #: the pipeline stage named in its audit events and dead letters
    counts: dict[str, int]  #: what it decided, by kind; its own, read by /health
    emitter: Emitter  #: buffered: the loop publishes ``emitter.pending`` once the state is durable
    outcomes: OutcomeBook  #: decisions recorded for redelivery; the loop tells it which inputs are committed
    state: Any  #: its ``CachedTable``; ``state.flush()`` moves changed entries into the table

    def begin_batch(self) -> None:
        """Start a batch (and count it)."""

    def handle(self, message: InputMessage) -> None:
        """Give one message an outcome (outputs, a dead letter, or a recorded repeat)."""

    def unhandled(self, message: InputMessage, exc: Exception) -> None:
        """Dead-letter a message whose ``handle`` raised (a bug), so that the batch goes on."""

    def end_batch(self) -> None:
        """Move the batch's changed state into the table (the loop then makes it durable)."""


class ProcessorBase:
    """The parts every processor shares: its counters, batch counting and dead-lettering an input."""

    stage = ""
    emitter: Emitter
    counts: dict[str, int]

    def count(self, kind: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``kind`` (created at its first use)."""
        self.counts[kind] = self.counts.get(kind, 0) + n

    def begin_batch(self) -> None:
        self.count("batches")

    def dead_letter(self, message: InputMessage, reason: str) -> None:
        """Keep a message this processor cannot decide, with its reason (topic ``dlq``, audited), and count it."""
        self.count("dead_lettered")
        self.emitter.dead_letter(self.stage, message.topic, message.partition, message.offset, message.key,
                                 message.value or b"", reason)

    def unhandled(self, message: InputMessage, exc: Exception) -> None:
        self.count("unhandled")
        self.emitter.dead_letter(self.stage, message.topic, message.partition, message.offset, message.key,
                                 message.value or b"", f"unhandled: {exc.__class__.__name__}: {exc}")

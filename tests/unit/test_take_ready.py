"""An agent takes what is ready: a lone order is decided at once, a backlog still in big batches.

``streams.pipeline.batching.take_ready`` replaces Faust's ``take_events(max_, within)``,
which held a lone event until ``within`` passed (at every hop of the pipeline).
Here a real Faust stream runs over an in-memory channel (no broker).
"""
from __future__ import annotations

import asyncio
import uuid
from typing import Any

import faust

from streams.pipeline.batching import take_ready

#: Generous bound for "came without waiting": nothing here sleeps, so only a hang reaches it.
HANG = 30.0


def _stream() -> tuple[Any, Any]:
    app = faust.App(f"csos-take-{uuid.uuid4().hex[:6]}", broker="kafka://127.0.0.1:9", store="memory://")
    app.flow_control.resume()  # as a running worker's: events are not skipped
    channel = app.channel()
    return channel, app.stream(channel)


async def _batches(max_: int, send: list[int], then: list[int]) -> tuple[list[list[int]], list[bool]]:
    """Send ``send``; while the first batch is held, send ``then``; collect batches until all arrived.

    Returns the batches' values and, for the first batch, whether each event
    was acknowledged while its batch was still being handled.
    """
    channel, stream = _stream()
    batches: list[list[int]] = []
    acked_while_held: list[bool] = []
    first_taken = asyncio.Event()
    release_first = asyncio.Event()
    total = len(send) + len(then)

    async def agent() -> None:
        async for events in take_ready(stream, max_):
            batches.append([e.value for e in events])
            if len(batches) == 1:
                first_taken.set()
                await release_first.wait()  # the agent is busy with its first batch
                acked_while_held.extend(e.message.acked for e in events)
            if sum(map(len, batches)) >= total:
                return

    task = asyncio.ensure_future(agent())
    for v in send:
        await channel.send(value=v)
    await asyncio.wait_for(first_taken.wait(), HANG)
    for v in then:
        await channel.send(value=v)
    release_first.set()
    await asyncio.wait_for(task, HANG)
    await stream.stop()
    return batches, acked_while_held


def test_a_lone_event_is_taken_at_once_without_waiting_for_a_full_batch() -> None:
    """One order on a quiet stream is handed on by itself: no window, no batch of 2,000 awaited."""
    batches, acked = asyncio.run(_batches(2000, [1], []))
    assert batches == [[1]]
    assert acked == [False]  # acknowledged only after its batch was handled


def test_a_backlog_is_taken_in_full_batches_not_one_by_one() -> None:
    """Events queued while the agent is busy come as batches of up to max_, in order, none lost or repeated."""
    batches, acked = asyncio.run(_batches(100, [0], list(range(1, 251))))
    assert batches[0] == [0]
    assert [len(b) for b in batches[1:]] == [100, 100, 50]
    assert [v for b in batches for v in b] == list(range(251))
    assert acked == [False]


def test_a_batch_whose_handling_failed_is_not_acknowledged() -> None:
    """An agent that fails on a batch leaves it unacknowledged: committed offsets never pass it."""
    async def run() -> list[bool]:
        channel, stream = _stream()
        taken: list[Any] = []
        batches = take_ready(stream, 10)

        async def agent() -> None:
            async for events in batches:
                taken.extend(events)
                raise RuntimeError("the state could not be written")

        task = asyncio.ensure_future(agent())
        await channel.send(value=1)
        try:
            await asyncio.wait_for(task, HANG)
        except RuntimeError:
            pass
        await batches.aclose()  # what the event loop's finalizer does to an abandoned generator
        await stream.stop()
        return [e.message.acked for e in taken]

    assert asyncio.run(run()) == [False]

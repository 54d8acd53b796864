"""The worker's event loop: libuv's (uvloop) by default, the standard library's on request.

Why: every event a Faust agent takes passes through several rounds of the
event loop (the fetcher, the conductor, the agent's queue, the acknowledgement,
the producers' callbacks), so the loop's own cost is paid many times per order.
uvloop is the loop mode and Faust support besides asyncio's; measured with
``csos bench --registrants 300`` on the 2-core machine, alternated with the
standard loop, the worker used 5-11 % fewer CPU-seconds for the same feed
(README "Performance"). ``CSOS_EVENT_LOOP=asyncio`` brings the standard loop back
(for a platform without uvloop, or to rule the loop out when chasing a fault).
"""
from __future__ import annotations

import asyncio

#: The loops the worker can run on.
EVENT_LOOPS = ("uvloop", "asyncio")


def use_event_loop(name: str) -> str:
    """Install ``name``'s event-loop policy for every loop created after this call; returns the name.

    Call it before the worker (or any loop) starts. An unknown name is a
    ``ValueError``: a typo must not silently fall back to another loop.
    """
    if name not in EVENT_LOOPS:
        raise ValueError(f"CSOS_EVENT_LOOP={name!r}: expected one of {', '.join(EVENT_LOOPS)}")
    if name == "uvloop":
        import mode.loop

        mode.loop.use("uvloop")  # sets uvloop's policy, as ``faust -L uvloop`` does
    else:
        asyncio.set_event_loop_policy(None)  # the standard library's default policy
    return name

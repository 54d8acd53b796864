"""The worker's event loop setting (CSOS_EVENT_LOOP): uvloop by default, asyncio on request, nothing else."""
from __future__ import annotations

import asyncio

import pytest

from streams.core.config import Settings
from streams.pipeline.event_loop import use_event_loop


@pytest.fixture(autouse=True)
def _restore_policy():
    yield
    asyncio.set_event_loop_policy(None)


def _loop_kind() -> str:
    loop = asyncio.new_event_loop()
    try:
        return type(loop).__module__.split(".")[0]
    finally:
        loop.close()


def test_the_worker_runs_on_uvloop_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CSOS_EVENT_LOOP", raising=False)
    use_event_loop(Settings.from_env().event_loop)
    assert _loop_kind() == "uvloop"


def test_asyncio_brings_the_standard_loop_back(monkeypatch: pytest.MonkeyPatch) -> None:
    use_event_loop("uvloop")
    monkeypatch.setenv("CSOS_EVENT_LOOP", " AsyncIO ")
    use_event_loop(Settings.from_env().event_loop)
    assert _loop_kind() == "asyncio"


def test_an_unknown_loop_is_refused_not_replaced() -> None:
    with pytest.raises(ValueError, match="CSOS_EVENT_LOOP='tokio'.*uvloop, asyncio"):
        use_event_loop("tokio")

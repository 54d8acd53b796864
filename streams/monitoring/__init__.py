"""Suspicious order monitoring (21 CFR 1301.74(b)): pure logic, no Kafka or Faust.

``Monitor.score(state, order) -> verdict`` and ``Monitor.learn(state, order) -> state``
are what the monitor agent calls; the state is a plain dict that round-trips
through ``schemas/avro/som_registrant_state.avsc`` (``som.state.RegistrantState``).

``streams.core.native`` (imported by ``streams/__init__.py``, first) decides whether
the compiled modules (built by setup.py with mypyc) or their sources are imported.
"""
from streams.monitoring.baselines import STATE_VERSION, RiverStateError, StateVersionError, migrate_state, new_state
from streams.monitoring.detectors import MonitorConfig, default_detectors
from streams.monitoring.monitor import Monitor

__all__ = [
    "Monitor", "MonitorConfig", "default_detectors", "new_state", "migrate_state",
    "STATE_VERSION", "RiverStateError", "StateVersionError",
]

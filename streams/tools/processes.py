"""Start and stop the pipeline's processes as children (demo, benchmark, tests).

The worker and the sink run in their own processes, as in production: the
demo and the tests talk to them only through Kafka and their HTTP endpoints.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from streams.core.config import Settings


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process see ``settings``."""
    env = dict(os.environ)
    env.update({
        "KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "CSOS_DATA_DIR": str(settings.data_dir),
        "CSOS_PKI_DIR": str(settings.pki_dir),
        "CSOS_PRODUCTS": str(settings.products_path),
        "CSOS_APP_ID": settings.app_id,
        "CSOS_PARTITIONS": str(settings.partitions),
        "CSOS_WEB_PORT": str(settings.web_port),
        "CSOS_SINK_PORT": str(settings.sink_port),
        "CSOS_FETCH_MAX_WAIT_MS": str(settings.fetch_max_wait_ms),
        "CSOS_REQUIRE_REGISTRATION": "1" if settings.require_registration else "0",
        "CSOS_BATCH_SIZE": str(settings.batch_size),
        "CSOS_BATCH_SECONDS": str(settings.batch_seconds),
        "CSOS_SINK_BATCH_SIZE": str(settings.sink_batch_size),
        "CSOS_SINK_BATCH_SECONDS": str(settings.sink_batch_seconds),
        "CSOS_DUE_DILIGENCE_DAYS": repr(settings.due_diligence_days),
        "CSOS_CASE_CLOCK_SECONDS": repr(settings.case_clock_seconds),
        "CSOS_CASE_RETENTION_DAYS": repr(settings.case_retention_days),
        "CSOS_REPORTING_DEA": settings.reporting_dea,
        "CLICKHOUSE_DATABASE": settings.clickhouse_database,
        # Secrets: in the child's environment only (never on a command line or in a log); '' = unset.
        "CSOS_AUDIT_KEY": settings.audit_key,
        "CSOS_AUDIT_OLD_KEYS": settings.audit_old_keys,
        # -- read-only SQL (issue 9): '' = the sink generates a token into $CSOS_DATA_DIR/sink-token
        "CSOS_SQL_TOKEN": settings.sql_token,
        "CSOS_SQL_MAX_SECONDS": str(settings.sql_max_seconds),
        "CSOS_SQL_MAX_MEMORY_MB": str(settings.sql_max_memory_mb),
        "CSOS_SQL_MAX_ROWS": str(settings.sql_max_rows),
        # -- issue 9 (hostile input), verify agent
        "CSOS_SUPPLIER_DEA": settings.supplier_dea,
        "CSOS_RECEIPT_SKEW_SECONDS": repr(settings.receipt_skew_seconds),
        # -- issue 10 (fast recovery)
        "CSOS_WORKER_ID": settings.worker_id,
        "CSOS_SESSION_TIMEOUT_SECONDS": repr(settings.session_timeout_seconds),
        "CSOS_HEARTBEAT_SECONDS": repr(settings.heartbeat_seconds),
        "CSOS_STATIC_MEMBERSHIP": "1" if settings.static_membership else "0",
        "CSOS_RUNTIME": settings.runtime,
    })
    if settings.clickhouse_url:
        env["CLICKHOUSE_URL"] = settings.clickhouse_url
    return env


def _health(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


class ChildProcess:
    """A ``csos <command>`` child whose readiness is judged from its /health answer."""

    def __init__(self, settings: Settings, command: list[str], port: int, log_path: Path,
                 ready: Callable[[dict[str, Any]], bool], extra_env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.command = command
        self.port = port
        self.log_path = log_path
        self.ready = ready
        self.extra_env = dict(extra_env or {})  # settings outside Settings (e.g. the review page's)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "streams.cli", *self.command],
                                     env=dict(settings_env(self.settings), **self.extra_env), stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command[0]} exited with {self.proc.returncode}; "
                                   f"see {self.log_path}:\n{self.tail()}")
            health = _health(self.port)
            if health is not None and self.ready(health):
                return
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"{self.command[0]} not ready within {timeout:.0f}s; see {self.log_path}:\n{self.tail()}")

    def health(self) -> dict[str, Any] | None:
        return _health(self.port)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)


def worker_process(settings: Settings) -> ChildProcess:
    """Verification + monitoring agents; ready once its agents have loaded the PKI and products."""
    return ChildProcess(settings, ["worker", "--loglevel", "info"], settings.web_port,
                        settings.data_dir / "worker.log", lambda h: bool(h.get("counts")))


def sink_process(settings: Settings) -> ChildProcess:
    """The ClickHouse sink; ready once the DDL is applied and it serves /health."""
    return ChildProcess(settings, ["sink"], settings.sink_port, settings.data_dir / "sink.log",
                        lambda h: h.get("status") == "ok")


def review_process(settings: Settings, port: int, users_path: Path, secret: str) -> ChildProcess:
    """The review page (``csos review``) on 127.0.0.1:``port``; ready once it answers /health.

    Its own settings (port, users file, cookie key) are not part of ``Settings``, so they are
    passed to the child explicitly.
    """
    return ChildProcess(settings, ["review"], port, settings.data_dir / "review.log",
                        lambda h: h.get("status") == "ok",
                        extra_env={"CSOS_REVIEW_PORT": str(port), "CSOS_REVIEW_USERS": str(users_path),
                                   "CSOS_REVIEW_SECRET": secret})


class Pipeline:
    """Sink and worker together, started sink first (the DDL exists before any row arrives)."""

    def __init__(self, settings: Settings) -> None:
        self.sink = sink_process(settings)
        self.worker = worker_process(settings)

    def start(self) -> None:
        self.sink.start()
        try:
            self.worker.start()
        except Exception:
            self.sink.stop()
            raise

    def stop(self) -> None:
        self.worker.stop()
        self.sink.stop()

    def tail(self) -> str:
        return f"--- worker\n{self.worker.tail()}\n--- sink\n{self.sink.tail()}"

    def __enter__(self) -> "Pipeline":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

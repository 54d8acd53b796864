"""Start and stop a worker as a child process (demo, benchmark, tests).

The worker runs in its own process, as in production: the demo and the
tests talk to it only through Kafka and its HTTP endpoints.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .config import Settings
from .query import worker_is_up


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
        "CSOS_BATCH_SIZE": str(settings.batch_size),
        "CSOS_BATCH_SECONDS": str(settings.batch_seconds),
        "CSOS_SINK_BATCH_SIZE": str(settings.sink_batch_size),
        "CSOS_SINK_BATCH_SECONDS": str(settings.sink_batch_seconds),
        "CLICKHOUSE_DATABASE": settings.clickhouse_database,
    })
    if settings.clickhouse_url:
        env["CLICKHOUSE_URL"] = settings.clickhouse_url
    return env


class WorkerProcess:
    def __init__(self, settings: Settings, log_path: Path | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.settings = settings
        self.log_path = log_path or settings.data_dir / "worker.log"
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker", "--loglevel", "info", *self.extra_args],
            env=settings_env(self.settings), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}; see {self.log_path}:\n{self.tail()}")
            if worker_is_up(self.settings, timeout=0.5) and self._agents_running():
                return
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"worker not ready within {timeout:.0f}s; see {self.log_path}:\n{self.tail()}")

    def _agents_running(self) -> bool:
        """Ready means components loaded (the /health counts exist), not just the web server up."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.settings.web_port}/health", timeout=1) as r:
                import json
                return bool(json.loads(r.read()).get("counts"))
        except OSError:
            return False

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

    def __enter__(self) -> "WorkerProcess":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

"""A real local Kafka broker for tests and the demo CLI.

Why a real broker and not a mock: the pipeline's guarantees (idempotent
producers, Faust changelog-backed tables, consumer-group rebalances, compacted
state topics) are properties of the broker protocol, and an in-memory fake
would test the fake. ``deploy/kafka/kafka.sh`` does the actual work (fetch the
jars from Maven Central, format KRaft storage, start/stop the JVM); this module
drives it from Python with per-instance ports and data directories so tests
can run their own broker without touching a developer's one.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from confluent_kafka.admin import AdminClient

from connectors.kafka.security import client_config

__all__ = ["LocalBroker", "wait_until_ready", "free_port", "REPO_ROOT", "KAFKA_SH"]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
KAFKA_SH = REPO_ROOT / "deploy" / "kafka" / "kafka.sh"

# The first start on a fresh clone downloads ~45 MB of jars with Maven; that
# time is not part of the readiness timeout, but it must not hang forever.
_FETCH_ALLOWANCE_S = 900.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now.

    Tests use this so their broker never collides with a developer's broker on
    9092 or with a parallel test session. (The port could in theory be taken
    between this call and the broker binding it; kafka.sh then fails with a
    clear "port in use" error rather than talking to the wrong broker.)
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _quiet_admin(bootstrap: str, security: dict[str, str] | None = None, **extra: object) -> AdminClient:
    """An AdminClient whose librdkafka chatter goes to Python logging.

    While the broker is still starting, librdkafka would otherwise print a
    "Connection refused" line to stderr on every retry. ``security`` is the
    librdkafka SASL/TLS config (default: this process's, from KAFKA_SECURITY_*).
    """
    conf: dict[str, object] = {
        "bootstrap.servers": bootstrap,
        "socket.connection.setup.timeout.ms": 2000,
        "reconnect.backoff.max.ms": 500,
    }
    conf.update(client_config() if security is None else security)
    conf.update(extra)
    return AdminClient(conf, logger=logging.getLogger("streams.tools.broker.librdkafka"))


def wait_until_ready(bootstrap: str, timeout: float, security: dict[str, str] | None = None) -> None:
    """Block until the Kafka cluster at ``bootstrap`` answers metadata requests.

    Why metadata and not a TCP connect: a listening socket only shows the JVM
    is up; a metadata response listing at least one broker shows the broker
    has joined the (KRaft) cluster and can serve clients. Raises
    ``TimeoutError`` if that does not happen within ``timeout`` seconds.
    ``security``: as for ``_quiet_admin`` (``{}`` for a PLAINTEXT listener).
    """
    deadline = time.monotonic() + timeout
    admin = _quiet_admin(bootstrap, security)
    last_error: Exception | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"Kafka at {bootstrap} not ready after {timeout:.0f}s"
                + (f": {last_error}" if last_error else "")
            )
        try:
            md = admin.list_topics(timeout=min(2.0, max(remaining, 0.1)))
            if md.brokers:
                return
        except Exception as exc:  # KafkaException while the broker is down
            last_error = exc
        time.sleep(0.2)


class LocalBroker:
    """One local single-node Kafka (KRaft, broker+controller) process.

    Each instance owns a data directory (server.properties, partitions, logs,
    pid file) and a pair of loopback ports; the downloaded jars are shared
    through ``<repo>/.cache/kafka`` unless ``KAFKA_CACHE_DIR`` says otherwise.
    Usable as a context manager: ``with LocalBroker(port) as b: ...``.
    """

    def __init__(
        self,
        port: int = 9092,
        data_dir: Path | None = None,
        *,
        controller_port: int | None = None,
        extra_env: dict[str, str] | None = None,
        sasl_port: int | None = None,
        admin_password: str | None = None,
    ) -> None:
        if (sasl_port is None) != (admin_password is None):
            raise ValueError("sasl_port and admin_password go together (the SASL listener's super user)")
        self.port = port
        # Optional SASL_PLAINTEXT listener (SCRAM, ACLs enforced, super user `admin`); see kafka.sh.
        self.sasl_port = sasl_port
        self.admin_password = admin_password
        # kafka.sh's default is KAFKA_PORT+1; tests pass a separately probed
        # free port because port+1 may be taken.
        self.controller_port = controller_port if controller_port is not None else port + 1
        self.data_dir = Path(data_dir) if data_dir is not None else REPO_ROOT / "var" / "kafka"
        self.extra_env = dict(extra_env or {})

    # ------------------------------------------------------------ properties

    @property
    def bootstrap(self) -> str:
        """The ``bootstrap.servers`` string clients use for this broker."""
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        """The SASL_PLAINTEXT listener's ``bootstrap.servers`` (only with ``sasl_port``)."""
        if self.sasl_port is None:
            raise ValueError(f"{self!r} has no SASL listener")
        return f"127.0.0.1:{self.sasl_port}"

    def admin_config(self) -> dict[str, str]:
        """librdkafka settings to connect to the SASL listener as the super user ``admin``."""
        return {"bootstrap.servers": self.sasl_bootstrap, "security.protocol": "sasl_plaintext",
                "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "admin", "sasl.password": str(self.admin_password)}

    @property
    def log_dir(self) -> Path:
        """Where the broker writes server.log (and kafka.out, its console)."""
        return self.data_dir / "logs"

    @property
    def server_log(self) -> Path:
        """The broker's main log file."""
        return self.log_dir / "server.log"

    # ------------------------------------------------------------ lifecycle

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "KAFKA_PORT": str(self.port),
                "KAFKA_CONTROLLER_PORT": str(self.controller_port),
                "KAFKA_DATA_DIR": str(self.data_dir),
                # Set explicitly so a KAFKA_LOG_DIR exported in the caller's
                # shell cannot make two brokers share one server.log.
                "KAFKA_LOG_DIR": str(self.log_dir),
            }
        )
        if self.sasl_port is not None:
            env["KAFKA_SASL_PORT"] = str(self.sasl_port)
            env["KAFKA_SASL_ADMIN_PASSWORD"] = str(self.admin_password)
        env.update(self.extra_env)
        return env

    def _run(self, command: str, timeout: float, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        env = self._env()
        if extra:
            env.update(extra)
        return subprocess.run(
            ["bash", str(KAFKA_SH), command],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of server.log, for error messages."""
        try:
            with self.server_log.open("r", errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError:
            return f"(no log at {self.server_log})"

    def start(self, timeout: float = 120) -> None:
        """Start the broker (fetching jars and formatting storage if needed).

        Returns once clients can use the broker. ``timeout`` bounds the wait
        for readiness after the JVM is launched; a first-time jar download
        comes on top of it. Raises ``RuntimeError`` with the log tail if the
        broker fails to start or does not become ready in time.
        """
        try:
            proc = self._run(
                "start",
                timeout=timeout + _FETCH_ALLOWANCE_S,
                extra={"KAFKA_START_TIMEOUT": str(int(max(timeout, 1)))},
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(
                f"kafka.sh start did not finish in {exc.timeout:.0f}s\n{self.log_tail()}"
            ) from exc
        if proc.returncode != 0:
            raise RuntimeError(
                f"kafka.sh start failed (exit {proc.returncode}) for {self.bootstrap}\n"
                f"{proc.stderr.strip()}\n--- server.log tail ---\n{self.log_tail()}"
            )
        log.info("kafka.sh start: %s", proc.stderr.strip().replace("\n", " | "))
        try:
            # The PLAINTEXT listener always exists and answers metadata without credentials.
            wait_until_ready(self.bootstrap, timeout=min(timeout, 60), security={})
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}\n--- server.log tail ---\n{self.log_tail()}") from exc

    def stop(self) -> None:
        """Stop the broker gracefully (SIGTERM, then SIGKILL as a fallback).

        Does nothing if it is not running. Raises ``RuntimeError`` if
        kafka.sh cannot stop it.
        """
        proc = self._run("stop", timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"kafka.sh stop failed (exit {proc.returncode}): {proc.stderr.strip()}")

    def is_running(self) -> bool:
        """Whether this instance's broker process is alive (per its pid file)."""
        return self._run("status", timeout=30).returncode == 0

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalBroker(bootstrap={self.bootstrap!r}, data_dir={str(self.data_dir)!r})"


@contextmanager
def running_broker(data_dir: Path, partitions: int | None = None) -> Iterator[LocalBroker]:
    """A KRaft broker of its own on free ports with the pipeline's topics, stopped on exit.

    For whatever must not share topics with a developer's broker or another run:
    the test session, tests that need isolation, the crash and hostile soaks.
    ``partitions``: of each topic (None: the catalogue's default, as ``ensure_topics``).
    """
    from connectors.kafka.topics import ensure_topics

    b = LocalBroker(port=free_port(), data_dir=data_dir, controller_port=free_port())
    b.start(timeout=180)
    try:
        ensure_topics(b.bootstrap, partitions)
        yield b
    finally:
        b.stop()

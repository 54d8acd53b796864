"""Settings from the environment (12-factor): nothing secret lives in files.

This is the one module that reads the environment for settings: ``Settings.from_env``
once per process (a command, a worker), areas as sections (``kafka``, ``review``);
nothing is read at import time, so a test or a tool that sets a variable is heard.

Every process (worker, CLI, demo, tests) reads the same variables, so one
``export`` block configures a whole deployment. Defaults are the zero-setup
local ones: a broker on 127.0.0.1 and the embedded ClickHouse engine.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


@dataclass(frozen=True)
class KafkaSettings:
    """Producer and topic settings every Kafka client of the project shares (a section of ``Settings``)."""

    compression: str = "lz4"  # KAFKA_COMPRESSION: lz4 (cheap, and it matters on real networks); none on loopback
    replication_factor: int = 1  # KAFKA_REPLICATION_FACTOR: replicas per topic (1: the local single broker)

    @classmethod
    def from_env(cls) -> "KafkaSettings":
        return cls(compression=_env("KAFKA_COMPRESSION", cls.compression),
                   replication_factor=int(_env("KAFKA_REPLICATION_FACTOR", str(cls.replication_factor))))


@dataclass(frozen=True)
class ReviewSettings:
    """The review page's settings (a section of ``Settings``); ``streams.apps.review.web.ReviewConfig`` checks them."""

    port: int = 6068  # CSOS_REVIEW_PORT
    host: str = "127.0.0.1"  # CSOS_REVIEW_HOST: loopback unless a container sits behind a TLS proxy
    secret: str = field(default="", repr=False)  # CSOS_REVIEW_SECRET: Fernet key sealing the session cookies
    users: str = ""  # CSOS_REVIEW_USERS: the users file ('' = review-users.json in the data directory)
    secure_cookies: str = "auto"  # CSOS_REVIEW_SECURE_COOKIES: 1, 0 or auto
    trusted_proxies: str = ""  # CSOS_REVIEW_TRUSTED_PROXIES: addresses or networks, comma-separated
    password: str = field(default="", repr=False)  # CSOS_REVIEW_PASSWORD: for `csos review add-user` (else a prompt)

    @classmethod
    def from_env(cls) -> "ReviewSettings":
        return cls(port=int(_env("CSOS_REVIEW_PORT", str(cls.port))), host=_env("CSOS_REVIEW_HOST", cls.host),
                   secret=_env("CSOS_REVIEW_SECRET", ""), users=_env("CSOS_REVIEW_USERS", ""),
                   secure_cookies=_env("CSOS_REVIEW_SECURE_COOKIES", cls.secure_cookies).strip().lower(),
                   trusted_proxies=_env("CSOS_REVIEW_TRUSTED_PROXIES", ""),
                   password=_env("CSOS_REVIEW_PASSWORD", ""))


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap: str = "127.0.0.1:9092"
    data_dir: Path = REPO_ROOT / "var"
    clickhouse_url: str = ""  # empty = embedded engine under data_dir
    clickhouse_database: str = "csos"
    clickhouse_user: str = "default"
    clickhouse_password: str = field(default="", repr=False)
    pki_dir: Path = REPO_ROOT / "var" / "pki"
    products_path: Path = REPO_ROOT / "streams" / "tools" / "data" / "product_master.csv"
    app_id: str = "csos-som"
    partitions: int = 4
    web_port: int = 6066
    sink_port: int = 6067
    fetch_max_wait_ms: int = 100
    require_registration: bool = True
    batch_size: int = 2000
    batch_seconds: float = 0.0  # 0: take what is ready (streams.pipeline.batching); > 0: Faust's windowed take
    sink_batch_size: int = 5000
    # About one insert per table a second while the stream is slow (a full batch goes sooner): each insert writes
    # a new part whatever its size (~15-30 ms of the embedded engine's CPU per table; ClickHouse advises about
    # one insert a second).
    sink_batch_seconds: float = 1.0
    due_diligence_days: float = 7.0  # calendar days a held order may wait before its case is escalated
    case_clock_seconds: float = 60.0  # how often the case agent looks for lapsed due-diligence clocks
    case_retention_days: float = 90.0  # closed cases leave the worker's table this long after the decision
    reporting_dea: str = ""  # the distributor's DEA number on suspicious order reports (default: the order's supplier)
    audit_key: str = field(default="", repr=False)  # CSOS_AUDIT_KEY: HMAC key sealing the audit chain ('' = SHA-256)
    audit_old_keys: str = field(default="", repr=False)  # CSOS_AUDIT_OLD_KEYS: earlier keys, comma-separated (verify)
    # -- read-only SQL (issue 9): the analysts' query path (connectors/clickhouse/sql_guard.py, streams/pipeline/sink_service.py)
    sql_token: str = field(default="", repr=False)  # CSOS_SQL_TOKEN: the sink's /sql token ('' = sink-token file)
    sql_max_seconds: int = 60  # CSOS_SQL_MAX_SECONDS: an analyst query is stopped after this long
    sql_max_memory_mb: int = 2048  # CSOS_SQL_MAX_MEMORY_MB: memory one analyst query may use
    sql_max_rows: int = 1_000_000  # CSOS_SQL_MAX_ROWS: a larger result is an error, never silently cut
    # -- issue 9 (hostile input), verify agent
    supplier_dea: str = ""  # CSOS_SUPPLIER_DEA: this distributor's DEA number(s), comma-separated; the worker needs it
    receipt_skew_seconds: float = 300.0  # CSOS_RECEIPT_SKEW_SECONDS: stated receipt vs broker append time
    # -- issue 10 (crash-safe outcomes): how long an order id's decision is remembered by each agent, so that a
    # duplicate (a redelivery, or an upstream agent repeating its output after a crash) is not judged twice.
    dedup_days: float = 14.0
    # -- issue 10 (fast recovery): static consumer-group membership and failure detection
    worker_id: str = ""  # CSOS_WORKER_ID: this process's stable name in its consumer groups ('' = host + port)
    session_timeout_seconds: float = 6.0  # CSOS_SESSION_TIMEOUT_SECONDS: a silent member's partitions move after
    heartbeat_seconds: float = 1.0  # CSOS_HEARTBEAT_SECONDS: how often a member tells the broker it is alive
    static_membership: bool = True  # CSOS_STATIC_MEMBERSHIP: 0 = dynamic members (ids not stable, e.g. autoscaled)
    # -- issue 12 (CRL freshness barrier): how long the verify agent waits, per batch, for its reference reader
    # to reach what pki.crl and registrants held when the batch arrived; past it the batch's orders are parked.
    reference_barrier_seconds: float = 30.0
    # -- issue 15 (Prometheus metrics): also serve /metrics alone on host:port (containers); empty: off
    metrics_addr: str = ""
    # -- issue 13 (configuration read once, in sections): what modules used to read from os.environ themselves
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    review: ReviewSettings = field(default_factory=ReviewSettings)
    profile_path: str = ""  # CSOS_PROFILE: write a cProfile of `csos worker` to this path on exit ('' = off)
    # -- issue 14 (latency): a batch slower than this is logged with where its time went (0: every batch)
    slow_batch_seconds: float = 0.5
    # -- issue 14 (latency tail): freeze the worker's start-up heap so full GC collections skip it
    gc_freeze: bool = True
    # -- issue 14 (throughput): the collector's young-generation threshold (0: CPython's 700)
    gc_young: int = 10_000
    # -- issue 14 (framework cost): the worker's asyncio event loop, "uvloop" (libuv) or "asyncio" (the stdlib's)
    event_loop: str = "uvloop"
    # -- issue 14 (framework cost): what runs the worker's processors, "faust" (streams.pipeline.app) or "kafka"
    # (streams.pipeline.kafka_worker: one confluent-kafka consumer, the same processors, tables and topics)
    runtime: str = "faust"

    @property
    def supplier_deas(self) -> frozenset[str]:
        """The DEA numbers an order may name as its supplier (empty: not configured)."""
        return frozenset(d.strip().upper() for d in self.supplier_dea.split(",") if d.strip())

    def group_instance_id(self, port: int) -> str | None:
        """This process's static member id (KIP-345) in its consumer groups: ``CSOS_WORKER_ID``, else host-port.

        Why static: a worker restarted under the same id gets its partitions
        back at once, without the group waiting for the dead process's session
        to time out. The default (host name and this process's HTTP port) is
        stable across restarts and differs between the processes of one host,
        which cannot share a port. Ids are per consumer group, so a worker and
        a sink may carry the same one. None with ``CSOS_STATIC_MEMBERSHIP=0``.
        """
        if not self.static_membership:
            return None
        if self.worker_id:
            return self.worker_id
        return f"{socket.gethostname()}-{port}"

    @property
    def effective_clickhouse_url(self) -> str:
        return self.clickhouse_url or f"chdb://{(self.data_dir / 'clickhouse').resolve()}"

    @property
    def embedded_clickhouse(self) -> bool:
        return self.effective_clickhouse_url.startswith("chdb:")

    @classmethod
    def from_env(cls) -> "Settings":
        data_dir = Path(_env("CSOS_DATA_DIR", str(REPO_ROOT / "var"))).resolve()
        return cls(
            kafka_bootstrap=_env("KAFKA_BOOTSTRAP", cls.kafka_bootstrap),
            data_dir=data_dir,
            clickhouse_url=_env("CLICKHOUSE_URL", ""),
            clickhouse_database=_env("CLICKHOUSE_DATABASE", cls.clickhouse_database),
            clickhouse_user=_env("CLICKHOUSE_USER", cls.clickhouse_user),
            clickhouse_password=_env("CLICKHOUSE_PASSWORD", ""),
            pki_dir=Path(_env("CSOS_PKI_DIR", str(data_dir / "pki"))).resolve(),
            products_path=Path(_env("CSOS_PRODUCTS", str(cls.products_path))).resolve(),
            app_id=_env("CSOS_APP_ID", cls.app_id),
            partitions=int(_env("CSOS_PARTITIONS", str(cls.partitions))),
            web_port=int(_env("CSOS_WEB_PORT", str(cls.web_port))),
            sink_port=int(_env("CSOS_SINK_PORT", str(cls.sink_port))),
            require_registration=_env("CSOS_REQUIRE_REGISTRATION", "1").lower() not in ("0", "false", "no"),
            fetch_max_wait_ms=int(_env("CSOS_FETCH_MAX_WAIT_MS", str(cls.fetch_max_wait_ms))),
            batch_size=int(_env("CSOS_BATCH_SIZE", str(cls.batch_size))),
            batch_seconds=float(_env("CSOS_BATCH_SECONDS", str(cls.batch_seconds))),
            sink_batch_size=int(_env("CSOS_SINK_BATCH_SIZE", str(cls.sink_batch_size))),
            sink_batch_seconds=float(_env("CSOS_SINK_BATCH_SECONDS", str(cls.sink_batch_seconds))),
            due_diligence_days=float(_env("CSOS_DUE_DILIGENCE_DAYS", str(cls.due_diligence_days))),
            case_clock_seconds=float(_env("CSOS_CASE_CLOCK_SECONDS", str(cls.case_clock_seconds))),
            case_retention_days=float(_env("CSOS_CASE_RETENTION_DAYS", str(cls.case_retention_days))),
            reporting_dea=_env("CSOS_REPORTING_DEA", ""),
            audit_key=_env("CSOS_AUDIT_KEY", ""),
            audit_old_keys=_env("CSOS_AUDIT_OLD_KEYS", ""),
            # -- read-only SQL (issue 9)
            sql_token=_env("CSOS_SQL_TOKEN", ""),
            sql_max_seconds=int(_env("CSOS_SQL_MAX_SECONDS", str(cls.sql_max_seconds))),
            sql_max_memory_mb=int(_env("CSOS_SQL_MAX_MEMORY_MB", str(cls.sql_max_memory_mb))),
            sql_max_rows=int(_env("CSOS_SQL_MAX_ROWS", str(cls.sql_max_rows))),
            # -- issue 9 (hostile input), verify agent
            supplier_dea=_env("CSOS_SUPPLIER_DEA", ""),
            receipt_skew_seconds=float(_env("CSOS_RECEIPT_SKEW_SECONDS", str(cls.receipt_skew_seconds))),
            # -- issue 10 (crash-safe outcomes)
            dedup_days=float(_env("CSOS_DEDUP_DAYS", str(cls.dedup_days))),
            # -- issue 10 (fast recovery)
            worker_id=_env("CSOS_WORKER_ID", ""),
            session_timeout_seconds=float(_env("CSOS_SESSION_TIMEOUT_SECONDS", str(cls.session_timeout_seconds))),
            heartbeat_seconds=float(_env("CSOS_HEARTBEAT_SECONDS", str(cls.heartbeat_seconds))),
            static_membership=_env("CSOS_STATIC_MEMBERSHIP", "1").lower() not in ("0", "false", "no"),
            # -- issue 12 (CRL freshness barrier)
            reference_barrier_seconds=float(_env("CSOS_REFERENCE_BARRIER_SECONDS",
                                                 str(cls.reference_barrier_seconds))),
            # -- issue 15 (Prometheus metrics)
            metrics_addr=_env("CSOS_METRICS_ADDR", ""),
            # -- issue 13 (configuration in sections)
            kafka=KafkaSettings.from_env(),
            review=ReviewSettings.from_env(),
            profile_path=_env("CSOS_PROFILE", ""),
            # -- issue 14 (latency)
            slow_batch_seconds=float(_env("CSOS_SLOW_BATCH_SECONDS", str(cls.slow_batch_seconds))),
            # -- issue 14 (latency tail)
            gc_freeze=_env("CSOS_GC_FREEZE", "1").lower() not in ("0", "false", "no"),
            gc_young=int(_env("CSOS_GC_YOUNG", str(cls.gc_young))),
            # -- issue 14 (framework cost)
            event_loop=_env("CSOS_EVENT_LOOP", cls.event_loop).strip().lower(),
            runtime=_env("CSOS_RUNTIME", cls.runtime).strip().lower(),
        )

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)

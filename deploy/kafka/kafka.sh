#!/usr/bin/env bash
# A real, local, single-node Apache Kafka broker (KRaft mode, combined
# broker+controller) for development, tests and CI -- no Docker, no tarball.
#
# The broker's jars come from Maven Central (deploy/kafka/pom.xml) so that a
# fresh clone can bring everything up with nothing but a JDK and Maven.
#
# Usage: deploy/kafka/kafka.sh {fetch|format|start|stop|restart|status|config|logs}
#
#   fetch   download the broker jars into $KAFKA_CACHE_DIR/lib (skipped when
#           they are already there for the current pom.xml)
#   format  write server.properties and format KRaft storage with a fresh
#           cluster id (skipped when the data dir is already formatted)
#   start   fetch + format if needed, start in the background, wait (polling)
#           until the broker is serving; exit 1 with the log tail on timeout
#   stop    SIGTERM (controlled shutdown), wait, SIGKILL as a last resort
#   restart stop, then start
#   status  print whether it runs; exit 0 if running, 3 if not
#   config  regenerate and print server.properties
#   logs    tail the server log
#
# Environment (defaults in brackets):
#   KAFKA_PORT              client listener port on 127.0.0.1 [9092]
#   KAFKA_CONTROLLER_PORT   KRaft controller listener port [KAFKA_PORT+1]
#   KAFKA_DATA_DIR          server.properties, pid file, logs, partitions [<repo>/var/kafka]
#   KAFKA_LOG_DIR           where server.log goes [$KAFKA_DATA_DIR/logs]
#   KAFKA_CACHE_DIR         downloaded jars [<repo>/.cache/kafka]
#   KAFKA_MAVEN_REPO        Maven local repository used by fetch [<repo>/.cache/m2]
#   KAFKA_NUM_PARTITIONS    num.partitions for auto/implicitly created topics [4]
#   KAFKA_AUTO_CREATE_TOPICS  auto.create.topics.enable [false]
#   KAFKA_HEAP_OPTS         [-Xms256m -Xmx512m]
#   KAFKA_JVM_OPTS          extra JVM options [G1, small pauses, headless, C1 JIT only]
#                           C1 only (-XX:TieredStopAtLevel=1): this broker lives for a test, a demo or a
#                           bench, and C2 compiling it took half its CPU there (README Performance,
#                           "What the broker's CPU went to"); a long-lived broker may drop it.
#   KAFKA_START_TIMEOUT     seconds start waits for readiness [120]
#   KAFKA_STOP_TIMEOUT      seconds stop waits after SIGTERM before SIGKILL [30]
#   JAVA                    java executable [java on PATH, JDK 17+]
#   KAFKA_LOG4J_CONFIG      log4j2 configuration [deploy/kafka/log4j2.properties]; deploy/kafka/
#                           log4j2-requests.properties also logs every request to requests.log
#   KAFKA_SASL_PORT         optional: also listen with SASL_PLAINTEXT (SCRAM-SHA-512/256) on this
#                           127.0.0.1 port and enforce ACLs everywhere (StandardAuthorizer, super user
#                           `admin`, deny when no ACL matches: the PLAINTEXT port then serves only
#                           metadata) [unset: PLAINTEXT only, no authorizer]
#   KAFKA_SASL_ADMIN_PASSWORD  password of the super user `admin` (required with KAFKA_SASL_PORT;
#                           letters, digits and ._~+/=@%- only). Its SCRAM credential is written at
#                           format time, so SASL needs a data dir formatted with it.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"

KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}"
KAFKA_DATA_DIR="${KAFKA_DATA_DIR:-$REPO_ROOT/var/kafka}"
KAFKA_LOG_DIR="${KAFKA_LOG_DIR:-$KAFKA_DATA_DIR/logs}"
KAFKA_CACHE_DIR="${KAFKA_CACHE_DIR:-$REPO_ROOT/.cache/kafka}"
KAFKA_MAVEN_REPO="${KAFKA_MAVEN_REPO:-$REPO_ROOT/.cache/m2}"
KAFKA_NUM_PARTITIONS="${KAFKA_NUM_PARTITIONS:-4}"
KAFKA_AUTO_CREATE_TOPICS="${KAFKA_AUTO_CREATE_TOPICS:-false}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"
KAFKA_JVM_OPTS="${KAFKA_JVM_OPTS:--server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true -XX:TieredStopAtLevel=1}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-120}"
KAFKA_STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"
JAVA="${JAVA:-java}"
KAFKA_SASL_PORT="${KAFKA_SASL_PORT:-}"
KAFKA_SASL_ADMIN_PASSWORD="${KAFKA_SASL_ADMIN_PASSWORD:-}"

POM="$SCRIPT_DIR/pom.xml"
LOG4J_CONFIG="${KAFKA_LOG4J_CONFIG:-$SCRIPT_DIR/log4j2.properties}"
LIB_DIR="$KAFKA_CACHE_DIR/lib"
LIB_STAMP="$LIB_DIR/.pom.sha256"
PROPS="$KAFKA_DATA_DIR/server.properties"
PARTITIONS_DIR="$KAFKA_DATA_DIR/data"
PID_FILE="$KAFKA_DATA_DIR/kafka.pid"
CLUSTER_ID_FILE="$KAFKA_DATA_DIR/cluster.id"
CONSOLE_OUT="$KAFKA_LOG_DIR/kafka.out"
SERVER_LOG="$KAFKA_LOG_DIR/server.log"
SASL_MARKER="$KAFKA_DATA_DIR/sasl.formatted"

log() { printf 'kafka.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ----------------------------------------------------------------- helpers

pom_hash() { sha256sum "$POM" | cut -d' ' -f1; }

jars_cached() {
    [[ -f "$LIB_STAMP" ]] && [[ "$(cat "$LIB_STAMP")" == "$(pom_hash)" ]]
}

# The pid from the pid file, if that process is alive and is our broker (a
# stale pid file may name a pid the OS has since reused for something else).
running_pid() {
    [[ -f "$PID_FILE" ]] || return 1
    local pid
    pid="$(cat "$PID_FILE" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    if [[ -r "/proc/$pid/cmdline" ]]; then
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q 'kafka\.Kafka' || return 1
    fi
    echo "$pid"
}

port_open() {
    # bash's /dev/tcp: a plain TCP connect, no extra tools needed.
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

classpath() { echo "$LIB_DIR/*"; }

new_cluster_id() {
    # A Kafka Uuid: 16 random bytes, URL-safe base64 without padding (22 chars),
    # the same format `kafka-storage.sh random-uuid` prints, without paying for
    # a JVM start.
    # Like Kafka's Uuid.randomUuid(), never start with '-': the storage tool's
    # argument parser would take such an id for an option.
    local id
    while :; do
        id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
        [[ "$id" != -* ]] && break
    done
    echo "$id"
}

show_log_tail() {
    local n="${1:-40}"
    if [[ -s "$CONSOLE_OUT" ]]; then
        echo "----- last $n lines of $CONSOLE_OUT -----" >&2
        tail -n "$n" "$CONSOLE_OUT" >&2
    fi
    if [[ -s "$SERVER_LOG" ]]; then
        # Skip the tab-indented lines of the startup config dump: they would
        # fill the tail and hide the actual error.
        echo "----- last $n log lines of $SERVER_LOG (config dump omitted) -----" >&2
        grep -v $'^\t' "$SERVER_LOG" | tail -n "$n" >&2
    fi
}

# ----------------------------------------------------------------- commands

cmd_fetch() {
    if jars_cached; then
        log "jars already cached in $LIB_DIR"
        return 0
    fi
    command -v mvn >/dev/null || die "mvn not found on PATH (needed to fetch Kafka from Maven Central)"
    mkdir -p "$KAFKA_CACHE_DIR"
    # Serialize concurrent fetches (parallel test sessions share the cache).
    exec 9>"$KAFKA_CACHE_DIR/.fetch.lock"
    flock 9
    if jars_cached; then
        exec 9>&-
        log "jars already cached in $LIB_DIR"
        return 0
    fi
    local tmp="$KAFKA_CACHE_DIR/lib.tmp.$$"
    rm -rf "$tmp"
    log "fetching Kafka broker jars from Maven Central into $LIB_DIR (first time takes a while)"
    local started=$SECONDS
    if ! mvn -B -q -f "$POM" \
        -Dmaven.repo.local="$KAFKA_MAVEN_REPO" \
        dependency:copy-dependencies \
        -DincludeScope=runtime \
        -DoutputDirectory="$tmp" >"$KAFKA_CACHE_DIR/fetch.log" 2>&1; then
        tail -n 30 "$KAFKA_CACHE_DIR/fetch.log" >&2
        rm -rf "$tmp"
        die "mvn dependency:copy-dependencies failed (full output: $KAFKA_CACHE_DIR/fetch.log)"
    fi
    ls "$tmp"/kafka_2.13-*.jar >/dev/null 2>&1 || die "fetch finished but no kafka_2.13 jar in $tmp"
    pom_hash >"$tmp/.pom.sha256"
    rm -rf "$LIB_DIR"
    mv "$tmp" "$LIB_DIR"
    exec 9>&-  # release the lock; the broker started later must not inherit it
    log "fetched $(ls "$LIB_DIR"/*.jar | wc -l) jars ($(du -sh "$LIB_DIR" | cut -f1)) in $((SECONDS - started))s"
}

sasl_enabled() { [[ -n "$KAFKA_SASL_PORT" ]]; }

check_sasl_settings() {
    sasl_enabled || return 0
    [[ "$KAFKA_SASL_PORT" =~ ^[0-9]+$ ]] || die "KAFKA_SASL_PORT must be a port number, got '$KAFKA_SASL_PORT'"
    [[ -n "$KAFKA_SASL_ADMIN_PASSWORD" ]] || die "KAFKA_SASL_PORT is set but KAFKA_SASL_ADMIN_PASSWORD is not"
    # The password goes into a JAAS line and a --add-scram argument: keep it free of their quoting characters.
    [[ "$KAFKA_SASL_ADMIN_PASSWORD" =~ ^[A-Za-z0-9._~+/=@%-]+$ ]] \
        || die "KAFKA_SASL_ADMIN_PASSWORD may contain only letters, digits and ._~+/=@%-"
}

# The SASL listener, the authorizer and the broker's own logins (as the super user admin):
# SCRAM-SHA-512 between brokers (credential stored at format time), PLAIN on the controller
# listener (KRaft controllers cannot use SCRAM: they start before the metadata holding it).
sasl_config() {
    local pw="$KAFKA_SASL_ADMIN_PASSWORD"
    cat <<EOF

# ---- SASL + ACLs (KAFKA_SASL_PORT is set); later keys override the ones above ----------
listeners=PLAINTEXT://127.0.0.1:${KAFKA_PORT},SASL_PLAINTEXT://127.0.0.1:${KAFKA_SASL_PORT},CONTROLLER://127.0.0.1:${KAFKA_CONTROLLER_PORT}
advertised.listeners=PLAINTEXT://127.0.0.1:${KAFKA_PORT},SASL_PLAINTEXT://127.0.0.1:${KAFKA_SASL_PORT}
listener.security.protocol.map=CONTROLLER:SASL_PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT
inter.broker.listener.name=SASL_PLAINTEXT
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_plaintext.sasl.enabled.mechanisms=SCRAM-SHA-512,SCRAM-SHA-256
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="${pw}";
listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
sasl.mechanism.controller.protocol=PLAIN
listener.name.controller.sasl.enabled.mechanisms=PLAIN
listener.name.controller.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="admin" password="${pw}" user_admin="${pw}";
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:admin
allow.everyone.if.no.acl.found=false
EOF
}

write_config() {
    mkdir -p "$KAFKA_DATA_DIR" "$KAFKA_LOG_DIR" "$PARTITIONS_DIR"
    check_sasl_settings
    : >"$PROPS"
    chmod 600 "$PROPS"  # holds the admin password in SASL mode
    cat >"$PROPS" <<EOF
# Generated by deploy/kafka/kafka.sh from environment variables; edits are
# overwritten at the next start.

# KRaft: one process is both the broker and the (only) controller.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:${KAFKA_CONTROLLER_PORT}
controller.listener.names=CONTROLLER

# Loopback only: nothing outside this machine should reach the broker.
listeners=PLAINTEXT://127.0.0.1:${KAFKA_PORT},CONTROLLER://127.0.0.1:${KAFKA_CONTROLLER_PORT}
advertised.listeners=PLAINTEXT://127.0.0.1:${KAFKA_PORT}
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT

log.dirs=${PARTITIONS_DIR}

# Topics are created explicitly (connectors/kafka/topics.py; Faust creates its own
# internal topics through the admin API), so a typo'd topic name fails loudly
# instead of silently creating a topic.
auto.create.topics.enable=${KAFKA_AUTO_CREATE_TOPICS}
num.partitions=${KAFKA_NUM_PARTITIONS}
default.replication.factor=1
min.insync.replicas=1

# Single node: internal topics cannot have more than one replica. Fewer
# partitions than the defaults (50) keep the first group join fast.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=8
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1

# Tests and demos start consumer groups constantly; do not wait 3 s for more
# members before the first rebalance.
group.initial.rebalance.delay.ms=0

num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.check.interval.ms=300000
EOF
    if sasl_enabled; then sasl_config >>"$PROPS"; fi
}

is_formatted() { [[ -f "$PARTITIONS_DIR/meta.properties" ]]; }

cmd_format() {
    write_config
    if is_formatted; then
        if sasl_enabled && [[ ! -f "$SASL_MARKER" ]]; then
            die "$PARTITIONS_DIR was formatted without SASL (no admin SCRAM credential); use a fresh KAFKA_DATA_DIR"
        fi
        log "storage in $PARTITIONS_DIR already formatted (cluster id $(grep -s '^cluster.id=' "$PARTITIONS_DIR/meta.properties" | cut -d= -f2))"
        return 0
    fi
    jars_cached || cmd_fetch
    local cid
    if [[ -s "$CLUSTER_ID_FILE" ]]; then
        cid="$(cat "$CLUSTER_ID_FILE")"
    else
        cid="$(new_cluster_id)"
        echo "$cid" >"$CLUSTER_ID_FILE"
    fi
    log "formatting KRaft storage in $PARTITIONS_DIR (cluster id $cid)"
    local scram=()
    if sasl_enabled; then
        scram=(--add-scram "SCRAM-SHA-512=[name=admin,password=$KAFKA_SASL_ADMIN_PASSWORD]")
    fi
    if ! "$JAVA" -Xmx256m \
        -Dlog4j2.configurationFile="$LOG4J_CONFIG" -Dkafka.logs.dir="$KAFKA_LOG_DIR" \
        -cp "$(classpath)" kafka.tools.StorageTool format \
        --cluster-id "$cid" --config "$PROPS" --ignore-formatted "${scram[@]}" \
        >"$KAFKA_LOG_DIR/format.out" 2>&1; then
        cat "$KAFKA_LOG_DIR/format.out" >&2
        die "kafka.tools.StorageTool format failed"
    fi
    is_formatted || { cat "$KAFKA_LOG_DIR/format.out" >&2; die "format ran but $PARTITIONS_DIR/meta.properties is missing"; }
    if sasl_enabled; then touch "$SASL_MARKER"; fi
}

cmd_start() {
    local pid
    if pid="$(running_pid)"; then
        log "already running (pid $pid) on 127.0.0.1:$KAFKA_PORT"
        return 0
    fi
    command -v "$JAVA" >/dev/null || die "java not found on PATH (JDK 17+ needed)"
    for p in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" $KAFKA_SASL_PORT; do
        if port_open "$p"; then
            die "port $p on 127.0.0.1 is already in use by another process (set KAFKA_PORT / KAFKA_CONTROLLER_PORT)"
        fi
    done
    cmd_fetch
    cmd_format

    : >"$CONSOLE_OUT"
    log "starting Kafka on 127.0.0.1:$KAFKA_PORT${KAFKA_SASL_PORT:+, SASL on :$KAFKA_SASL_PORT with ACLs} (controller :$KAFKA_CONTROLLER_PORT, data $KAFKA_DATA_DIR)"
    # shellcheck disable=SC2086  # the *_OPTS variables are word lists
    nohup "$JAVA" $KAFKA_HEAP_OPTS $KAFKA_JVM_OPTS \
        -Dlog4j2.configurationFile="$LOG4J_CONFIG" \
        -Dkafka.logs.dir="$KAFKA_LOG_DIR" \
        -cp "$(classpath)" kafka.Kafka "$PROPS" \
        >>"$CONSOLE_OUT" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$PID_FILE"

    # Poll: ready once the client port accepts connections and the broker
    # has logged that startup completed (it can accept on the port a moment
    # before it has caught up with the metadata log).
    local started=$SECONDS deadline=$((SECONDS + KAFKA_START_TIMEOUT))
    while true; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PID_FILE"
            show_log_tail 40
            die "Kafka exited during startup (see $SERVER_LOG)"
        fi
        if grep -q 'Kafka Server started' "$CONSOLE_OUT" 2>/dev/null && port_open "$KAFKA_PORT"; then
            log "ready after $((SECONDS - started))s (pid $pid)"
            return 0
        fi
        if ((SECONDS >= deadline)); then
            show_log_tail 40
            log "Kafka did not become ready within ${KAFKA_START_TIMEOUT}s; stopping it (pid $pid)"
            cmd_stop
            die "Kafka did not become ready within ${KAFKA_START_TIMEOUT}s (see $SERVER_LOG)"
        fi
        sleep 0.2
    done
}

cmd_stop() {
    local pid
    if ! pid="$(running_pid)"; then
        log "not running"
        rm -f "$PID_FILE"
        return 0
    fi
    log "stopping Kafka (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + KAFKA_STOP_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "still running ${KAFKA_STOP_TIMEOUT}s after SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.2
    done
    rm -f "$PID_FILE"
    log "stopped"
}

cmd_status() {
    local pid
    if pid="$(running_pid)"; then
        if port_open "$KAFKA_PORT"; then
            echo "running (pid $pid) on 127.0.0.1:$KAFKA_PORT, data $KAFKA_DATA_DIR"
        else
            echo "starting (pid $pid), 127.0.0.1:$KAFKA_PORT not accepting yet, data $KAFKA_DATA_DIR"
        fi
        return 0
    fi
    echo "stopped (data $KAFKA_DATA_DIR)"
    return 3
}

case "${1:-}" in
    fetch) cmd_fetch ;;
    format) cmd_format ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart) cmd_stop; cmd_start ;;
    status) cmd_status ;;
    config) write_config; cat "$PROPS" ;;
    logs) tail -n "${2:-100}" "$SERVER_LOG" ;;
    *)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
        exit 2
        ;;
esac

#!/usr/bin/env bash
# Starts a Kafka-compatible broker on a loopback port for the Kafka tests
# and benchmark: tansu (https://tansu.io), with in-memory storage.
#
#   scripts/kafka-broker.sh            install tansu if missing, start it, wait
#   scripts/kafka-broker.sh --stop     stop the broker this script started
#
# Then:
#   KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:19092 cargo test -p switchyard --test all kafka
#
# Settings (environment):
#   KAFKA_PORT       port to listen on (default 19092)
#   TANSU_VERSION    version installed from crates.io (default 0.6.0)
#   TANSU_ROOT       where it is installed (default ~/.cache/switchyard-tools;
#                    the binary is $TANSU_ROOT/bin/tansu). Building it takes
#                    about a quarter of an hour on two cores, once.
#   TANSU_LOG        the broker's log (default $TANSU_ROOT/tansu-<port>.log)
#
# The storage is in memory: a restarted broker starts empty.
set -euo pipefail

PORT="${KAFKA_PORT:-19092}"
VERSION="${TANSU_VERSION:-0.6.0}"
ROOT="${TANSU_ROOT:-$HOME/.cache/switchyard-tools}"
BIN="$ROOT/bin/tansu"
LOG="${TANSU_LOG:-$ROOT/tansu-$PORT.log}"
PIDFILE="$ROOT/tansu-$PORT.pid"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if [ "${1:-}" = "--stop" ]; then
    if [ -f "$PIDFILE" ] && kill "$(cat "$PIDFILE")" 2>/dev/null; then
        echo "stopped the broker on 127.0.0.1:$PORT"
    fi
    rm -f "$PIDFILE"
    exit 0
fi

if [ "${1:-}" != "" ]; then
    echo "usage: $0 [--stop]" >&2
    exit 2
fi

if port_open "$PORT"; then
    echo "a broker already listens on 127.0.0.1:$PORT"
    echo "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$PORT"
    exit 0
fi

if ! [ -x "$BIN" ] || ! "$BIN" --version 2>/dev/null | grep -q "$VERSION"; then
    echo "installing tansu $VERSION into $ROOT (one-off build, several minutes)"
    mkdir -p "$ROOT"
    # Its own target directory, so it never shares a lock with the project's build.
    CARGO_TARGET_DIR="$ROOT/build" cargo install tansu --version "$VERSION" \
        --features dynostore --locked --root "$ROOT"
    rm -rf "$ROOT/build"
fi

mkdir -p "$(dirname "$LOG")"
echo "starting tansu on 127.0.0.1:$PORT (log: $LOG)"
# setsid: the broker outlives this script and the CI step that ran it.
setsid "$BIN" broker \
    --listener-url "tcp://127.0.0.1:$PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$PORT" \
    --storage-engine "memory://tansu/" \
    >"$LOG" 2>&1 </dev/null &
echo $! >"$PIDFILE"

for _ in $(seq 1 60); do
    if port_open "$PORT"; then
        echo "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$PORT"
        exit 0
    fi
    if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        echo "error: tansu exited; the end of its log:" >&2
        tail -n 20 "$LOG" >&2
        exit 1
    fi
    sleep 0.5
done
echo "error: tansu did not listen on 127.0.0.1:$PORT within 30 s; see $LOG" >&2
exit 1

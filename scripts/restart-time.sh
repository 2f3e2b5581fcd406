#!/usr/bin/env bash
# How long `sfc-server` takes to serve again on a big backlog, after `kill -9` and after a clean
# stop (SIGTERM): from the start of the process to its `serving` log line (the store is open and
# the endpoint bound; the line is written just before the accept loop starts). Besides the
# wall-clock time it prints the CPU time the server used until then (user + system, from
# /proc), which a busy machine inflates far less.
#
# usage: scripts/restart-time.sh DIR FILLED [ROUNDS]
#   DIR holds the sfc-server binary. FILLED is a data directory as a killed server left it,
#   e.g. made by `DIR/examples/pending_fill FILLED 100 10000 240 --kill` (1,000,000 pending
#   messages in 100 inboxes; `cargo build --release --example pending_fill`). It is never
#   changed: each round copies it, then
#     1. starts the server on the copy: the restart after SIGKILL,
#     2. stops it with SIGTERM (the time the stop took is printed too),
#     3. starts it again: the restart after SIGTERM, and stops it.
#   ROUNDS (default 3) rounds; the medians come last.
# example: scripts/restart-time.sh target/release /tmp/filled 3
set -euo pipefail

dir=${1:?usage: scripts/restart-time.sh DIR FILLED [ROUNDS]}
filled=${2:?usage: scripts/restart-time.sh DIR FILLED [ROUNDS]}
rounds=${3:-3}
work=$(mktemp -d)
pid=
cleanup() {
    if [ -n "$pid" ]; then kill -KILL "$pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
"$dir/sfc-server" gen-certs --dir "$work/certs" >/dev/null

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# CPU time (user + system) of process $1 so far, in milliseconds.
cpu_ms() {
    awk -v hz="$(getconf CLK_TCK)" '{ print int(($14 + $15) * 1000 / hz) }' "/proc/$1/stat"
}

# Starts the server on $work/data; sets pid, ms to the milliseconds until it serves and cpu
# to the CPU milliseconds it used until then.
start() {
    local log=$1 began
    began=$(now_ms)
    RUST_LOG=info "$dir/sfc-server" --listen 127.0.0.1:0 --data "$work/data" \
        --certs "$work/certs" 2>"$log" >/dev/null &
    pid=$!
    until grep -q ' serving' "$log"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "the server exited before serving:" >&2
            cat "$log" >&2
            exit 1
        fi
        sleep 0.005
    done
    ms=$(($(now_ms) - began))
    cpu=$(cpu_ms "$pid")
}

# Stops it with SIGTERM; sets ms to the milliseconds the stop took.
stop() {
    local began
    began=$(now_ms)
    kill -TERM "$pid"
    local status=0
    wait "$pid" || status=$?
    if [ "$status" -ne 0 ]; then
        echo "the server did not exit cleanly after SIGTERM (status $status):" >&2
        tail -5 "$work/log1" "$work/log2" >&2
        exit 1
    fi
    pid=
    ms=$(($(now_ms) - began))
}

journal_bytes() {
    find "$work/data" -maxdepth 1 -name '*.jnl' -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }'
}

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

killed=() termed=() stops=() killed_cpu=() termed_cpu=()
for round in $(seq "$rounds"); do
    rm -rf "$work/data"
    cp -a "$filled" "$work/data"
    sync
    journals=$(journal_bytes)
    start "$work/log1"
    k=$ms kc=$cpu
    stop
    s=$ms
    left=$(journal_bytes)
    start "$work/log2"
    t=$ms tc=$cpu
    stop
    echo "round $round: after SIGKILL ${k} ms (CPU ${kc} ms; journals $((journals / 1048576)) MiB)," \
        "SIGTERM took ${s} ms (journals left $((left / 1048576)) MiB)," \
        "after SIGTERM ${t} ms (CPU ${tc} ms)"
    killed+=("$k") termed+=("$t") stops+=("$s") killed_cpu+=("$kc") termed_cpu+=("$tc")
done
m() { printf '%s\n' "$@" | median; }
echo "median: after SIGKILL $(m "${killed[@]}") ms (CPU $(m "${killed_cpu[@]}") ms)," \
    "stop $(m "${stops[@]}") ms, after SIGTERM $(m "${termed[@]}") ms (CPU $(m "${termed_cpu[@]}") ms)"

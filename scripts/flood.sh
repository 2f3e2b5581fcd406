#!/usr/bin/env bash
# What a flood costs honest users: starts a release sfc-server (default limits, signups
# unthrottled for the honest relay's set-up), measures an honest relay (sfc-bench relay,
# open loop) and the server's RSS unloaded, then again while a flood runs, then the server's
# RSS once the flood is over.
#
#   idle:   CONNECTIONS (default 5000) connections that say `hello` and never log in
#           (sfc-bench flood), spread over SOURCES loopback addresses (127.1.0.x), held
#           HOLD seconds.
#   logins: CONNECTIONS (default 2000) wrong-password logins (sfc-bench flood-logins, when
#           this build has it), from SOURCES addresses, for HOLD seconds.
#
# usage: scripts/flood.sh [idle|logins] [CONNECTIONS] [HOLD]
# environment: SOURCES (64), PAIRS (10), RATE (500 msg/s in all), RELAY_SECS (10),
#              NO_BUILD=1 to use target/release as it is, FLOOD_PREFIX to run the flood
#              generator under a command, e.g. FLOOD_PREFIX="nice -n 19": on one machine the
#              generator's own CPU competes with the server and the honest relay, which a
#              flood from elsewhere would not.
# The honest relay runs from 127.0.0.1, the flood from 127.1.0.x (all of 127/8 is loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-idle}"
case "$mode" in
    idle) connections="${2:-5000}" ;;
    logins) connections="${2:-2000}" ;;
    *) echo "usage: $0 [idle|logins] [CONNECTIONS] [HOLD]" >&2; exit 2 ;;
esac
relay_secs="${RELAY_SECS:-10}"
hold="${3:-$((relay_secs + 10))}"
sources="${SOURCES:-64}"
pairs="${PAIRS:-10}"
rate="${RATE:-500}"
flood_prefix="${FLOOD_PREFIX:-}"
if [[ -z "${NO_BUILD:-}" ]]; then
    cargo build --release --quiet --bin sfc-server --bin sfc-bench
fi
bin=target/release
if [[ $mode == logins ]] && ! "$bin/sfc-bench" --help | grep -q flood-logins; then
    echo "this sfc-bench has no flood-logins scenario yet" >&2
    exit 2
fi

dir=$(mktemp -d)
server_pid=""
cleanup() {
    [[ -n "$server_pid" ]] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    for job in $(jobs -p); do kill "$job" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap cleanup EXIT

# Default limits, except those the honest relay's own setup would trip from 127.0.0.1 (it signs
# up 16 users at once and sends 50 messages/s per account): with the per-address password-work
# cap off, a login flood is the worse case for the server.
"$bin/sfc-server" --listen 127.0.0.1:0 --data "$dir/data" --certs "$dir/certs" \
    --signups-per-minute 0 --password-work-per-address 0 --sends-per-minute 0 \
    2>"$dir/server.log" &
server_pid=$!
addr=""
for _ in $(seq 100); do
    addr=$(grep -o 'listen=[^ ]*' "$dir/server.log" | head -1 | cut -d= -f2 || true)
    [[ -n "$addr" ]] && break
    sleep 0.1
done
[[ -n "$addr" ]] || { echo "the server did not start:" >&2; cat "$dir/server.log" >&2; exit 1; }
ca="$dir/certs/ca.crt"

rss_mib() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$server_pid/status"; }
# CPU (user + system) the server has used so far, in milliseconds: robust to a busy machine.
cpu_ms() {
    awk -v hz="$(getconf CLK_TCK)" '{ print int(($14 + $15) * 1000 / hz) }' "/proc/$server_pid/stat"
}
# The relay, with the server CPU per second it took (the flood's share included when flooded).
measured_relay() {
    local before after out
    before=$(cpu_ms)
    out=$(relay)
    after=$(cpu_ms)
    echo "$out; server CPU $(((after - before) / relay_secs)) ms/s"
}
relay() {
    "$bin/sfc-bench" relay --server "$addr" --ca "$ca" --clients "$pairs" --rate "$rate" \
        --duration "$relay_secs" --json 2>"$dir/relay.err" |
        python3 -c 'import json, sys
r = json.load(sys.stdin); l = r["latency_us"]
print("p50 %d us, p99 %d us, p99.9 %d us, delivered %d, errors %d"
      % (l["p50"], l["p99"], l["p999"], r["delivered"], r["errors"]))' 2>/dev/null ||
        echo "FAILED: $(grep -v '^sfc-bench: relay' "$dir/relay.err" | tail -1)"
}

echo "server $addr (pid $server_pid); $mode flood of $connections from $sources addresses"
echo "honest relay: $pairs pairs, $rate msg/s open loop, $relay_secs s, from 127.0.0.1"
echo "unloaded:  RSS $(rss_mib) MiB; relay $(measured_relay); RSS after it $(rss_mib) MiB"

if [[ $mode == idle ]]; then
    $flood_prefix "$bin/sfc-bench" flood --server "$addr" --ca "$ca" --clients "$connections" \
        --sources "$sources" --duration "$hold" >"$dir/flood.out" 2>"$dir/flood.log" &
    ready='holding'
else
    $flood_prefix "$bin/sfc-bench" flood-logins --server "$addr" --ca "$ca" --connections "$connections" \
        --sources "$sources" --duration "$hold" >"$dir/flood.out" 2>"$dir/flood.log" &
    ready='flooding with'
fi
flood_pid=$!
if [[ -n "$ready" ]]; then
    for _ in $(seq 600); do
        grep -q "$ready" "$dir/flood.log" && break
        kill -0 "$flood_pid" 2>/dev/null || break
        sleep 0.1
    done
    grep -o 'round 1 holding [0-9]* connections\|flooding with .*' "$dir/flood.log" || true
fi
echo "flooded:   RSS $(rss_mib) MiB; relay $(measured_relay); RSS after it $(rss_mib) MiB"
wait "$flood_pid" || true
sleep 5
echo "after:     RSS $(rss_mib) MiB (flood over, 5 s later)"
echo "--- sfc-bench $([[ $mode == idle ]] && echo flood || echo flood-logins) said:"
cat "$dir/flood.out"

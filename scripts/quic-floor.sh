#!/usr/bin/env bash
# Full handshakes of SecureFastChat against the floor of QUIC + TLS alone, in alternated rounds:
#   floor: examples/quic_floor.rs (our TLS and transport configuration, a 2-byte request and
#          reply on one stream, no application protocol);
#   sfc:   sfc-server + `sfc-bench handshake` (connect, TLS, hello, close).
# Both use 16 loops over 4 shared client endpoints, TLS resumption off. For each run it prints
# handshakes per second and the CPU per handshake of the server (from /proc) and of the client
# (from its rusage, via /usr/bin/time).
#
# usage: scripts/quic-floor.sh [ROUNDS] [SECONDS]     (defaults: 3 rounds of 5 s)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
secs="${2:-5}"
loops=16
command -v /usr/bin/time >/dev/null || { echo "quic-floor.sh: /usr/bin/time is needed (apt-get install time)" >&2; exit 1; }
cargo build --release --quiet --bin sfc-server --bin sfc-bench --example quic_floor
bin=target/release
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
"$bin/sfc-server" gen-certs --dir "$work/certs" >/dev/null

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# run KIND PORT: starts the server, loads it, prints one line.
run() {
    local kind="$1" port="$2" pid
    local log="$work/server-$port.log" ready
    if [[ $kind == floor ]]; then
        "$bin/examples/quic_floor" server "127.0.0.1:$port" "$work/certs" 2>"$log" &
        ready="listening on"
    else
        "$bin/sfc-server" --listen "127.0.0.1:$port" --data "$work/data-$port" \
            --certs "$work/certs" >"$log" 2>&1 &
        ready="serving"
    fi
    pid=$!
    # Each server says when it listens; give up after 10 s.
    for _ in $(seq 100); do
        grep -q "$ready" "$log" && break
        kill -0 "$pid" 2>/dev/null || { echo "quic-floor.sh: the $kind server exited:" >&2; cat "$log" >&2; exit 1; }
        sleep 0.1
    done
    grep -q "$ready" "$log" || { echo "quic-floor.sh: the $kind server did not start" >&2; exit 1; }
    local before after done
    before=$(cpu_ticks "$pid")
    if [[ $kind == floor ]]; then
        done=$(/usr/bin/time -f "%U %S" -o "$work/time" "$bin/examples/quic_floor" client \
            "127.0.0.1:$port" "$work/certs/ca.crt" "$secs" "$loops" | awk '{print $1}')
    else
        done=$(/usr/bin/time -f "%U %S" -o "$work/time" "$bin/sfc-bench" handshake \
            --server "127.0.0.1:$port" --ca "$work/certs/ca.crt" --clients "$loops" \
            --duration "$secs" --json 2>/dev/null |
            python3 -c 'import json, sys; print(json.load(sys.stdin)["sent"])')
    fi
    after=$(cpu_ticks "$pid")
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local hz
    hz=$(getconf CLK_TCK)
    awk -v kind="$kind" -v n="$done" -v secs="$secs" -v ticks=$((after - before)) -v hz="$hz" \
        -v client="$(awk '{print $1 + $2}' "$work/time")" \
        'BEGIN { printf "%-5s %6d handshakes %6.0f/s  server %4.0f µs  client %4.0f µs of CPU per handshake\n",
                 kind, n, n / secs, ticks / hz / n * 1e6, client / n * 1e6 }'
}

port=47300
for round in $(seq "$rounds"); do
    for kind in floor sfc; do
        port=$((port + 1))
        run "$kind" "$port"
    done
done

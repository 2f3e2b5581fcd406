#!/usr/bin/env bash
# A/B comparison of sfc-server builds under the same load, alternated in one run so the noise of
# a shared machine hits every build alike. Each build gets the same sfc-bench scenarios:
#   relay, 100 pairs, full speed          -> delivered messages/s
#   relay, 100 pairs, 5,000 messages/s    -> latency p50/p99/p99.9
#   the server's CPU per message during the fixed-rate run (perf stat, 5 s window), if perf exists
#
#   scripts/ab.sh [--rounds N] SERVER_BIN_A SERVER_BIN_B [...]
# Build the variants first (e.g. `git stash; cargo build --release; cp target/release/sfc-server
# /tmp/a; git stash pop; cargo build --release; cp target/release/sfc-server /tmp/b`).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=3
if [[ "${1:-}" == "--rounds" ]]; then rounds=$2; shift 2; fi
if [[ $# -lt 2 ]]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
cargo build --release --locked --quiet --bin sfc-bench
bench=target/release/sfc-bench
rate_json=$(mktemp)
trap 'rm -f "$rate_json"' EXIT
summary() {
  python3 - "$1" <<'PY'
import json, sys
d = json.loads(sys.argv[1])
l = d["latency_us"]
print("%.0f/s lost=%d dup=%d p50=%dus p99=%dus p99.9=%dus" % (
    d["throughput_per_s"], d["lost"], d["duplicates"], l["p50"], l["p99"], l["p999"]))
PY
}
for round in $(seq "$rounds"); do
  for bin in "$@"; do
    full=$("$bench" relay --server-bin "$bin" --clients 100 --duration 5 --json 2>/dev/null)
    "$bench" relay --server-bin "$bin" --clients 100 --rate 5000 --duration 16 --json \
      >"$rate_json" 2>/dev/null &
    load=$!
    cpu=""
    if command -v perf >/dev/null; then
      # Past set-up (sign-ups hash passwords), measure 5 s of steady load.
      sleep 10
      if pid=$(pgrep -n -f "^$bin") && t=$(perf stat -x, -e task-clock -p "$pid" -- sleep 5 2>&1 \
          | grep task-clock | cut -d, -f1); then
        cpu=$(python3 -c "print('%.1f' % (float('$t') * 1000 / (5000 * 5)))")
      fi
    fi
    wait "$load"
    echo "round $round $bin"
    echo "  full speed:  $(summary "$full")"
    echo "  5,000/s:     $(summary "$(cat "$rate_json")")${cpu:+  server CPU ${cpu} us/message}"
  done
done

#!/usr/bin/env bash
# The full-speed relay of SecureFastChat against the floor of its traffic on QUIC and TLS
# alone, in alternated rounds:
#   floor: examples/relay_floor.rs (our TLS and transport configuration; per message a
#          unidirectional stream in, one out and a `sent` event, acks batched as sfc-bench's
#          receivers do; no accounts, store, sync or sealing);
#   sfc:   sfc-bench relay against sfc-server (sync durability).
# Both: PAIRS sender/receiver pairs, 8 sends in flight per sender, 4 shared client endpoints,
# 128 B messages, the server spawned by the load generator. Each run prints the delivered rate
# and the CPU per message of each side over a window in the middle of the load
# (scripts/lib/relay-window.sh, WINDOW seconds, default 3).
#
# usage: scripts/relay-floor.sh [ROUNDS] [PAIRS] [SECONDS]   (defaults: 3 rounds, 100 pairs, 8 s)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
pairs="${2:-100}"
secs="${3:-8}"
cargo build --release --quiet --bin sfc-server --bin sfc-bench --example relay_floor
bin=target/release
log=$(mktemp)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -f "$log"' EXIT

# shellcheck source=lib/relay-window.sh
source scripts/lib/relay-window.sh
for round in $(seq "$rounds"); do
    for kind in floor sfc; do
        if [[ $kind == floor ]]; then
            start_load "$log" "$bin/examples/relay_floor" spawn "$pairs" "$secs"
        else
            start_relay "$log" "$bin/sfc-bench" "$bin/sfc-server" --clients "$pairs" \
                --duration "$secs"
        fi
        printf 'round %s %-5s ' "$round" "$kind"
        cpu_window "$log" "${WINDOW:-3}"
    done
done

#!/usr/bin/env bash
# Files end to end against the floor of QUIC + TLS alone, in alternated rounds, for each size:
#   floor: examples/file_floor.rs (our TLS and transport configuration, the bytes on one stream
#          each way, no sealing, no disk);
#   sfc:   `sfc-bench file` (send-file to an online and to an offline recipient: sealed,
#          uploaded, synced, the file message, fetched, opened and checked), against an
#          sfc-server it spawns.
# Prints each size's medians (MB/s of file bytes), the server's CPU per GB moved and the peak
# RSS of the server, the client process and the floor server; --json prints sfc-bench's JSON.
#
# usage: scripts/file-bench.sh [--json] [ROUNDS] [SIZE...]   (defaults: 3 rounds; 100 MiB, 1 GiB)
#        needs about 3 × the largest size free under ${TMPDIR:-/tmp}
set -euo pipefail
cd "$(dirname "$0")/.."
json=()
if [[ "${1:-}" == "--json" ]]; then
    json=(--json)
    shift
fi
rounds="${1:-3}"
shift || true
sizes=("$@")
if [[ ${#sizes[@]} -eq 0 ]]; then
    sizes=(104857600 1073741824)
fi
cargo build --release --locked --quiet --bin sfc-server --bin sfc-bench --example file_floor
for size in "${sizes[@]}"; do
    echo "== sfc-bench file --size $size --rounds $rounds" >&2
    target/release/sfc-bench file --size "$size" --rounds "$rounds" "${json[@]}"
done

#!/usr/bin/env bash
# CPU per delivered message of the load generator and the server in the steady middle of an
# offline drain (the `offline` scenario's drain of one client's backlog), read from /proc over
# a window of progress lines, as scripts/cpu-window.sh does for the relay: the drain's figure
# in the suite also counts its start (the login, the first store reads) and its end.
#
# usage: scripts/drain-window.sh DIR [ROUNDS]
#   DIR holds the sfc-bench and sfc-server binaries to use. Each round runs `DIR/sfc-bench
#   offline --clients 1 --backlog BACKLOG --spawn --server-bin DIR/sfc-server` (BACKLOG
#   default 300000) and measures WINDOW seconds of the drain (default 1), SETTLE seconds
#   (default 0.3) after it begins.
# example: scripts/drain-window.sh target/release 3
set -euo pipefail

dir=${1:?usage: scripts/drain-window.sh DIR [ROUNDS]}
rounds=${2:-1}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

export LOAD_LINE="offline drain" SETTLE="${SETTLE:-0.3}"
# shellcheck source=lib/relay-window.sh
source "$(dirname "$0")/lib/relay-window.sh"
for round in $(seq "$rounds"); do
    start_load "$log" "$dir/sfc-bench" offline --spawn --server-bin "$dir/sfc-server" \
        --clients 1 --backlog "${BACKLOG:-300000}"
    printf 'round %s ' "$round"
    cpu_window "$log" "${WINDOW:-1}"
    grep -E "^throughput" "$log"
done

#!/usr/bin/env bash
# CPU per delivered message of the load generator, the server and the server's inbox writer
# and committer threads (the group commit), read from /proc over a window in the middle of a
# relay run (the steadiest figure on a noisy machine: a fixed amount of work per message,
# whatever else the machine does), and the UDP datagrams per message in that window (from
# /proc/net/snmp: every datagram on the machine, so run nothing else that talks UDP).
#
# usage: scripts/cpu-window.sh DIR [sfc-bench relay flags...]
#   DIR holds the sfc-bench and sfc-server binaries to use (e.g. target/release, or a copy of
#   an older build for an A/B run). The run is `DIR/sfc-bench relay --spawn --server-bin
#   DIR/sfc-server FLAGS`; give it at least --duration 6 so the window (1 s after the load
#   starts, then WINDOW whole seconds of progress lines, default 3) fits inside the load.
# example: scripts/cpu-window.sh target/release --clients 100 --duration 7 --rate 5000
set -euo pipefail

dir=${1:?usage: scripts/cpu-window.sh DIR [sfc-bench relay flags...]}
shift
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# shellcheck source=lib/relay-window.sh
source "$(dirname "$0")/lib/relay-window.sh"
start_relay "$log" "$dir/sfc-bench" "$dir/sfc-server" "$@"
cpu_window "$log" "${WINDOW:-3}"
grep -E "^(scenario|throughput)" "$log"

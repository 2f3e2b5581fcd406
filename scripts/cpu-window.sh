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
window=${WINDOW:-3}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# shellcheck source=lib/relay-window.sh
source "$(dirname "$0")/lib/relay-window.sh"
start_relay "$log" "$dir/sfc-bench" "$dir/sfc-server" "$@"
sleep 1
# The group commit's two threads: the writer (sfc-inbox-writer) and the committer
# (sfc-inbox-commit); builds from before the committer have the writer only.
inbox_threads=$(grep -l '^sfc-inbox-' /proc/"$server"/task/*/comm | xargs -n1 dirname)

# UDP datagrams received on the whole machine (loopback: each one sent is received once).
udp_datagrams() { awk '/^Udp:/ && $2 ~ /^[0-9]+$/ { print $2 }' /proc/net/snmp; }
ticks() { awk '{print $14 + $15}' "$1"; }           # utime + stime, in clock ticks
inbox_ticks() {
    local t total=0
    for t in $inbox_threads; do total=$((total + $(ticks "$t/stat"))); done
    echo "$total"
}
fresh_line "$log"
b0=$(ticks /proc/$bench/stat); s0=$(ticks /proc/$server/stat); w0=$(inbox_ticks)
d0=$(delivered "$log"); t0=$(date +%s.%N); u0=$(udp_datagrams)
sleep "$(awk -v w="$window" 'BEGIN { print w - 0.5 }')"
fresh_line "$log"
b1=$(ticks /proc/$bench/stat); s1=$(ticks /proc/$server/stat); w1=$(inbox_ticks)
d1=$(delivered "$log"); t1=$(date +%s.%N); u1=$(udp_datagrams)
wait "$bench"

hz=$(getconf CLK_TCK)
python3 - "$hz" "$t0" "$t1" "$d0" "$d1" "$b0" "$b1" "$s0" "$s1" "$w0" "$w1" "$u0" "$u1" <<'EOF'
import sys
hz, t0, t1, d0, d1, b0, b1, s0, s1, w0, w1, u0, u1 = map(float, sys.argv[1:])
n, dt = d1 - d0, t1 - t0
per = lambda a, b: (b - a) / hz * 1e6 / n
print(f"window {dt:.1f} s, {n:.0f} delivered ({n / dt:,.0f}/s): CPU per message "
      f"load generator {per(b0, b1):.1f} us, server {per(s0, s1):.1f} us "
      f"(inbox writer and committer {per(w0, w1):.1f} us); "
      f"UDP datagrams per message {(u1 - u0) / n:.2f}")
EOF
grep -E "^(scenario|throughput)" "$log"

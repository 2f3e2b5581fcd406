# Shared by scripts/cpu-window.sh, scripts/relay-floor.sh, scripts/drain-window.sh and
# scripts/callgrind.sh (sourced, not run): start a load, find whole-second windows in it from
# sfc-bench's progress lines, and measure the CPU per message over one.
#
# LOAD_LINE is the phase whose progress lines count: `relay load` unless set (the drain of
# the offline scenario is `offline drain`).
LOAD_LINE=${LOAD_LINE:-relay load}

# start_relay LOG BENCH SERVER_BIN [relay flags...]: runs `BENCH relay --spawn` in the
# background with its output in LOG, waits until the load phase has begun, and sets `bench`
# (its pid) and `server` (the pid of the server it spawned).
start_relay() {
    local log=$1 bench_bin=$2 server_bin=$3
    shift 3
    start_load "$log" "$bench_bin" relay --spawn --server-bin "$server_bin" "$@"
}

# start_load LOG COMMAND...: the same for any load generator that spawns its server as its
# first child and prints sfc-bench's progress lines (`relay load ..., delivered N`), such as
# examples/relay_floor.rs or `sfc-bench offline` (with LOAD_LINE="offline drain").
start_load() {
    local log=$1
    shift
    "$@" >"$log" 2>&1 &
    bench=$!
    until grep -q "$LOAD_LINE" "$log" 2>/dev/null; do
        kill -0 "$bench" 2>/dev/null || { cat "$log" >&2; exit 1; }
        sleep 0.1
    done
    server=$(pgrep -P "$bench" | head -1)
}

# delivered LOG: the delivered count of the last progress line (one a second).
delivered() { grep "$LOAD_LINE" "$1" | tail -1 | sed 's/.*delivered \([0-9,]*\).*/\1/' | tr -d ,; }

# fresh_line LOG: waits for the next progress line, so that a figure read right after it and
# the delivered count describe the same instant.
fresh_line() {
    local lines
    lines=$(grep -c "$LOAD_LINE" "$1")
    while [ "$(grep -c "$LOAD_LINE" "$1")" -le "$lines" ]; do sleep 0.01; done
}

# cpu_window LOG SECONDS: after SETTLE seconds of load (default 1), the CPU per delivered message of the load
# generator (`bench`), the server (`server`) and the server's inbox writer and committer
# threads (the group commit; none in a build without them), read from /proc over SECONDS of
# progress lines, and the UDP datagrams per message in that window (from /proc/net/snmp: every
# datagram on the machine, so run nothing else that talks UDP). Prints one line, then waits for
# the load generator to exit (and shows its last lines if it failed).
cpu_window() {
    local log=$1 window=$2 inbox_threads
    sleep "${SETTLE:-1}"
    # The group commit's two threads: the writer (sfc-inbox-writer) and the committer
    # (sfc-inbox-commit); builds from before the committer have the writer only.
    inbox_threads=$(grep -l '^sfc-inbox-' /proc/"$server"/task/*/comm | xargs -r -n1 dirname || true)
    fresh_line "$log"
    local b0 s0 w0 d0 t0 u0 b1 s1 w1 d1 t1 u1
    # shellcheck disable=SC2086 # one argument per thread
    b0=$(ticks /proc/$bench/stat); s0=$(ticks /proc/$server/stat); w0=$(inbox_ticks $inbox_threads)
    d0=$(delivered "$log"); t0=$(date +%s.%N); u0=$(udp_datagrams)
    sleep "$(awk -v w="$window" 'BEGIN { print w - 0.5 }')"
    fresh_line "$log"
    # shellcheck disable=SC2086
    b1=$(ticks /proc/$bench/stat); s1=$(ticks /proc/$server/stat); w1=$(inbox_ticks $inbox_threads)
    d1=$(delivered "$log"); t1=$(date +%s.%N); u1=$(udp_datagrams)
    local failed=0
    wait "$bench" || failed=$?
    python3 - "$(getconf CLK_TCK)" "$t0" "$t1" "$d0" "$d1" "$b0" "$b1" "$s0" "$s1" "$w0" "$w1" "$u0" "$u1" <<'EOF'
import sys
hz, t0, t1, d0, d1, b0, b1, s0, s1, w0, w1, u0, u1 = map(float, sys.argv[1:])
n, dt = d1 - d0, t1 - t0
per = lambda a, b: (b - a) / hz * 1e6 / n
print(f"window {dt:.1f} s, {n:.0f} delivered ({n / dt:,.0f}/s): CPU per message "
      f"load generator {per(b0, b1):.1f} us, server {per(s0, s1):.1f} us "
      f"(inbox writer and committer {per(w0, w1):.1f} us); "
      f"UDP datagrams per message {(u1 - u0) / n:.2f}")
EOF
    if [ "$failed" -ne 0 ]; then
        echo "the load generator exited with status $failed after the window; its last lines:"
        tail -n 5 "$log"
    fi
}

# UDP datagrams received on the whole machine (loopback: each one sent is received once).
udp_datagrams() { awk '/^Udp:/ && $2 ~ /^[0-9]+$/ { print $2 }' /proc/net/snmp; }
ticks() { awk '{print $14 + $15}' "$1"; }           # utime + stime, in clock ticks
# inbox_ticks [TASK_DIR...]: the summed ticks of those threads.
inbox_ticks() {
    local t total=0
    for t in "$@"; do total=$((total + $(ticks "$t/stat"))); done
    echo "$total"
}

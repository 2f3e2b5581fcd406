# Shared by scripts/cpu-window.sh and scripts/callgrind.sh (sourced, not run): start a relay
# load and find whole-second windows in it from sfc-bench's progress lines.

# start_relay LOG BENCH SERVER_BIN [relay flags...]: runs `BENCH relay --spawn` in the
# background with its output in LOG, waits until the load phase has begun, and sets `bench`
# (its pid) and `server` (the pid of the server it spawned).
start_relay() {
    local log=$1 bench_bin=$2 server_bin=$3
    shift 3
    "$bench_bin" relay --spawn --server-bin "$server_bin" "$@" >"$log" 2>&1 &
    bench=$!
    until grep -q "relay load" "$log" 2>/dev/null; do
        kill -0 "$bench" 2>/dev/null || { cat "$log" >&2; exit 1; }
        sleep 0.1
    done
    server=$(pgrep -P "$bench" | head -1)
}

# delivered LOG: the delivered count of the last progress line (one a second).
delivered() { grep "relay load" "$1" | tail -1 | sed 's/.*delivered \([0-9,]*\).*/\1/' | tr -d ,; }

# fresh_line LOG: waits for the next progress line, so that a figure read right after it and
# the delivered count describe the same instant.
fresh_line() {
    local lines
    lines=$(grep -c "relay load" "$1")
    while [ "$(grep -c "relay load" "$1")" -le "$lines" ]; do sleep 0.01; done
}

#!/usr/bin/env bash
# The standard benchmark suite: builds sfc-server and sfc-bench (release), runs each scenario of
# sfc-bench against a server it spawns, saves the results as JSON lines, and regenerates the block
# of docs/BENCHMARKS.md between `<!-- bench.sh: begin -->` and `<!-- bench.sh: end -->` and the
# plots in docs/bench/. Everything else in BENCHMARKS.md (the hand-written analysis) is kept.
# A round of the suite's runs takes about 3.5 minutes on 2 cores, made SFC_BENCH_REPEAT times (3: the
# report gives each figure's median, with the range in the notes; this machine's speed moves
# within minutes), plus the build and any criterion micro benchmarks (benches/micro.rs, run
# where it exists); --quick takes about one minute.
#
# usage: scripts/bench.sh [--quick] [--no-micro] [--report-only]
#   --quick        a short, small run to test this script (not figures to quote)
#   --no-micro     skip `cargo bench --bench micro` even where benches/micro.rs exists
#   --report-only  no runs: rebuild the report and plots from the last results
#
# environment (defaults in brackets, --quick's after the slash):
#   SFC_BENCH_REPEAT       rounds of the whole list of runs; medians are reported [3 / 1]
#   SFC_BENCH_DURATION     seconds of load per run [5 / 1]
#   SFC_BENCH_PAIRS        relay pairs at full speed, sync durability ["1 10 50 100 1000" / "1 10 100"]
#   SFC_BENCH_RATE         messages/s of the open-loop latency run, 100 pairs [5000]
#   SFC_BENCH_BACKLOG      messages drained by one client in the offline run [100000 / 10000]
#   SFC_BENCH_CONNECTIONS  idle connections held [10000 / 200]
#   SFC_BENCH_MICRO_TIME   criterion measurement seconds per micro benchmark [2 / 0.3]
#   SFC_BENCH_TIMEOUT      seconds after which one run is stopped and counted as failed [600]
#   SFC_BENCH_RETRIES      times a failed run is tried again before it counts as failed [1]
#   SFC_BENCH_PEER         0 skips the peer table (scripts/peer-bench.sh: mosquitto + TLS next to sfc,
#                          one shard and the QUIC + TLS floor, alternated; only with mosquitto) [1]
#   CARGO_TARGET_DIR       where cargo builds [target]; results go to $CARGO_TARGET_DIR/bench/
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

quick=0
micro=1
report_only=0
for arg in "$@"; do
    case "$arg" in
        --quick) quick=1 ;;
        --no-micro) micro=0 ;;
        --report-only) report_only=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "bench.sh: unknown argument: $arg (see --help)" >&2
            exit 2
            ;;
    esac
done

die() {
    echo "bench.sh: $*" >&2
    exit 1
}
command -v python3 >/dev/null || die "python3 is needed for the report (standard library only): install it, e.g. apt-get install python3"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 8))' || die "python3 3.8 or newer is needed"
if [[ $report_only == 0 ]]; then
    command -v cargo >/dev/null || die "cargo is needed (https://rustup.rs)"
    command -v timeout >/dev/null || die "timeout (GNU coreutils) is needed"
fi

if [[ $quick == 1 ]]; then
    duration=${SFC_BENCH_DURATION:-1}
    pairs=${SFC_BENCH_PAIRS:-"1 10 100"}
    backlog=${SFC_BENCH_BACKLOG:-10000}
    connections=${SFC_BENCH_CONNECTIONS:-200}
    micro_time=${SFC_BENCH_MICRO_TIME:-0.3}
    repeat=${SFC_BENCH_REPEAT:-1}
else
    duration=${SFC_BENCH_DURATION:-5}
    pairs=${SFC_BENCH_PAIRS:-"1 10 50 100 1000"}
    backlog=${SFC_BENCH_BACKLOG:-100000}
    connections=${SFC_BENCH_CONNECTIONS:-10000}
    micro_time=${SFC_BENCH_MICRO_TIME:-2}
    repeat=${SFC_BENCH_REPEAT:-3}
fi
[[ $repeat =~ ^[1-9][0-9]*$ ]] || die "SFC_BENCH_REPEAT must be a whole number of rounds, at least 1"
rate=${SFC_BENCH_RATE:-5000}
run_timeout=${SFC_BENCH_TIMEOUT:-600}
retries=${SFC_BENCH_RETRIES:-1}

target_dir=${CARGO_TARGET_DIR:-target}
mkdir -p "$target_dir"
target_dir="$(cd "$target_dir" && pwd)"
export CARGO_TARGET_DIR="$target_dir"
out="$target_dir/bench"
results="$out/results.jsonl"
meta="$out/meta.json"
marker="$out/micro.started"
report=(python3 "$root/scripts/bench_report.py")
have_micro=0
[[ $micro == 1 && -f benches/micro.rs ]] && have_micro=1

render() {
    "${report[@]}" report --results "$results" --meta "$meta" --doc docs/BENCHMARKS.md \
        --svg-dir docs/bench --criterion-dir "$target_dir/criterion" --since "$marker"
}

if [[ $report_only == 1 ]]; then
    [[ -f $results && -f $meta ]] || die "no results in $out: run scripts/bench.sh first"
    render
    exit 0
fi

echo "== building (release)" >&2
cargo build --release --locked --bin sfc-server --bin sfc-bench
failed=0
if [[ $have_micro == 1 ]] && ! cargo bench --locked --bench micro --no-run; then
    echo "bench.sh: cargo bench --bench micro does not build; going on without it" >&2
    have_micro=0
    failed=1
fi
bench="$target_dir/release/sfc-bench"

mkdir -p "$out"
[[ -f $results ]] && mv "$results" "$out/results.prev.jsonl"
: >"$results"
rm -f "$marker"
"${report[@]}" meta --quick "$quick" --config duration="$duration" --config pairs="$pairs" \
    --config rate="$rate" --config backlog="$backlog" --config connections="$connections" \
    --config micro="$have_micro" --config micro_time="$micro_time" --config repeat="$repeat" \
    >"$meta"
suite_start=$(date +%s)

# A run in its own process group (timeout's), so that a timeout or Ctrl-C also stops the server
# that sfc-bench spawned.
current=""
interrupted() {
    if [[ -n $current ]]; then
        kill -TERM "$current" 2>/dev/null || true
        wait "$current" 2>/dev/null || true
    fi
    echo "bench.sh: interrupted; partial results in $results" >&2
    exit 130
}
trap interrupted INT TERM

runs=0
# run LABEL SCENARIO [SFC-BENCH FLAGS...]: one sfc-bench run (tried again if it fails, up to
# SFC_BENCH_RETRIES times), appended to the results.
run() {
    local label=$1
    shift
    local args=("$@" --spawn --json)
    runs=$((runs + 1))
    local stdout="$out/last.json" start status attempt=0
    while :; do
        attempt=$((attempt + 1))
        echo "== [$runs] $label: sfc-bench ${args[*]}" >&2
        start=$(date +%s.%N)
        timeout --kill-after=10 "$run_timeout" "$bench" "${args[@]}" >"$stdout" </dev/null &
        current=$!
        status=0
        wait "$current" || status=$?
        current=""
        [[ $status == 0 || $attempt -gt $retries ]] && break
        echo "bench.sh: $label failed (exit $status); trying again" >&2
    done
    if [[ $status != 0 ]]; then
        failed=$((failed + 1))
        echo "bench.sh: $label failed (exit $status)" >&2
    fi
    "${report[@]}" record --label "$label" --start "$start" --end "$(date +%s.%N)" \
        --exit "$status" --attempts "$attempt" --stdout "$stdout" -- "${args[@]}" >>"$results"
}

# Whole rounds rather than each run three times in a row, so that a slow minute of the machine
# touches one sample of several figures, not every sample of one.
for round in $(seq 1 "$repeat"); do
    echo "== round $round of $repeat" >&2
    for n in $pairs; do
        run "relay, $n pair$([[ $n == 1 ]] || echo s)" relay --clients "$n" --duration "$duration"
    done
    run "relay, 100 pairs, buffered" relay --clients 100 --duration "$duration" --durability buffered
    # Every user on two devices: each message is 3 copies (throughput counts copies).
    run "relay, 100 pairs, 2 devices each" relay --clients 100 --devices 2 --duration "$duration"
    run "relay, 100 pairs at $rate msg/s" relay --clients 100 --rate "$rate" --duration "$duration"
    run "offline drain, $backlog messages" offline --clients 1 --backlog "$backlog"
    run "login, 16 concurrent" login --clients 16 --duration "$duration"
    run "resume, 16 concurrent" resume --clients 16 --duration "$duration"
    run "handshake, 16 concurrent" handshake --clients 16 --duration "$duration"
    run "connections, $connections idle" connections --clients "$connections" --duration "$duration"
done

if [[ $have_micro == 1 ]]; then
    echo "== [micro] cargo bench --bench micro" >&2
    touch "$marker"
    micro_args=(--warm-up-time "$micro_time" --measurement-time "$micro_time" --noplot)
    [[ $quick == 1 ]] && micro_args+=(--sample-size 10)
    status=0
    CRITERION_HOME="$target_dir/criterion" cargo bench --locked --bench micro -- "${micro_args[@]}" || status=$?
    if [[ $status != 0 ]]; then
        failed=$((failed + 1))
        echo "bench.sh: cargo bench --bench micro failed (exit $status)" >&2
    fi
fi

"${report[@]}" meta --update "$meta" --config total_s="$(($(date +%s) - suite_start))" >"$meta.new"
mv "$meta.new" "$meta"
render

# The peer (mosquitto + TLS) alternated with sfc in one run, when mosquitto is installed: its
# own block of docs/BENCHMARKS.md (scripts/peer-bench.sh; SFC_BENCH_PEER=0 skips it).
if [[ ${SFC_BENCH_PEER:-1} != 0 ]]; then
    peer_args=()
    [[ $quick == 1 ]] && peer_args=(--quick)
    if ! bash scripts/peer-bench.sh "${peer_args[@]}"; then
        failed=$((failed + 1))
        echo "bench.sh: scripts/peer-bench.sh failed" >&2
    fi
fi
if [[ $failed != 0 ]]; then
    die "$failed run(s) failed; see the table in docs/BENCHMARKS.md and $results"
fi

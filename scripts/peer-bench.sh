#!/usr/bin/env bash
# The peer side by side: mosquitto (MQTT over TLS 1.3, QoS 1) driven by ../shared/peer-bench's
# load generator, and sfc-bench relay against an sfc-server it spawns (`sync` durability, every
# message sealed end to end), alternated run by run in one invocation, in the same shapes:
#   relay, 100 pairs, full speed     (window 8, 128-byte payloads)
#   relay, 1,000 pairs, full speed
#   100 pairs at 5,000 msg/s, open loop (latency from the intended send time)
# Besides the two, by default:
#   sfc1:  the same sfc-server with one shard (`SFC_SHARDS=1`): one network thread, as the
#          broker has one;
#   floor: examples/relay_floor.rs with its server on one thread (`--server-workers 1`): the
#          relay's traffic on QUIC and TLS alone with our configurations, no accounts, store,
#          sync, sealing or decoding; what the transport costs before SecureFastChat does
#          anything, measured in the same run.
# Each round runs every shape on every system, the order of the systems rotating by round.
# Writes the medians and the ratios (each system / mosquitto) into docs/BENCHMARKS.md between
# `<!-- peer-bench: begin -->` and `<!-- peer-bench: end -->`, with each server's CPU per
# message over the load (mosquitto's utime+stime during the send phase; the others' from the
# start of the load until the receivers had everything), and keeps every run's JSON in
# $CARGO_TARGET_DIR/bench/peer.jsonl.
#
# Needs mosquitto (`apt-get install mosquitto`; .ci/run does not) and the peer's sources
# (PEER_BENCH_DIR, default ../shared/peer-bench beside the repository). Without either it
# says so and exits 0, so scripts/bench.sh can call it unconditionally.
#
# usage: scripts/peer-bench.sh [--quick]      (--quick: 1 round of 2 s, 100 pairs; to test this script)
# environment: PEER_ROUNDS [3], PEER_DURATION seconds per run [10], PEER_RATE [5000],
#              PEER_PAIRS ["100 1000"], PEER_WINDOW [8], PEER_SYSTEMS ["mosquitto sfc sfc1 floor";
#              mosquitto and sfc are always run], PEER_BENCH_DIR, CARGO_TARGET_DIR [target]
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

rounds="${PEER_ROUNDS:-3}"
duration="${PEER_DURATION:-10}"
rate="${PEER_RATE:-5000}"
pairs="${PEER_PAIRS:-100 1000}"
window="${PEER_WINDOW:-8}"
systems=(mosquitto sfc)
for system in ${PEER_SYSTEMS:-sfc1 floor}; do
    case $system in
    mosquitto | sfc) ;;
    sfc1 | floor) systems+=("$system") ;;
    *)
        echo "peer-bench.sh: unknown system $system in PEER_SYSTEMS (mosquitto, sfc, sfc1, floor)" >&2
        exit 2
        ;;
    esac
done
if [[ "${1:-}" == "--quick" ]]; then
    rounds=1
    duration=2
    pairs=100
    rate=2000
elif [[ -n "${1:-}" ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 2
fi
peer="${PEER_BENCH_DIR:-$root/../shared/peer-bench}"
if ! command -v mosquitto >/dev/null; then
    echo "peer-bench.sh: mosquitto is not installed (apt-get install mosquitto); no peer figures" >&2
    exit 0
fi
if [[ ! -f "$peer/Cargo.toml" || ! -f "$peer/run_one.sh" ]]; then
    echo "peer-bench.sh: no peer load generator at $peer (set PEER_BENCH_DIR); no peer figures" >&2
    exit 0
fi
peer="$(cd "$peer" && pwd)"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
out="$target_dir/bench"
mkdir -p "$out"
results="$out/peer.jsonl"

echo "== building sfc-server, sfc-bench and the peer's mqtt-bench (release)" >&2
cargo build --release --locked --quiet --bin sfc-server --bin sfc-bench --example relay_floor
CARGO_TARGET_DIR="$target_dir/peer-bench" cargo build --release --locked --quiet \
    --manifest-path "$peer/Cargo.toml"
sfc_bench="$target_dir/release/sfc-bench"
floor="$target_dir/release/examples/relay_floor"
export PEER_BENCH_BIN="$target_dir/peer-bench/release/mqtt-bench"

# The broker's directory must be reachable by the user mosquitto drops to (FACTS.md).
mq="$(mktemp -d)"
chmod 755 "$mq"
trap 'rm -rf "$mq"' EXIT
MQ_DIR="$mq" bash "$peer/setup_broker.sh" >"$mq/setup.log" 2>&1 || {
    cat "$mq/setup.log" >&2
    exit 1
}

: >"$results"
# one SYSTEM SHAPE ARGS...: one run, its JSON appended to the results as one line.
one() {
    local system=$1 shape=$2
    shift 2
    local json="$mq/last.json" status=0
    echo "== $system, $shape" >&2
    case $system in
    mosquitto) MQ_DIR="$mq" bash "$peer/run_one.sh" "$json" "$@" 2>>"$mq/peer.log" || status=$? ;;
    floor) timeout --kill-after=10 600 "$floor" spawn "$@" --server-workers 1 --json >"$json" 2>/dev/null </dev/null || status=$? ;;
    sfc1) SFC_SHARDS=1 timeout --kill-after=10 600 "$sfc_bench" relay --spawn --json "$@" >"$json" </dev/null || status=$? ;;
    *) timeout --kill-after=10 600 "$sfc_bench" relay --spawn --json "$@" >"$json" </dev/null || status=$? ;;
    esac
    python3 - "$system" "$shape" "$status" "$json" "$round" >>"$results" <<'EOF'
import json, sys
system, shape, status, path, round_ = sys.argv[1:6]
try:
    with open(path) as f:
        run = json.load(f)
except (OSError, ValueError):
    run = None
print(json.dumps({"system": system, "shape": shape, "round": int(round_), "exit": int(status), "run": run}))
EOF
}

# run SYSTEM SHAPE PAIRS: one run of a shape ("full N" or "rate") in each system's words.
run() {
    local system=$1 shape=$2 n=$3
    case $system/$shape in
    mosquitto/full) one mosquitto "full $n" --mode full --pairs "$n" --window "$window" --duration "$duration" ;;
    mosquitto/rate) one mosquitto rate --mode open --pairs "$n" --rate "$rate" --duration "$duration" ;;
    floor/full) one floor "full $n" "$n" "$duration" --window "$window" ;;
    floor/rate) one floor rate "$n" "$duration" --rate "$rate" ;;
    */full) one "$system" "full $n" --clients "$n" --window "$window" --duration "$duration" ;;
    */rate) one "$system" rate --clients "$n" --rate "$rate" --duration "$duration" ;;
    esac
}

for round in $(seq 1 "$rounds"); do
    echo "== round $round of $rounds" >&2
    # The order of the systems rotates by round, so none always runs first.
    shift_by=$(((round - 1) % ${#systems[@]}))
    order=("${systems[@]:shift_by}" "${systems[@]:0:shift_by}")
    for n in $pairs; do
        for system in "${order[@]}"; do
            run "$system" full "$n"
        done
    done
    for system in "${order[@]}"; do
        run "$system" rate 100
    done
done

python3 - "$results" "$root/docs/BENCHMARKS.md" "$rounds" "$duration" "$rate" "$window" "${systems[*]}" <<'EOF'
import json, statistics, subprocess, sys, datetime

results, doc, rounds, duration, rate, window, systems = sys.argv[1:8]
systems = systems.split()
others = [s for s in systems if s != "mosquitto"]
names = {"sfc": "sfc", "sfc1": "sfc, 1 shard", "floor": "QUIC + TLS floor"}
runs = [json.loads(line) for line in open(results) if line.strip()]

def ok(r):
    return r["exit"] == 0 and r["run"] is not None

def cpu_us_per_message(r):
    run = r["run"]
    if r["system"] == "mosquitto":
        cpu, n = run.get("broker_cpu_s"), run.get("delivered")
        return None if cpu is None or not n else cpu / n * 1e6
    return run.get("server_cpu_us_per_delivery")

def client_cpu_us_per_message(r):
    # The load generator's own CPU: both share the machine's two cores with the server, so a
    # costlier generator leaves less to the server at full speed.
    run = r["run"]
    if r["system"] == "mosquitto":
        cpu = run.get("client_cpu_s_incl_drain", run.get("client_cpu_s"))
        n = run.get("delivered")
        return None if cpu is None or not n else cpu / n * 1e6
    return run.get("client_cpu_us_per_delivery")

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None

def figure(shape, system, get):
    return median([get(r) for r in runs if r["shape"] == shape and r["system"] == system and ok(r)])

def lost(shape, system):
    return sum((r["run"] or {}).get("lost", 0) + (r["run"] or {}).get("duplicates", 0)
               for r in runs if r["shape"] == shape and r["system"] == system)

def failed():
    return [f'{r["system"]} {r["shape"]} (exit {r["exit"]})' for r in runs if not ok(r)]

def fmt(v, unit):
    if v is None:
        return "—"
    if unit == "msg/s":
        return f"{v:,.0f} msg/s"
    if unit == "µs":
        return f"{v:,.1f} µs"
    # latency in µs, shown in µs below 1 ms
    return f"{v:,.0f} µs" if v < 1000 else f"{v / 1000:,.2f} ms"

def ratio(ours, mq, higher_is_better, less="faster", more="slower"):
    if ours is None or mq is None or mq == 0 or ours == 0:
        return "—"
    r = ours / mq
    if higher_is_better:
        return f"{r:.2f}×"
    return f"{r:.2f}× ({less if r < 1 else more})" if r != 1 else "1.00×"

def row(label, shape, get, unit, higher_is_better, less="faster", more="slower"):
    mq = figure(shape, "mosquitto", get)
    cells = [label, fmt(mq, unit)]
    for system in others:
        ours = figure(shape, system, get)
        cells += [fmt(ours, unit), ratio(ours, mq, higher_is_better, less, more)]
    return cells

rows = []
shapes = sorted({r["shape"] for r in runs if r["shape"].startswith("full ")}, key=lambda s: int(s.split()[1]))
for shape in shapes:
    n = int(shape.split()[1])
    tp = lambda r: r["run"].get("throughput_per_s")
    rows.append(row(f"relay, {n:,} pairs, full speed", shape, tp, "msg/s", True))
    rows.append(row(f"server CPU per message, {n:,} pairs", shape, cpu_us_per_message, "µs", False, "less", "more"))
    rows.append(row(f"load generator CPU per message, {n:,} pairs", shape, client_cpu_us_per_message, "µs", False, "less", "more"))
for p, name in (("p50", "p50"), ("p99", "p99"), ("p999", "p99.9")):
    get = lambda r, p=p: (r["run"].get("latency_us") or {}).get(p)
    rows.append(row(f"latency at {int(rate):,} msg/s, 100 pairs: {name}", "rate", get, "lat", False))
rows.append(row(f"server CPU per message at {int(rate):,} msg/s", "rate", cpu_us_per_message, "µs", False, "less", "more"))
rows.append(row(f"load generator CPU per message at {int(rate):,} msg/s", "rate", client_cpu_us_per_message, "µs", False, "less", "more"))

version = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()
version = version[0].strip() if version else "mosquitto"
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
losses = {s: sum(lost(shape, s) for shape in {r["shape"] for r in runs}) for s in systems}
lines = [
    f"Generated by `scripts/peer-bench.sh` (called by `scripts/bench.sh`) on "
    f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC at `{commit}`: {version} with TLS 1.3 and "
    f"QoS 1 (`../shared/peer-bench`) and sfc-server in `sync` durability with every message sealed end to end, "
    f"alternated run by run; {rounds} round(s) of {duration} s per run, medians; 128-byte payloads, "
    f"{window} sends in flight per sender at full speed. Server CPU is the broker's over the send "
    f"phase and the others' from the start of the load until the receivers had everything; the "
    f"load generators' CPU (each generator's own, sealing and opening included for sfc) spans "
    f"the load and the drain for both. Ratio: each system / mosquitto (above 1× is better for "
    f"throughput, below 1× is better for latency and CPU)."
    + (" sfc, 1 shard: the same server with `SFC_SHARDS=1` (one network thread, as the broker has)."
       if "sfc1" in others else "")
    + (" QUIC + TLS floor: `examples/relay_floor.rs`, the relay's traffic on QUIC and TLS alone with "
       "our configurations and its server on one thread, nothing stored, sealed or decoded."
       if "floor" in others else ""),
    "",
    "| figure | mosquitto + TLS | " + " | ".join(f"{names[s]} | ratio" for s in others) + " |",
    "| --- | ---: | " + " | ".join("---: | ---:" for _ in others) + " |",
]
lines += ["| " + " | ".join(cells) + " |" for cells in rows]
lines += ["", "Lost or duplicated, summed over all runs: "
          + ", ".join(f"{'mosquitto' if s == 'mosquitto' else names[s]} {losses[s]}" for s in systems) + "."]
# Per round: the broker's figure moves by up to 25 % between rounds, so the spread of the ratio
# says more than its median.
def per_round(shape, get):
    rounds_seen = sorted({r.get("round", 0) for r in runs if r["shape"] == shape})
    parts = []
    for system in others:
        ratios = []
        for n in rounds_seen:
            pick = lambda s: next((get(r) for r in runs if r["shape"] == shape and r["system"] == s
                                   and r.get("round", 0) == n and ok(r)), None)
            mq, ours = pick("mosquitto"), pick(system)
            ratios.append(f"{ours / mq:.2f}×" if mq and ours else "—")
        parts.append(f"{names[system]} {' / '.join(ratios)}")
    return "; ".join(parts)
tp = lambda r: r["run"].get("throughput_per_s")
p50 = lambda r: (r["run"].get("latency_us") or {}).get("p50")
lines.append("Ratios per round, in round order: " + "; ".join(
    [f"{shape.split()[1]} pairs: {per_round(shape, tp)}" for shape in shapes]
    + [f"p50 at {int(rate):,} msg/s: {per_round('rate', p50)}",
       f"server CPU at {int(rate):,} msg/s: {per_round('rate', cpu_us_per_message)}"]) + ".")
bad = failed()
if bad:
    lines.append(f"Failed runs (left out of the medians): {', '.join(bad)}.")
block = "\n".join(lines)
print(block)

begin, end = "<!-- peer-bench: begin -->", "<!-- peer-bench: end -->"
text = open(doc).read()
if begin in text and end in text:
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    text = f"{head}{begin}\n{block}\n{end}{tail}"
else:
    text = text.rstrip("\n") + f"\n\n## The peer, side by side (generated by scripts/peer-bench.sh)\n\n{begin}\n{block}\n{end}\n"
open(doc, "w").write(text)
EOF

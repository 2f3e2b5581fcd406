#!/usr/bin/env bash
# UDP datagrams per relayed message, messages/s and latency, for one or more builds alternated
# in one run (A B A B ...), each run in a network namespace of its own so that nothing else on
# the machine that talks UDP (other tests, other benchmarks) is counted.
#
# usage: scripts/datagrams.sh [--rounds N] [--duration S] [--rate R] [--pairs P] [--window W]
#                             [--only full|rate] LABEL=DIR[,VAR=VALUE...] [...]
#   DIR holds the sfc-bench and sfc-server binaries of one configuration (e.g. target/release,
#   or a copy of another build); VAR=VALUE pairs after it are set in the environment of both
#   (a build that reads settings from it). Each round runs, for every LABEL in order:
#     full: `sfc-bench relay --spawn --clients P --window W --duration S`  (default 100, 8, 8)
#     rate: `sfc-bench relay --spawn --clients P --rate R --duration S`    (default R = 5000)
#   each inside `unshare --net` (root; only the new namespace's loopback is used), and prints
#   one line per run, then the medians per LABEL and shape. Figures per run:
#     msg/s        delivered copies per second over the whole load (sfc-bench's throughput)
#     dgram/msg    UDP datagrams per delivered message over 3 s in the middle of the load, from
#                  the namespace's /proc/net/snmp (OutDatagrams, server and load generator
#                  alike; the kernel counts a GSO send of several datagrams once, so at full
#                  speed this is below the real count: see quinn/msg)
#     quinn/msg    the same over the whole load from quinn's counters of the load generator's
#                  connections (both directions; see `packets` in sfc-bench's JSON)
#     p50 p99 p99.9  delivery latency (open loop: from the intended send time)
#     srv us/msg   server CPU per delivered message over the load
#     lost dup     must be 0
#   Every run's figures, with quinn's per-direction counts, are kept as JSON lines in
#   target/bench/datagrams-DATE.jsonl.
# example: scripts/datagrams.sh --rounds 3 base=/tmp/sfc-base head=target/release
set -euo pipefail
self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$0")/.."

# Inside the namespace: one run, one line of JSON on stdout.
if [[ "${1:-}" == "--inner" ]]; then
  shift
  dir=$1
  shift
  ip link set lo up
  log=$(mktemp)
  trap 'rm -f "$log"' EXIT
  # shellcheck source=lib/relay-window.sh
  source scripts/lib/relay-window.sh
  snmp() { awk '/^Udp:/ && $2 ~ /^[0-9]+$/ { print $2, $5 }' /proc/net/snmp; }
  start_relay "$log" "$dir/sfc-bench" "$dir/sfc-server" --json "$@"
  sleep "${SETTLE:-1}"
  fresh_line "$log"
  d0=$(delivered "$log"); read -r in0 out0 < <(snmp)
  sleep 2.5
  fresh_line "$log"
  d1=$(delivered "$log"); read -r in1 out1 < <(snmp)
  failed=0
  wait "$bench" || failed=$?
  if [[ $failed -ne 0 ]]; then
    echo "the load generator failed ($failed):" >&2
    tail -n 5 "$log" >&2
    exit 1
  fi
  python3 - "$d0" "$d1" "$in0" "$in1" "$out0" "$out1" "$log" <<'EOF'
import json, sys
d0, d1, in0, in1, out0, out1 = map(int, sys.argv[1:7])
report = next(json.loads(l) for l in open(sys.argv[7]) if l.startswith("{"))
n = max(d1 - d0, 1)
l = report["latency_us"]
print(json.dumps({
    "msg_s": report["throughput_per_s"],
    "dgram": (out1 - out0) / n,
    "dgram_in": (in1 - in0) / n,
    "quinn": (report.get("packets") or {}).get("datagrams_per_message", 0.0),
    "p50": l["p50"], "p99": l["p99"], "p999": l["p999"],
    "cpu": report.get("server_cpu_us_per_delivery") or 0.0,
    "lost": report["lost"], "dup": report["duplicates"], "errors": report["errors"],
    "packets": report.get("packets"),
}))
EOF
  exit 0
fi

rounds=3 duration=8 rate=5000 pairs=100 window=8 only=""
while [[ "${1:-}" == --* ]]; do
  case $1 in
    --rounds) rounds=$2 ;;
    --duration) duration=$2 ;;
    --rate) rate=$2 ;;
    --pairs) pairs=$2 ;;
    --window) window=$2 ;;
    --only) only=$2 ;;
    *) sed -n '2,27p' "$0" >&2; exit 2 ;;
  esac
  shift 2
done
if [[ $# -lt 1 ]]; then
  sed -n '2,27p' "$0" >&2
  exit 2
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "datagrams.sh needs root for its network namespaces (unshare --net)" >&2
  exit 2
fi
shapes=(full rate)
[[ -n $only ]] && shapes=("$only")
mkdir -p target/bench
results=target/bench/datagrams-$(date -u +%Y%m%dT%H%M%S).jsonl
printf '%-5s %-10s %-5s %9s %9s %9s %8s %8s %8s %10s %5s %4s\n' \
  round config shape msg/s dgram/msg quinn/msg p50 p99 p99.9 "srv us/msg" lost dup
for round in $(seq "$rounds"); do
  for spec in "$@"; do
    label=${spec%%=*} rest=${spec#*=}
    dir=${rest%%,*} envs=()
    [[ $rest == *,* ]] && IFS=, read -r -a envs <<<"${rest#*,}"
    for shape in "${shapes[@]}"; do
      flags=(--clients "$pairs" --duration "$duration")
      if [[ $shape == full ]]; then flags+=(--window "$window"); else flags+=(--rate "$rate"); fi
      if ! line=$(env "${envs[@]}" unshare --net "$self" --inner "$dir" "${flags[@]}"); then
        echo "$round $label $shape: failed" >&2
        continue
      fi
      echo "$round $label $shape $line" >>"$results"
      python3 - "$round" "$label" "$shape" "$line" <<'EOF'
import json, sys
r = json.loads(sys.argv[4])
print("%-5s %-10s %-5s %9.0f %9.2f %9.2f %8d %8d %8d %10.1f %5d %4d" % (
    sys.argv[1], sys.argv[2], sys.argv[3], r["msg_s"], r["dgram"], r["quinn"],
    r["p50"], r["p99"], r["p999"], r["cpu"], r["lost"], r["dup"]))
EOF
    done
  done
done
echo
echo "medians over the rounds (lost and duplicates summed; every run in $results):"
python3 - "$results" <<'EOF'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    rnd, label, shape, js = line.split(" ", 3)
    rows.setdefault((label, shape), []).append(json.loads(js))
m = lambda rs, k: statistics.median(r[k] for r in rs)
for (label, shape), rs in rows.items():
    print("%-10s %-5s %9.0f msg/s  %5.2f dgram/msg (snmp)  %5.2f (quinn)  p50 %d  p99 %d  "
          "p99.9 %d us  server %.1f us/msg  lost %d dup %d  (%d runs)" % (
        label, shape, m(rs, "msg_s"), m(rs, "dgram"), m(rs, "quinn"), m(rs, "p50"),
        m(rs, "p99"), m(rs, "p999"), m(rs, "cpu"), sum(r["lost"] for r in rs),
        sum(r["dup"] for r in rs), len(rs)))
    # Where the datagrams go, from quinn's counters (median per direction).
    dirs = ["senders_out", "senders_in", "receivers_out", "receivers_in"]
    ps = [r["packets"] for r in rs if r.get("packets")]
    if ps:
        parts = []
        for d in dirs:
            f = lambda k: statistics.median(p[d]["frames"][k] for p in ps)
            parts.append("%s %.2f (stream %.2f ack %.2f max_streams %.2f)" % (
                d, statistics.median(p[d]["datagrams"] for p in ps), f("stream"), f("ack"),
                f("max_streams")))
        print("           " + "; ".join(parts))
EOF

#!/usr/bin/env bash
# Instructions the server executes per full TLS handshake, counted by callgrind (see
# scripts/callgrind.sh for why: CPU time of one build swings by 2x on a shared machine).
#
# The server runs under `valgrind --tool=callgrind` on a loopback port with collection off; it
# is switched on for one whole `sfc-bench handshake` run against it (connect, full TLS
# handshake, hello, close; resumption off), and the count is divided by the handshakes done.
# User space only; valgrind lacks the SHA extensions, so SHA-256 runs in software under it.
#
# usage: scripts/callgrind-handshake.sh DIR [sfc-bench handshake flags...]
#   DIR holds the sfc-bench and sfc-server binaries (e.g. target/release). The flags default to
#   `--clients 4 --duration 15`. OUT=path keeps the profile; TOP=n lists the n costliest
#   functions by inclusive instructions per handshake (default 20).
# example: scripts/callgrind-handshake.sh target/release
set -euo pipefail

dir=$(cd "${1:?usage: scripts/callgrind-handshake.sh DIR [sfc-bench handshake flags...]}" && pwd)
shift
[ $# -gt 0 ] || set -- --clients 4 --duration 15
top=${TOP:-20}
port=${PORT:-4499}

# shellcheck source=lib/valgrind.sh
source "$(dirname "$0")/lib/valgrind.sh"
ensure_valgrind

work=$(mktemp -d)
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/cg.out" \
    "$dir/sfc-server" --listen "127.0.0.1:$port" --data "$work/data" --certs "$work/certs" \
    >"$work/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; rm -rf "$work"' EXIT
until [ -f "$work/certs/ca.crt" ] && grep -q "serving" "$work/server.log"; do
    kill -0 "$server" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
    sleep 0.5
done

callgrind_control --instr=on "$server" >/dev/null 2>&1
"$dir/sfc-bench" handshake --server "127.0.0.1:$port" --ca "$work/certs/ca.crt" --json "$@" \
    >"$work/bench.json" 2>/dev/null
callgrind_control --instr=off "$server" >/dev/null 2>&1
callgrind_control --dump "$server" >/dev/null 2>&1
kill -INT "$server"
wait "$server" || true

profile=$work/cg.out.1
[ -n "${OUT:-}" ] && cp "$profile" "$OUT" && echo "profile: $OUT"
python3 - "$profile" "$work/bench.json" "$top" <<'PY'
import json, re, subprocess, sys

profile, bench, top = sys.argv[1], sys.argv[2], int(sys.argv[3])
result = json.load(open(bench))
done = result["delivered"]
if done <= 0 or result["errors"]:
    sys.exit(f"handshakes: {done}, errors: {result['errors']}")
totals = next(int(l.split()[1]) for l in open(profile) if l.startswith("totals:"))
print(f"{done} full handshakes; server: {totals / done:,.0f} instructions per handshake (user space)")
lines = subprocess.run(["callgrind_annotate", "--inclusive=yes", profile],
                       capture_output=True, text=True, check=True).stdout.splitlines()
row = re.compile(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+\S*?:(.*?)( \[.*\])?$")
# Runtime plumbing that wraps everything says nothing about the handshake.
plumbing = ("tokio::runtime::", "<tokio::runtime::", "<tracing::instrument::", "std::",
            "<tokio_util::task::", "core::", "<core::", "0x", "(below main)", "start_thread",
            "clone3")
shown = 0
for line in lines:
    m = row.match(line)
    if not m or "PROGRAM TOTALS" in line or m.group(2).startswith(plumbing):
        continue
    print(f"{int(m.group(1).replace(',', '')) / done:>12,.0f}  {m.group(2)[:110]}")
    shown += 1
    if shown >= top:
        break
PY

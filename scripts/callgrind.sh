#!/usr/bin/env bash
# Instructions the server executes per relayed message, counted by callgrind: a figure that the
# machine's noise does not move (CPU time swings by 2x here between runs of one build), for
# comparing two builds or finding what a message costs, function by function.
#
# The server runs under `valgrind --tool=callgrind` with collection off; it is switched on for
# a window of whole seconds of steady relay load (after set-up, signups and handshakes) and the
# count is divided by the messages delivered in that window. Kernel work (system calls, the
# loopback) is not counted: callgrind sees user space only.
#
# usage: scripts/callgrind.sh DIR [sfc-bench relay flags...]
#   DIR holds the sfc-bench and sfc-server binaries (e.g. target/release). The relay flags
#   default to `--clients 10 --rate 100 --duration 20`: under callgrind the server runs ~50x
#   slower, so keep the rate low; a low rate is also the regime where a message costs most.
#   OUT=path keeps the callgrind profile (default: a temporary file, removed); TOP=n lists the
#   n costliest functions by inclusive instructions per message (default 25).
# example: scripts/callgrind.sh target/release
#          OUT=/tmp/base.cg scripts/callgrind.sh /tmp/base-build --clients 10 --rate 100 --duration 20
set -euo pipefail

dir=$(cd "${1:?usage: scripts/callgrind.sh DIR [sfc-bench relay flags...]}" && pwd)
shift
[ $# -gt 0 ] || set -- --clients 10 --rate 100 --duration 20
window=${WINDOW:-8}
top=${TOP:-25}

# shellcheck source=lib/valgrind.sh
source "$(dirname "$0")/lib/valgrind.sh"
ensure_valgrind

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
out=${OUT:-$work/callgrind.out}
log=$work/bench.log
# sfc-bench starts the server itself (--spawn); a wrapper puts callgrind in between.
cat >"$work/server" <<EOF
#!/usr/bin/env bash
exec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" "$dir/sfc-server" "\$@"
EOF
chmod +x "$work/server"

# shellcheck source=lib/relay-window.sh
source "$(dirname "$0")/lib/relay-window.sh"
start_relay "$log" "$dir/sfc-bench" "$work/server" "$@"
sleep 2
fresh_line "$log"
callgrind_control --instr=on "$server" >/dev/null 2>&1
d0=$(delivered "$log")
sleep "$(awk -v w="$window" 'BEGIN { print w - 0.5 }')"
fresh_line "$log"
callgrind_control --instr=off "$server" >/dev/null 2>&1
d1=$(delivered "$log")
# The bench kills its server when it is done, so the profile is written now.
callgrind_control --dump "$server" >/dev/null 2>&1
wait "$bench"
grep -E "^(scenario|throughput)" "$log"

profile=$(ls -t "$out"* | head -1)
[ -n "${OUT:-}" ] && echo "profile: $profile"
python3 - "$profile" "$((d1 - d0))" "$top" <<'EOF'
import re, subprocess, sys

profile, messages, top = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if messages <= 0:
    sys.exit("no message was delivered in the window")


def annotate(*flags):
    return subprocess.run(["callgrind_annotate", *flags, profile],
                          capture_output=True, text=True, check=True).stdout.splitlines()


row = re.compile(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)")


def clean(name):
    name = re.sub(r"\s*\[/[^\]]*\]$", "", name)
    name = re.sub(r"^/root/\.cargo/registry/src/[^/]+/", "", name)
    return re.sub(r"^/rustc/[0-9a-f]+/", "", name)


total = None
for line in annotate():
    m = row.match(line)
    if m and "PROGRAM TOTALS" in m.group(2):
        total = int(m.group(1).replace(",", ""))
        break
if total is None:
    sys.exit("no totals in the profile")
print(f"window: {messages} messages delivered; server: {total / messages:,.0f} instructions "
      f"per message (user space)")
if top > 0:
    print(f"costliest functions, inclusive instructions per message (top {top}):")
shown = 0
for line in annotate("--inclusive=yes") if top > 0 else []:
    m = row.match(line)
    if not m or "PROGRAM TOTALS" in m.group(2):
        continue
    print(f"{int(m.group(1).replace(',', '')) / messages:>10,.0f}  {clean(m.group(2))[:150]}")
    shown += 1
    if shown == top:
        break
EOF

#!/usr/bin/env bash
# Crash safety, the long run (the suite runs a short one: tests/crash_safety.rs).
#
# 1. The server binary is killed with SIGKILL at random moments, ROUNDS times (default 20),
#    while PAIRS sender/receiver pairs of application clients (the client library with a home
#    each, as `sfc` uses it) send and receive; after each kill it is started again on the same
#    data directory and address, and must open its store and serve. At the end every message
#    the server acknowledged must have been shown to its receiver exactly once (none missing,
#    none twice by id, no text twice), and the server must not log an error.
# 2. A backlog of BACKLOG messages (default 3000) is drained by `sfc recv`, killed with SIGKILL
#    up to RECEIVER_KILLS times (default 20) mid-drain and started again: every message must be
#    shown, and a message shown twice only as the last line of a killed run (it was shown, and
#    the run was killed before it could record that).
#
# Everything starts from a fresh state (new temporary data directories and homes). Every
# acknowledged and every shown message is also written to RECORDS (default: a new temporary
# directory, kept): acked.txt (FROM TAB ID), shown.txt (TO TAB FROM TAB ID TAB TEXT).
#
# usage: scripts/crash-test.sh [ROUNDS]
#   environment: PAIRS (6), ROUND_MS (4000: the most time between two kills; each waits a
#   random 1/4..1 of it), BACKLOG, RECEIVER_KILLS, RECORDS, SEED (to repeat a run),
#   PROFILE (dev; `release` for release binaries).
# example: scripts/crash-test.sh 20
set -euo pipefail
cd "$(dirname "$0")/.."

records=${RECORDS:-$(mktemp -d -t sfc-crash.XXXXXX)}
export SFC_CRASH_ROUNDS=${1:-20}
export SFC_CRASH_PAIRS=${PAIRS:-6}
export SFC_CRASH_ROUND_MS=${ROUND_MS:-4000}
export SFC_CRASH_BACKLOG=${BACKLOG:-3000}
export SFC_CRASH_RECEIVER_KILLS=${RECEIVER_KILLS:-20}
export SFC_CRASH_RECORDS=$records
if [ -n "${SEED:-}" ]; then export SFC_CRASH_SEED=$SEED; fi

profile=()
if [ "${PROFILE:-dev}" = release ]; then profile=(--release); fi
cargo test "${profile[@]}" --test crash_safety -- --ignored --nocapture --test-threads 1 \
    long_killed_server_rounds long_killed_receiver_drains
echo "records: $records/acked.txt $records/shown.txt"

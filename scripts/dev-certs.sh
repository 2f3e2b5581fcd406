#!/usr/bin/env bash
# Writes a development CA (ca.crt) and a server certificate and key (server.crt, server.key)
# valid for localhost, 127.0.0.1, ::1 and any extra names given, using rcgen through the
# project's own binary. Clients trust DIR/ca.crt. Existing files in DIR are replaced.
#
# usage: scripts/dev-certs.sh [DIR] [EXTRA_NAME ...]     (DIR defaults to certs/)
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-certs}"
shift || true
sans=()
for name in "$@"; do
    sans+=(--san "$name")
done
exec cargo run --release --quiet --bin sfc-server -- gen-certs --dir "$dir" "${sans[@]}"

#!/usr/bin/env bash
# Cross-language check: a Python client (aioquic + msgpack, cryptography + spake2 for devices)
# written from docs/PROTOCOL.md alone runs its protocol checks against the real sfc-server
# binary on 127.0.0.1, after reproducing the spec's E13 link vectors and E15 file vectors.
#
# usage: scripts/interop.sh [--release]     (needs python3 with venv; installs into target/)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=debug
cargo_flags=()
if [[ "${1:-}" == "--release" ]]; then
    profile=release
    cargo_flags=(--release)
fi

venv=target/interop-venv
if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/interop/requirements.txt

# The E13 (linking) vectors of PROTOCOL.md, with the code the devices checks link with.
if ! vectors="$("$venv/bin/python" tests/interop/link_vectors.py 2>&1)"; then
    echo "$vectors" >&2
    echo "interop: the E13 link vectors differ from docs/PROTOCOL.md" >&2
    exit 1
fi

# The E15 (file encryption) vectors of PROTOCOL.md, from an implementation of E15's text.
if ! vectors="$("$venv/bin/python" tests/interop/file_vectors.py 2>&1)"; then
    echo "$vectors" >&2
    echo "interop: the E15 file vectors differ from docs/PROTOCOL.md" >&2
    exit 1
fi
echo "$vectors"

cargo build --locked --quiet "${cargo_flags[@]}" --bin sfc-server
work="$(mktemp -d)"
port=$((20000 + RANDOM % 20000))
"target/$profile/sfc-server" --listen "127.0.0.1:$port" --data "$work/data" --certs "$work/certs" \
    >"$work/server.log" 2>&1 &
server=$!
cleanup() {
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 100); do
    grep -q "serving" "$work/server.log" 2>/dev/null && break
    sleep 0.1
done
if ! grep -q "serving" "$work/server.log"; then
    cat "$work/server.log" >&2
    echo "interop: the server did not start" >&2
    exit 1
fi
"$venv/bin/python" tests/interop/interop_client.py --server "127.0.0.1:$port" --ca "$work/certs/ca.crt"

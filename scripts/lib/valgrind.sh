# Shared by scripts/callgrind.sh and scripts/callgrind-handshake.sh (sourced, not run).

# ensure_valgrind: installs valgrind (with callgrind_annotate and callgrind_control) with apt
# where it is missing.
ensure_valgrind() {
    command -v valgrind >/dev/null && command -v callgrind_annotate >/dev/null && return
    command -v apt-get >/dev/null || { echo "valgrind is needed" >&2; exit 1; }
    local as_root=""
    [ "$(id -u)" -eq 0 ] || as_root="sudo"
    echo "== installing valgrind" >&2
    $as_root apt-get update -qq
    $as_root apt-get install -y -qq valgrind >/dev/null
}

# shellcheck shell=bash disable=SC2034 # ROOT, LOG_NAME, LOOPBACK are for the scripts sourcing this
# Shell functions that more than one script of this folder uses; source it right after
# `set -euo pipefail`: source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# It sets ROOT (the repository, absolute) and LOOPBACK, and names messages after the script
# that sourced it ("cluster: ..."), unless that script set LOG_NAME first. Nothing here
# changes the working directory or starts anything by itself.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOG_NAME=${LOG_NAME:-$(basename "${BASH_SOURCE[1]:-$0}" .sh)}
LOOPBACK=127.0.0.1

say() { printf '%s: %s\n' "$LOG_NAME" "$*"; }
warn() { printf '%s: %s\n' "$LOG_NAME" "$*" >&2; }
die() { warn "error: $*"; exit 1; }

# The comment block at the top of SCRIPT (after the shebang, up to `set -euo pipefail`),
# without its comment marks: every script's --help.
script_help() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$1"; }

# help_if_asked SCRIPT ARG: prints SCRIPT's --help and exits when ARG (its first) asks for it.
help_if_asked() { [[ ${2:-} != -h && ${2:-} != --help ]] || { script_help "$1" && exit 0; }; }

# lock_or_die LOCK_FILE MESSAGE: holds the lock of LOCK_FILE on descriptor 9 while the
# script runs, or stops with MESSAGE when another process holds it.
lock_or_die() {
    mkdir -p "$(dirname "$1")"
    exec 9>"$1"
    flock -n 9 || die "$2"
}

# The lines of SCRIPT's header from `# Usage:` through the first line matching LAST.
script_usage() { sed -n "/^# Usage:/,/$2/s/^# \{0,1\}//p" "$1"; }

# A path relative to the repository when it is inside it, for messages.
rel() { printf '%s\n' "${1#"$ROOT"/}"; }

# need_tools [--install] TOOL=PACKAGE...: stops, naming the Debian packages to install,
# unless every TOOL is on the PATH; with --install, installs them with apt-get instead.
# INSTALL_HINT, if set, is one more line for the message.
need_tools() {
    local install=no spec missing=() packages=()
    [[ ${1:-} != --install ]] || { install=yes && shift; }
    for spec in "$@"; do
        command -v "${spec%%=*}" >/dev/null && continue
        missing+=("${spec%%=*}")
        [[ " ${packages[*]} " == *" ${spec#*=} "* ]] || packages+=("${spec#*=}")
    done
    ((${#missing[@]} > 0)) || return 0
    if [[ $install == yes ]]; then
        say "installing ${packages[*]} (missing: ${missing[*]})"
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${packages[@]}"
        return
    fi
    warn "missing: ${missing[*]}; install them with:  apt-get install ${packages[*]}"
    [[ -z ${INSTALL_HINT:-} ]] || warn "$INSTALL_HINT"
    exit 1
}

# The release binary NAME in this tree's target folder.
release_binary() { printf '%s\n' "${CARGO_TARGET_DIR:-$ROOT/target}/release/$1"; }

# build_release PACKAGE: its release binary, through cargo, which knows when it is stale
# (sources, manifests, or the profile's settings, which scripts/test.sh changes).
build_release() {
    say "cargo build --release -p $1"
    (cd "$ROOT" && cargo build --release --quiet -p "$1")
}

build_service() { build_release ratelimiter; }

# The HTTP status of GET URL ("000" when nothing answers within 2 s).
http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" 2>/dev/null || true; }
http_ok() { [[ $(http_code "$1") == 200 ]]; }

# --- processes --------------------------------------------------------------------
# A pids file records started processes, one line "NAME PID START LOG" each (START: the
# kernel's start time of PID, so that a pid reused by an unrelated process after ours
# exited is never mistaken for ours). scripts/cluster.sh and the bench program write them.

# The kernel's start time of PID (clock ticks since boot); nothing for a missing process or a zombie.
start_time_of() {
    local stat fields
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    # Fields after the command name, which may itself contain spaces and parentheses.
    read -r -a fields <<<"${stat##*) }"
    [[ ${fields[0]} == Z ]] || printf '%s\n' "${fields[19]}"
}

# Is the recorded process (PID, START) still running?
still_running() { [[ -n ${2:-} && $(start_time_of "$1") == "$2" ]]; }

# Is any process recorded in PIDS_FILE still running?
any_recorded_running() {
    local n pid since log
    while read -r n pid since log; do still_running "$pid" "$since" && return 0; done < <(cat "$1" 2>/dev/null)
    return 1
}

# stop_recorded [--quiet] PIDS_FILE: stops every process recorded there, newest first (SIGTERM,
# SIGKILL after 10 s), then removes the file; --quiet says nothing of one gone already.
stop_recorded() {
    local quiet=no
    [[ $1 != --quiet ]] || { quiet=yes && shift; }
    local pids_file=$1 lines=() n pid since i deadline
    [[ -f $pids_file ]] || return 0
    mapfile -t lines <"$pids_file"
    for ((i = ${#lines[@]} - 1; i >= 0; i--)); do
        read -r n pid since _ <<<"${lines[i]}"
        if ! still_running "$pid" "$since"; then
            [[ $quiet == yes ]] || say "$n (pid $pid) is not running"
            continue
        fi
        say "stopping $n (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 10))
        while still_running "$pid" "$since" && ((SECONDS < deadline)); do sleep 0.1; done
        if still_running "$pid" "$since"; then
            warn "$n (pid $pid) ignored SIGTERM for 10s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -f "$pids_file"
}

# --- the bench program ------------------------------------------------------------

# The bench program (bench/), in the dev profile: it waits more than it computes, and compiles fast.
build_bench() {
    say "building the bench program: cargo build -p bench"
    (cd "$ROOT" && cargo build --quiet -p bench)
    BENCH_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug/bench
}

# run_bench PIDS_FILE ARGS...: the bench program, waited for in the background so that a
# signal reaches this script's traps at once (stop_bench then stops it and what it recorded
# in PIDS_FILE); returns its exit status. It does not inherit the lock (descriptor 9),
# which stays with the script, not with the daemons the program starts.
run_bench() {
    BENCH_PIDS=$1
    shift
    "$BENCH_BIN" "$@" 9>&- &
    BENCH_PID=$!
    local code=0
    wait "$BENCH_PID" || code=$?
    BENCH_PID=""
    ((code != 2)) || warn "see: scripts/$LOG_NAME.sh --help"
    return "$code"
}

# For an EXIT trap: stops the bench program if it still runs, then what it started.
stop_bench() {
    if [[ -n ${BENCH_PID:-} ]] && kill -0 "$BENCH_PID" 2>/dev/null; then
        kill -TERM "$BENCH_PID" 2>/dev/null || true
        wait "$BENCH_PID" 2>/dev/null || true
    fi
    BENCH_PID=""
    [[ -z ${BENCH_PIDS:-} ]] || stop_recorded --quiet "$BENCH_PIDS"
}

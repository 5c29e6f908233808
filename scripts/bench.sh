#!/usr/bin/env bash
# Benchmarks the rate limiter in the native topology of scripts/cluster.sh (Nginx on 8000,
# instances on 8001/8002, a Redis master with two replicas, three sentinels), all on this
# machine, and prints a Markdown table; with --record it also writes docs/BENCHMARKS.md.
#
# Usage: scripts/bench.sh [--duration SECS] [--rounds N] [--threads N]
#                         [--quiet-max PCT] [--quiet-wait SECS] [--record]
#
#   --duration SECS  length of one measurement (default 5; 1 to 60)
#   --rounds N       rounds per phase (default 3; 3 to 20); each round measures every
#                    target of the phase once, in reverse order every other round
#   --threads N      wrk threads (default 1: two cores are shared by everything)
#   --quiet-max PCT  the machine is "quiet" when processes outside the benchmark use at
#                    most PCT % of it (default 15): each measurement waits for that (up to
#                    --quiet-wait SECS, default 30; 0 does not wait), and one during which
#                    others used more is taken again, twice at most, keeping the quietest
#   --record         also write the run into docs/BENCHMARKS.md (needs the bench's own
#                    cluster, since only that runs every phase)
#
# Phases, each with the cluster started by this script under its own policy:
#   allow          RATE_LIMIT=BURST=10^9 per 1 s: every request runs the whole Redis
#                  decision and is admitted. wrk on / and /limited_endpoint, through
#                  Nginx and directly (8001), at 16 and 64 connections. Then
#                  redis-benchmark runs the project's Lua script alone (EVALSHA) on the
#                  master with its replicas attached: random keys (allow-heavy), one
#                  client coming back (returning), one denied key (deny-heavy), a script
#                  that only returns (the floor), and a reference token-bucket script
#                  (scripts/bench/reference_token_bucket.lua) to calibrate the anchors.
#   metrics-off    the targets of `allow` at 64 connections with METRICS=off: what
#                  /metrics costs.
#   allow-pool     the same with REDIS_CLIENT=pool (r2d2 through web::block) instead of the
#                  default client, when the binary knows that setting.
#   memory-store   one instance with the embedded store instead (no cluster), the same
#                  policy, directly: the decision without the Redis round trip.
#   mixed          RATE_LIMIT=BURST=$MIXED_RATE (default 15) per 1 s over 241 clients
#                  (target/release/loadtest binds 127.0.0.10-250), so 200s and 429s both
#                  occur; the targets of `allow`.
#   flood          the shipped policy (10 per 60 s): one client (wrk) floods at 64
#                  connections through Nginx with the deny cache on; / beside it.
#   flood-nocache  the same with DENY_CACHE_SIZE=0.
#
# When /ready answers on 8000, 8001 and 8002 and the cluster is a native one with pid
# records (CLUSTER_DIR, default run/cluster), that cluster is used as it is: one phase
# ("running") under whatever policy it has, and nothing of it is stopped. Otherwise the
# script starts its own cluster per phase in run/bench-cluster and stops it at the end.
#
# Per measurement: requests/s, p50/p99/max latency, responses by status (200, 429, other:
# statuses other than 200/429 and socket errors; through Nginx from its access log, which
# also shows 499s from wrk closing its connections at the end, not counted as errors),
# CPU µs per request of each process group (utime+stime from /proc/PID/stat), the CPU of
# every other process on the machine, and the Lua script calls Redis saw
# (INFO commandstats deltas). Raw outputs stay in run/bench/.
#
# Environment: MIXED_RATE (see above); WORKERS, REDIS_POOL_SIZE, REDIS_TIMEOUT_MS,
# ACCESS_LOG and RUST_LOG reach the instances as they are; REDIS_PASSWORD and
# RATELIMITER_BIN (a binary to run instead of building target/release/ratelimiter) as for
# scripts/cluster.sh. Needs wrk, redis-tools, curl, and cargo to build the binaries.

# Markdown is written with backticks inside single-quoted printf formats on purpose.
# shellcheck disable=SC2016
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
STARTED_AT=$SECONDS

INVOCATION="scripts/bench.sh${*:+ $*}"
DURATION=5
ROUNDS=3
THREADS=1
RECORD=no
QUIET_MAX=15
QUIET_WAIT=30
RETAKES=2
MIXED_RATE=${MIXED_RATE:-15}
REDIS_PASSWORD=${REDIS_PASSWORD:-ratelimiter-dev-password}
export REDIS_PASSWORD

LOOPBACK=127.0.0.1
NGINX_URL=http://$LOOPBACK:8000
DIRECT_URL=http://$LOOPBACK:8001
DATA_PORTS=(6379 6380 6381)
MIXED_SOURCES=127.0.0.10-250
BENCH_KEY_PREFIX=ratelimit:bench
OUT=$ROOT/run/bench
RESULTS=$OUT/results.tsv
LUA_REPORT=scripts/bench/report.lua
LOADTEST=${CARGO_TARGET_DIR:-$ROOT/target}/release/loadtest
# As in scripts/cluster.sh (which reads the same variable): another binary than the one
# built from this working tree, e.g. one built from a given commit.
BIN=${RATELIMITER_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/ratelimiter}
DOC=docs/BENCHMARKS.md

say() { printf 'bench: %s\n' "$*"; }
warn() { printf 'bench: %s\n' "$*" >&2; }
die() {
    warn "error: $*"
    exit 1
}

usage() {
    sed -n '/^# Usage:/,/^#   --record/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
    exit 2
}

# --- arguments and tools ----------------------------------------------------------

int_in() {
    local name=$1 value=$2 low=$3 high=$4
    if ! [[ $value =~ ^[0-9]+$ ]] || ((value < low || value > high)); then
        die "$name must be a whole number from $low to $high, got '$value'"
    fi
}

while (($# > 0)); do
    case $1 in
    --duration) DURATION=${2:-} && shift ;;
    --rounds) ROUNDS=${2:-} && shift ;;
    --threads) THREADS=${2:-} && shift ;;
    --quiet-max) QUIET_MAX=${2:-} && shift ;;
    --quiet-wait) QUIET_WAIT=${2:-} && shift ;;
    --record) RECORD=yes ;;
    -h | --help) usage ;;
    *)
        warn "unknown argument: $1"
        usage
        ;;
    esac
    shift
done
int_in --duration "$DURATION" 1 60
int_in --rounds "$ROUNDS" 3 20
int_in --threads "$THREADS" 1 16
int_in --quiet-max "$QUIET_MAX" 1 100
int_in --quiet-wait "$QUIET_WAIT" 0 600
int_in MIXED_RATE "$MIXED_RATE" 1 1000000

check_tools() {
    local tool missing=() packages=()
    declare -A package_of=([wrk]=wrk [redis-cli]=redis-tools [redis-benchmark]=redis-tools
        [curl]=curl [awk]=mawk [sha1sum]=coreutils [pgrep]=procps)
    for tool in wrk redis-cli redis-benchmark curl awk sha1sum pgrep; do
        command -v "$tool" >/dev/null || {
            missing+=("$tool")
            [[ " ${packages[*]} " == *" ${package_of[$tool]} "* ]] || packages+=("${package_of[$tool]}")
        }
    done
    if ((${#missing[@]} > 0)); then
        warn "missing: ${missing[*]}"
        warn "install them with:  apt-get install ${packages[*]}"
        exit 1
    fi
}

# --- process accounting -----------------------------------------------------------

CLK_TCK=$(getconf CLK_TCK)

# utime+stime of PIDs in clock ticks (whole thread groups); a vanished pid counts 0.
ticks_of() {
    local total=0 pid stat fields
    for pid in "$@"; do
        read -r stat 2>/dev/null <"/proc/$pid/stat" || continue
        # Fields after the command name, which may itself hold spaces and parentheses:
        # index 11 is utime (field 14), 12 is stime (field 15).
        read -r -a fields <<<"${stat##*) }"
        total=$((total + fields[11] + fields[12]))
    done
    echo "$total"
}

# "busy all" ticks of the whole machine. With tick-based accounting (this kernel has no
# IRQ_TIME_ACCOUNTING) a tick spent in irq or softirq work, such as loopback TCP, is also
# charged to the process it interrupted, so busy counts it: busy - processes is then what
# every other process (and interrupt work on an idle CPU) used.
machine_ticks() {
    local user nice system idle iowait irq softirq steal rest
    read -r _ user nice system idle iowait irq softirq steal rest </proc/stat
    echo "$((user + nice + system + irq + softirq)) $((user + nice + system + idle + iowait + irq + softirq + steal))"
}

# The kernel's start time of PID, to tell a recorded process from a reused pid.
start_time_of() {
    local stat fields
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    read -r -a fields <<<"${stat##*) }"
    [[ ${fields[0]} == Z ]] || printf '%s\n' "${fields[19]}"
}

# Pids of the cluster's recorded processes whose name matches the pattern, still running.
recorded_pids() {
    local pattern=$1 name pid since log
    [[ -f $CLUSTER_DIR/pids ]] || return 0
    while read -r name pid since log; do
        # shellcheck disable=SC2053 # the pattern is a glob on purpose
        [[ $name == $pattern && $(start_time_of "$pid") == "$since" ]] && echo "$pid"
    done <"$CLUSTER_DIR/pids"
    return 0
}

# Process groups, found once per phase: Nginx's workers are children of its master.
APP_PIDS=() NGINX_PIDS=() MASTER_PIDS=() REPLICA_PIDS=() SENTINEL_PIDS=()
MASTER_PORT=6379

find_processes() {
    local nginx_master port role
    mapfile -t APP_PIDS < <(recorded_pids 'app-*')
    nginx_master=$(recorded_pids nginx)
    NGINX_PIDS=()
    if [[ -n $nginx_master ]]; then
        mapfile -t NGINX_PIDS < <(
            echo "$nginx_master"
            pgrep -P "$nginx_master" || true
        )
    fi
    MASTER_PIDS=() REPLICA_PIDS=()
    for port in "${DATA_PORTS[@]}"; do
        role=$(rcli "$port" ROLE)
        role=${role%%$'\n'*}
        if [[ $role == master ]]; then
            MASTER_PORT=$port
            mapfile -t -O "${#MASTER_PIDS[@]}" MASTER_PIDS < <(recorded_pids "redis-$port")
        else
            mapfile -t -O "${#REPLICA_PIDS[@]}" REPLICA_PIDS < <(recorded_pids "redis-$port")
        fi
    done
    mapfile -t SENTINEL_PIDS < <(recorded_pids 'sentinel-*')
    ((${#APP_PIDS[@]} == 2 && ${#NGINX_PIDS[@]} >= 2 && ${#MASTER_PIDS[@]} == 1)) ||
        die "cannot find the cluster's processes in $CLUSTER_DIR/pids (instances: ${#APP_PIDS[@]}, nginx: ${#NGINX_PIDS[@]}, master: ${#MASTER_PIDS[@]})"
    say "processes: instances ${APP_PIDS[*]}; nginx ${NGINX_PIDS[*]}; master :$MASTER_PORT ${MASTER_PIDS[*]}; replicas ${REPLICA_PIDS[*]}; sentinels ${SENTINEL_PIDS[*]}"
}

# "user system context_switches threads" of the instances: ticks of user and system time,
# and voluntary + involuntary switches of the threads alive now (a thread that ended
# takes its switches with it).
app_detail() {
    local user=0 system=0 threads=0 pid stat fields
    for pid in "${APP_PIDS[@]}"; do
        read -r stat 2>/dev/null <"/proc/$pid/stat" || continue
        read -r -a fields <<<"${stat##*) }"
        user=$((user + fields[11])) system=$((system + fields[12])) threads=$((threads + fields[17]))
    done
    local switches
    switches=$(for pid in "${APP_PIDS[@]}"; do cat "/proc/$pid/task/"*/status 2>/dev/null; done |
        awk '/ctxt_switches/ { s += $2 } END { print s + 0 }')
    echo "$user $system $switches $threads"
}

group_ticks() {
    echo "$(ticks_of "${APP_PIDS[@]}") $(ticks_of "${NGINX_PIDS[@]}") $(ticks_of "${MASTER_PIDS[@]}")" \
        "$(ticks_of "${REPLICA_PIDS[@]}") $(ticks_of "${SENTINEL_PIDS[@]}")"
}

# --- Redis, Nginx and instance counters -------------------------------------------

# redis-cli against a data node, authenticated through the environment (not argv).
rcli() {
    local port=$1 reply
    shift
    reply=$(REDISCLI_AUTH=$REDIS_PASSWORD timeout 5 redis-cli -h "$LOOPBACK" -p "$port" "$@" 2>/dev/null) || true
    printf '%s\n' "${reply//$'\r'/}"
}

# "script_calls script_usec all_calls" on the master: EVALSHA and EVAL (the fallback on
# NOSCRIPT) together, and every command.
redis_stats() {
    rcli "$MASTER_PORT" INFO commandstats | awk -F'[:,=]' '
        /^cmdstat_/ {
            calls = 0; usec = 0
            for (i = 2; i < NF; i += 2) {
                if ($i == "calls") calls = $(i + 1)
                if ($i == "usec") usec = $(i + 1)
            }
            all += calls
            if ($1 == "cmdstat_evalsha" || $1 == "cmdstat_eval") { sc += calls; su += usec }
        }
        END { printf "%d %d %d\n", sc, su, all }'
}

access_log() { echo "$CLUSTER_DIR/nginx/logs/access.log"; }

access_log_size() {
    local log
    log=$(access_log)
    if [[ -f $log ]]; then stat -c %s "$log"; else echo 0; fi
}

# "n200 n429 nother n499" of the access log's lines after byte OFFSET.
access_log_counts() {
    local offset=$1 log
    log=$(access_log)
    [[ -f $log ]] || {
        echo "0 0 0 0"
        return 0
    }
    tail -c "+$((offset + 1))" "$log" | awk -F'"' '
        { split($3, f, " "); s = f[1]
          if (s == "200") a++; else if (s == "429") d++; else if (s == "499") c++; else o++ }
        END { printf "%d %d %d %d\n", a, d, o, c }'
}

# "n200 n429 nother" that instance 8001 counted for PATH (ratelimit_http_requests_total).
app_counts() {
    local path=$1
    curl -s --max-time 5 "$DIRECT_URL/metrics" | awk -v route="$path" '
        index($0, "ratelimit_http_requests_total{route=\"" route "\",") == 1 {
            match($0, /status="[0-9]+"/)
            s = substr($0, RSTART + 8, RLENGTH - 9)
            if (s == "200") a += $NF; else if (s == "429") d += $NF; else o += $NF
        }
        END { printf "%d %d %d\n", a, d, o }'
}

# --- cluster ----------------------------------------------------------------------

OWN_CLUSTER=no
CLUSTER_UP=no
SERVICE_NOTE=""

ready() {
    [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$LOOPBACK:$1/ready" 2>/dev/null) == 200 ]]
}

port_open() { (exec 3<>"/dev/tcp/$LOOPBACK/$1") 2>/dev/null; }

# Environment the bench decides per phase; everything else reaches the instances as given.
PHASE_VARS=(RATE_LIMIT TIME_WINDOW BURST DENY_CACHE_SIZE FAIL_MODE REDIS_CLIENT METRICS)

cluster_up() {
    local phase=$1 log=$OUT/cluster-$1.log unset_args=() var
    shift
    for var in "${PHASE_VARS[@]}"; do unset_args+=(-u "$var"); done
    note_command "$* CLUSTER_DIR=${CLUSTER_DIR#"$ROOT"/} scripts/cluster.sh up"
    say "phase $phase: starting the cluster (log: ${log#"$ROOT"/})"
    CLUSTER_UP=yes
    if ! env "${unset_args[@]}" "$@" scripts/cluster.sh up >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "scripts/cluster.sh up failed (phase $phase); see ${log#"$ROOT"/}"
    fi
    say "phase $phase: $(tail -n 1 "$log" | sed 's/^cluster: //')"
}

cluster_down() {
    [[ $OWN_CLUSTER == yes && $CLUSTER_UP == yes ]] || return 0
    note_command "CLUSTER_DIR=${CLUSTER_DIR#"$ROOT"/} scripts/cluster.sh down"
    scripts/cluster.sh down >>"$OUT/cluster-down.log" 2>&1 || warn "scripts/cluster.sh down failed; see run/bench/cluster-down.log"
    CLUSTER_UP=no
}

# One instance with the embedded store (no Redis: the decision runs inline, on the event
# loop), the same allow-everything policy, on a free port: what a decision costs the
# instance without the Redis round trip.
MEMORY_PID=""

memory_instance_up() {
    local log=$OUT/memory-instance.log port="" deadline=$((SECONDS + 15))
    : >"$log"
    note_command "env -i HOST=$LOOPBACK PORT=0 INSTANCE_NAME=bench-memory $* $BIN &"
    env -i PATH="$PATH" RUST_LOG=info HOST="$LOOPBACK" PORT=0 INSTANCE_NAME=bench-memory "$@" \
        "$BIN" >"$log" 2>&1 &
    MEMORY_PID=$!
    until [[ -n $port ]] && ready "$port"; do
        kill -0 "$MEMORY_PID" 2>/dev/null || die "the embedded-store instance exited; see ${log#"$ROOT"/}"
        ((SECONDS < deadline)) || die "the embedded-store instance is not ready after 15 s; see ${log#"$ROOT"/}"
        port=$(sed -n '/listening on port/{s/.*listening on port \([0-9]*\).*/\1/p;q}' "$log")
        sleep 0.2
    done
    DIRECT_URL=http://$LOOPBACK:$port
    APP_PIDS=("$MEMORY_PID") NGINX_PIDS=() MASTER_PIDS=() REPLICA_PIDS=() SENTINEL_PIDS=()
    say "phase memory-store: one instance with the embedded store (pid $MEMORY_PID) on port $port"
}

memory_instance_down() {
    [[ -n $MEMORY_PID ]] || return 0
    kill -TERM "$MEMORY_PID" 2>/dev/null || true
    wait "$MEMORY_PID" 2>/dev/null || true
    MEMORY_PID=""
    DIRECT_URL=http://$LOOPBACK:8001
}

# --- one measurement --------------------------------------------------------------

COMMANDS=()
declare -A COMMAND_SEEN=()

note_command() {
    local text=$1
    text=${text//"$ROOT"\//}
    [[ -z ${MEMORY_PID:-} ]] || text=${text//"$DIRECT_URL"/http://$LOOPBACK:PORT}
    if [[ -z ${COMMAND_SEEN[$text]:-} ]]; then
        COMMAND_SEEN[$text]=1
        COMMANDS+=("$text")
        say "+ $text"
    fi
}

# Runs a load generator in a subshell and writes the CPU ticks it used (user+system of
# the subshell's waited-for children) to TICKS_FILE; its output goes to OUT_FILE.
run_loadgen() {
    local out_file=$1 ticks_file=$2
    shift 2
    (
        rc=0
        "$@" >"$out_file" 2>&1 || rc=$?
        read -r stat <"/proc/$BASHPID/stat"
        read -r -a fields <<<"${stat##*) }"
        echo "$((fields[13] + fields[14]))" >"$ticks_file"
        exit "$rc"
    )
}

# Waits, at most QUIET_WAIT seconds, until the machine (the idle topology included) is at
# most QUIET_MAX % busy over half a second, so that a measurement starts on a quiet box.
wait_quiet() {
    ((QUIET_WAIT > 0)) || return 0
    local deadline=$((SECONDS + QUIET_WAIT)) a b busy
    while :; do
        a=$(machine_ticks)
        sleep 0.5
        b=$(machine_ticks)
        busy=$(awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " "); d = y[2] - x[2]
            print (d > 0 ? int(100 * (y[1] - x[1]) / d) : 0) }')
        ((busy <= QUIET_MAX)) && return 0
        if ((SECONDS >= deadline)); then
            say "  the machine is still ${busy}% busy after waiting ${QUIET_WAIT}s; measuring anyway"
            return 0
        fi
        sleep 1
    done
}

RETAKEN=0
STILL_BUSY=0

# measure PHASE ROUND TOOL TARGET PATH CONNECTIONS: one row of results.tsv. A measurement
# during which other processes used more than QUIET_MAX % of the machine is taken again
# (at most RETAKES times); the quietest attempt is kept.
measure() {
    local attempt best="" best_others=101 others
    for ((attempt = 0; attempt <= RETAKES; attempt++)); do
        wait_quiet
        measure_once "$@"
        others=$(cut -f22 <<<"$LAST_ROW")
        if awk -v o="$others" -v b="$best_others" 'BEGIN { exit !(o < b) }'; then
            best=$LAST_ROW best_others=$others
        fi
        awk -v o="$others" -v m="$QUIET_MAX" 'BEGIN { exit !(o <= m) }' && break
        if ((attempt < RETAKES)); then
            RETAKEN=$((RETAKEN + 1))
            say "  other processes used ${others}% of the machine meanwhile; measuring again"
        else
            STILL_BUSY=$((STILL_BUSY + 1))
        fi
    done
    printf '%s\n' "$best" >>"$RESULTS"
}

LAST_ROW=""

# measure_once PHASE ROUND TOOL TARGET PATH CONNECTIONS: sets LAST_ROW.
measure_once() {
    local phase=$1 round=$2 tool=$3 target=$4 path=$5 conns=$6
    local base url name out cmd=()
    case $target in
    nginx) base=$NGINX_URL ;;
    direct) base=$DIRECT_URL ;;
    esac
    url=$base$path
    name=$phase-r$round-$tool-$target-${path//\//_}-c$conns
    out=$OUT/$name.txt
    case $tool in
    wrk) cmd=(wrk "-t$THREADS" "-c$conns" "-d${DURATION}s" --latency -s "$LUA_REPORT" "$url") ;;
    loadtest) cmd=("$LOADTEST" --url "$url" --connections "$conns" --duration "${DURATION}s"
        --sources "$MIXED_SOURCES" --max-requests 100000000) ;;
    esac
    note_command "${cmd[*]}"

    local g0 g1 m0 m1 r0 r1 d0 d1 log0 c0 c1 rc=0
    log0=$(access_log_size)
    [[ $target == direct ]] && c0=$(app_counts "$path")
    r0=$(redis_stats)
    d0=$(app_detail)
    m0=$(machine_ticks)
    g0=$(group_ticks)
    run_loadgen "$out" "$out.ticks" "${cmd[@]}" || rc=$?
    g1=$(group_ticks)
    d1=$(app_detail)
    m1=$(machine_ticks)
    r1=$(redis_stats)
    ((rc == 0)) || {
        tail -n 5 "$out" >&2
        die "the load generator failed (exit $rc): ${cmd[*]}"
    }

    # requests secs p50 p99 max (ms) n200 n429 nother
    local parsed counts
    if [[ $tool == wrk ]]; then
        parsed=$(awk '/^BENCH /{
            for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
            printf "%d %.3f %.3f %.3f %.3f %d\n", v["requests"], v["duration_us"] / 1e6,
                v["p50_us"] / 1e3, v["p99_us"] / 1e3, v["max_us"] / 1e3,
                v["connect"] + v["read"] + v["write"] + v["timeout"] }' "$out")
        [[ -n $parsed ]] || die "no BENCH line in ${out#"$ROOT"/}"
        if [[ $target == nginx ]]; then
            counts=$(access_log_counts "$log0")
        else
            c1=$(app_counts "$path")
            counts=$(awk -v a="$c0" -v b="$c1" 'BEGIN { split(a, x, " "); split(b, y, " ");
                printf "%d %d %d 0\n", y[1] - x[1], y[2] - x[2], y[3] - x[3] }')
            if [[ $counts == "0 0 0 0" ]]; then
                # METRICS=off: the instance counted nothing, so wrk's own count stands in
                # (no 429 is expected where metrics are off; any status >= 400 is "other").
                counts=$(awk '/^BENCH /{
                    for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
                    printf "%d 0 %d 0\n", v["requests"] - v["status"], v["status"] }' "$out")
            fi
        fi
    else
        # loadtest: "requests N sent · M answered · ...", "outcome admitted 200: A ·
        # rejected 429: B · 5xx: C · other: D · errors: E", "latency p50 X ms · ... p99 Z
        # ms · max W ms", "stopped by ... after S s".
        parsed=$(awk '
            /^stopped by/ { for (i = 1; i <= NF; i++) if ($i == "after") secs = $(i + 1) }
            /^requests / { answered = $5 }
            /^outcome / { for (i = 1; i <= NF; i++) {
                if ($i == "200:") a = $(i + 1); if ($i == "429:") d = $(i + 1)
                if ($i == "5xx:" || $i == "other:" || $i == "errors:") o += $(i + 1) } }
            /^latency / { for (i = 1; i <= NF; i++) {
                if ($i == "p50") p50 = $(i + 1); if ($i == "p99") p99 = $(i + 1)
                if ($i == "max") mx = $(i + 1) } }
            END { if (secs > 0) printf "%d %.3f %.3f %.3f %.3f 0 %d %d %d\n",
                answered, secs, p50, p99, mx, a, d, o }' "$out")
        [[ -n $parsed ]] || die "cannot read the summary in ${out#"$ROOT"/}"
        counts=$(awk '{ printf "%d %d %d 0\n", $7, $8, $9 }' <<<"$parsed")
        parsed=$(awk '{ print $1, $2, $3, $4, $5, $6 }' <<<"$parsed")
    fi

    local row
    row=$(awk -v phase="$phase" -v round="$round" -v tool="$tool" -v target="$target" \
        -v path="$path" -v conns="$conns" -v parsed="$parsed" -v counts="$counts" \
        -v g0="$g0" -v g1="$g1" -v m0="$m0" -v m1="$m1" -v r0="$r0" -v r1="$r1" -v d0="$d0" -v d1="$d1" \
        -v lg="$(cat "$out.ticks")" -v hz="$CLK_TCK" 'BEGIN {
        split(parsed, p, " "); split(counts, c, " ")
        split(g0, a, " "); split(g1, b, " "); split(m0, x, " "); split(m1, y, " ")
        split(r0, s, " "); split(r1, t, " ")
        n = p[1]; secs = p[2]; q = (n > 0 ? n : 1)
        per = 1e6 / hz / q
        groups = 0
        for (i = 1; i <= 5; i++) { d[i] = b[i] - a[i]; groups += d[i] }
        busy = y[1] - x[1]; all = y[2] - x[2]
        others = (all > 0 ? 100 * (busy - groups - lg) / all : 0)
        if (others < 0) others = 0
        calls = t[1] - s[1]; usec = t[2] - s[2]; cmds = t[3] - s[3]
        split(d0, e, " "); split(d1, f, " ")
        printf "%s\t%d\t%s\t%s\t%s\t%d\t%d\t%.2f\t%.0f\t%.2f\t%.2f\t%.2f\t%d\t%d\t%d\t%.1f\t%.1f\t%.1f\t%.1f\t%.1f\t%.1f\t%.1f\t%.3f\t%.2f\t%.3f\t%.1f\t%.1f\t%.2f\t%d\n",
            phase, round, tool, target, path, conns, n, secs, n / secs,
            p[3], p[4], p[5], c[1], c[2], c[3] + p[6],
            d[1] * per, d[2] * per, d[3] * per, d[4] * per, d[5] * per, lg * per,
            others, calls / q, (calls > 0 ? usec / calls : 0), cmds / q,
            (f[1] - e[1]) * per, (f[2] - e[2]) * per, (f[3] - e[3]) / q, f[4] }')
    LAST_ROW=$row
    awk -F'\t' '{ printf "bench:   %-13s r%d %-8s %-6s %-17s c%-3d %8.0f req/s  p50 %6.2f  p99 %6.2f  max %7.2f ms  200:%d 429:%d other:%d  app %.1f µs/req  nginx %.1f  redis %.1f  gen %.1f  others %.0f%%  script calls/req %.3f  app user/sys %.1f/%.1f  cs/req %.2f  threads %d\n",
        $1, $2, $3, $4, $5, $6, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $21, $22, $23, $26, $27, $28, $29 }' <<<"$row"
    # A 499 is Nginx logging a request that wrk abandoned when its time was up.
    local closed
    closed=$(awk '{ print $4 }' <<<"$counts")
    ((closed == 0)) || say "  ($closed requests abandoned by the load generator at its end: Nginx logged 499)"
}

# Short unrecorded runs, so that pools, connections and caches are warm.
warm_up() {
    local target
    say "warming up (2 s per target, not recorded)"
    for target in "$@"; do
        wrk -t1 -c16 -d2s "$target" >/dev/null 2>&1 || true
    done
}

# run_rounds PHASE "TOOL TARGET PATH CONNS"...: every round measures each, in order on odd
# rounds and in reverse on even ones, so that drift hits pairs of figures alike.
run_rounds() {
    local phase=$1 round i
    shift
    local list=("$@")
    for ((round = 1; round <= ROUNDS; round++)); do
        say "phase $phase, round $round of $ROUNDS"
        if ((round % 2 == 1)); then
            for ((i = 0; i < ${#list[@]}; i++)); do
                # shellcheck disable=SC2086 # four words on purpose
                measure "$phase" "$round" ${list[i]}
            done
        else
            for ((i = ${#list[@]} - 1; i >= 0; i--)); do
                # shellcheck disable=SC2086
                measure "$phase" "$round" ${list[i]}
            done
        fi
    done
}

# --- the Lua script alone ---------------------------------------------------------

SCRIPT_ROWS=()

# "command calls usec" for every command the master has counted.
command_stats() {
    rcli "$MASTER_PORT" INFO commandstats | awk -F'[:,=]' '
        /^cmdstat_/ {
            calls = 0; usec = 0
            for (i = 2; i < NF; i += 2) {
                if ($i == "calls") calls = $(i + 1)
                if ($i == "usec") usec = $(i + 1)
            }
            print substr($1, 9), calls, usec
        }'
}

# script_alone NAME SHA KEY CAPACITY_UNITS REFILL_UNITS_PER_US COST_UNITS
script_alone() {
    local name=$1 sha=$2 key=$3 capacity=$4 refill=$5 cost=$6 t0 t1 out=$OUT/redis-benchmark-$1.txt
    local cmd=(redis-benchmark -h "$LOOPBACK" -p "$MASTER_PORT" -a PASSWORD
        -n 200000 -r 100000 -q EVALSHA "$sha" 1 "$key" "$capacity" "$refill" "$cost")
    note_command "${cmd[*]}"
    cmd[6]=$REDIS_PASSWORD
    command_stats >"$OUT/cmdstats-$name.before"
    t0=$(ticks_of "${MASTER_PIDS[@]}")
    run_loadgen "$out" "$out.ticks" "${cmd[@]}" || die "redis-benchmark failed: $(tail -n 3 "$out")"
    t1=$(ticks_of "${MASTER_PIDS[@]}")
    command_stats >"$OUT/cmdstats-$name.after"
    # name, calls, usec_per_call, master CPU µs per call, calls/s, then µs per script call
    # spent in each command the script runs (the rest is the script engine itself).
    local row
    row=$(awk -v t0="$t0" -v t1="$t1" -v hz="$CLK_TCK" -v name="$name" -v client="$(cat "$out.ticks")" \
        -v rps="$(tr '\r' '\n' <"$out" | sed -n 's/.*: \([0-9.]*\) requests per second.*/\1/p' | tail -n 1)" '
        NR == FNR { c0[$1] = $2; u0[$1] = $3; next }
        { c[$1] = $2 - c0[$1]; u[$1] = $3 - u0[$1] }
        END {
            calls = c["evalsha"]; q = (calls ? calls : 1)
            printf "%s\t%d\t%.2f\t%.1f\t%.0f", name, calls, u["evalsha"] / q, (t1 - t0) * 1e6 / hz / q, rps
            inner = 0
            split("time hmget hset pexpire get setex", names, " ")
            for (i = 1; i <= 6; i++) inner += u[names[i]]
            for (i = 1; i <= 4; i++) printf "\t%.2f", u[names[i]] / q
            printf "\t%.2f\t%.1f\n", (u["evalsha"] - inner) / q, client * 1e6 / hz / q
        }' "$OUT/cmdstats-$name.before" "$OUT/cmdstats-$name.after")
    SCRIPT_ROWS+=("$row")
    awk -F'\t' '{ printf "bench:   %s: %d calls, usec_per_call %.2f (TIME %.2f, HMGET %.2f, HSET %.2f, PEXPIRE %.2f, the rest %.2f), master CPU %.1f µs/call, client %.1f µs/call, %.0f calls/s\n", $1, $2, $3, $6, $7, $8, $9, $10, $4, $11, $5 }' <<<"$row"
}

run_script_alone() {
    local sha floor reference
    sha=$(rcli "$MASTER_PORT" -x SCRIPT LOAD <src/limiter/token_bucket.lua)
    [[ $sha == "$(sha1sum <src/limiter/token_bucket.lua | cut -d' ' -f1)" ]] ||
        die "SCRIPT LOAD answered '$sha', not the SHA-1 of src/limiter/token_bucket.lua"
    # A script that only returns what the real one returns: the floor of any EVALSHA with
    # these arguments on this machine (argument tables, the call, the reply).
    floor=$(rcli "$MASTER_PORT" SCRIPT LOAD 'return {1, 0}')
    reference=$(rcli "$MASTER_PORT" -x SCRIPT LOAD <scripts/bench/reference_token_bucket.lua)
    say "redis-benchmark: src/limiter/token_bucket.lua is $sha; replicas attached: $(rcli "$MASTER_PORT" INFO replication | sed -n 's/^connected_slaves://p')"
    # The shipped policy, 10 per 60 s, in the script's units (src/limiter/policy.rs):
    # capacity = BURST × TIME_WINDOW × 10^6, refill = RATE_LIMIT per µs, cost = window in µs.
    # Random keys of a burst of 10 are admitted (two calls per key on average); one key
    # with a burst of 1 and a refill of one token per 60 s is denied after its first call.
    script_alone allow-heavy "$sha" "$BENCH_KEY_PREFIX:__rand_int__" 600000000 10 60000000
    # One client coming back again and again under the allow policy of the HTTP phases
    # (10^9 per 1 s): after its first call its key is extended, so a call writes only the hash.
    script_alone returning "$sha" "$BENCH_KEY_PREFIX:returning" 1000000000000000 1000000000 1000000
    script_alone deny-heavy "$sha" "$BENCH_KEY_PREFIX:denied" 60000000 1 60000000
    script_alone "floor (return {1, 0})" "$floor" "$BENCH_KEY_PREFIX:__rand_int__" 600000000 10 60000000
    # The same random keys and policy (10 tokens, 10 per 60 s) for the reference script.
    script_alone reference "$reference" "$BENCH_KEY_PREFIX:ref:__rand_int__" 10 0.16666667 1790000000
    rcli "$MASTER_PORT" DEL "$BENCH_KEY_PREFIX:denied" "$BENCH_KEY_PREFIX:returning" >/dev/null
}

# --- report -----------------------------------------------------------------------

# Awk functions the report's programs start with: medians of numbers, sorting in place.
AWK_MEDIAN='
    function median_of(v, n,    i, j, t) {
        for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j - 1] + 0 > v[j] + 0; j--) {
            t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
        return (n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2)
    }
    function median(list,    n, v) { n = split(list, v, " "); return median_of(v, n) }
'

# Medians over the rounds of each (phase, tool, target, path, connections).
summary_table() {
    printf '| phase | load | via | path | conns | req/s | p50 ms | p99 ms | max ms | 200 | 429 | other | app µs/req | Nginx µs/req | Redis master µs/req | replicas µs/req | sentinels µs/req | load gen µs/req | other processes %% | script calls/req | Redis µs/call |\n'
    printf '|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n'
    awk -F'\t' "$AWK_MEDIAN"'
        {
            key = $1 "\t" $3 "\t" $4 "\t" $5 "\t" $6
            if (!(key in seen)) { seen[key] = 1; order[++n] = key }
            for (i = 9; i <= 25; i++) col[key, i] = col[key, i] " " $i
            if ($12 > mx[key]) mx[key] = $12
            for (i = 13; i <= 15; i++) sum[key, i] += $i
        }
        END {
            for (k = 1; k <= n; k++) {
                key = order[k]; split(key, f, "\t")
                printf "| %s | %s | %s | `%s` | %s | %.0f | %.2f | %.2f | %.2f | %d | %d | %d |",
                    f[1], f[2], f[3], f[4], f[5], median(col[key, 9]), median(col[key, 10]),
                    median(col[key, 11]), mx[key], sum[key, 13], sum[key, 14], sum[key, 15]
                for (i = 16; i <= 21; i++) printf " %.1f |", median(col[key, i])
                calls = median(col[key, 23])
                printf " %.0f | %.3f | %s |\n", median(col[key, 22]), calls,
                    (calls >= 0.01 ? sprintf("%.2f", median(col[key, 24])) : "-")
            }
        }' "$RESULTS"
}

detail_table() {
    printf '| phase | via | path | conns | app user µs/req | app system µs/req | context switches/req | threads |\n'
    printf '|---|---|---|--:|--:|--:|--:|--:|\n'
    awk -F'\t' "$AWK_MEDIAN"'
        {
            key = $1 "\t" $4 "\t" $5 "\t" $6
            if (!(key in seen)) { seen[key] = 1; order[++n] = key }
            for (i = 26; i <= 29; i++) col[key, i] = col[key, i] " " $i
        }
        END {
            for (k = 1; k <= n; k++) {
                key = order[k]; split(key, f, "\t")
                printf "| %s | %s | `%s` | %s | %.1f | %.1f | %.2f | %d |\n", f[1], f[2], f[3], f[4],
                    median(col[key, 26]), median(col[key, 27]), median(col[key, 28]), median(col[key, 29])
            }
        }' "$RESULTS"
}

# ratio PHASE TARGET CONNS: "median min max" of /limited_endpoint ÷ / req/s, per round.
ratio() {
    awk -F'\t' -v phase="$1" -v target="$2" -v conns="$3" "$AWK_MEDIAN"'
        $1 == phase && $4 == target && $6 == conns {
            if ($5 == "/limited_endpoint") l[$2] = $9; else if ($5 == "/") r[$2] = $9 }
        END {
            for (k in l) if (k in r && r[k] > 0) v[++n] = l[k] / r[k]
            if (!n) { print "- - -"; exit }
            printf "%.2f %.2f %.2f\n", median_of(v, n), v[1], v[n]
        }' "$RESULTS"
}

# over_rounds PHASE TARGET PATH CONNS FIELD [median|max|sum]: over the rounds.
over_rounds() {
    awk -F'\t' -v phase="$1" -v target="$2" -v path="$3" -v conns="$4" -v field="$5" -v how="${6:-median}" "$AWK_MEDIAN"'
        $1 == phase && $4 == target && $5 == path && $6 == conns { v[++n] = $field + 0; s += $field }
        END {
            if (!n) { print "-"; exit }
            m = median_of(v, n)
            if (how == "max") print v[n]; else if (how == "sum") print s; else print m
        }' "$RESULTS"
}

verdict() {
    # verdict VALUE OP GOAL -> "met" / "MISSED" / "not measured"
    awk -v v="$1" -v op="$2" -v g="$3" 'BEGIN {
        if (v == "-" || v == "") { print "not measured"; exit }
        ok = (op == ">=" ? v + 0 >= g + 0 : (op == "<=" ? v + 0 <= g + 0 : v + 0 == g + 0))
        print (ok ? "met" : "MISSED") }'
}

keepalive_check() {
    local file missing
    for file in nginx/*.conf*; do
        missing=()
        grep -Eq '^[[:space:]]*keepalive[[:space:]]+[0-9]+;' "$file" || missing+=("keepalive N")
        grep -Eq '^[[:space:]]*proxy_http_version[[:space:]]+1\.1;' "$file" || missing+=("proxy_http_version 1.1")
        grep -Eq '^[[:space:]]*proxy_set_header[[:space:]]+Connection[[:space:]]+"";' "$file" || missing+=('proxy_set_header Connection ""')
        if ((${#missing[@]} == 0)); then
            printf -- '- `%s`: `%s` (met)\n' "$file" "$(sed -nE '/^[[:space:]]*keepalive[[:space:]]+[0-9]+;/{s/^[[:space:]]*//;p;q}' "$file")"
        else
            printf -- '- `%s`: lacks %s (MISSED)\n' "$file" "${missing[*]}"
        fi
    done
}

goals() {
    local r c v med lo hi
    printf '1. **Nginx upstream keepalive** (`keepalive N`, `proxy_http_version 1.1`, `Connection ""`) in every shipped config:\n'
    keepalive_check | sed 's/^/   /'

    read -r med lo hi <<<"$(ratio allow nginx 64)"
    c=$(over_rounds allow nginx /limited_endpoint 64 15 sum)
    v=$(over_rounds allow nginx /limited_endpoint 64 11 max)
    printf '2. **Through Nginx at 64 connections, allow-everything policy**: `/limited_endpoint` ÷ `/` = **%s** (rounds: %s–%s; goal ≥ 0.6: %s); responses other than 200/429: **%s** (goal 0: %s); p99 median %s ms, worst %s ms (goal ≤ 10: %s).' \
        "$med" "$lo" "$hi" "$(verdict "$med" '>=' 0.6)" "$c" "$(verdict "$c" '==' 0)" \
        "$(over_rounds allow nginx /limited_endpoint 64 11)" "$v" "$(verdict "$v" '<=' 10)"
    read -r med lo hi <<<"$(ratio allow nginx 16)"
    printf ' At 16 connections: %s (%s–%s).' "$med" "$lo" "$hi"
    printf ' Responses other than 200/429 in all %s measurements of the run: %s.' "$(wc -l <"$RESULTS")" "$(awk -F'\t' '{ s += $15 } END { print s + 0 }' "$RESULTS")"
    read -r med lo hi <<<"$(ratio mixed nginx 64)"
    printf ' Mixed policy over 241 clients at 64 connections: %s (%s–%s).\n' "$med" "$lo" "$hi"

    v=$(over_rounds allow nginx /limited_endpoint 64 16)
    r=$(over_rounds allow nginx / 64 16)
    printf '3. **App CPU per decision** (both instances, through Nginx at 64 connections, allow policy, the default Redis client): **%s µs** (goal ≤ 18: %s); per `/` request %s µs, so the decision itself adds %s µs. Directly at 64 connections: %s µs per decision, %s µs per `/`.\n' \
        "$v" "$(verdict "$v" '<=' 18)" "$r" "$(awk -v a="$v" -v b="$r" 'BEGIN { if (a == "-" || b == "-") print "-"; else printf "%.1f", a - b }')" \
        "$(over_rounds allow direct /limited_endpoint 64 16)" "$(over_rounds allow direct / 64 16)"
    v=$(over_rounds allow-pool nginx /limited_endpoint 64 16)
    printf '   With `REDIS_CLIENT=pool` (r2d2 through `web::block`): **%s µs** per decision through Nginx (%s), %s µs directly; `/limited_endpoint` ÷ `/` through Nginx at 64 connections %s. Without Redis (one instance with the embedded store, directly, 64 connections): %s µs per decision, %s µs per `/`. Context switches per request through Nginx at 64 connections: %s per decision with the default client, %s with the pool, %s per `/`.\n' \
        "$v" "$(verdict "$v" '<=' 18)" "$(over_rounds allow-pool direct /limited_endpoint 64 16)" "$(ratio allow-pool nginx 64 | cut -d' ' -f1)" \
        "$(over_rounds memory-store direct /limited_endpoint 64 16)" "$(over_rounds memory-store direct / 64 16)" \
        "$(over_rounds allow nginx /limited_endpoint 64 28)" "$(over_rounds allow-pool nginx /limited_endpoint 64 28)" "$(over_rounds allow nginx / 64 28)"

    v=$(over_rounds metrics-off nginx /limited_endpoint 64 16)
    r=$(over_rounds metrics-off nginx / 64 16)
    read -r med lo hi <<<"$(ratio metrics-off nginx 64)"
    printf '   With `METRICS=off` (same policy, its own cluster, 64 connections): %s µs per decision and %s µs per `/` through Nginx (with metrics: %s and %s), %s and %s directly (with metrics: %s and %s); `/limited_endpoint` ÷ `/` through Nginx %s (%s–%s).\n' \
        "$v" "$r" "$(over_rounds allow nginx /limited_endpoint 64 16)" "$(over_rounds allow nginx / 64 16)" \
        "$(over_rounds metrics-off direct /limited_endpoint 64 16)" "$(over_rounds metrics-off direct / 64 16)" \
        "$(over_rounds allow direct /limited_endpoint 64 16)" "$(over_rounds allow direct / 64 16)" "$med" "$lo" "$hi"

    local allow_row deny_row returning_row reference_row anchored
    allow_row=$(printf '%s\n' "${SCRIPT_ROWS[@]}" | awk -F'\t' '$1 == "allow-heavy"')
    deny_row=$(printf '%s\n' "${SCRIPT_ROWS[@]}" | awk -F'\t' '$1 == "deny-heavy"')
    returning_row=$(printf '%s\n' "${SCRIPT_ROWS[@]}" | awk -F'\t' '$1 == "returning"')
    reference_row=$(printf '%s\n' "${SCRIPT_ROWS[@]}" | awk -F'\t' '$1 == "reference"')
    v=$(cut -f3 <<<"$allow_row")
    r=$(cut -f3 <<<"$reference_row")
    # The anchors' reference script cost 6.0 µs there; the same script costs r here.
    anchored=$(awk -v v="${v:--}" -v r="${r:--}" 'BEGIN { if (v == "-" || r == "-" || r + 0 == 0) print "-"; else printf "%.1f", v * 6.0 / r }')
    printf '4. **Redis CPU per decision** (`usec_per_call` of EVALSHA, redis-benchmark, replicas attached): allow-heavy (random keys, half of them new) **%s µs** (read against the goal of 5.5 µs as it stands: %s), a returning client %s µs, deny-heavy %s µs; master CPU from /proc %s, %s and %s µs per call. The reference script (two string keys, GET/GET/SETEX/SETEX; 6.0 µs on the anchors'"'"' machine) costs %s µs here on the same keys, so the script costs %s× the reference: **about %s µs** on the anchors'"'"' machine (goal ≤ 5.5: %s). Under HTTP load (allow policy, Nginx, 64 connections): %s µs per call, master %s µs per request.\n' \
        "${v:--}" "$(verdict "${v:--}" '<=' 5.5)" "$(cut -f3 <<<"$returning_row")" "$(cut -f3 <<<"$deny_row")" \
        "$(cut -f4 <<<"$allow_row")" "$(cut -f4 <<<"$returning_row")" "$(cut -f4 <<<"$deny_row")" "${r:--}" \
        "$(awk -v v="${v:--}" -v r="${r:--}" 'BEGIN { if (v == "-" || r == "-" || r + 0 == 0) print "-"; else printf "%.2f", v / r }')" \
        "$anchored" "$(verdict "$anchored" '<=' 5.5)" \
        "$(over_rounds allow nginx /limited_endpoint 64 24)" "$(over_rounds allow nginx /limited_endpoint 64 18)"

    read -r med lo hi <<<"$(ratio flood nginx 64)"
    printf '5. **One client flooding through Nginx at 64 connections** (10 per 60 s), deny cache on: `/limited_endpoint` ÷ `/` = **%s** (%s–%s; goal ≥ 0.9: %s), script calls per request %s (Nginx logged %s × 429 and %s × 200).' \
        "$med" "$lo" "$hi" "$(verdict "$med" '>=' 0.9)" "$(over_rounds flood nginx /limited_endpoint 64 23)" \
        "$(over_rounds flood nginx /limited_endpoint 64 14 sum)" "$(over_rounds flood nginx /limited_endpoint 64 13 sum)"
    read -r med lo hi <<<"$(ratio flood-nocache nginx 64)"
    printf ' With `DENY_CACHE_SIZE=0`: %s (%s–%s), script calls per request %s.\n' \
        "$med" "$lo" "$hi" "$(over_rounds flood-nocache nginx /limited_endpoint 64 23)"
    printf '6. **Memory**: see the `scripts/memory.sh` section.\n'
}

machine() {
    printf -- '- Machine: %s cores, %s, kernel %s, %s MiB RAM\n' "$(nproc)" \
        "$(sed -n '/^model name/{s/^model name[[:space:]]*: //;p;q}' /proc/cpuinfo)" "$(uname -r)" \
        "$(awk '/^MemTotal/ { printf "%d", $2 / 1024 }' /proc/meminfo)"
    printf -- '- Software: %s; %s; %s\n' "$(nginx -v 2>&1 | sed 's/^nginx version: //')" \
        "$(redis-server --version | awk '{ print $1, $2, $3 }')" "$(wrk --version 2>&1 | awk 'NR == 1 { print "wrk", $2 }')"
    if [[ -n $SERVICE_NOTE ]]; then
        printf -- '- Service: %s\n' "$SERVICE_NOTE"
    elif [[ $OWN_CLUSTER == yes ]]; then
        printf -- '- Service: RATELIMITER_BIN=%s (built %s); this checkout is at commit %s\n' "${RATELIMITER_BIN#"$ROOT"/}" \
            "$(date -u -r "$BIN" '+%Y-%m-%d %H:%M UTC')" "$(git log -1 --format='%h (%s)')"
    else
        printf -- '- Service: the running cluster'"'"'s binary; this checkout is at commit %s\n' "$(git log -1 --format='%h (%s)')"
    fi
}

report() {
    local elapsed=$1 load_before=$2 load_after=$3
    printf '## Run of %s\n\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
    machine
    printf -- '- Load average before/after: %s / %s; the "other processes" column is the CPU every process outside the topology and the load generator used during each measurement, in %% of all cores\n' "$load_before" "$load_after"
    printf -- '- %s rounds of %s s per measurement, wrk with %s thread(s); whole run %s s\n' "$ROUNDS" "$DURATION" "$THREADS" "$elapsed"
    printf -- '- Measurements taken again because other processes used more than %s%% of the machine: %s; kept although still above it: %s\n' "$QUIET_MAX" "$RETAKEN" "$STILL_BUSY"
    printf -- '- CPU used by processes outside the benchmark during the kept measurements: median %s%%, highest %s%% of the machine\n' \
        "$(awk -F'\t' "$AWK_MEDIAN"'{ v[++n] = $22 } END { print (n ? median_of(v, n) : "-") }' "$RESULTS")" \
        "$(awk -F'\t' '$22 > m { m = $22 } END { print m + 0 }' "$RESULTS")"
    local passed=() var
    for var in WORKERS REDIS_POOL_SIZE REDIS_TIMEOUT_MS ACCESS_LOG; do
        [[ -z ${!var:-} ]] || passed+=("$var=${!var}")
    done
    printf -- '- Instance settings beyond each phase'"'"'s policy: %s\n\n' "${passed[*]:-defaults}"
    printf '### Goals\n\n'
    goals
    printf '\n### Medians over the rounds\n\n'
    printf 'CPU columns are µs of CPU time (user + system, from `/proc/PID/stat`) per answered request; "app" is both instances together. "other" counts statuses other than 200 and 429 plus socket errors. "script calls/req" is EVALSHA+EVAL seen by the master per answered request; "Redis µs/call" their `usec` ÷ `calls` from `INFO commandstats`.\n\n'
    summary_table
    printf '\n### Where the instances spend their CPU (medians)\n\n'
    printf 'User and system time of both instances per answered request, their threads'"'"' context switches per request (voluntary + involuntary, threads alive at the end), and their thread count at the end.\n\n'
    detail_table
    printf '\n### The Lua script alone (redis-benchmark, 200000 calls, 50 clients, replicas attached)\n\n'
    printf '`usec_per_call` of EVALSHA includes the commands the script runs; their own `usec` per script call follows, and "engine" is the rest (the Lua call, its argument tables, the arithmetic, the reply). The floor row is a script that only returns `{1, 0}` with the same arguments; the reference row is `scripts/bench/reference_token_bucket.lua` (its own commands, GET and SETEX, are counted in neither column nor "engine"). The client column is redis-benchmark'"'"'s own CPU per call: what one event-loop client (C, hiredis) spends per round trip on this machine.\n\n'
    printf '| case | calls | usec_per_call | TIME | HMGET | HSET | PEXPIRE | engine | master CPU µs/call (/proc) | client CPU µs/call | calls/s |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n'
    printf '%s\n' "${SCRIPT_ROWS[@]}" | awk -F'\t' 'NF { printf "| %s | %d | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.1f | %.1f | %.0f |\n", $1, $2, $3, $6, $7, $8, $9, $10, $4, $11, $5 }'
    printf '\n### Commands\n\n`PASSWORD` stands for REDIS_PASSWORD; the embedded-store instance listens on a free port.\n\n```sh\n'
    printf '%s\n' "$INVOCATION" "${COMMANDS[@]}"
    printf '```\n'
}

# --- main -------------------------------------------------------------------------

check_tools
# The load generator's version does not move the service's figures: build it only if missing.
[[ -x $LOADTEST ]] || {
    say "building the load generator: cargo build --release -p loadtest"
    cargo build --release -p loadtest
}
rm -rf "$OUT" && mkdir -p "$OUT"
: >"$RESULTS"

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
say "load average now: $load_before ($(nproc) cores); other engineers' work moves the figures, see the 'other processes' column"

if ready 8000 && ready 8001 && ready 8002; then
    CLUSTER_DIR=${CLUSTER_DIR:-$ROOT/run/cluster}
    [[ -n $(recorded_pids nginx) ]] ||
        die "something answers /ready on 8000-8002 but it is not a native cluster with pid records in ${CLUSTER_DIR#"$ROOT"/} (Compose?): stop it, or set CLUSTER_DIR to its run folder"
    [[ $RECORD == no ]] || die "--record needs every phase, so the bench's own cluster: stop the running one first (scripts/cluster.sh down)"
    export CLUSTER_DIR
    say "using the running cluster (${CLUSTER_DIR#"$ROOT"/}); it keeps its policy and keeps running"
    say "its policy: $(curl -s -D - -o /dev/null "$NGINX_URL/limited_endpoint" | tr -d '\r' | sed -n 's/^ratelimit-policy: //Ip')"
else
    busy=()
    for port in 8000 8001 8002 "${DATA_PORTS[@]}" 26379 26380 26381; do
        port_open "$port" && busy+=("$port")
    done
    ((${#busy[@]} == 0)) ||
        die "port(s) ${busy[*]} are in use but no native cluster answers on 8000-8002; free them (see: ss -ltnp 'sport = :${busy[0]}') and retry"
    OWN_CLUSTER=yes
    # Every phase runs the same binary, even if the working tree changes meanwhile (which
    # would make scripts/cluster.sh rebuild it between phases): a copy, made once.
    if [[ -z ${RATELIMITER_BIN:-} ]]; then
        if [[ ! -x $BIN ]] || [[ -n $(find src config Cargo.toml Cargo.lock -newer "$BIN" -print -quit 2>/dev/null) ]]; then
            say "building the release binary: cargo build --release --bin ratelimiter"
            cargo build --release --bin ratelimiter
        fi
        SERVICE_NOTE="${BIN#"$ROOT"/} built from this working tree at commit $(git log -1 --format='%h (%s)')$(git status --porcelain -- src config Cargo.toml Cargo.lock 2>/dev/null | awk 'END { if (NR) printf ", with %d uncommitted change(s) under src/, config/ or Cargo.*", NR }'), run as a copy, run/bench/ratelimiter"
        cp "$BIN" "$OUT/ratelimiter"
        BIN=$OUT/ratelimiter
        export RATELIMITER_BIN=$BIN
        say "every phase runs a copy of it: ${BIN#"$ROOT"/}"
    fi
    export CLUSTER_DIR=$ROOT/run/bench-cluster
    trap 'memory_instance_down; cluster_down' EXIT
    trap 'exit 130' INT TERM HUP PIPE
fi

if [[ $OWN_CLUSTER == no ]]; then
    find_processes
    warm_up "$NGINX_URL/limited_endpoint" "$NGINX_URL/" "$DIRECT_URL/limited_endpoint"
    run_rounds running \
        "wrk nginx /limited_endpoint 16" "wrk nginx / 16" "wrk direct /limited_endpoint 16" "wrk direct / 16" \
        "wrk nginx /limited_endpoint 64" "wrk nginx / 64" "wrk direct /limited_endpoint 64" "wrk direct / 64"
    run_script_alone
else
    cluster_up allow RATE_LIMIT=1000000000 TIME_WINDOW=1 BURST=1000000000
    find_processes
    warm_up "$NGINX_URL/limited_endpoint" "$NGINX_URL/" "$DIRECT_URL/limited_endpoint"
    run_rounds allow \
        "wrk nginx /limited_endpoint 16" "wrk nginx / 16" "wrk direct /limited_endpoint 16" "wrk direct / 16" \
        "wrk nginx /limited_endpoint 64" "wrk nginx / 64" "wrk direct /limited_endpoint 64" "wrk direct / 64"
    run_script_alone
    cluster_down

    # What /metrics costs: the allow phase again with every metric switched off.
    cluster_up metrics-off RATE_LIMIT=1000000000 TIME_WINDOW=1 BURST=1000000000 METRICS=off
    find_processes
    warm_up "$NGINX_URL/limited_endpoint" "$NGINX_URL/" "$DIRECT_URL/limited_endpoint"
    run_rounds metrics-off \
        "wrk nginx /limited_endpoint 64" "wrk nginx / 64" "wrk direct /limited_endpoint 64" "wrk direct / 64"
    cluster_down

    if grep -q REDIS_CLIENT "$BIN"; then
        cluster_up allow-pool RATE_LIMIT=1000000000 TIME_WINDOW=1 BURST=1000000000 REDIS_CLIENT=pool
        find_processes
        warm_up "$NGINX_URL/limited_endpoint" "$NGINX_URL/" "$DIRECT_URL/limited_endpoint"
        run_rounds allow-pool \
            "wrk nginx /limited_endpoint 16" "wrk nginx / 16" "wrk direct /limited_endpoint 16" "wrk direct / 16" \
            "wrk nginx /limited_endpoint 64" "wrk nginx / 64" "wrk direct /limited_endpoint 64" "wrk direct / 64"
        cluster_down
    else
        say "phase allow-pool skipped: this binary has no REDIS_CLIENT setting (one Redis client design only)"
    fi

    memory_instance_up RATE_LIMIT=1000000000 TIME_WINDOW=1 BURST=1000000000
    warm_up "$DIRECT_URL/limited_endpoint" "$DIRECT_URL/"
    run_rounds memory-store \
        "wrk direct /limited_endpoint 16" "wrk direct / 16" "wrk direct /limited_endpoint 64" "wrk direct / 64"
    memory_instance_down

    cluster_up mixed RATE_LIMIT="$MIXED_RATE" TIME_WINDOW=1 BURST="$MIXED_RATE"
    find_processes
    warm_up "$NGINX_URL/limited_endpoint" "$NGINX_URL/" "$DIRECT_URL/limited_endpoint"
    run_rounds mixed \
        "loadtest nginx /limited_endpoint 16" "loadtest nginx / 16" "loadtest direct /limited_endpoint 16" "loadtest direct / 16" \
        "loadtest nginx /limited_endpoint 64" "loadtest nginx / 64" "loadtest direct /limited_endpoint 64" "loadtest direct / 64"
    cluster_down

    cluster_up flood RATE_LIMIT=10 TIME_WINDOW=60
    find_processes
    warm_up "$NGINX_URL/limited_endpoint" "$NGINX_URL/" "$DIRECT_URL/limited_endpoint"
    run_rounds flood "wrk nginx /limited_endpoint 64" "wrk nginx / 64"
    cluster_down

    cluster_up flood-nocache RATE_LIMIT=10 TIME_WINDOW=60 DENY_CACHE_SIZE=0
    find_processes
    warm_up "$NGINX_URL/limited_endpoint" "$NGINX_URL/" "$DIRECT_URL/limited_endpoint"
    run_rounds flood-nocache "wrk nginx /limited_endpoint 64" "wrk nginx / 64"
    cluster_down
fi

elapsed=$((SECONDS - STARTED_AT))
report "$elapsed" "$load_before" "$(cut -d' ' -f1-3 /proc/loadavg)" >"$OUT/report.md"
printf '\n'
cat "$OUT/report.md"
printf '\n'
say "done in ${elapsed}s; raw outputs in ${OUT#"$ROOT"/}"
if [[ $RECORD == yes ]]; then
    scripts/bench/record-block.sh bench.sh "$OUT/report.md" "$DOC"
    say "recorded in $DOC"
fi

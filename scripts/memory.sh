#!/usr/bin/env bash
# Shows that one instance's resident memory stays bounded after a million distinct client
# identities have passed through it, and that Redis keeps no bucket past its refill time.
#
# Usage: scripts/memory.sh [--identities N] [--cases "CASE..."] [--max-secs S] [--record]
#
#   --identities N  distinct identities per case (default 1000000)
#   --cases LIST    space-separated STORE:RATE_LIMIT/TIME_WINDOW/BURST, STORE being memory
#                   or redis (default "memory:10/60/10 memory:1/60/1 redis:1/2/1")
#   --max-secs S    bound on the traffic of one case, in seconds (default 300)
#   --record        also write the results into docs/BENCHMARKS.md
#
# Each case starts one instance (target/release/ratelimiter) on a free loopback port with
# TRUSTED_PROXIES=127.0.0.1, and for `redis` a redis-server of its own on a free port in a
# temporary folder; nothing of scripts/cluster.sh is used or touched. wrk (with
# scripts/bench/xff.lua) then sends every identity, an IPv4 in 10.0.0.0/8, in
# X-Forwarded-For; every 10th identity asks twice in a row, which a burst of 1 denies, so
# that with Redis the deny cache fills up (DENY_CACHE_SIZE, default 100000). VmRSS
# (/proc/PID/status) is read before, every second during, right after, and after the
# refill time; VmHWM is the kernel's peak. With Redis, DBSIZE is polled until the bucket
# keys are gone. Everything started here is stopped at the end, by pid.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
STARTED_AT=$SECONDS

IDENTITIES=1000000
CASES="memory:10/60/10 memory:1/60/1 redis:1/2/1"
MAX_SECS=300
RECORD=no
REPEAT_EVERY=10
CONNECTIONS=64
THREADS=2
LIMIT_MIB=64
LOOPBACK=127.0.0.1
# As in scripts/cluster.sh: RATELIMITER_BIN runs another binary than the one built here.
BIN=${RATELIMITER_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/ratelimiter}
DOC=docs/BENCHMARKS.md

say() { printf 'memory: %s\n' "$*"; }
warn() { printf 'memory: %s\n' "$*" >&2; }
die() {
    warn "error: $*"
    exit 1
}
usage() {
    sed -n '/^# Usage:/,/^#   --record/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
    exit 2
}

while (($# > 0)); do
    case $1 in
    --identities) IDENTITIES=${2:-} && shift ;;
    --cases) CASES=${2:-} && shift ;;
    --max-secs) MAX_SECS=${2:-} && shift ;;
    --record) RECORD=yes ;;
    -h | --help) usage ;;
    *)
        warn "unknown argument: $1"
        usage
        ;;
    esac
    shift
done
if ! [[ $IDENTITIES =~ ^[0-9]+$ ]] || ((IDENTITIES < 1000 || IDENTITIES > 16000000)); then
    die "--identities must be from 1000 to 16000000 (10.0.0.0/8), got '$IDENTITIES'"
fi
if ! [[ $MAX_SECS =~ ^[0-9]+$ ]] || ((MAX_SECS < 10 || MAX_SECS > 600)); then
    die "--max-secs must be from 10 to 600, got '$MAX_SECS'"
fi
for case in $CASES; do
    [[ $case =~ ^(memory|redis):[0-9]+/[0-9]+/[0-9]+$ ]] ||
        die "a case is STORE:RATE_LIMIT/TIME_WINDOW/BURST with STORE memory or redis, got '$case'"
done

missing=()
for tool in wrk curl redis-server redis-cli awk; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
((${#missing[@]} == 0)) ||
    die "missing: ${missing[*]}; install with: apt-get install wrk curl redis-server redis-tools mawk"
OUT=$ROOT/run/memory
mkdir -p "$OUT"
if [[ -n ${RATELIMITER_BIN:-} ]]; then
    [[ -x $BIN ]] || die "RATELIMITER_BIN=$BIN is not an executable file"
    SERVICE_NOTE="RATELIMITER_BIN=${BIN#"$ROOT"/}; this checkout is at commit $(git log -1 --format='%h (%s)')"
else
    if [[ ! -x $BIN ]] || [[ -n $(find src config Cargo.toml Cargo.lock -newer "$BIN" -print -quit 2>/dev/null) ]]; then
        say "building the release binary: cargo build --release --bin ratelimiter"
        cargo build --release --bin ratelimiter
    fi
    SERVICE_NOTE="${BIN#"$ROOT"/} built from this working tree at commit $(git log -1 --format='%h (%s)')$(git status --porcelain -- src config Cargo.toml Cargo.lock 2>/dev/null | awk 'END { if (NR) printf ", with %d uncommitted change(s) under src/, config/ or Cargo.*", NR }'), run as a copy, run/memory/ratelimiter"
    # Every case runs the same binary, even if the working tree is rebuilt meanwhile.
    cp "$BIN" "$OUT/ratelimiter"
    BIN=$OUT/ratelimiter
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ratelimiter-memory.XXXXXX")
PIDS=()

# Stops what this script started, newest first, by pid.
cleanup() {
    local i pid deadline
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid=${PIDS[i]}
        kill -0 "$pid" 2>/dev/null || continue
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 10))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}
trap 'cleanup; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM HUP PIPE

# Stops one pid of ours and forgets it.
stop_pid() {
    local pid=$1 keep=() p deadline
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
    for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

port_open() { (exec 3<>"/dev/tcp/$LOOPBACK/$1") 2>/dev/null; }

free_port() {
    local port tries
    for ((tries = 0; tries < 100; tries++)); do
        port=$((20000 + RANDOM % 40000))
        port_open "$port" || {
            echo "$port"
            return 0
        }
    done
    die "no free port found on $LOOPBACK"
}

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# "n200 n429" the instance counted on /limited_endpoint.
served() {
    curl -s --max-time 5 "http://$LOOPBACK:$1/metrics" | awk '
        index($0, "ratelimit_http_requests_total{route=\"/limited_endpoint\",") == 1 {
            if ($0 ~ /status="200"/) a += $NF; else if ($0 ~ /status="429"/) d += $NF; else o += $NF }
        END { printf "%d %d %d\n", a, d, o }'
}

dbsize() { redis-cli -h "$LOOPBACK" -p "$1" DBSIZE 2>/dev/null | tr -d '\r' || echo "?"; }

# Requests the wrk script sends for IDENTITIES identities over THREADS threads.
planned_requests() {
    awk -v n="$IDENTITIES" -v t="$THREADS" -v e="$REPEAT_EVERY" 'BEGIN {
        per = int((n + t - 1) / t); total = 0
        for (i = 0; i < t; i++) {
            c = n - i * per; if (c > per) c = per; if (c < 0) c = 0
            total += (e > 0 ? int(c / e) * (e + 1) + c % e : c)
        }
        print total }'
}

ROWS=()
COMMANDS=()

run_case() {
    local spec=$1 store policy rate window burst
    store=${spec%%:*} policy=${spec#*:}
    IFS=/ read -r rate window burst <<<"$policy"
    local name=$store-$rate-$window-$burst log=$OUT/$store-$rate-$window-$burst.log
    local redis_port="" redis_pid="" app_env=() app_pid port deadline

    say "case $spec: $store store, RATE_LIMIT=$rate TIME_WINDOW=$window BURST=$burst, $IDENTITIES identities"
    if [[ $store == redis ]]; then
        redis_port=$(free_port)
        mkdir -p "$WORK/redis-$name"
        redis-server --port "$redis_port" --bind "$LOOPBACK" --dir "$WORK/redis-$name" \
            --save '' --appendonly no --daemonize no >"$OUT/redis-$name.log" 2>&1 &
        redis_pid=$!
        PIDS+=("$redis_pid")
        deadline=$((SECONDS + 10))
        until [[ $(redis-cli -h "$LOOPBACK" -p "$redis_port" PING 2>/dev/null) == PONG ]]; do
            ((SECONDS < deadline)) || die "redis-server on port $redis_port did not answer PING; see ${OUT#"$ROOT"/}/redis-$name.log"
            sleep 0.1
        done
        say "  started redis-server (pid $redis_pid) on port $redis_port in $WORK/redis-$name"
        app_env+=("REDIS_URL=redis://$LOOPBACK:$redis_port")
    fi

    # Only what this case sets reaches the instance.
    : >"$log"
    env -i PATH="$PATH" HOME="${HOME:-/}" RUST_LOG=info HOST="$LOOPBACK" PORT=0 \
        INSTANCE_NAME="memory-$name" TRUSTED_PROXIES="$LOOPBACK" \
        RATE_LIMIT="$rate" TIME_WINDOW="$window" BURST="$burst" "${app_env[@]}" \
        "$BIN" >"$log" 2>&1 &
    app_pid=$!
    PIDS+=("$app_pid")
    deadline=$((SECONDS + 15))
    port=""
    until [[ -n $port ]] && [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$LOOPBACK:$port/ready") == 200 ]]; do
        kill -0 "$app_pid" 2>/dev/null || die "the instance exited; see ${log#"$ROOT"/}"
        ((SECONDS < deadline)) || die "the instance is not ready after 15 s; see ${log#"$ROOT"/}"
        port=$(sed -n '/listening on port/{s/.*listening on port \([0-9]*\).*/\1/p;q}' "$log")
        sleep 0.2
    done
    say "  started the instance (pid $app_pid) on port $port; log: ${log#"$ROOT"/}"

    local before keys_before="-" planned
    before=$(rss_kib "$app_pid")
    [[ -z $redis_port ]] || keys_before=$(dbsize "$redis_port")
    planned=$(planned_requests)

    local cmd=(wrk "-t$THREADS" "-c$CONNECTIONS" "-d${MAX_SECS}s" -s scripts/bench/xff.lua
        "http://$LOOPBACK:$port/limited_endpoint" -- "$IDENTITIES" "$THREADS" "$REPEAT_EVERY")
    local shown_env=()
    [[ -z $redis_port ]] || shown_env=("REDIS_URL=redis://$LOOPBACK:PORT")
    COMMANDS+=("RATE_LIMIT=$rate TIME_WINDOW=$window BURST=$burst TRUSTED_PROXIES=$LOOPBACK HOST=$LOOPBACK PORT=0 ${shown_env[*]:+${shown_env[*]} }${BIN#"$ROOT"/} &"
        "${cmd[*]//$port/PORT}")
    say "  + ${cmd[*]}  (stopped once $planned requests are answered)"
    local wrk_pid started=$SECONDS peak=$before keys_peak=- now counts n rss keys=-
    "${cmd[@]}" >"$OUT/wrk-$name.txt" 2>&1 &
    wrk_pid=$!
    PIDS+=("$wrk_pid")
    while kill -0 "$wrk_pid" 2>/dev/null; do
        sleep 1
        rss=$(rss_kib "$app_pid")
        ((rss > peak)) && peak=$rss
        counts=$(served "$port")
        n=$(awk '{ print $1 + $2 + $3 }' <<<"$counts")
        if [[ -n $redis_port ]]; then
            keys=$(dbsize "$redis_port")
            [[ $keys =~ ^[0-9]+$ ]] && { [[ $keys_peak == - ]] || ((keys > keys_peak)); } && keys_peak=$keys
        fi
        now=$((SECONDS - started))
        if ((now % 10 == 0)); then
            say "  ${now}s: $n of $planned answered, VmRSS $(mib "$rss") MiB${redis_port:+, Redis keys $keys}"
        fi
        ((n >= planned)) && break
    done
    local secs=$((SECONDS - started))
    kill -0 "$wrk_pid" 2>/dev/null && stop_pid "$wrk_pid"
    sleep 0.5
    counts=$(served "$port")
    local after hwm n200 n429 nother
    after=$(rss_kib "$app_pid")
    ((after > peak)) && peak=$after
    read -r n200 n429 nother <<<"$counts"
    n=$((n200 + n429 + nother))
    ((n >= planned)) || warn "only $n of $planned requests were answered within ${MAX_SECS}s"

    # After the refill time every bucket is full again: nothing needs to be remembered.
    local wait_secs=$((window * burst / rate + 2)) keys_after="-" gone="-"
    ((wait_secs <= 120)) || wait_secs=120
    if [[ -n $redis_port ]]; then
        local t0=$SECONDS limit=$((SECONDS + wait_secs + 30))
        keys_after=$(dbsize "$redis_port")
        while [[ $keys_after =~ ^[0-9]+$ ]] && ((keys_after > keys_before && SECONDS < limit)); do
            sleep 0.5
            keys_after=$(dbsize "$redis_port")
        done
        gone=$((SECONDS - t0))
        say "  Redis keys: $keys_before before, peak $keys_peak, $keys_after ${gone}s after the traffic ended"
        local rest=$((wait_secs - gone))
        ((rest <= 0)) || sleep "$rest"
    else
        say "  waiting ${wait_secs}s, past the refill time"
        sleep "$wait_secs"
    fi
    local settled
    settled=$(rss_kib "$app_pid")
    hwm=$(hwm_kib "$app_pid")
    say "  VmRSS: $(mib "$before") MiB before, peak $(mib "$peak") MiB during (VmHWM $(mib "$hwm")), $(mib "$after") right after, $(mib "$settled") after the refill time"
    local verdict=met
    ((hwm < LIMIT_MIB * 1024)) || verdict=MISSED
    ROWS+=("$(printf '| %s | %s/%s s, burst %s | %d | %d | %d | %.0f | %s | %s | %s | %s | **%s** | %s | %s | %s | %s | %s |' \
        "$store" "$rate" "$window" "$burst" "$IDENTITIES" "$n" "$n429" \
        "$(awk -v n="$n" -v s="$secs" 'BEGIN { print (s > 0 ? n / s : 0) }')" \
        "$(mib "$before")" "$(mib "$peak")" "$(mib "$after")" "$(mib "$settled")" "$(mib "$hwm")" "$verdict" \
        "$keys_before" "$keys_peak" "$keys_after" "$gone")")

    stop_pid "$app_pid"
    [[ -z $redis_pid ]] || stop_pid "$redis_pid"
}

say "load average now: $(cut -d' ' -f1-3 /proc/loadavg)"
for case in $CASES; do
    run_case "$case"
done
elapsed=$((SECONDS - STARTED_AT))

{
    printf '## Memory: run of %s\n\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
    printf -- '- Service: %s\n' "$SERVICE_NOTE"
    printf -- '- Machine: %s cores, %s, kernel %s; whole run %s s\n' "$(nproc)" \
        "$(sed -n '/^model name/{s/^model name[[:space:]]*: //;p;q}' /proc/cpuinfo)" "$(uname -r)" "$elapsed"
    printf -- '- %s distinct identities per case (IPv4s from 10.0.0.0/8 in X-Forwarded-For from the trusted 127.0.0.1); every %sth asks twice in a row, so a burst of 1 denies it; wrk %s threads, %s connections; deny cache at its default size (100000)\n' \
        "$IDENTITIES" "$REPEAT_EVERY" "$THREADS" "$CONNECTIONS"
    printf -- '- Goal: VmHWM (the peak resident memory the kernel saw) under %s MiB; Redis keys back to what they were before the traffic (the instance'"'"'s own announcement) within the refill time\n\n' "$LIMIT_MIB"
    printf '| store | policy (RATE_LIMIT/TIME_WINDOW, BURST) | identities | requests | 429 | req/s | VmRSS before MiB | peak during | right after | after refill | VmHWM MiB | < %s MiB | Redis keys before | peak | after | s until back |\n' "$LIMIT_MIB"
    printf '|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|\n'
    printf '%s\n' "${ROWS[@]}"
    # shellcheck disable=SC2016 # Markdown backticks
    printf '\nCommands (`PORT` is a free port chosen at run time):\n\n```sh\nscripts/memory.sh'
    [[ $CASES == "memory:10/60/10 memory:1/60/1 redis:1/2/1" ]] || printf ' --cases "%s"' "$CASES"
    ((IDENTITIES == 1000000)) || printf ' --identities %s' "$IDENTITIES"
    printf '\n'
    printf '%s\n' "${COMMANDS[@]}"
    printf '```\n'
} >"$OUT/report.md"

printf '\n'
cat "$OUT/report.md"
printf '\n'
say "done in ${elapsed}s; logs in ${OUT#"$ROOT"/}"
if [[ $RECORD == yes ]]; then
    scripts/bench/record-block.sh memory.sh "$OUT/report.md" "$DOC"
    say "recorded in $DOC"
fi

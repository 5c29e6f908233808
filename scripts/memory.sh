#!/usr/bin/env bash
# Shows that one instance's resident memory stays bounded after a million distinct client
# identities have passed through it, and that Redis keeps no bucket past its refill time.
#
# Usage: scripts/memory.sh [--identities N] [--cases "CASE..."] [--max-secs S] [--record]
#
#   --identities N  distinct identities per case (default 1000000; 1000 to 16000000)
#   --cases LIST    space-separated STORE:RATE_LIMIT/TIME_WINDOW/BURST, STORE being memory
#                   or redis (default "memory:10/60/10 memory:1/60/1 redis:1/2/1")
#   --max-secs S    bound on the traffic of one case, in seconds (default 300; 10 to 600)
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
#
# This script checks the tools, builds what is missing, makes the temporary folder and
# stops whatever is left running at its end; the bench program (bench/, `bench memory`)
# runs the cases and writes the table and the docs/BENCHMARKS.md block. Logs stay in
# run/memory/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

help_if_asked "${BASH_SOURCE[0]}" "${1:-}"
# One run per checkout: a second would share run/memory/ and its record of processes.
lock_or_die "$ROOT/run/memory.lock" "another scripts/memory.sh runs in this checkout (it holds run/memory.lock); wait for it"

need_tools wrk=wrk redis-server=redis-server cargo=cargo
build_bench
if [[ -n ${RATELIMITER_BIN:-} ]]; then
    [[ -x $RATELIMITER_BIN ]] || die "RATELIMITER_BIN=$RATELIMITER_BIN is not an executable file"
else
    build_service
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ratelimiter-memory.XXXXXX")
trap 'stop_bench; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM HUP PIPE

run_bench "$ROOT/run/memory/pids" memory --work-dir "$WORK" "$@"

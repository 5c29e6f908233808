#!/usr/bin/env bash
# Benchmarks the rate limiter in the native topology of scripts/cluster.sh (Nginx, two
# instances, a Redis master with two replicas, three sentinels; the cluster phase also its
# Cluster mode, 3 masters and 3 replicas), all on this machine on the ports of
# scripts/ports.env, and prints Markdown tables; with --record it also writes
# docs/BENCHMARKS.md.
#
# Usage: scripts/bench.sh [--duration SECS] [--rounds N] [--threads N]
#                         [--quiet-max PCT] [--quiet-wait SECS] [--phases A,B,...] [--record]
#
#   --duration SECS  length of one measurement (default 5; 1 to 60)
#   --rounds N       rounds per phase (default 3; 1 to 20); each round measures every
#                    target of the phase once, in reverse order every other round
#   --threads N      wrk threads (default 1: two cores are shared by everything)
#   --quiet-max PCT  the machine is "quiet" when processes outside the benchmark use at
#                    most PCT % of it (default 15): each measurement waits for that (up to
#                    --quiet-wait SECS, default 30; 0 does not wait), and one during which
#                    others used more is taken again, twice at most, keeping the quietest
#   --phases A,B,... only these phases (comma-separated; they run in the order below),
#                    e.g. --phases allow,cluster; default all
#   --record         also write the run into docs/BENCHMARKS.md (rewrites the whole
#                    block, so it needs every phase)
#
# Phases, each with a cluster of its own (run/bench-cluster; bench/src/phases.rs holds each
# as data: settings, policy, targets):
#   allow          10^9 per 1 s: every request runs the whole Redis decision and is
#                  admitted. wrk on /limited_endpoint and /, through Nginx and directly,
#                  at 16 and 64 connections.
#   two-limits     one policy of two limits (per second and per minute), 64 connections
#   metrics-off    allow's targets at 64 connections with METRICS=off: what /metrics costs
#   allow-pool     allow with REDIS_CLIENT=pool, when the binary knows that setting
#   memory-store   one instance with the embedded store, directly: no Redis round trip
#   flood          the shipped policy (10 per 60 s): one client floods through Nginx at
#                  64 connections, deny cache on; / beside it
#   flood-nocache  the same with DENY_CACHE_SIZE=0
#   gateway        scripts/cluster.sh up --gateway, one policy keyed by X-Bench-Key that
#                  admits everything: wrk (keys.lua) on /api/items through the gateway, an
#                  in-Nginx Redis limiter (scripts/bench/peer-nginx.conf, if PEER_LUA) and
#                  the bench's Nginx straight to the same demo upstream (proxy-nginx.conf).
#                  Every answer must be a 200 the demo upstream counted, or the run stops.
#   cluster        Sentinel mode, then Cluster mode, under one policy keyed by X-Bench-Key
#                  (scripts/bench/keys.lua: a new key every request), through Nginx and
#                  directly.
#
# Per measurement: requests/s, p50/p99/max latency, responses by status (through Nginx
# from its access log, where 499 is wrk closing at its end and not an error; directly from
# the instance's /metrics), CPU µs per request of each process group (/proc/PID/stat),
# the CPU of every other process, and the script calls Redis saw (INFO commandstats).
# Each is a JSON line of run/bench/results.jsonl (the run's conditions in run.json); the
# report (run/bench/report.md) is rendered from those files alone.
#
# Environment: PEER_LUA (a folder with the Lua peer's files, see peer-nginx.conf);
# CLUSTER_PORT_OFFSET shifts every phase's cluster off the ports of
# scripts/ports.env (as for scripts/cluster.sh; the bench's own Nginx still takes the first
# free port from 8090); WORKERS, REDIS_POOL_SIZE, REDIS_TIMEOUT_MS, ACCESS_LOG and
# RUST_LOG reach the instances as they are; the passwords and RATELIMITER_BIN as for
# scripts/cluster.sh. Needs wrk, redis-tools, nginx, curl and cargo.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

help_if_asked "${BASH_SOURCE[0]}" "${1:-}"
# One run per checkout: a second would empty the first one's run/bench/ and stop its cluster.
lock_or_die "$ROOT/run/bench.lock" "another scripts/bench.sh runs in this checkout (it holds run/bench.lock); wait for it"

need_tools wrk=wrk redis-cli=redis-tools nginx=nginx-light curl=curl cargo=cargo
build_bench
[[ -n ${RATELIMITER_BIN:-} ]] || build_service

cleanup() {
    stop_bench
    if any_recorded_running "$ROOT/run/bench-cluster/pids"; then
        warn "stopping the bench's cluster"
        CLUSTER_DIR=$ROOT/run/bench-cluster scripts/cluster.sh down >/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP PIPE

run_bench "$ROOT/run/bench/pids" throughput --invocation "scripts/bench.sh${*:+ $*}" "$@"

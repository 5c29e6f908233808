#!/usr/bin/env bash
# Benchmarks the rate limiter in the native topology of scripts/cluster.sh (Nginx on 8000,
# instances on 8001/8002, a Redis master with two replicas, three sentinels; the cluster
# phase also its Cluster mode, 3 masters and 3 replicas on 7000-7005), all on this
# machine, and prints Markdown tables; with --record it also writes docs/BENCHMARKS.md.
#
# Usage: scripts/bench.sh [--duration SECS] [--rounds N] [--threads N]
#                         [--quiet-max PCT] [--quiet-wait SECS] [--phases A,B,...] [--record]
#
#   --duration SECS  length of one measurement (default 5; 1 to 60)
#   --rounds N       rounds per phase (default 3; 3 to 20); each round measures every
#                    target of the phase once, in reverse order every other round
#   --threads N      wrk threads (default 1: two cores are shared by everything)
#   --quiet-max PCT  the machine is "quiet" when processes outside the benchmark use at
#                    most PCT % of it (default 15): each measurement waits for that (up to
#                    --quiet-wait SECS, default 30; 0 does not wait), and one during which
#                    others used more is taken again, twice at most, keeping the quietest
#   --phases A,B,... only these phases of the bench's own cluster (names below, comma-
#                    separated; they run in the order below), e.g. --phases allow,cluster;
#                    default all. Refused when a cluster is running (that gets one phase)
#   --record         also write the run into docs/BENCHMARKS.md (needs the bench's own
#                    cluster and every phase: recording rewrites the whole block, so it
#                    refuses --phases with a subset)
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
#   two-limits     POLICY_FILE with one policy of two limits (both 10^9 per second and per
#                  minute): `/` and `/limited_endpoint` at 64 connections, through Nginx and
#                  directly; redis-benchmark measures one and two limits side by side in
#                  the allow phase.
#   metrics-off    the targets of `allow` at 64 connections with METRICS=off: what
#                  /metrics costs.
#   allow-pool     the same with REDIS_CLIENT=pool (r2d2 on tokio's blocking pool) instead of the
#                  default client, when the binary knows that setting.
#   memory-store   one instance with the embedded store instead (no cluster), the same
#                  policy, directly: the decision without the Redis round trip.
#   mixed          RATE_LIMIT=BURST=$MIXED_RATE (default 15) per 1 s over 241 clients
#                  (target/release/loadtest binds 127.0.0.10-250), so 200s and 429s both
#                  occur; the targets of `allow`.
#   flood          the shipped policy (10 per 60 s): one client (wrk) floods at 64
#                  connections through Nginx with the deny cache on; / beside it.
#   flood-nocache  the same with DENY_CACHE_SIZE=0.
#   gateway        `scripts/cluster.sh up --gateway` (the demo upstream on 8081, its counts on
#                  8082, the gateway on 8080) with a POLICY_FILE of one policy on every path
#                  (no match), per client address, 10^9 per 1 s: every gateway request runs
#                  the whole decision (auth_request to an instance's /v1/check) and is
#                  admitted. Beside it the bench starts its own Nginx (config, pid, logs and
#                  temp files in run/bench/proxy-nginx/, on the first free port from 8090)
#                  proxying straight to the same upstream with the gateway server's worker,
#                  keepalive and proxy settings. wrk on /api/items at 64 connections through
#                  each: admitted requests/s of the gateway ÷ the direct Nginx's, and the
#                  CPU per request of each process (both Nginx, instances, Redis, the demo
#                  upstream). Every answer through the gateway must be a 200 that the demo
#                  upstream counted (GET 8082/__upstream/count), or the run stops.
#   cluster        Sentinel mode, then Cluster mode (`scripts/cluster.sh up --redis-cluster`:
#                  3 masters and 3 replicas on 7000-7005), both under a POLICY_FILE that keys
#                  /limited_endpoint by the header X-Bench-Key, 10^9 per 1 s (every request
#                  decided and admitted), and wrk with scripts/bench/keys.lua (a new key every
#                  request, 100,000 in turn) through Nginx and directly at 64 connections: the
#                  CPU per decision of the instances, Nginx and Redis (the master, or the three
#                  masters together) side by side. Then, in Cluster mode, one wrk run through
#                  Nginx long enough for 100,000 keys: each master's share of the script calls
#                  (INFO commandstats), which should be within ±10 % of a third.
#
# When Nginx answers /health on 8000 and /ready answers on 8001 and 8002, and the cluster is a native one with pid
# records (CLUSTER_DIR, default run/cluster), that cluster is used as it is: one phase
# ("running") under whatever policy it has, and nothing of it is stopped. Otherwise the
# script starts its own cluster per phase in run/bench-cluster and stops it at the end.
#
# Per measurement: requests/s, p50/p99/max latency, responses by status (200, 429, other:
# statuses other than 200/429 and socket errors; through Nginx from its access log, which
# also shows 499s from wrk closing its connections at the end, not counted as errors),
# CPU µs per request of each process group (utime+stime from /proc/PID/stat), the CPU of
# every other process on the machine, and the Lua script calls Redis saw
# (INFO commandstats deltas). wrk reports through scripts/bench/report.lua (one line of
# JSON), the load generator through its --json summary. Raw outputs stay in run/bench/
# (results.jsonl holds every measurement).
#
# This script checks the tools, builds what is missing and stops whatever is left running
# at its end; the bench program (bench/, `bench throughput`) runs the phases, parses, and
# computes the medians, the tables and the docs/BENCHMARKS.md block.
#
# Environment: MIXED_RATE (see above); WORKERS, REDIS_POOL_SIZE, REDIS_TIMEOUT_MS,
# ACCESS_LOG and RUST_LOG reach the instances as they are; the passwords (the bench reads the
# data nodes as REDIS_ADMIN_PASSWORD's operators' user) and RATELIMITER_BIN (a binary to run
# instead of building target/release/ratelimiter) as for scripts/cluster.sh. Needs wrk, redis-tools, curl, and cargo to build the binaries.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

case ${1:-} in
-h | --help)
    script_help "${BASH_SOURCE[0]}"
    exit 0
    ;;
esac

# One run per checkout: a second would empty the first one's run/bench/ and, at its end,
# stop the first one's cluster.
mkdir -p run
exec 9>"$ROOT/run/bench.lock"
flock -n 9 || die "another scripts/bench.sh runs in this checkout (it holds run/bench.lock); wait for it"

need_tools wrk=wrk redis-cli=redis-tools redis-benchmark=redis-tools curl=curl cargo=cargo
build_bench
# The load generator's version does not move the service's figures: build it only if missing.
[[ -x $(release_binary loadtest) ]] || {
    say "building the load generator: cargo build --release -p loadtest"
    cargo build --release -p loadtest
}
if [[ -n ${RATELIMITER_BIN:-} ]]; then
    [[ -x $RATELIMITER_BIN ]] || die "RATELIMITER_BIN=$RATELIMITER_BIN is not an executable file"
elif ! { http_ok "http://$LOOPBACK:8000/health" && http_ok "http://$LOOPBACK:8001/ready" &&
    http_ok "http://$LOOPBACK:8002/ready"; }; then
    # The bench starts its own cluster: its phases run a copy of this binary.
    build_service
fi

OWN_CLUSTER_DIR=$ROOT/run/bench-cluster
cleanup() {
    stop_bench
    if any_recorded_running "$OWN_CLUSTER_DIR/pids"; then
        warn "stopping the bench's cluster"
        CLUSTER_DIR=$OWN_CLUSTER_DIR scripts/cluster.sh down >/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP PIPE

code=0
# The lock stays with this script, not with the daemons the program starts.
run_bench "$ROOT/run/bench/pids" throughput --invocation "scripts/bench.sh${*:+ $*}" "$@" 9>&- || code=$?
((code != 2)) || warn "see: scripts/bench.sh --help"
exit "$code"

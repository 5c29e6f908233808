#!/usr/bin/env bash
# A soak of the native topology (scripts/cluster.sh), bounded in time: steady load while
# the master is killed every few minutes, then a verdict.
#
# Usage: scripts/soak.sh --minutes N      N from 2 to 240
#        scripts/soak.sh --help
#
# The soak test (tests/soak/, `cargo test --test soak -- --ignored`) starts its own cluster
# (CLUSTER_PORT_OFFSET=1000: Nginx on 9000, master 7379, so it runs beside a cluster on
# the default ports) with FAIL_MODE=local and a policy file of one limit per client
# address, then, minute by minute:
#   load     241 clients (127.0.0.10-250) through Nginx, 200 requests a second in all,
#            one run of the load generator (target/release/loadtest) per minute
#   kill     every 3rd minute from the first, `kill -9` of the master 15 s in; once the
#            sentinels have promoted a replica and both instances decide with Redis
#            again, the killed node is restarted in place and must rejoin as a replica
#   reload   before the middle minute the policy file is rewritten (12/min, burst 6
#            becomes 30/min, burst 10); the minute starts once both instances serve it
#   sample   every 5 s, VmRSS and open descriptors (/proc/PID/fd) of every process of the
#            cluster: data nodes, sentinels, instances, Nginx's master and workers
# and checks at the end, exiting 1 if any fails:
#   - no 5xx, and no request that failed (timeout, connection error, other status);
#   - every client, in every minute, admitted at most floor(C + r × t) plus, for each
#     failover of that minute, n × (max(1, floor(C / n)) + floor(r × T / n)) (n = 2
#     instances, T from the kill until both instances answered a probe with a Redis
#     decision): the bound the load generator itself judges by (loadtest/src/policy.rs),
#     plus the local fallback's shares during T (docs/RELIABILITY.md, "Measured");
#   - VmRSS and open descriptors of every process grew less than 5 % from its first
#     samples after warm-up to its last ones (the median of 6 each, taken while the load
#     runs; a data node's only in the role it ended in). Warm-up: 60 s, or a quarter of
#     the run if longer, after the process's first sample (a restarted data node's own);
#     for a data node also until its replication backlog is full (repl-backlog-size,
#     4 MB at about 35 KB/s: two minutes), since until then it grows with every write by
#     design. A process with less than 30 s of samples after its warm-up (every data node
#     in a 2-minute soak) is listed as not judged.
# Decisions by the fallback in a minute without a kill (a Redis call that timed out on a
# busy machine) are reported; the per-client bound, which allows nothing for them, judges.
# It prints the tables (Markdown) and leaves them, with every minute's summary and the
# samples, in run/soak/out/. Whatever happens, what it started is stopped.
#
# Environment: SOAK_PORT_OFFSET (default 1000) is the cluster's CLUSTER_PORT_OFFSET;
# SOAK_DIR (default run/soak) its folder; REDIS_ADMIN_PASSWORD, SENTINEL_PASSWORD and
# RATELIMITER_BIN as for scripts/cluster.sh; LOADTEST_BIN, the load generator (default: its
# release build). Two soaks in one checkout need two SOAK_DIRs and offsets. Needs redis-server, redis-sentinel, redis-cli, nginx, curl and cargo.
set -euo pipefail
[[ -z ${SOAK_DIR:-} ]] || SOAK_DIR=$(realpath -m -- "$SOAK_DIR")
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

help_if_asked "${BASH_SOURCE[0]}" "${1:-}"
[[ $# == 2 && $1 == --minutes && $2 =~ ^[1-9][0-9]{0,2}$ ]] && (($2 >= 2 && $2 <= 240)) ||
    { warn "error: --minutes N, N from 2 to 240, is required (got: ${*:-nothing}); see scripts/soak.sh --help"; exit 2; }
need_tools redis-server=redis-server redis-sentinel=redis-sentinel redis-cli=redis-tools \
    nginx=nginx-light curl=curl cargo=cargo
export SOAK_MINUTES=$2 SOAK_DIR=${SOAK_DIR:-$ROOT/run/soak} SOAK_PORT_OFFSET=${SOAK_PORT_OFFSET:-1000}
lock_or_die "$SOAK_DIR/lock" "another soak uses $(rel "$SOAK_DIR") (it holds its lock); give this one another SOAK_DIR and SOAK_PORT_OFFSET"

[[ -n ${RATELIMITER_BIN:-} ]] || build_service
[[ -n ${LOADTEST_BIN:-} ]] || build_release loadtest
say "building the soak test: cargo test --no-run --test soak" && cargo test --quiet --no-run --test soak

# The test stops its cluster; if the script is stopped, this stops the test (cargo's child) and the cluster.
trap 'code=$?; [[ -z ${BENCH_PID:-} ]] || pkill -TERM -P "$BENCH_PID" || true; stop_bench
CLUSTER_DIR=$SOAK_DIR/cluster CLUSTER_PORT_OFFSET=$SOAK_PORT_OFFSET scripts/cluster.sh down >"$SOAK_DIR/down.log" 2>&1 ||
    warn "scripts/cluster.sh down failed: see $(rel "$SOAK_DIR")/down.log"
exit $code' EXIT
trap 'exit 130' INT TERM HUP

BENCH_BIN=cargo run_bench "$SOAK_DIR/out/pids" test --quiet --test soak -- --ignored --nocapture || {
    warn "the soak failed (cargo test exit $?); logs: $(rel "$SOAK_DIR")/cluster, summaries: $(rel "$SOAK_DIR")/out"
    exit 1
}

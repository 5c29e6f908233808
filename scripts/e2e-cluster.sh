#!/usr/bin/env bash
# The native cluster's end-to-end suite, in two phases, each `scripts/cluster.sh up`, the
# tests of tests/e2e_cluster.rs through Nginx, then `scripts/cluster.sh down`, whatever
# happened:
#
#   sentinel       `up --gateway`: exactness across instances, the 429's shape, per-client
#                  buckets, spoofed X-Forwarded-For via Nginx and directly, oversized headers,
#                  a failover mid-traffic; through the gateway, exactly the limit reaches the
#                  demo upstream; the internal routes are not served through Nginx
#   redis-cluster  `up --redis-cluster --gateway` (3 masters, 3 replicas on 7000-7005), the
#                  tests of tests/e2e_cluster/redis_cluster.rs: clients on all three masters
#                  each admitted exactly the limit across both instances (each master ran
#                  EVALSHA), then kill -9 of a master under traffic: no 5xx, nothing slower
#                  than 1 s, its slots back on Redis within 2 s of the promotion, exact again
#
# Exits non-zero when anything failed, after printing the topology's status and the end of
# its logs. Those tests are `#[ignore]`d, so a plain `cargo test` reports them as ignored;
# this script runs them with `--ignored` and a name filter (`--skip redis_cluster::` for
# the first phase, `redis_cluster::` for the second).
#
# Usage: scripts/e2e-cluster.sh [--phase sentinel|redis-cluster] [TEST NAME FILTER...]
#
#   --phase P  only that phase (default both, in the order above)
#   filters    choose among the sentinel phase's tests; the redis-cluster phase runs whole
#
# Runs with RATE_LIMIT=5 TIME_WINDOW=60 unless they are set (the tests read the same
# values), in its own run folders ($CLUSTER_DIR, default run/e2e-cluster, and the same
# with -redis-cluster appended), so that its `down` can never stop a
# cluster started by hand. Needs the ports of scripts/cluster.sh free (both phases use
# 8000-8002 and 8080-8082, one after the other).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
started=$SECONDS

export RATE_LIMIT=${RATE_LIMIT:-5}
export TIME_WINDOW=${TIME_WINDOW:-60}
export CLUSTER_DIR=${CLUSTER_DIR:-$PWD/run/e2e-cluster}
export E2E_CLUSTER_URL=${E2E_CLUSTER_URL:-http://127.0.0.1:8000}
export E2E_APP_URL=${E2E_APP_URL:-http://127.0.0.1:8001}
export E2E_GATEWAY_URL=${E2E_GATEWAY_URL:-http://127.0.0.1:8080}
export E2E_UPSTREAM_COUNT_URL=${E2E_UPSTREAM_COUNT_URL:-http://127.0.0.1:8082}

phases=(sentinel redis-cluster)
if [[ ${1:-} == --phase ]]; then
    case ${2:-} in
    sentinel | redis-cluster) phases=("$2") ;;
    *) die "--phase takes sentinel or redis-cluster, not \"${2:-}\"" ;;
    esac
    shift 2
fi
SENTINEL_DIR=$CLUSTER_DIR
REDIS_CLUSTER_DIR=$CLUSTER_DIR-redis-cluster

# One run at a time: a second one would find the ports taken, and its clean-up must not
# stop the first one's cluster.
mkdir -p "$(dirname "$CLUSTER_DIR")"
exec 9>"$CLUSTER_DIR.lock"
flock -n 9 || {
    say "another run holds $CLUSTER_DIR.lock; wait for it to finish"
    exit 1
}

# Compile first, so the cluster is not kept waiting for the compiler.
say "building the test binary"
cargo test --test e2e_cluster --no-run

finish() {
    local code=$?
    trap - EXIT INT TERM
    if ((code != 0)); then
        say "FAILED (exit $code); the cluster's state:"
        scripts/cluster.sh status || true
        scripts/cluster.sh logs || true
    fi
    scripts/cluster.sh down || true
    if ((code == 0)); then
        say "passed in $((SECONDS - started))s"
    fi
    exit "$code"
}
trap finish EXIT
trap 'exit 130' INT TERM

for phase in "${phases[@]}"; do
    if [[ $phase == sentinel ]]; then
        export CLUSTER_DIR=$SENTINEL_DIR
        options=(--gateway)
        filters=(--skip redis_cluster:: "$@")
    else
        export CLUSTER_DIR=$REDIS_CLUSTER_DIR
        options=(--redis-cluster --gateway)
        filters=(redis_cluster::)
        E2E_REDIS_CLUSTER_NODES=$(printf '127.0.0.1:%s,' 7000 7001 7002 7003 7004 7005)
        export E2E_REDIS_CLUSTER_NODES=${E2E_REDIS_CLUSTER_NODES%,}
    fi
    say "phase $phase: starting the topology (RATE_LIMIT=$RATE_LIMIT TIME_WINDOW=$TIME_WINDOW) in ${CLUSTER_DIR#"$PWD"/}"
    up_started=$SECONDS
    # The lock stays with this script, not with the daemons `up` leaves running.
    scripts/cluster.sh up "${options[@]}" 9>&-
    say "phase $phase: up in $((SECONDS - up_started))s; running the suite against $E2E_CLUSTER_URL"

    suite_started=$SECONDS
    cargo test --test e2e_cluster -- --ignored --nocapture "${filters[@]}"
    say "phase $phase: the suite ran in $((SECONDS - suite_started))s"
    scripts/cluster.sh down
done

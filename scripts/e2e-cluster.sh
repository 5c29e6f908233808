#!/usr/bin/env bash
# The native cluster's end-to-end suite: `scripts/cluster.sh up --gateway`, then
# tests/e2e_cluster.rs through Nginx (exactness across instances, the 429's shape, per-client
# buckets, spoofed X-Forwarded-For via Nginx and directly, oversized headers, a failover
# mid-traffic; through the gateway, exactly the limit reaches the demo upstream; the internal
# routes are not served through Nginx), then
# `scripts/cluster.sh down`, whatever happened. Exits non-zero when anything failed, after
# printing the cluster's status and the end of its logs. Those tests are `#[ignore]`d, so a
# plain `cargo test` reports them as ignored; this script runs them with `--ignored`.
#
# Usage: scripts/e2e-cluster.sh [TEST NAME FILTER...]
#
# Runs with RATE_LIMIT=5 TIME_WINDOW=60 unless they are set (the tests read the same
# values), in its own run folder (run/e2e-cluster, or $CLUSTER_DIR), so that its `down`
# can never stop a cluster started by hand. Needs the ports of scripts/cluster.sh free.
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

say "starting the cluster (RATE_LIMIT=$RATE_LIMIT TIME_WINDOW=$TIME_WINDOW) in ${CLUSTER_DIR#"$PWD"/}"
up_started=$SECONDS
# The lock stays with this script, not with the daemons `up` leaves running.
scripts/cluster.sh up --gateway 9>&-
say "cluster up in $((SECONDS - up_started))s; running the suite against $E2E_CLUSTER_URL"

suite_started=$SECONDS
cargo test --test e2e_cluster -- --ignored --nocapture "$@"
say "suite ran in $((SECONDS - suite_started))s"

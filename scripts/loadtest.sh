#!/usr/bin/env bash
# Drives the rate limiter (through Nginx on 127.0.0.1:8000 by default, or Envoy's
# rate-limit service over gRPC with --domain) from many client addresses and reports
# what it admitted: a thin wrapper over the `loadtest` binary, the workspace's member
# crate in loadtest/.
#
# Usage: scripts/loadtest.sh [LOADTEST FLAGS...]
#        scripts/loadtest.sh --help      this text, then every flag of the binary
#
# Every argument goes to the binary unchanged; cargo builds it in release mode first if it
# is stale. Typical runs:
#   scripts/loadtest.sh                                   200 req/s for 10 s from 241 clients
#   scripts/loadtest.sh --rate 1000 --duration 30s --plot load.png --json load.json
#   scripts/loadtest.sh --connections 64 --duration 5s    flat out
#   scripts/loadtest.sh --sources 127.0.0.10-20 --rate 50 --check
#   scripts/loadtest.sh --url http://127.0.0.1:8080/limited_endpoint   through the gateway
#                                                         (scripts/cluster.sh up --gateway)
#   scripts/loadtest.sh --domain edge --descriptor 'remote_address={client}'
#                                                         ShouldRateLimit on app-1's gRPC
#                                                         port 8051, a bucket per client
#
# Exit codes are the binary's: 0 done, 1 the run failed, 2 bad flags, 3 --check failed,
# 130 interrupted by Ctrl-C (the summary still covers what was sent).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

binary=$(release_binary loadtest)

if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
    script_help "${BASH_SOURCE[0]}"
fi

# Progress goes to stderr: stdout is the binary's.
build_release loadtest >&2

warn "+ $binary $*"
exec "$binary" "$@"

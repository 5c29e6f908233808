#!/bin/bash
# Container healthcheck: healthy when GET /health on this container's port answers 200.
#   healthcheck [PORT]     (default: $PORT, else 8000)
# Plain bash (/dev/tcp), so that the runtime image needs no HTTP client.
set -euo pipefail
port=${1:-${PORT:-8000}}
exec 3<>"/dev/tcp/127.0.0.1/$port"
printf 'GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&3
read -r -t 2 _version status _reason <&3
[[ $status == 200 ]]

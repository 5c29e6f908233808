#!/usr/bin/env bash
# The passwords of docker/compose.yaml (its header says what each is for), generated at
# random on first use and kept private: writes each one that FILE (default docker/.env,
# which Compose reads by itself; ignored by git) does not hold yet, 48 hex digits from
# /dev/urandom, and leaves the others as they are. The file is readable by its owner only.
# Compose refuses to start without them (it names the one missing): nothing in the
# repository is a password it would fall back to. The data nodes and sentinels keep the
# passwords of their first start on their volumes: after changing one here,
# `docker compose -f docker/compose.yaml down -v` forgets them.
#
# Usage: scripts/compose-secrets.sh [FILE]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ ${1:-} != -h && ${1:-} != --help ]] || { script_help "${BASH_SOURCE[0]}"; exit 0; }
file=${1:-$ROOT/docker/.env}
# Private before anything is written into it.
(umask 077 && touch "$file") && chmod 600 "$file"
added=()
for name in REDIS_PASSWORD REDIS_ADMIN_PASSWORD REDIS_REPLICA_PASSWORD SENTINEL_AUTH_PASSWORD SENTINEL_PASSWORD SENTINEL_SERVICE_PASSWORD; do
    grep -q "^$name=" "$file" && continue
    printf '%s=%s\n' "$name" "$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')" >>"$file"
    added+=("$name")
done
if ((${#added[@]} > 0)); then say "wrote ${added[*]} into $(rel "$file") (mode 600)"; else say "$(rel "$file") holds every password already; nothing changed"; fi

#!/usr/bin/env bash
# The passwords of docker/compose.yaml, generated at random on first use and kept private:
# writes each one that FILE (default docker/.env, which Compose reads by itself; ignored by
# git) does not hold yet, 48 hex digits from /dev/urandom, and leaves the others as they are.
# The file is readable by its owner only. Compose refuses to start without these variables
# (it names the one missing); nothing in the repository is a password it would fall back to.
#
#   REDIS_PASSWORD          the instances' user (ratelimiter) on the data nodes
#   REDIS_ADMIN_PASSWORD    the data nodes' default user: operators (redis-cli), healthchecks
#   REDIS_REPLICA_PASSWORD  the replication user
#   SENTINEL_AUTH_PASSWORD  the sentinels' user on the data nodes
#   SENTINEL_PASSWORD       what every sentinel requires (the instances use it too)
#
# The data nodes and sentinels keep the passwords of their first start on their volumes:
# after changing one here, `docker compose -f docker/compose.yaml down -v` forgets them.
#
# Usage: scripts/compose-secrets.sh [FILE]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

case ${1:-} in
-h | --help)
    script_help "${BASH_SOURCE[0]}"
    exit 0
    ;;
esac
file=${1:-$ROOT/docker/.env}
names=(REDIS_PASSWORD REDIS_ADMIN_PASSWORD REDIS_REPLICA_PASSWORD SENTINEL_AUTH_PASSWORD SENTINEL_PASSWORD)

# Private before anything is written into it.
(umask 077 && touch "$file")
chmod 600 "$file"
added=()
for name in "${names[@]}"; do
    grep -q "^$name=" "$file" && continue
    printf '%s=%s\n' "$name" "$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')" >>"$file"
    added+=("$name")
done
if ((${#added[@]} > 0)); then
    say "wrote ${added[*]} into ${file#"$ROOT"/} (mode 600)"
else
    say "${file#"$ROOT"/} already holds every password; nothing changed"
fi

#!/bin/bash
# Entrypoint of the data nodes and the sentinels in docker/compose.yaml: gives the server its own
# writable copy of its config, made from a shared read-only file, then runs the server on it.
#
#   redis-entrypoint.sh TEMPLATE COPY COMMAND...
#
# Every __NAME__ placeholder in TEMPLATE becomes the value of the environment variable NAME
# (__MASTER_HOST__ becomes $MASTER_HOST); a placeholder without its variable stops the start and
# names it. INITIAL_CONFIG, if set, is appended: the lines that hold only until Sentinel takes
# over (a replica's first `replicaof`).
#
# Why a copy: a sentinel keeps its state in its config file (its id, the epoch, the current
# master, the replicas and sentinels it found), and Sentinel rewrites a data node's file when it
# re-points it; three sentinels on one shared file would share one id and never reach a quorum.
# The copy is made once and then kept on the service's volume: a restarted node resumes from
# what it last knew, not from the topology of the first start (a promoted replica must not come
# back as a replica of the old master). `docker compose down -v` forgets it.
set -euo pipefail
shopt -s extglob

template=$1 copy=$2
shift 2

if [[ ! -s $copy ]]; then
  mapfile -t names < <(grep -v '^[[:space:]]*#' "$template" | grep -o '__[A-Z][A-Z0-9_]*__' | sort -u |
    sed 's/^__//; s/__$//')
  for name in "${names[@]}"; do
    if [[ -z ${!name+set} ]]; then
      echo "$template: placeholder __${name}__ needs the environment variable $name" >&2
      exit 1
    fi
  done
  # Comments keep their placeholders: they document the template, and no password lands in them.
  config=""
  while IFS= read -r line || [[ -n $line ]]; do
    if [[ $line != *([[:space:]])#* ]]; then
      for name in "${names[@]}"; do line=${line//"__${name}__"/"${!name}"}; done
    fi
    config+=$line$'\n'
  done <"$template"
  if [[ -n ${INITIAL_CONFIG:-} ]]; then
    config+=$'\n# First start only (docker/redis-entrypoint.sh); Sentinel keeps it current.\n'
    config+=$INITIAL_CONFIG$'\n'
  fi
  # The copy may hold the password: readable by this user only.
  (umask 077 && printf '%s' "$config" >"$copy.new")
  mv "$copy.new" "$copy"
  echo "redis-entrypoint: wrote $copy from $template"
fi

# Relative paths in the config (the dump file, Sentinel's own rewrites) land beside the copy.
cd "$(dirname "$copy")"
exec "$@"

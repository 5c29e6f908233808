#!/bin/bash
# Renders a config template of redis/, nginx/ or observability/ into a server's own copy:
# the one way both scripts/cluster.sh and docker/compose.yaml (as the containers'
# entrypoint) make configs.
#
# Usage: render-config.sh TEMPLATE COPY [COMMAND...]
#
# Every __NAME__ placeholder outside comments becomes the value of the environment variable
# NAME, which must be set. Comments keep their placeholders (no password lands in them); a
# *.acl template is written without comments and blank lines (Redis reads none there).
# EXTRA_CONFIG, if set, is appended (a Compose replica's first `replicaof`). The copy may
# hold a password: it is its owner's only, and written whole or not at all. A COPY that
# exists is kept: a server that rewrites its config (a sentinel's id, epoch and topology)
# resumes from what it last knew. A COMMAND then runs (exec) in COPY's folder, so that
# relative paths in the config land beside the copy. Standalone (no scripts/lib.sh):
# containers mount this one file.
set -euo pipefail
shopt -s extglob

(($# >= 2)) || { sed -n '/^# Usage:/s/^# //p' "$0" >&2; exit 2; }
template=$1 copy=$2
shift 2

if [[ ! -s $copy ]]; then
    mapfile -t names < <(grep -v '^[[:space:]]*#' "$template" | grep -o '__[A-Z][A-Z0-9_]*__' | sort -u | sed 's/^__//; s/__$//')
    for name in "${names[@]}"; do
        [[ -n ${!name+set} ]] || { echo "render-config: $template: placeholder __${name}__ needs the environment variable $name" >&2; exit 1; }
    done
    config=""
    while IFS= read -r line || [[ -n $line ]]; do
        [[ $template == *.acl && $line == *([[:space:]])?(#*) ]] && continue
        if [[ $line != *([[:space:]])#* ]]; then
            for name in "${names[@]}"; do line=${line//"__${name}__"/"${!name}"}; done
        fi
        config+=$line$'\n'
    done <"$template"
    [[ -z ${EXTRA_CONFIG:-} ]] || config+=$'\n# Appended from EXTRA_CONFIG by render-config.sh.\n'$EXTRA_CONFIG$'\n'
    (umask 077 && printf '%s' "$config" >"$copy.new")
    mv "$copy.new" "$copy"
    echo "render-config: wrote $copy from $template"
fi

if (($# > 0)); then
    cd "$(dirname "$copy")"
    exec "$@"
fi

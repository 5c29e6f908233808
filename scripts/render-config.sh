#!/bin/bash
# Renders a config template of redis/ or nginx/ into a server's own copy: the one way both
# scripts/cluster.sh and docker/compose.yaml (as the containers' entrypoint) make configs.
#
# Usage: render-config.sh TEMPLATE COPY [COMMAND...]
#
# Every __NAME__ placeholder outside comments becomes the value of the environment
# variable NAME (__MASTER_HOST__ becomes $MASTER_HOST); a placeholder without its variable
# stops it, naming the variable. Comments keep their placeholders: they document the
# template, and no password lands in them; a template named *.acl (a Redis ACL file, where
# Redis reads no comments) is written without its comment and blank lines. EXTRA_CONFIG, if
# set, is appended (the lines one topology adds, such as a Compose replica's first
# `replicaof`). The copy may hold a
# password, so it is readable by its owner only, and it is written whole or not at all.
#
# A COPY that exists already is kept: a server that rewrites its own config (a sentinel
# keeps its id, epoch and the topology it learnt there; Sentinel re-points a data node in
# it) resumes from what it last knew after a restart, not from the first start's topology.
# With a COMMAND, it then runs (exec) in COPY's folder, so that relative paths in the
# config land beside the copy.
#
# Standalone on purpose (no scripts/lib.sh): containers mount this one file.
set -euo pipefail
shopt -s extglob

(($# >= 2)) || {
    sed -n '/^# Usage:/s/^# //p' "$0" >&2
    exit 2
}
template=$1 copy=$2
shift 2

if [[ ! -s $copy ]]; then
    mapfile -t names < <(grep -v '^[[:space:]]*#' "$template" | grep -o '__[A-Z][A-Z0-9_]*__' | sort -u |
        sed 's/^__//; s/__$//')
    for name in "${names[@]}"; do
        if [[ -z ${!name+set} ]]; then
            echo "render-config: $template: placeholder __${name}__ needs the environment variable $name" >&2
            exit 1
        fi
    done
    config=""
    while IFS= read -r line || [[ -n $line ]]; do
        if [[ $template == *.acl && $line == *([[:space:]])?(#*) ]]; then
            continue
        fi
        if [[ $line != *([[:space:]])#* ]]; then
            for name in "${names[@]}"; do line=${line//"__${name}__"/"${!name}"}; done
        fi
        config+=$line$'\n'
    done <"$template"
    if [[ -n ${EXTRA_CONFIG:-} ]]; then
        config+=$'\n# Appended from EXTRA_CONFIG by render-config.sh.\n'
        config+=$EXTRA_CONFIG$'\n'
    fi
    (umask 077 && printf '%s' "$config" >"$copy.new")
    mv "$copy.new" "$copy"
    echo "render-config: wrote $copy from $template"
fi

if (($# > 0)); then
    cd "$(dirname "$copy")"
    exec "$@"
fi

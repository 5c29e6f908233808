#!/usr/bin/env bash
# Replaces one script's block of docs/BENCHMARKS.md with the contents of a file, leaving
# the rest of the document (the prose around the blocks) as it is. Blocks sit between
# `<!-- NAME:begin -->` and `<!-- NAME:end -->`; a missing block is appended.
#
# Usage: scripts/bench/record-block.sh NAME FILE DOC
set -euo pipefail

(($# == 3)) || {
    echo "usage: $0 NAME FILE DOC" >&2
    exit 2
}
name=$1 body=$2 doc=$3
begin="<!-- $name:begin -->"
end="<!-- $name:end -->"
[[ -f $body ]] || {
    echo "record-block: no such file: $body" >&2
    exit 1
}

mkdir -p "$(dirname "$doc")"
[[ -f $doc ]] || printf '# Benchmarks\n' >"$doc"
grep -qxF "$begin" "$doc" || printf '\n%s\n%s\n' "$begin" "$end" >>"$doc"

tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
awk -v begin="$begin" -v end="$end" -v file="$body" '
    $0 == begin { print; while ((getline line < file) > 0) print line; skip = 1; next }
    $0 == end { skip = 0 }
    !skip { print }' "$doc" >"$tmp"
cat "$tmp" >"$doc"

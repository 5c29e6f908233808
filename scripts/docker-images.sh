#!/usr/bin/env bash
# Builds, without any container registry, the images the Compose end-to-end test runs:
#
#   ratelimiter-base:bookworm  a Debian bookworm root file system made by debootstrap, with
#                              redis-server, redis-sentinel, nginx-light and curl; it stands in for
#                              the redis, nginx and debian:bookworm-slim images of docker/compose.yaml
#   ratelimiter:local          docker/Dockerfile's runtime stage on that base, holding the release
#                              binaries built on this host (there is no Rust image to build them
#                              in): the service, and the demo upstream of the `gateway` profile;
#                              the stage alone is tagged ratelimiter:local-runtime
#
# The base is built once and reused; --rebuild makes it again.
#
# Usage: scripts/docker-images.sh [--rebuild] [--no-cargo]
#   --rebuild   debootstrap the base image again even if it exists
#   --no-cargo  use target/release/{ratelimiter,demo-upstream} as they are instead of running
#               `cargo build --release`
# Environment: BASE_IMAGE, APP_IMAGE (image names), DEBIAN_MIRROR, DEBIAN_SUITE.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

repo=$ROOT
BASE_IMAGE=${BASE_IMAGE:-ratelimiter-base:bookworm}
APP_IMAGE=${APP_IMAGE:-ratelimiter:local}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
# Everything the Compose services run: the data nodes and sentinels, the proxy, and curl for the
# healthchecks and the test's clients.
BASE_PACKAGES=(redis-server redis-sentinel redis-tools nginx-light curl ca-certificates)

rebuild=false
cargo_build=true
for arg in "$@"; do
  case $arg in
    --rebuild) rebuild=true ;;
    --no-cargo) cargo_build=false ;;
    -h | --help) script_help "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done

log() { say "$@"; }
# Runs a command, showing its output only if it fails (the classic builder's deprecation notice
# would otherwise drown the log).
quietly() {
  local output
  output=$("$@" 2>&1) || { printf '%s\n' "$output" >&2; return 1; }
}
# remove_replaced ID NAME: removes image ID, which NAME was until now, unless NAME still is it or
# anything still uses it.
remove_replaced() {
  local current
  current=$(docker image inspect --format '{{.Id}}' "$2" 2>/dev/null || true)
  if [[ -n $1 && $1 != "$current" ]]; then docker image rm "$1" >/dev/null 2>&1 || true; fi
}
seconds_since() { echo $(($(date +%s) - $1)); }

rootfs=""
context=""
cleanup() {
  if [[ -n $context ]]; then rm -rf "$context"; fi
  if [[ -n $rootfs && -d $rootfs ]]; then
    # The chroot's /proc must be gone before the tree is removed.
    if mountpoint -q "$rootfs/proc"; then umount "$rootfs/proc"; fi
    rm -rf --one-file-system "$rootfs"
  fi
}
trap cleanup EXIT

build_base() {
  local started
  started=$(date +%s)
  if [[ $(id -u) -ne 0 ]]; then
    echo "building $BASE_IMAGE needs root (debootstrap and chroot)" >&2
    exit 1
  fi
  command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }

  rootfs=$(mktemp -d "${TMPDIR:-/var/tmp}/ratelimiter-rootfs.XXXXXX")
  # mktemp makes the folder 0700, and it becomes the image's / : non-root users could not
  # traverse it (nor apt's _apt user download into it).
  chmod 0755 "$rootfs"
  log "debootstrap --variant=minbase $DEBIAN_SUITE into $rootfs"
  local build_log=$rootfs.log
  debootstrap --variant=minbase "$DEBIAN_SUITE" "$rootfs" "$DEBIAN_MIRROR" >"$build_log" 2>&1 || {
    tail -n 30 "$build_log" >&2; exit 1; }

  log "installing ${BASE_PACKAGES[*]}"
  # No service may start inside the chroot while packages install.
  printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
  chmod 755 "$rootfs/usr/sbin/policy-rc.d"
  mount -t proc proc "$rootfs/proc"
  chroot "$rootfs" /usr/bin/env DEBIAN_FRONTEND=noninteractive sh -euc '
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    apt-get clean
    # /data: where each data node and sentinel keeps its writable config copy and its state,
    # owned by the redis user the services run as (as in the redis image).
    install -d -o redis -g redis -m 0750 /data
  ' sh "${BASE_PACKAGES[@]}" >>"$build_log" 2>&1 || { tail -n 30 "$build_log" >&2; exit 1; }
  rm -f "$build_log"
  umount "$rootfs/proc"
  rm -f "$rootfs/usr/sbin/policy-rc.d"
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/*.log \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/tmp/* "$rootfs"/var/tmp/*

  log "importing $BASE_IMAGE"
  local previous
  previous=$(docker image inspect --format '{{.Id}}' "$BASE_IMAGE" 2>/dev/null || true)
  tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'WORKDIR /data' \
    --change 'CMD ["bash"]' \
    --message "debootstrap --variant=minbase $DEBIAN_SUITE + ${BASE_PACKAGES[*]}" \
    - "$BASE_IMAGE" >/dev/null
  remove_replaced "$previous" "$BASE_IMAGE"
  cleanup
  rootfs=""
  log "built $BASE_IMAGE in $(seconds_since "$started")s"
}

build_app() {
  local started
  started=$(date +%s)
  if $cargo_build; then
    log "cargo build --release --locked -p ratelimiter -p demo-upstream"
    (cd "$repo" && cargo build --release --locked -p ratelimiter -p demo-upstream)
  fi
  local binary name
  for name in ratelimiter demo-upstream; do
    binary=$(release_binary "$name")
    [[ -x $binary ]] || { echo "$binary is missing: run cargo build --release -p $name" >&2; exit 1; }
  done

  # The runtime stage of docker/Dockerfile is the one users get; only the binary's origin differs.
  # It is the first stage, so the classic builder never reaches the Rust builder stage.
  log "building $APP_IMAGE (docker/Dockerfile, target runtime-base, on $BASE_IMAGE)"
  local previous
  previous=$(docker image inspect --format '{{.Id}}' "$APP_IMAGE" 2>/dev/null || true)
  quietly docker build --quiet --file "$repo/docker/Dockerfile" --target runtime-base \
    --build-arg "RUNTIME_IMAGE=$BASE_IMAGE" --tag "$APP_IMAGE-runtime" "$repo"

  context=$(mktemp -d "${TMPDIR:-/tmp}/ratelimiter-app.XXXXXX")
  cp "$(release_binary ratelimiter)" "$context/ratelimiter"
  cp "$(release_binary demo-upstream)" "$context/demo-upstream"
  cp "$repo/docker/Dockerfile.prebuilt" "$context/Dockerfile"
  quietly docker build --quiet --build-arg "RUNTIME_IMAGE=$APP_IMAGE-runtime" --tag "$APP_IMAGE" "$context"
  remove_replaced "$previous" "$APP_IMAGE"
  log "built $APP_IMAGE in $(seconds_since "$started")s"
}

if $rebuild || ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  build_base
else
  log "$BASE_IMAGE exists (--rebuild makes it again)"
fi
build_app

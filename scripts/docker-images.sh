#!/usr/bin/env bash
# Builds, without any container registry, the images the Compose tests (tests/compose/) run:
#   ratelimiter-base:bookworm  Debian bookworm made by debootstrap, with redis-server,
#                              redis-sentinel, nginx-light and curl: it stands in for the redis,
#                              nginx and debian:bookworm-slim images of docker/compose.yaml
#   ratelimiter:local          docker/Dockerfile's runtime stage on that base (also tagged
#                              ratelimiter:local-runtime) with the release binaries built on this
#                              host (no Rust image here): the service and the demo upstream
#   ratelimiter-prometheus:local  docker/Dockerfile.prometheus on that base: Debian's prometheus
#                              package, for the Compose profile observability
# The base is built once (as root) and reused; --rebuild makes it again.
#
# Usage: scripts/docker-images.sh [--rebuild] [--no-cargo]
#   --rebuild   debootstrap the base image again even if it exists
#   --no-cargo  use target/release/{ratelimiter,demo-upstream} as they are instead of running
#               `cargo build --release`
# Environment: BASE_IMAGE, APP_IMAGE, PROMETHEUS_IMAGE (image names), DEBIAN_MIRROR, DEBIAN_SUITE;
# APP_BINARIES, a folder to take both binaries from instead (no cargo; scripts/test.sh
# gives its debug build), their debug info stripped from the copies.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BASE_IMAGE=${BASE_IMAGE:-ratelimiter-base:bookworm}
APP_IMAGE=${APP_IMAGE:-ratelimiter:local}
PROMETHEUS_IMAGE=${PROMETHEUS_IMAGE:-ratelimiter-prometheus:local}
# What the Compose services run: data nodes and sentinels, the proxy, curl for the clients.
PACKAGES=(redis-server redis-sentinel redis-tools nginx-light curl ca-certificates)
rebuild=false cargo_build=true
for arg in "$@"; do
    case $arg in
    --rebuild) rebuild=true ;;
    --no-cargo) cargo_build=false ;;
    -h | --help) script_help "$0" && exit 0 ;;
    *) warn "unknown argument: $arg (try --help)"; exit 2 ;;
    esac
done

# 0755, not mktemp's 0700: the root file system in it becomes the image's /.
work=$(mktemp -d "${TMPDIR:-/var/tmp}/ratelimiter-images.XXXXXX") && chmod 0755 "$work"
# The chroot's /proc goes before the tree.
trap '! mountpoint -q "$work/rootfs/proc" || umount "$work/rootfs/proc"; rm -rf --one-file-system "$work"' EXIT
# quietly COMMAND...: its output only if it fails (the classic builder's notices would drown the log).
quietly() { "$@" >"$work/log" 2>&1 || { tail -n 30 "$work/log" >&2 && return 1; }; }
# replace IMAGE COMMAND...: builds IMAGE with COMMAND, then removes the image it replaced.
replace() {
    local image=$1 previous current
    shift
    previous=$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
    quietly "$@"
    current=$(docker image inspect --format '{{.Id}}' "$image")
    [[ -z $previous || $previous == "$current" ]] || docker image rm "$previous" >/dev/null 2>&1 || true
}

if $rebuild || ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    started=$SECONDS
    [[ $(id -u) == 0 ]] || die "building $BASE_IMAGE needs root (debootstrap and chroot)"
    need_tools debootstrap=debootstrap
    rootfs=$work/rootfs
    say "debootstrap --variant=minbase ${DEBIAN_SUITE:-bookworm}, then ${PACKAGES[*]}"
    quietly debootstrap --variant=minbase "${DEBIAN_SUITE:-bookworm}" "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
    # No service may start inside the chroot while packages install.
    printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d" && chmod 755 "$rootfs/usr/sbin/policy-rc.d"
    mount -t proc proc "$rootfs/proc"
    # /data: where each data node and sentinel keeps its config copy and its state, owned
    # by the redis user the services run as (as in the redis image).
    quietly chroot "$rootfs" /usr/bin/env DEBIAN_FRONTEND=noninteractive sh -euc '
        apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@" && apt-get clean
        install -d -o redis -g redis -m 0750 /data' sh "${PACKAGES[@]}"
    umount "$rootfs/proc"
    rm -rf "$rootfs"/usr/sbin/policy-rc.d "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/log/*.log "$rootfs"/usr/share/{doc,man,info}/* "$rootfs"/tmp/* "$rootfs"/var/tmp/*
    say "importing $BASE_IMAGE"
    import() {
        tar --numeric-owner -C "$rootfs" -c . | docker import --change 'WORKDIR /data' --change 'CMD ["bash"]' \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' --change 'ENV LANG=C.UTF-8' \
            --message "debootstrap --variant=minbase + ${PACKAGES[*]}" - "$BASE_IMAGE"
    }
    replace "$BASE_IMAGE" import
    rm -rf --one-file-system "$rootfs"
    say "built $BASE_IMAGE in $((SECONDS - started))s"
else
    say "$BASE_IMAGE exists (--rebuild makes it again)"
fi

started=$SECONDS
if $cargo_build && [[ -z ${APP_BINARIES:-} ]]; then
    say "cargo build --release --locked -p ratelimiter -p demo-upstream"
    (cd "$ROOT" && cargo build --release --locked -p ratelimiter -p demo-upstream)
fi
mkdir "$work/app"
for name in ratelimiter demo-upstream; do
    binary=${APP_BINARIES:-$(dirname "$(release_binary "$name")")}/$name
    strip --strip-debug -o "$work/app/$name" "$binary" || die "cannot copy $binary: build it (cargo build --release -p $name)"
done
cp "$ROOT/docker/Dockerfile.prebuilt" "$work/app/Dockerfile"
# The runtime stage of docker/Dockerfile is the one users get; only the binaries' origin
# differs. It is the first stage, so the classic builder never reaches the Rust builder stage.
say "building $APP_IMAGE (docker/Dockerfile, target runtime-base, on $BASE_IMAGE)"
replace "$APP_IMAGE-runtime" docker build --quiet --file "$ROOT/docker/Dockerfile" --target runtime-base \
    --build-arg "RUNTIME_IMAGE=$BASE_IMAGE" --tag "$APP_IMAGE-runtime" "$ROOT"
replace "$APP_IMAGE" docker build --quiet --build-arg "RUNTIME_IMAGE=$APP_IMAGE-runtime" --tag "$APP_IMAGE" "$work/app"
say "built $APP_IMAGE in $((SECONDS - started))s"

started=$SECONDS
say "building $PROMETHEUS_IMAGE (docker/Dockerfile.prometheus on $BASE_IMAGE)"
# It copies nothing in: a folder of its Dockerfile alone is the whole context.
mkdir "$work/prometheus" && cp "$ROOT/docker/Dockerfile.prometheus" "$work/prometheus/Dockerfile"
replace "$PROMETHEUS_IMAGE" docker build --quiet --build-arg "RUNTIME_IMAGE=$BASE_IMAGE" \
    --tag "$PROMETHEUS_IMAGE" "$work/prometheus"
say "built $PROMETHEUS_IMAGE in $((SECONDS - started))s"

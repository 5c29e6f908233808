#!/usr/bin/env bash
# The project's one test command: hygiene (fmt, clippy), every cargo test against real
# redis-server / redis-sentinel processes, then the end-to-end suites.
#
#   scripts/test.sh            everything
#   scripts/test.sh --quick    fmt, clippy and cargo tests only (no soak, no Docker)
#
# The cargo tests start every topology they need themselves (testkit/): Redis, Sentinel
# and Redis Cluster from the shipped redis/ configs, and Nginx from the shipped template
# (tests/gateway/), all on free ports, so nginx is needed even with --quick; and Prometheus
# with the shipped rules (tests/observability/), so prometheus is needed too. promtool
# checks the shipped rules and runs their unit tests (observability/rules.test.yml) first.
#
# The Compose suite and the soak run the debug binaries the cargo tests built.
#
# The full run ends with a 2-minute soak (scripts/soak.sh --minutes 2: steady load, a master
# kill, a restart in place, a policy reload, memory and descriptors sampled), on its own
# cluster with ports shifted by 1000.
#
# The Compose suite needs a Docker engine; without one it is skipped with a notice,
# except in CI (CI=true) or with REQUIRE_DOCKER=1, where a missing engine is a failure.
#
# Missing Debian packages are installed when running as root; otherwise the exact
# apt-get command is printed and the script stops.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

quick=false logs=${TMPDIR:-/tmp}/ratelimiter
[[ "${1:-}" == "--quick" ]] && quick=true

section() { printf '\n== %s\n' "$*"; }

tools=(redis-server=redis-server redis-sentinel=redis-sentinel redis-cli=redis-tools nginx=nginx-light
    prometheus=prometheus promtool=prometheus)
$quick || tools+=(curl=curl debootstrap=debootstrap)
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
  need_tools --install "${tools[@]}"
else
  need_tools "${tools[@]}"
fi

section "cargo fmt --check"
cargo fmt --all -- --check

section "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

section "promtool check rules, promtool test rules (observability/)"
promtool check rules observability/rules.yml
promtool test rules observability/rules.test.yml

docker_here=false
if ! $quick; then
  if docker info >/dev/null 2>&1; then
    docker_here=true
  elif [[ "${CI:-}" == true || "${REQUIRE_DOCKER:-0}" == 1 ]]; then
    echo "the Compose suite must run here, but no Docker engine answers (docker info failed)" >&2
    exit 1
  fi
fi

section "cargo test --workspace (the failover suite, which mostly waits on Sentinel, beside the rest)"
cargo test --workspace --all-targets --quiet --no-run
# The Compose suite's images, made while the cargo tests run (they mostly wait on the
# processes they start), at the lowest priority so as not to disturb their timing. They
# and the soak run debug binaries: they check behaviour, not speed, and a release build
# would cost as much CPU as everything else here.
$quick || cargo build --quiet --bins -p ratelimiter -p demo-upstream -p loadtest
binaries=${CARGO_TARGET_DIR:-$ROOT/target}/debug
if $docker_here; then
  APP_BINARIES=$binaries nice -n 19 scripts/docker-images.sh </dev/null >"$logs-images.log" 2>&1 &
  imaging=$!
fi
cargo test --quiet --test failover >"$logs-failover.log" 2>&1 &
failover=$!
# shellcheck disable=SC2046 # one word per flag
cargo test --workspace --lib --bins --benches $(ls tests | sed -e 's/\.rs$//' -e '/^failover$/d' -e 's/^/--test /') --quiet 2>&1 | tee "$logs-cargo-test.log"
wait "$failover" || { cat "$logs-failover.log"; echo "the failover suite failed (above)" >&2; exit 1; }
cat "$logs-failover.log"

if $quick; then
  section "not run: the Compose suite and the soak; scripts/test.sh without --quick runs them"
  exit 0
fi

suite_started=$SECONDS
if $docker_here; then
  wait "$imaging" || { cat "$logs-images.log" >&2; echo "building the images failed (above)" >&2; exit 1; }
  section "end-to-end: Docker Compose (cargo test --test compose -- --ignored)"
  COMPOSE_IMAGES=keep cargo test --test compose -- --ignored --nocapture
  echo "Compose suite: $((SECONDS - suite_started)) s"
else
  section "skipped: Docker Compose suite (no Docker engine answers; REQUIRE_DOCKER=1 makes this an error)"
fi

suite_started=$SECONDS
section "soak: 2 minutes of load with a master kill, a restart in place and a policy reload (scripts/soak.sh --minutes 2)"
RATELIMITER_BIN=$binaries/ratelimiter LOADTEST_BIN=$binaries/loadtest scripts/soak.sh --minutes 2
echo "soak: $((SECONDS - suite_started)) s"

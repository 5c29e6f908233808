#!/usr/bin/env bash
# End-to-end test of docker/compose.yaml, run for real: the same file users run, with images
# built on this machine (scripts/docker-images.sh: no registry is needed) substituted through
# its image variables. Requests go through Nginx, except those showing that an instance reached
# directly ignores a client's X-Forwarded-For.
#
#   0. without its passwords Compose refuses to start, naming the variable (none is written in
#      the repository); scripts/compose-secrets.sh generates them, into a private file
#   1. up: every container healthy, both instances ready
#   1b. who may talk to what: an unauthenticated command to a sentinel is refused (NOAUTH); the
#      instances' Redis user is refused FLUSHALL, CONFIG SET, REPLICAOF and keys outside their
#      prefix; from the Nginx container the data nodes' and sentinels' names do not resolve and
#      their addresses do not connect (they are on the back-end network only)
#   2. one client gets exactly RATE_LIMIT 200s then 429s, from both instances; another client
#      has its own bucket
#   3. X-Forwarded-For is believed from Nginx only: a client claiming another address, directly
#      to an instance or through Nginx, keeps its own bucket
#   4. `docker kill` of the master under a steady stream of requests: no 5xx; Sentinel promotes a
#      replica; a new client again gets exactly RATE_LIMIT (the instances share Redis again);
#      the killed node, started again, rejoins as a replica
#   5. `docker network disconnect` of the master from the back-end network (a partition), under the same stream: the isolated
#      master refuses writes (NOREPLICAS), the others promote a replica and keep serving, limits
#      are exact again; reconnected, the old master rejoins as a replica
#   6. the gateway (profile `gateway`): a client gets exactly RATE_LIMIT requests through to the
#      demo upstream (its own count), then 429s with the problem body and headers; spoofed
#      forwarding headers change nothing; a path no policy limits passes untouched; the
#      instances' internal routes answer 404 through Nginx and 200 on their own ports
#   7. every instance killed: the gateway answers 503 (GATEWAY_FAIL_MODE=closed) within its
#      timeouts, and nothing reaches the upstream
#   8. Cluster mode (profile redis-cluster: six nodes joined by redis-cli --cluster create, its own
#      instances and Nginx): clients whose buckets lie on each of the three masters each get
#      exactly RATE_LIMIT through Nginx from both instances, and each master ran EVALSHA; then
#      `docker kill` of a master under a stream of requests on its slots: no 5xx, its replica is
#      promoted, a new client on those slots gets exactly RATE_LIMIT from Redis again; the killed
#      node, started again, rejoins as that replica's replica
#   9. down -v, always, whatever happened (also on failure or Ctrl-C)
#
# Usage: scripts/e2e-compose.sh [--no-images] [--no-cargo]
#   --no-images  use the images as they are (do not run scripts/docker-images.sh)
#   --no-cargo   build the app image from target/release/ratelimiter as it is
# Environment: E2E_PROJECT (Compose project, default ratelimiter-e2e); NGINX_PORT,
#   NGINX_HTTP_PORT, APP_1_PORT, APP_2_PORT, GATEWAY_PORT, UPSTREAM_COUNT_PORT (host ports on
#   127.0.0.1, default 8000, 80, 8001, 8002, 8080, 8082); CLUSTER_NGINX_PORT, CLUSTER_APP_1_PORT,
#   CLUSTER_APP_2_PORT (the profile redis-cluster's, default 8100-8102); NET_PREFIX and
#   CLUSTER_NET_PREFIX (the project's two /24s, default 172.28.99 and 172.28.98); RATE_LIMIT
#   (default 10).
# Traffic goes only to this project: its ports published on 127.0.0.1, and its own containers
# from client containers on its network. Every wait is bounded.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

repo=$ROOT
compose_file=$repo/docker/compose.yaml

build_images=true
images_args=()
for arg in "$@"; do
  case $arg in
    --no-images) build_images=false ;;
    --no-cargo) images_args+=(--no-cargo) ;;
    -h | --help) script_help "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done

export BASE_IMAGE=${BASE_IMAGE:-ratelimiter-base:bookworm}
export APP_IMAGE=${APP_IMAGE:-ratelimiter:local}
export REDIS_IMAGE=${REDIS_IMAGE:-$BASE_IMAGE}
export NGINX_IMAGE=${NGINX_IMAGE:-$BASE_IMAGE}
# The clients run curl in a container on the project's network, each at its own address.
CLIENT_IMAGE=${CLIENT_IMAGE:-$BASE_IMAGE}
export PUBLISH_ADDRESS=127.0.0.1
export NGINX_PORT=${NGINX_PORT:-8000}
export NGINX_HTTP_PORT=${NGINX_HTTP_PORT:-80}
export APP_1_PORT=${APP_1_PORT:-8001}
export APP_2_PORT=${APP_2_PORT:-8002}
export GATEWAY_PORT=${GATEWAY_PORT:-8080}
export UPSTREAM_COUNT_PORT=${UPSTREAM_COUNT_PORT:-8082}
export CLUSTER_NGINX_PORT=${CLUSTER_NGINX_PORT:-8100}
export CLUSTER_APP_1_PORT=${CLUSTER_APP_1_PORT:-8101}
export CLUSTER_APP_2_PORT=${CLUSTER_APP_2_PORT:-8102}
export CLUSTER_NET_PREFIX=${CLUSTER_NET_PREFIX:-172.28.98}
export GATEWAY_FAIL_MODE=closed
export NET_PREFIX=${NET_PREFIX:-172.28.99}
export RATE_LIMIT=${RATE_LIMIT:-10}
# One token comes back every TIME_WINDOW / RATE_LIMIT seconds: none may during a client's burst.
export TIME_WINDOW=60
export FAIL_MODE=local
project=${E2E_PROJECT:-ratelimiter-e2e}
# This run's own passwords, generated as users generate theirs (scripts/compose-secrets.sh),
# in a private temporary file: whatever docker/.env holds is overridden by the environment.
secrets_file=$(mktemp "${TMPDIR:-/tmp}/e2e-compose-secrets.XXXXXX")
password_names=(REDIS_PASSWORD REDIS_ADMIN_PASSWORD REDIS_REPLICA_PASSWORD SENTINEL_AUTH_PASSWORD SENTINEL_PASSWORD)

if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  compose=(docker-compose)
fi
compose+=(--project-name "$project" --file "$compose_file" --profile gateway)
# The Cluster mode phase, and the teardown, see the profile redis-cluster too.
compose_all=("${compose[@]}" --profile redis-cluster)

# ---------------------------------------------------------------------------------------------
# Reporting

passed=0
timings=()
log() { say "$@"; }
ok() { passed=$((passed + 1)); say "  ok: $*"; }
failure=""
fail() {
  failure=$*
  warn "FAILED: $failure"
  exit 1
}
phase_started=0
phase() {
  phase_name=$1
  phase_started=$EPOCHREALTIME
  log "== $phase_name"
}
phase_done() {
  local took
  took=$(elapsed "$phase_started")
  timings+=("$(printf '%-44s %6ss' "$phase_name" "$took")")
  log "   $phase_name: ${took}s"
}
elapsed() { awk -v from="$1" -v to="$EPOCHREALTIME" 'BEGIN { printf "%.1f", to - from }'; }

# until_true SECONDS WHAT COMMAND...: runs COMMAND every half second until it succeeds; fails
# the test, naming WHAT, when SECONDS have passed.
until_true() {
  local limit=$1 what=$2 deadline
  shift 2
  deadline=$(($(date +%s) + limit))
  until "$@"; do
    if (($(date +%s) >= deadline)); then fail "$what: not within ${limit}s"; fi
    sleep 0.5
  done
}

# ---------------------------------------------------------------------------------------------
# Teardown: always, and only what this script started.

stream_pid=""
diagnostics() {
  log "--- state at the failure"
  "${compose[@]}" ps || true
  local sentinel
  if sentinel=$(container_of sentinel-1 2>/dev/null); then
    docker exec "$sentinel" redis-cli -p 26379 sentinel master redis-master 2>&1 | paste - - | head -12 || true
  fi
  "${compose[@]}" logs --no-color --tail 25 || true
}
teardown() {
  local status=$?
  trap - EXIT INT TERM
  if [[ -n $stream_pid ]]; then kill "$stream_pid" 2>/dev/null || true; fi
  if ((status != 0)); then diagnostics >&2; fi
  if ((status != 0)) && [[ -n ${cluster_phase:-} ]]; then cluster_diagnostics >&2; fi
  local clients
  clients=$(docker ps --all --quiet --filter "label=ratelimiter-e2e=$project")
  # shellcheck disable=SC2086 # one id per word
  if [[ -n $clients ]]; then docker rm --force $clients >/dev/null 2>&1 || true; fi
  local started=$EPOCHREALTIME
  log "down -v"
  "${compose_all[@]}" down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 ||
    log "down -v failed: run ${compose_all[*]} down -v"
  log "   down: $(elapsed "$started")s"
  rm -f "$secrets_file"
  if ((status == 0)); then
    log "timings:"
    printf "$LOG_NAME:   %s\n" "${timings[@]}"
    printf "$LOG_NAME:   %-44s %6ss\n" "down -v" "$(elapsed "$started")" "total" "$(elapsed "$script_started")"
    echo "e2e-compose: $passed passed, 0 failed"
  else
    if [[ -n $failure ]]; then warn "FAILED: $failure"; fi
    echo "e2e-compose: $passed passed, 1 failed"
  fi
  exit "$status"
}

# ---------------------------------------------------------------------------------------------
# The project's containers and Redis roles

data_nodes=(redis-master redis-replica-1 redis-replica-2)
sentinels=(sentinel-1 sentinel-2 sentinel-3)
# Containers are found by the labels both Compose versions set, not by their names (which differ).
declare -A container_ids=()
find_containers() {
  local service
  for service in "${data_nodes[@]}" "${sentinels[@]}" app-1 app-2 nginx demo-upstream; do
    container_ids[$service]=$(docker ps --all --quiet --filter "label=com.docker.compose.project=$project" \
      --filter "label=com.docker.compose.service=$service" | head -n 1)
  done
}
container_of() {
  [[ -n ${container_ids[$1]:-} ]] || { echo "no container for $1" >&2; return 1; }
  echo "${container_ids[$1]}"
}
project_containers() { docker ps --all --quiet --filter "label=com.docker.compose.project=$project"; }

# The master the sentinels name, as a service name (they announce host names).
current_master() {
  local sentinel
  for sentinel in "${sentinels[@]}"; do
    docker exec "$(container_of "$sentinel")" redis-cli -p 26379 \
      sentinel get-master-addr-by-name redis-master 2>/dev/null | head -n 1 && return 0
  done
  return 1
}
# Every reachable sentinel names a master other than $1.
sentinels_moved_from() {
  local sentinel named
  for sentinel in "${sentinels[@]}"; do
    named=$(docker exec "$(container_of "$sentinel")" redis-cli -p 26379 \
      sentinel get-master-addr-by-name redis-master 2>/dev/null | head -n 1)
    [[ -n $named && $named != "$1" ]] || return 1
  done
}
replication() {
  docker exec "$(container_of "$1")" redis-cli info replication 2>/dev/null | tr -d '\r'
}
# redis-cli in container $1 with the rest as arguments, without the password the container's
# environment gives it; the reply with the error code, whatever the exit status.
unauthenticated_cli() {
  local id=$1
  shift
  docker exec "$id" env -u REDISCLI_AUTH redis-cli "$@" 2>&1 | tr -d '\r' || true
}
# redis-cli in data node container $1 as the instances' user.
instance_user_cli() {
  local id=$1
  shift
  docker exec -e "REDISCLI_AUTH=$REDIS_PASSWORD" "$id" redis-cli --user ratelimiter "$@" 2>&1 | tr -d '\r' || true
}
# $1, cut off from its replicas, refuses writes.
refuses_writes() {
  [[ $(docker exec "$(container_of "$1")" redis-cli set e2e:partition-probe 1 2>&1) == *NOREPLICAS* ]]
}
# $1 is a replica of $2 with its link up.
is_replica_of() {
  local info
  info=$(replication "$1")
  [[ $info == *role:slave* && $info == *"master_host:$2"* && $info == *master_link_status:up* ]]
}
all_healthy() {
  local id status
  (($(project_containers | wc -l) == 10)) || return 1
  for id in $(project_containers); do
    status=$(docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$id")
    [[ $status == healthy ]] || return 1
  done
}
ready() { http_ok "http://$LOOPBACK:$1/ready"; }

# ---------------------------------------------------------------------------------------------
# Clients. Each prints one line per request: STATUS INSTANCE SOURCE.

format='%{http_code} %header{x-instance} %header{x-ratelimit-source}\n'

# From this host, through the published port: Nginx sees the Docker gateway's address.
host_requests() {
  local i
  for ((i = 0; i < $1; i++)); do
    curl -s -o /dev/null --max-time 5 -w "$format" "http://127.0.0.1:$NGINX_PORT/limited_endpoint" || true
  done
}
# A new client: a container with an address of its own on the project's network (the lower
# half of the /24, which Docker does not hand out). new_client sets $client to the next address.
next_client=100
new_client() {
  client=$NET_PREFIX.$next_client
  next_client=$((next_client + 1))
}
# client_requests ADDRESS COUNT [URL [CURL-ARGUMENTS...]]: COUNT requests in a row from a new
# container at ADDRESS, by default to /limited_endpoint through Nginx.
client_requests() {
  local address=$1 count=$2 url=${3:-http://nginx:8000/limited_endpoint}
  shift $(($# < 3 ? $# : 3))
  docker run --rm --name "$project-client-${address##*.}" --label "ratelimiter-e2e=$project" \
    --network "$network" --ip "$address" "$CLIENT_IMAGE" \
    bash -c 'count=$1 format=$2 url=$3
             shift 3
             for ((i = 0; i < count; i++)); do
               curl -s -o /dev/null --max-time 5 -w "$format" "$@" "$url" || true
             done' client "$count" "$format" "$url" "$@"
}
statuses() { awk '{ printf "%s%s", (NR > 1 ? " " : ""), $1 }' <<<"$1"; }

# expect_exact_limit WHO LINES [INSTANCES]: RATE_LIMIT 200s, then only 429s, all decided by Redis
# and answered by both instances (INSTANCES, default app-1,app-2).
expect_exact_limit() {
  local who=$1 lines=$2 both=${3:-app-1,app-2} statuses expected sources instances i
  statuses=$(awk '{ printf "%s ", $1 }' <<<"$lines")
  expected=""
  for ((i = 0; i < RATE_LIMIT; i++)); do expected+="200 "; done
  expected+="429 429 "
  sources=$(awk '{ print $3 }' <<<"$lines" | sort | uniq -c | awk '{ printf "%s×%s ", $1, $2 }')
  instances=$(awk '{ print $2 }' <<<"$lines" | sort -u | paste -sd, -)
  [[ $statuses == "$expected" ]] ||
    fail "$who: expected $RATE_LIMIT × 200 then 429s, got: $statuses (sources: $sources)"
  [[ $sources == "$((RATE_LIMIT + 2))×redis " ]] || fail "$who: decisions not all by Redis: $sources"
  [[ $instances == "$both" ]] || fail "$who: answered by $instances, not by both instances"
  ok "$who: $RATE_LIMIT × 200 then 2 × 429, decided by Redis, answered by $instances"
}

# client_curl ADDRESS CURL-ARGUMENTS...: one curl from a new container at ADDRESS; prints what
# curl prints.
client_curl() {
  local address=$1
  shift
  docker run --rm --name "$project-client-${address##*.}" --label "ratelimiter-e2e=$project" \
    --network "$network" --ip "$address" "$CLIENT_IMAGE" curl -s --max-time 10 "$@"
}
# What reached the demo upstream from client ADDRESS (0 when nothing did).
upstream_count_of() {
  local counts
  counts=$(curl -s --max-time 5 "http://127.0.0.1:$UPSTREAM_COUNT_PORT/__upstream/count") ||
    fail "the demo upstream's counts do not answer on port $UPSTREAM_COUNT_PORT"
  grep -o "\"$1\":[0-9]*" <<<"$counts" | cut -d: -f2 | grep . || echo 0
}
# The value of header NAME in curl -i output (lower case, no carriage return).
header_of() { tr -d '\r' <<<"$2" | awk -v name="$1" 'index(tolower($0), name ": ") == 1 { sub(/^[^:]*: /, ""); print; exit }'; }
# Every request that reached the demo upstream.
upstream_total() {
  curl -s --max-time 5 "http://127.0.0.1:$UPSTREAM_COUNT_PORT/__upstream/count" | grep -o '"total":[0-9]*' | cut -d: -f2
}

# A steady stream of requests from this host, 20 a second, for at most two minutes, on one
# keep-alive connection through Nginx; one line per request goes to $stream_log.
start_stream() {
  stream_log=$(mktemp "${TMPDIR:-/tmp}/e2e-compose-stream.XXXXXX")
  curl -s --rate 20/s --max-time 3 -w "%{stderr}$format" \
    "http://127.0.0.1:$NGINX_PORT/limited_endpoint?n=[1-2400]" >/dev/null 2>"$stream_log" &
  stream_pid=$!
}
# Stops the stream; fails on any 5xx or failed request.
expect_stream_served() {
  kill "$stream_pid" 2>/dev/null || true
  wait "$stream_pid" 2>/dev/null || true
  stream_pid=""
  stream_verdict
}
# Judges the lines of $stream_log (STATUS INSTANCE SOURCE), then removes it.
stream_verdict() {
  local total bad summary
  total=$(grep -c . "$stream_log" || true)
  bad=$(awk '$1 !~ /^[24][0-9][0-9]$/' "$stream_log" | wc -l)
  summary=$(awk '{ print $1 "/" ($3 == "" ? "-" : $3) }' "$stream_log" | sort | uniq -c |
    awk '{ printf "%s×%s ", $1, $2 }')
  rm -f "$stream_log"
  ((total >= 20)) || fail "the request stream made only $total requests"
  ((bad == 0)) || fail "$bad of $total requests in the stream failed or got a 5xx: $summary"
  ok "stream: $total requests, none failed, no 5xx (status/source: $summary)"
}
# Both instances are ready: each reaches the master it follows (/ready PINGs it). Answers
# through Nginx would not tell: a client already denied is answered from the instance's
# cache of denials until its next token is due.
instances_ready() { ready "$APP_1_PORT" && ready "$APP_2_PORT"; }

# ---------------------------------------------------------------------------------------------

script_started=$EPOCHREALTIME
trap teardown EXIT
trap 'exit 130' INT TERM

if $build_images; then
  phase "images (scripts/docker-images.sh)"
  "$repo/scripts/docker-images.sh" "${images_args[@]}"
  phase_done
fi
for image in "$APP_IMAGE" "$REDIS_IMAGE" "$NGINX_IMAGE" "$CLIENT_IMAGE"; do
  docker image inspect "$image" >/dev/null 2>&1 || fail "image $image is missing: run scripts/docker-images.sh"
done
for variable in NGINX_PORT NGINX_HTTP_PORT APP_1_PORT APP_2_PORT GATEWAY_PORT UPSTREAM_COUNT_PORT \
  CLUSTER_NGINX_PORT CLUSTER_APP_1_PORT CLUSTER_APP_2_PORT; do
  if [[ -n $(ss -Hltn "sport = :${!variable}") ]]; then
    trap - EXIT
    fail "port ${!variable} is in use on this host: set $variable to a free port"
  fi
done
if [[ -n $(project_containers) ]]; then
  trap - EXIT
  fail "project $project is already running: ${compose[*]} down -v"
fi

phase "no password from the repository"
"$repo/scripts/compose-secrets.sh" "$secrets_file" >/dev/null
[[ $(stat -c %a "$secrets_file") == 600 ]] || fail "scripts/compose-secrets.sh left $secrets_file readable by others"
set -a
# shellcheck disable=SC1090 # generated just above
source "$secrets_file"
set +a
for name in "${password_names[@]}"; do
  [[ ${!name} =~ ^[0-9a-f]{48}$ ]] || fail "scripts/compose-secrets.sh wrote no random $name"
done
ok "scripts/compose-secrets.sh generated ${#password_names[@]} random passwords into a file only its owner reads"
empty_env=$(mktemp "${TMPDIR:-/tmp}/e2e-compose-env.XXXXXX")
for name in "${password_names[@]}"; do
  # The others are set: Compose must name this one.
  refused=$(env -u "$name" "${compose[@]}" --env-file "$empty_env" config 2>&1 >/dev/null) &&
    { rm -f "$empty_env"; fail "Compose renders its file without $name"; }
  [[ $refused == *"$name is unset; run scripts/compose-secrets.sh"* ]] ||
    { rm -f "$empty_env"; fail "without $name Compose says: $refused"; }
done
rm -f "$empty_env"
ok "without any one of ${password_names[*]} Compose refuses to start, naming it"
phase_done

phase "up until every container is healthy and ready"
up_log=$("${compose[@]}" up --detach --no-build 2>&1) || { printf '%s\n' "$up_log" >&2; fail "up failed"; }
find_containers
# Clients join Nginx's network (the front one); the partition cuts a data node off the back one.
network=$(docker inspect --format '{{range $name, $_ := .NetworkSettings.Networks}}{{$name}}{{end}}' \
  "$(container_of nginx)")
backend=$(docker inspect --format '{{range $name, $_ := .NetworkSettings.Networks}}{{$name}}{{end}}' \
  "$(container_of redis-master)")
[[ $network != "$backend" ]] || fail "Nginx and the data nodes share the network $network"
until_true 120 "every container healthy" all_healthy
until_true 30 "both instances ready" instances_ready
ok "10 containers healthy, both instances ready (network $network)"
for id in $(project_containers); do
  rotation=$(docker inspect --format '{{.HostConfig.LogConfig.Type}} {{index .HostConfig.LogConfig.Config "max-size"}} {{index .HostConfig.LogConfig.Config "max-file"}}' "$id")
  [[ $rotation == "json-file 10m 3" ]] || fail "container $id keeps its log as \"$rotation\", not rotated"
done
ok "every container's log is rotated (json-file, 3 × 10m)"
phase_done

phase "who may talk to what"
for sentinel in "${sentinels[@]}"; do
  id=$(container_of "$sentinel")
  for command in "sentinel monitor evil 192.0.2.1 6379 2" "sentinel get-master-addr-by-name redis-master" ping; do
    # shellcheck disable=SC2086 # the command's words
    reply=$(unauthenticated_cli "$id" -p 26379 $command)
    [[ $reply == *NOAUTH* ]] || fail "$sentinel answered \"$command\" without a password: $reply"
  done
  [[ $(docker exec "$id" redis-cli -p 26379 sentinel masters | grep -c '^evil$' || true) == 0 ]] ||
    fail "$sentinel monitors the fake master"
done
ok "every sentinel refuses unauthenticated commands (SENTINEL MONITOR, GET-MASTER-ADDR-BY-NAME, PING: NOAUTH)"
master_id=$(container_of "$(current_master)")
for command in flushall "config set maxmemory 1" "replicaof 192.0.2.1 6379" "set elsewhere:x 1" "del elsewhere:x" "scan 0"; do
  # shellcheck disable=SC2086 # the command's words
  reply=$(instance_user_cli "$master_id" $command)
  [[ $reply == *NOPERM* ]] || fail "the instances' user was not refused \"$command\" on the master: $reply"
done
[[ $(instance_user_cli "$master_id" ping) == PONG ]] || fail "the instances' user cannot even PING the master"
[[ $(unauthenticated_cli "$master_id" ping) == *NOAUTH* ]] || fail "the master answers without a password"
ok "the instances' Redis user is refused FLUSHALL, CONFIG SET, REPLICAOF, and keys outside ${KEY_PREFIX:-ratelimit}:"
nginx_id=$(container_of nginx)
for service in "${data_nodes[@]}" "${sentinels[@]}"; do
  docker exec "$nginx_id" getent hosts "$service" >/dev/null 2>&1 &&
    fail "the Nginx container resolves $service"
  address=$(docker inspect --format "{{(index .NetworkSettings.Networks \"$backend\").IPAddress}}" "$(container_of "$service")")
  [[ -n $address ]] || fail "$service has no address on $backend"
  port=6379
  [[ $service == sentinel-* ]] && port=26379
  docker exec "$nginx_id" timeout 3 bash -c "exec 3<>/dev/tcp/$address/$port" >/dev/null 2>&1 &&
    fail "the Nginx container connects to $service at $address:$port"
done
ok "from the Nginx container no data node or sentinel resolves or connects (they are on $backend only)"
phase_done

phase "limits through Nginx"
expect_exact_limit "a client on 127.0.0.1:$NGINX_PORT" "$(host_requests $((RATE_LIMIT + 2)))"
new_client
expect_exact_limit "client $client, its own bucket" "$(client_requests "$client" $((RATE_LIMIT + 2)))"
[[ $(curl -s -o /dev/null --max-time 5 -w '%{http_code}' "http://127.0.0.1:$NGINX_HTTP_PORT/health") == 200 ]] ||
  fail "Nginx does not answer /health on port $NGINX_HTTP_PORT"
ok "Nginx answers on port $NGINX_HTTP_PORT too"
phase_done

phase "X-Forwarded-For believed from Nginx only"
# A client talks to an instance directly, claiming another address; it exhausts its own bucket.
new_client
spoofer=$client
lines=$(client_requests "$spoofer" $((RATE_LIMIT + 1)) http://app-1:8000/limited_endpoint \
  -H 'X-Forwarded-For: 198.51.100.7')
[[ $(statuses "$lines") == *" 429" ]] || fail "client $spoofer did not exhaust its bucket: $(statuses "$lines")"
new_client
lines=$(client_requests "$client" 1 http://app-1:8000/limited_endpoint -H 'X-Forwarded-For: 198.51.100.7')
[[ $(statuses "$lines") == 200 ]] ||
  fail "client $client, claiming the same X-Forwarded-For directly, got $(statuses "$lines"): the instance believed it"
ok "an instance ignores X-Forwarded-For from clients: two clients claiming one address keep their own buckets"
new_client
lines=$(client_requests "$client" 1 http://nginx:8000/limited_endpoint -H "X-Forwarded-For: $spoofer")
[[ $(statuses "$lines") == 200 ]] ||
  fail "client $client, claiming to be $spoofer through Nginx, got $(statuses "$lines"): Nginx passed the claim on"
ok "through Nginx, a client claiming to be the exhausted $spoofer keeps its own bucket"
phase_done

phase "docker kill of the master"
killed=$(current_master) || fail "no sentinel names a master"
start_stream
sleep 2
docker kill "$(container_of "$killed")" >/dev/null
log "   killed $killed"
until_true 30 "sentinels promote a replica after $killed was killed" sentinels_moved_from "$killed"
promoted=$(current_master)
log "   sentinels promoted $promoted"
until_true 30 "both instances ready again, on the new master" instances_ready
sleep 1
expect_stream_served
new_client
expect_exact_limit "after the failover, client $client" "$(client_requests "$client" $((RATE_LIMIT + 2)))"
docker start "$(container_of "$killed")" >/dev/null
until_true 60 "$killed, started again, rejoins as a replica of $promoted" is_replica_of "$killed" "$promoted"
ok "$killed, started again, is a replica of $promoted"
phase_done

phase "network partition of the master"
isolated=$(current_master) || fail "no sentinel names a master"
start_stream
sleep 2
docker network disconnect "$backend" "$(container_of "$isolated")"
log "   disconnected $isolated from $backend"
until_true 15 "the isolated master $isolated refuses writes (NOREPLICAS)" refuses_writes "$isolated"
ok "the isolated master $isolated refuses writes: NOREPLICAS"
until_true 30 "sentinels promote a replica while $isolated is cut off" sentinels_moved_from "$isolated"
promoted=$(current_master)
log "   sentinels promoted $promoted"
until_true 30 "both instances ready again, on the new master" instances_ready
sleep 1
expect_stream_served
new_client
expect_exact_limit "during the partition, client $client" "$(client_requests "$client" $((RATE_LIMIT + 2)))"
docker network connect --alias "$isolated" "$backend" "$(container_of "$isolated")"
log "   reconnected $isolated"
until_true 60 "$isolated, reconnected, rejoins as a replica of $promoted" is_replica_of "$isolated" "$promoted"
ok "$isolated, reconnected, is a replica of $promoted"
new_client
expect_exact_limit "after the partition healed, client $client" "$(client_requests "$client" $((RATE_LIMIT + 2)))"
phase_done

phase "the gateway in front of the demo upstream"
gateway=http://nginx:8080
new_client
lines=$(client_requests "$client" $((RATE_LIMIT + 2)) "$gateway/limited_endpoint")
expected=""
for ((i = 0; i < RATE_LIMIT; i++)); do expected+="200 "; done
[[ "$(statuses "$lines") " == "${expected}429 429 " ]] ||
  fail "client $client through the gateway: expected $RATE_LIMIT × 200 then 429s, got $(statuses "$lines")"
# No X-Instance through the gateway (the upstream answered): the source is the last field.
[[ $(awk '{ print $NF }' <<<"$lines" | sort -u) == redis ]] || fail "through the gateway, not all decided by Redis: $lines"
reached=$(upstream_count_of "$client")
((reached == RATE_LIMIT)) || fail "client $client: $reached requests reached the upstream, not $RATE_LIMIT"
ok "client $client: exactly $RATE_LIMIT requests reached the upstream (its own count), then 429s"
denied=$(client_curl "$client" -i "$gateway/limited_endpoint")
[[ $denied == "HTTP/1.1 429"* ]] || fail "the denial through the gateway is not a 429: $denied"
[[ $(header_of content-type "$denied") == application/problem+json ]] || fail "the 429's Content-Type: $denied"
retry_after=$(header_of retry-after "$denied")
[[ $retry_after =~ ^[1-9][0-9]*$ ]] || fail "the 429's Retry-After: $denied"
[[ $(header_of ratelimit "$denied") == "\"default\";r=0;t=$retry_after" ]] || fail "the 429's RateLimit: $denied"
[[ $(header_of ratelimit-policy "$denied") == "\"default\";q=$RATE_LIMIT;w=$TIME_WINDOW" ]] ||
  fail "the 429's RateLimit-Policy: $denied"
[[ $denied == *'"violated-policies":["default"],"retry_after_ms":'[1-9]* ]] || fail "the 429's body: $denied"
((reached == $(upstream_count_of "$client"))) || fail "a denied request reached the upstream"
ok "the denial is a 429 problem+json with violated-policies, retry_after_ms, Retry-After and the draft headers"
exhausted=$client
new_client
lines=$(client_requests "$client" 1 "$gateway/limited_endpoint" -H "X-Forwarded-For: $exhausted" \
  -H "X-Real-IP: $exhausted" -H "Forwarded: for=$exhausted")
[[ $(statuses "$lines") == 200 ]] || fail "client $client, claiming to be $exhausted, got $(statuses "$lines")"
((reached == $(upstream_count_of "$exhausted"))) || fail "the upstream counted a request as $exhausted's"
ok "through the gateway, a client claiming to be the exhausted $exhausted keeps its own bucket"
new_client
free=$(client_curl "$client" -i "$gateway/your/api?page=2")
[[ $free == "HTTP/1.1 200"* && -z $(header_of ratelimit "$free") && -z $(header_of ratelimit-policy "$free") ]] ||
  fail "a path no policy limits did not pass untouched: $free"
(($(upstream_count_of "$client") == 1)) || fail "the unlimited request did not reach the upstream once"
ok "a path no policy limits passes to the upstream without quota headers"
for target in /ready /metrics /v1/policies //v1/policies /v1/../metrics; do
  code=$(curl -s --path-as-is -o /dev/null --max-time 5 -w '%{http_code}' "http://127.0.0.1:$NGINX_PORT$target")
  [[ $code == 404 ]] || fail "GET $target through Nginx answered $code, not 404"
done
[[ $(curl -s -o /dev/null --max-time 5 -w '%{http_code}' "http://127.0.0.1:$GATEWAY_PORT/__ratelimiter/check") == 404 ]] ||
  fail "the gateway's check location answers from outside"
for target in /ready /metrics /v1/policies; do
  http_ok "http://$LOOPBACK:$APP_1_PORT$target" || fail "GET $target on app-1's own port is not 200"
done
ok "/ready, /metrics and /v1/* answer 404 through Nginx (however spelt) and 200 on the instances' ports"
phase_done

phase "every instance down: the gateway fails closed"
docker kill "$(container_of app-1)" "$(container_of app-2)" >/dev/null
before=$(upstream_total)
started=$EPOCHREALTIME
answer=$(curl -s -i --max-time 15 "http://127.0.0.1:$GATEWAY_PORT/limited_endpoint") || fail "the gateway did not answer within 15 s"
took=$(elapsed "$started")
[[ $answer == "HTTP/1.1 503"* ]] || fail "with both instances down the gateway answered: $answer"
[[ $(header_of content-type "$answer") == application/problem+json && $(header_of x-ratelimit-source "$answer") == gateway-closed ]] ||
  fail "the gateway's 503 is not its problem+json: $answer"
(($(upstream_total) == before)) || fail "with both instances down a request reached the upstream"
ok "both instances killed: 503 problem+json from the gateway in ${took}s, nothing reached the upstream"
phase_done

# ---------------------------------------------------------------------------------------------
# Cluster mode: the profile redis-cluster. Its nodes have fixed addresses, CLUSTER_NET_PREFIX.21
# to .26 for redis-cluster-1 to -6; its clients take addresses from .100 on.

cluster_container_of() {
  docker ps --all --quiet --filter "label=com.docker.compose.project=$project" \
    --filter "label=com.docker.compose.service=$1" | head -n 1
}
# The service of the node at ADDRESS.
cluster_node_at() { echo "redis-cluster-${1##*.2}"; }
cluster_cli() {
  local service=$1
  shift
  docker exec "$(cluster_container_of "$service")" redis-cli "$@" 2>/dev/null | tr -d '\r'
}
# CLUSTER NODES as the first of the services given that answers sees it.
cluster_nodes_seen() {
  local service nodes
  for service in "$@"; do
    nodes=$(cluster_cli "$service" cluster nodes) && [[ -n $nodes ]] && { echo "$nodes"; return 0; }
  done
  return 1
}
# The masters the cluster counts, one line each: ADDRESS ID SLOT-RANGES (comma-separated).
cluster_masters() {
  cluster_nodes_seen "$@" | awk '{
      n = split($3, flags, ","); master = 0; failed = 0
      for (i = 1; i <= n; i++) { if (flags[i] == "master") master = 1; if (flags[i] == "fail") failed = 1 }
      if (!master || failed) next
      address = $2; sub(/:.*/, "", address); ranges = ""
      for (i = 9; i <= NF; i++) if ($i !~ /^\[/) ranges = ranges (ranges == "" ? "" : ",") $i
      print address, $1, ranges
    }' | sort
}
# The address of the replica following the master with ID.
cluster_replica_of() {
  cluster_nodes_seen "${@:2}" | awk -v id="$1" '$4 == id { address = $2; sub(/:.*/, "", address); print address; exit }'
}
# owner_of SLOT MASTERS: the address of the master (of the lines of cluster_masters) serving SLOT.
owner_of() {
  awk -v slot="$1" '{
      n = split($3, ranges, ",")
      for (i = 1; i <= n; i++) {
        m = split(ranges[i], ends, "-"); if (m == 1) ends[2] = ends[1]
        if (slot >= ends[1] && slot <= ends[2]) { print $1; exit }
      }
    }' <<<"$2"
}
# client_slots FROM TO: "ADDRESS SLOT" for the client addresses .FROM to .TO: the slot of its
# bucket, whose hash tag is {ip=ADDRESS}.
client_slots() {
  docker exec "$(cluster_container_of redis-cluster-1)" bash -c '
    for ((h = $2; h <= $3; h++)); do
      echo "$1.$h $(redis-cli cluster keyslot "{ip=$1.$h}")"
    done' slots "$CLUSTER_NET_PREFIX" "$1" "$2" 2>/dev/null | tr -d '\r'
}
evalsha_calls() {
  cluster_cli "$1" info commandstats | sed -n 's/^cmdstat_evalsha:calls=\([0-9]*\),.*/\1/p' | grep . || echo 0
}
cluster_whole() {
  local info
  info=$(cluster_cli "$1" cluster info)
  [[ $info == *cluster_state:ok* && $info == *cluster_slots_ok:16384* ]]
}
cluster_healthy() {
  local service status
  for service in redis-cluster-{1..6} cluster-app-1 cluster-app-2 cluster-nginx; do
    status=$(docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' \
      "$(cluster_container_of "$service")" 2>/dev/null) || return 1
    [[ $status == healthy ]] || return 1
  done
}
cluster_ready() { ready "$CLUSTER_APP_1_PORT" && ready "$CLUSTER_APP_2_PORT"; }
is_master() { [[ $(cluster_cli "$1" info replication) == *role:master* ]]; }
# $1 is a replica of the node at address $2 with its link up.
is_cluster_replica_of() {
  local info
  info=$(cluster_cli "$1" info replication)
  [[ $info == *role:slave* && $info == *"master_host:$2"* && $info == *master_link_status:up* ]]
}
cluster_diagnostics() {
  log "--- Cluster mode at the failure"
  cluster_nodes_seen redis-cluster-{1..6} || true
  "${compose_all[@]}" logs --no-color --tail 15 redis-cluster-create || true
  # The instances' own messages, without the access log.
  "${compose_all[@]}" logs --no-color cluster-app-1 cluster-app-2 | grep -v 'middleware::logger' | tail -n 30 || true
}
# A stream of requests from a client container at ADDRESS, 20 a second, at most two minutes; its
# lines (STATUS INSTANCE SOURCE) are the container's output, on stderr, which is not buffered, so
# that none is lost when the container is stopped.
start_client_stream() {
  stream_container=$(docker run --detach --name "$project-stream-${1##*.}" --label "ratelimiter-e2e=$project" \
    --network "$cluster_network" --ip "$1" "$CLIENT_IMAGE" \
    curl -s --rate 20/s --max-time 3 -o /dev/null -w "%{stderr}$format" \
    "http://cluster-nginx:8000/limited_endpoint?n=[1-2400]")
}
expect_client_stream_served() {
  docker stop --time 1 "$stream_container" >/dev/null 2>&1 || true
  stream_log=$(mktemp "${TMPDIR:-/tmp}/e2e-compose-stream.XXXXXX")
  docker logs "$stream_container" >"$stream_log" 2>&1
  docker rm --force "$stream_container" >/dev/null 2>&1 || true
  stream_verdict
}

phase "Cluster mode (profile redis-cluster)"
cluster_phase=yes
# The Sentinel topology is done with: its CPU goes to this one (two shared cores).
"${compose[@]}" stop --timeout 2 >/dev/null 2>&1 || fail "could not stop the Sentinel topology's containers"
up_log=$("${compose_all[@]}" up --detach --no-build cluster-nginx 2>&1) ||
  { printf '%s\n' "$up_log" >&2; fail "up of the profile redis-cluster failed"; }
until_true 120 "every Cluster mode container healthy" cluster_healthy
until_true 30 "both Cluster mode instances ready" cluster_ready
[[ $(docker inspect --format '{{.State.ExitCode}}' "$(cluster_container_of redis-cluster-create)") == 0 ]] ||
  fail "redis-cluster-create did not exit 0"
cluster_network=$(docker inspect --format '{{range $name, $_ := .NetworkSettings.Networks}}{{$name}}{{end}}' \
  "$(cluster_container_of cluster-nginx)")
masters=$(cluster_masters redis-cluster-{1..6})
(($(grep -c . <<<"$masters") == 3)) || fail "not three masters: $masters"
ok "redis-cluster-create made 3 masters ($(awk '{ printf "%s%s", (NR > 1 ? ", " : ""), $1 }' <<<"$masters")) with a replica each; both instances ready"

# Two clients on each master, of .100 to .149.
declare -A clients_of=()
while read -r address slot; do
  owner=$(owner_of "$slot" "$masters")
  [[ -n $owner ]] || fail "no master serves slot $slot"
  if (($(wc -w <<<"${clients_of[$owner]:-}") < 2)); then clients_of[$owner]+=" $address"; fi
done < <(client_slots 100 149)
declare -A calls_before=()
for owner in $(awk '{ print $1 }' <<<"$masters"); do
  (($(wc -w <<<"${clients_of[$owner]:-}") == 2)) || fail "no two of 50 clients on master $owner"
  calls_before[$owner]=$(evalsha_calls "$(cluster_node_at "$owner")")
done
network=$cluster_network
for owner in "${!clients_of[@]}"; do
  for address in ${clients_of[$owner]}; do
    expect_exact_limit "Cluster mode, client $address (on master $owner)" \
      "$(client_requests "$address" $((RATE_LIMIT + 2)) http://cluster-nginx:8000/limited_endpoint)" \
      cluster-app-1,cluster-app-2
  done
  calls=$(($(evalsha_calls "$(cluster_node_at "$owner")") - calls_before[$owner]))
  ((calls >= 2 * RATE_LIMIT)) || fail "master $owner ran EVALSHA $calls times for 2 clients of $RATE_LIMIT admissions"
  ok "master $owner ran EVALSHA $calls times for its 2 clients"
done

# docker kill of the master serving the stream's client, .99.
streamer=$CLUSTER_NET_PREFIX.99
victim=$(owner_of "$(cluster_cli redis-cluster-1 cluster keyslot "{ip=$streamer}")" "$masters")
victim_id=$(awk -v a="$victim" '$1 == a { print $2 }' <<<"$masters")
heir=$(cluster_replica_of "$victim_id" redis-cluster-{1..6})
[[ -n $heir ]] || fail "no replica follows master $victim"
start_client_stream "$streamer"
sleep 2
docker kill "$(cluster_container_of "$(cluster_node_at "$victim")")" >/dev/null
log "   killed $(cluster_node_at "$victim") ($victim); its replica is $(cluster_node_at "$heir") ($heir)"
until_true 30 "the cluster promotes $heir after $victim was killed" is_master "$(cluster_node_at "$heir")"
until_true 30 "the cluster is whole again, as $heir sees it" cluster_whole "$(cluster_node_at "$heir")"
until_true 30 "both Cluster mode instances ready again" cluster_ready
sleep 1
expect_client_stream_served
masters=$(cluster_masters "$(cluster_node_at "$heir")")
fresh=""
while read -r address slot; do
  if [[ $(owner_of "$slot" "$masters") == "$heir" ]]; then
    fresh=$address
    break
  fi
done < <(client_slots 150 199)
[[ -n $fresh ]] || fail "no fresh client on the promoted master $heir"
expect_exact_limit "after the kill, client $fresh on the promoted master $heir" \
  "$(client_requests "$fresh" $((RATE_LIMIT + 2)) http://cluster-nginx:8000/limited_endpoint)" cluster-app-1,cluster-app-2
docker start "$(cluster_container_of "$(cluster_node_at "$victim")")" >/dev/null
until_true 60 "$victim, started again, rejoins as a replica of $heir" is_cluster_replica_of "$(cluster_node_at "$victim")" "$heir"
ok "$(cluster_node_at "$victim"), started again, is a replica of $heir"
phase_done

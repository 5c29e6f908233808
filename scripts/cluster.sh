#!/usr/bin/env bash
# The whole distributed rate limiter on loopback, without containers:
#
#   Redis master 6379, replicas 6380 and 6381   (redis/master.conf, redis/replica.conf)
#   Sentinels 26379, 26380, 26381                (redis/sentinel.conf, one copy each)
#   or, with --redis-cluster, instead of both:   nodes 7000-7005 (bus 17000-17005) of
#                                                redis/cluster-node.conf, joined by
#                                                redis-cli --cluster create: 3 masters, 3 replicas
#   app-1 on 8001, app-2 on 8002                 (target/release/ratelimiter); their gRPC
#                                                rate-limit service on 8051, 8052 (RLS_CONFIG)
#   Nginx on 8000, and 80 if it may bind it      (nginx/nginx.conf.template): the public server
#   Nginx on 8080: the gateway, which asks an instance's /v1/check about every request and
#                  sends the admitted ones to GATEWAY_UPSTREAM (default 127.0.0.1:8081)
#   with --gateway: the demo upstream on 8081, its counts on 8082 (target/release/demo-upstream)
#   with --observability: Prometheus on 9090 scraping both instances with the shipped rules
#                  (observability/; README "Dashboards and alerts")
#
# Configs are the templates rendered by scripts/render-config.sh, as in docker/compose.yaml.
# Nginx reaches the instances on their Unix sockets (CLUSTER_DIR/app-N/http.sock, UNIX_SOCKET,
# mode 660): a peer there is the proxy they trust, and no TCP address is. With
# NGINX_TO_INSTANCES=tcp it reaches their ports from 127.0.0.2 (proxy_bind) instead, the only
# proxy they then trust; either way a client on 127.0.0.1 talking to an instance's port
# directly cannot choose its X-Forwarded-For.
#
# Usage: scripts/cluster.sh [--install] up [--gateway] [--redis-cluster] [--observability]|down|status|failover|logs [-f]
#
#   up        start everything and wait until it is ready (replication linked, sentinels
#             agree, instances ready), building the release binaries if needed; --gateway:
#             also the demo upstream (curl 127.0.0.1:8082/__upstream/count shows what
#             reached it); --redis-cluster: a Redis Cluster instead of the Sentinel group;
#             --observability: also Prometheus, with the shipped rules
#   down      stop exactly the processes `up` started (their recorded pids); idempotent
#   status    each data node's role and link, the master per sentinel (in Cluster mode,
#             what `redis-cli --cluster check` says), each instance's /ready; exits 1
#             unless all is well
#   failover  SENTINEL FAILOVER, then wait until the new master takes writes; in Cluster
#             mode CLUSTER FAILOVER on the replica of slot 0's master
#   logs      the last lines of every log; `logs -f` follows them
#   --install install missing packages with apt-get first (never done otherwise)
#
# Environment: the service's variables (README.md: RATE_LIMIT, BURST, FAIL_MODE, POLICY_FILE,
# ...) reach both instances, but the store's, which the topology sets. The passwords have
# loopback-only defaults: REDIS_PASSWORD (the instances' user), REDIS_ADMIN_PASSWORD (for
# operators and this script), REDIS_REPLICA_PASSWORD, SENTINEL_AUTH_PASSWORD (the sentinels'
# user on the data nodes), SENTINEL_PASSWORD (the sentinels' default user: operators, this
# script), SENTINEL_SERVICE_PASSWORD (the instances' user on the sentinels, which may only
# read the master and follow it: their SENTINEL_USERNAME / SENTINEL_PASSWORD). KEY_PREFIX (default ratelimit) is all the
# instances' user may touch. WORKERS defaults to half the CPUs. GATEWAY_UPSTREAM (host:port)
# is what the gateway guards, GATEWAY_FAIL_MODE (closed or open) what it does when no
# instance answers. CLUSTER_DIR (default run/cluster) holds configs, data, logs, the pids
# `down` stops and the `mode` that status, failover and logs follow. CLUSTER_PORT_OFFSET
# (default 0) is added to every port, so that a second cluster with its own CLUSTER_DIR runs
# beside the first (scripts/soak.sh). CLUSTER_WAIT_SECS (default 30) bounds each wait.
# RATELIMITER_BIN and DEMO_UPSTREAM_BIN run those binaries instead of building them.
# NGINX_TO_INSTANCES (socket or tcp, default socket) is how Nginx reaches the instances.
set -euo pipefail

# A CLUSTER_DIR given relative to where the script was called from stays that.
[[ -z ${CLUSTER_DIR:-} ]] || CLUSTER_DIR=$(realpath -m -- "$CLUSTER_DIR")
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

CLUSTER_DIR=${CLUSTER_DIR:-$ROOT/run/cluster}
PIDS_FILE=$CLUSTER_DIR/pids
MODE_FILE=$CLUSTER_DIR/mode
WAIT_SECS=${CLUSTER_WAIT_SECS:-30}
REDIS_PASSWORD=${REDIS_PASSWORD:-ratelimiter-dev-password}
REDIS_ADMIN_PASSWORD=${REDIS_ADMIN_PASSWORD:-ratelimiter-dev-admin-password}
REDIS_REPLICA_PASSWORD=${REDIS_REPLICA_PASSWORD:-ratelimiter-dev-replica-password}
SENTINEL_AUTH_PASSWORD=${SENTINEL_AUTH_PASSWORD:-ratelimiter-dev-sentinel-auth-password}
SENTINEL_PASSWORD=${SENTINEL_PASSWORD:-ratelimiter-dev-sentinel-password}
SENTINEL_SERVICE_PASSWORD=${SENTINEL_SERVICE_PASSWORD:-ratelimiter-dev-sentinel-service-password}
KEY_PREFIX=${KEY_PREFIX:-ratelimit}

offset=${CLUSTER_PORT_OFFSET:-0}
[[ $offset =~ ^[0-9]+$ ]] && ((offset <= 30000)) ||
    die "CLUSTER_PORT_OFFSET must be a whole number from 0 to 30000, got \"$offset\""
shifted() { local port; for port in "$@"; do echo $((port + offset)); done; }
# The ports, defined once in scripts/ports.env (the bench program reads it too), shifted here.
source "$ROOT/scripts/ports.env"
# shellcheck disable=SC2207,SC2086 # one port per word
APP_PORTS=($(shifted $APP_PORTS)) GRPC_PORTS=($(shifted $GRPC_PORTS)) DATA_PORTS=($(shifted $DATA_PORTS)) SENTINEL_PORTS=($(shifted $SENTINEL_PORTS))
# shellcheck disable=SC2207,SC2086
CLUSTER_PORTS=($(shifted $CLUSTER_PORTS))
PROMETHEUS_PORT=$(shifted $PROMETHEUS_PORT)
NGINX_PORT=$(shifted $NGINX_PORT) GATEWAY_PORT=$(shifted $GATEWAY_PORT) UPSTREAM_PORT=$(shifted $UPSTREAM_PORT) UPSTREAM_COUNT_PORT=$(shifted $UPSTREAM_COUNT_PORT)
MASTER_PORT=${DATA_PORTS[0]} MASTER_NAME=redis-master APP_NAMES=(app-1 app-2) PROXY_ADDR=127.0.0.2
GATEWAY_UPSTREAM=${GATEWAY_UPSTREAM:-$LOOPBACK:$UPSTREAM_PORT}
GATEWAY_FAIL_MODE=${GATEWAY_FAIL_MODE:-closed}
NGINX_TO_INSTANCES=${NGINX_TO_INSTANCES:-socket}
# The proxy the instances trust by address: none when Nginx comes through their sockets.
TRUSTED_PROXY=$PROXY_ADDR
[[ $NGINX_TO_INSTANCES != socket ]] || TRUSTED_PROXY=""
# Started by root, Nginx's workers run as nobody: the sockets then admit every local user,
# as 127.0.0.2 does over TCP (anyone on the host may bind it); else only their owner.
SOCKET_MODE=660
[[ $(id -u) != 0 ]] || SOCKET_MODE=666
BIN=${RATELIMITER_BIN:-$(release_binary ratelimiter)}
UPSTREAM_BIN=${DEMO_UPSTREAM_BIN:-$(release_binary demo-upstream)}

usage() { script_usage "${BASH_SOURCE[0]}" '^#   --install' >&2; exit 2; }

# rcli PORT ARGS...: redis-cli as the data nodes' operators' user (scli: a sentinels' client),
# the password in the environment, not argv; the reply without carriage returns, or nothing.
rcli() { REDISCLI_AUTH=$REDIS_ADMIN_PASSWORD timeout 3 redis-cli -h "$LOOPBACK" -p "$@" 2>/dev/null | tr -d '\r' || true; }
scli() { REDISCLI_AUTH=$SENTINEL_PASSWORD timeout 3 redis-cli -h "$LOOPBACK" -p "$@" 2>/dev/null | tr -d '\r' || true; }
# info_field PORT SECTION FIELD: a field of the data node's INFO; empty when it does not answer.
info_field() { rcli "$1" INFO "$2" | sed -n "s/^$3://p"; }
# The master's host:port according to the sentinel on PORT; empty when it does not answer.
master_by() {
    local reply
    reply=$(scli "$1" SENTINEL GET-MASTER-ADDR-BY-NAME "$MASTER_NAME")
    [[ $reply != *$'\n'* ]] || echo "${reply/$'\n'/:}"
}
port_open() { (exec 3<>"/dev/tcp/$LOOPBACK/$1") 2>/dev/null; }
recorded_mode() { if [[ -s $MODE_FILE ]]; then cat "$MODE_FILE"; else echo sentinel; fi; }

# start NAME LOG COMMAND...: COMMAND in the background, its output appended to LOG, recorded
# (lib.sh's pids format) so that `down` stops it and no other.
start() {
    local name=$1 log=$2
    shift 2
    "$@" </dev/null >>"$log" 2>&1 &
    printf '%s %s %s %s\n' "$name" "$!" "$(start_time_of "$!")" "$log" >>"$PIDS_FILE"
    say "started $name (pid $!), log: $(rel "$log")"
}

# wait_for NAME WHAT CHECK...: runs CHECK until it succeeds; stops when WAIT_SECS pass or
# the process recorded as NAME, if any, exits first, with the end of its log.
wait_for() {
    local name=$1 what=$2 deadline=$((SECONDS + WAIT_SECS)) pid since log why
    shift 2
    read -r _ pid since log < <(grep -s "^$name " "$PIDS_FILE" || echo)
    until "$@"; do
        why=""
        [[ -z $log ]] || still_running "$pid" "$since" || why="$name exited"
        ((SECONDS < deadline)) || why="${WAIT_SECS}s passed"
        if [[ -n $why ]]; then
            warn "error: $why before $what${log:+; the end of $(rel "$log"):}"
            [[ -z $log ]] || tail -n 15 "$log" | sed 's/^/    /' >&2
            exit 1
        fi
        sleep 0.2
    done
}

answers() { [[ $(rcli "$1" PING) == PONG ]]; }
replica_linked() { [[ $(info_field "$1" replication master_link_status) == up ]]; }
# replica_of PORT MASTER: a linked replica of the node on port MASTER.
replica_of() { [[ $(info_field "$1" replication master_port) == "$2" ]] && replica_linked "$1"; }
# Quorum, a majority to authorize a failover, and both replicas known: a failover can start.
sentinel_ready() {
    [[ $(scli "$1" SENTINEL CKQUORUM "$MASTER_NAME") == OK* ]] &&
        [[ $(scli "$1" SENTINEL MASTER "$MASTER_NAME" | sed -n '/^num-slaves$/{n;p}') == 2 ]]
}
# The node on PORT sees all six nodes and every slot served.
cluster_whole() { (($(rcli "$1" CLUSTER INFO | grep -cE '^(cluster_state:ok|cluster_slots_ok:16384|cluster_known_nodes:6)$') == 3)); }
# Three masters, every other node a linked replica, and every node has heard of each
# master's replica (until gossip reaches it, a node takes a new replica for a master).
cluster_linked() {
    local port other masters=() reply
    for port in "${CLUSTER_PORTS[@]}"; do
        case $(info_field "$port" replication role) in
        master) masters+=("$port") ;;
        slave) replica_linked "$port" || return 1 ;;
        *) return 1 ;;
        esac
    done
    ((${#masters[@]} == 3)) || return 1
    for port in "${masters[@]}"; do
        for other in "${CLUSTER_PORTS[@]}"; do
            reply=$(rcli "$other" CLUSTER REPLICAS "$(rcli "$port" CLUSTER MYID)")
            [[ -n $reply && $reply != ERR* ]] || return 1
        done
    done
}

# --- up ---------------------------------------------------------------------------

# render TEMPLATE COPY: scripts/render-config.sh with the placeholders the templates share.
render() {
    REDIS_PASSWORD=$REDIS_PASSWORD REDIS_ADMIN_PASSWORD=$REDIS_ADMIN_PASSWORD KEY_PREFIX=$KEY_PREFIX \
        REDIS_REPLICA_PASSWORD=$REDIS_REPLICA_PASSWORD SENTINEL_AUTH_PASSWORD=$SENTINEL_AUTH_PASSWORD \
        SENTINEL_PASSWORD=$SENTINEL_PASSWORD SENTINEL_SERVICE_PASSWORD=$SENTINEL_SERVICE_PASSWORD \
        scripts/render-config.sh "$1" "$2" >/dev/null
}

# start_redis NAME TEMPLATE PORT [ARGS...]: a data node in a private folder (Redis rewrites
# its config, passwords included, as 0644), its users (redis/users.acl) beside its config.
start_redis() {
    local name=$1 template=$2 port=$3 dir=$CLUSTER_DIR/$1
    shift 3
    rm -rf "$dir" && mkdir -m 700 "$dir"
    render redis/users.acl "$dir/users.acl" && render "$template" "$dir/redis.conf"
    start "$name" "$dir/redis.log" redis-server "$dir/redis.conf" --port "$port" --bind "$LOOPBACK" --dir "$dir" "$@"
}

start_sentinel_group() {
    local port dir
    start_redis "redis-$MASTER_PORT" redis/master.conf "$MASTER_PORT"
    wait_for "redis-$MASTER_PORT" "redis-$MASTER_PORT answers PING" answers "$MASTER_PORT"
    for port in "${DATA_PORTS[@]:1}"; do start_redis "redis-$port" redis/replica.conf "$port" --replicaof "$LOOPBACK" "$MASTER_PORT"; done
    for port in "${DATA_PORTS[@]:1}"; do wait_for "redis-$port" "redis-$port's replication link is up" replica_linked "$port"; done
    say "replication is linked: $MASTER_PORT -> ${DATA_PORTS[*]:1}"
    for port in "${SENTINEL_PORTS[@]}"; do
        dir=$CLUSTER_DIR/sentinel-$port
        rm -rf "$dir" && mkdir -m 700 "$dir"
        MASTER_HOST=$LOOPBACK MASTER_PORT=$MASTER_PORT render redis/sentinel.conf "$dir/sentinel.conf"
        start "sentinel-$port" "$dir/sentinel.log" redis-sentinel "$dir/sentinel.conf" --port "$port" --bind "$LOOPBACK" --dir "$dir"
    done
    for port in "${SENTINEL_PORTS[@]}"; do wait_for "sentinel-$port" "sentinel-$port's CKQUORUM is OK, both replicas known" sentinel_ready "$port"; done
    say "sentinels agree (CKQUORUM OK on ${SENTINEL_PORTS[*]})"
}

start_redis_cluster() {
    local port log=$CLUSTER_DIR/redis-cluster-create.log
    for port in "${CLUSTER_PORTS[@]}"; do start_redis "redis-cluster-$port" redis/cluster-node.conf "$port"; done
    for port in "${CLUSTER_PORTS[@]}"; do wait_for "redis-cluster-$port" "redis-cluster-$port answers PING" answers "$port"; done
    say "redis-cli --cluster create on ${CLUSTER_PORTS[0]}-${CLUSTER_PORTS[-1]} --cluster-replicas 1, log: $(rel "$log")"
    REDISCLI_AUTH=$REDIS_ADMIN_PASSWORD timeout "$WAIT_SECS" redis-cli --cluster create \
        "${CLUSTER_PORTS[@]/#/$LOOPBACK:}" --cluster-replicas 1 --cluster-yes </dev/null >"$log" 2>&1 ||
        { tail -n 15 "$log" >&2; die "redis-cli --cluster create failed"; }
    for port in "${CLUSTER_PORTS[@]}"; do wait_for "redis-cluster-$port" "redis-cluster-$port sees 6 nodes, every slot served" cluster_whole "$port"; done
    wait_for - "three masters, each with a linked replica every node knows" cluster_linked
    say "the Redis Cluster is whole: every slot served, every replica linked"
}

app_socket() { echo "$CLUSTER_DIR/${APP_NAMES[$1]}/http.sock"; }

start_nginx() {
    local dir=$CLUSTER_DIR/nginx listen="listen $LOOPBACK:$NGINX_PORT;"
    rm -rf "$dir" && mkdir -p "$dir/logs" "$dir/temp"
    if ((offset == 0)) && ! port_open 80 && { [[ $(id -u) == 0 ]] ||
        (($(cat /proc/sys/net/ipv4/ip_unprivileged_port_start 2>/dev/null || echo 1024) <= 80)); }; then
        listen+=" listen $LOOPBACK:80;"
    else
        say "note: Nginx listens on $NGINX_PORT only; port 80 wants CLUSTER_PORT_OFFSET=0, 80 free, and root or net.ipv4.ip_unprivileged_port_start <= 80"
    fi
    local app_1=$LOOPBACK:${APP_PORTS[0]} app_2=$LOOPBACK:${APP_PORTS[1]} proxy_bind=$PROXY_ADDR
    # A connection to a Unix socket binds to no address.
    [[ $NGINX_TO_INSTANCES != socket ]] || app_1=unix:$(app_socket 0) app_2=unix:$(app_socket 1) proxy_bind=off
    PID_FILE=$dir/nginx.pid ERROR_LOG=$dir/logs/error.log ACCESS_LOG=$dir/logs/access.log TEMP_DIR=$dir/temp \
        LISTEN=$listen APP_1=$app_1 APP_2=$app_2 PROXY_BIND=$proxy_bind \
        GATEWAY_LISTEN="listen $LOOPBACK:$GATEWAY_PORT;" GATEWAY_UPSTREAM=$GATEWAY_UPSTREAM \
        GATEWAY_FAIL_MODE=$GATEWAY_FAIL_MODE render nginx/nginx.conf.template "$dir/nginx.conf"
    # -e: the log Nginx opens before it reads its config (the built-in one is root's).
    nginx -t -q -e "$dir/logs/error.log" -p "$dir/" -c "$dir/nginx.conf" ||
        die "nginx rejects $(rel "$dir")/nginx.conf (rendered from nginx/nginx.conf.template)"
    start nginx "$dir/logs/error.log" nginx -e "$dir/logs/error.log" -p "$dir/" -c "$dir/nginx.conf"
    wait_for nginx "GET /health on $NGINX_PORT answers 200" http_ok "http://$LOOPBACK:$NGINX_PORT/health"
    wait_for nginx "the gateway listens on $GATEWAY_PORT" port_open "$GATEWAY_PORT"
}

# Prometheus scraping both instances every 15 s with the shipped rules (observability/).
start_prometheus() {
    local dir=$CLUSTER_DIR/prometheus
    rm -rf "$dir" && mkdir -p "$dir"
    TARGETS="\"$LOOPBACK:${APP_PORTS[0]}\", \"$LOOPBACK:${APP_PORTS[1]}\"" SCRAPE_INTERVAL=15s \
        RULES_FILE=$ROOT/observability/rules.yml render observability/prometheus.yml "$dir/prometheus.yml"
    start prometheus "$dir/prometheus.log" prometheus --config.file="$dir/prometheus.yml" \
        --storage.tsdb.path="$dir/data" --web.listen-address="$LOOPBACK:$PROMETHEUS_PORT"
    wait_for prometheus "GET /-/ready on $PROMETHEUS_PORT answers 200" http_ok "http://$LOOPBACK:$PROMETHEUS_PORT/-/ready"
    say "Prometheus: http://$LOOPBACK:$PROMETHEUS_PORT/ (Grafana: add it as a data source, import observability/dashboard.json)"
}

# need_binary VARIABLE PACKAGE: the binary VARIABLE names, or PACKAGE's release binary.
need_binary() {
    local variable=$1
    shift
    if [[ -z ${!variable:-} ]]; then
        command -v cargo >/dev/null || die "cargo is not installed (https://rustup.rs), and no $variable was given"
        build_release "$@" && return
    fi
    [[ -x ${!variable} ]] || die "$variable=${!variable} is not an executable file"
    say "using ${!variable}"
}

up() {
    local started=$SECONDS gateway=no mode=sentinel observability=no arg name port i store busy=()
    for arg in "$@"; do
        case $arg in --gateway) gateway=yes ;; --redis-cluster) mode="redis-cluster" ;; --observability) observability=yes ;; *) usage ;; esac
    done
    [[ $GATEWAY_FAIL_MODE == open || $GATEWAY_FAIL_MODE == closed ]] ||
        die "GATEWAY_FAIL_MODE must be open or closed, got \"$GATEWAY_FAIL_MODE\""
    [[ $NGINX_TO_INSTANCES == socket || $NGINX_TO_INSTANCES == tcp ]] ||
        die "NGINX_TO_INSTANCES must be socket or tcp, got \"$NGINX_TO_INSTANCES\""
    ! any_recorded_running "$PIDS_FILE" ||
        die "the cluster is already running (pids in $(rel "$PIDS_FILE")); run: scripts/cluster.sh down"
    for name in REDIS_PASSWORD REDIS_ADMIN_PASSWORD REDIS_REPLICA_PASSWORD SENTINEL_AUTH_PASSWORD SENTINEL_PASSWORD SENTINEL_SERVICE_PASSWORD; do
        [[ -n ${!name} && ${!name} != *[[:space:]\"\'\\]* ]] ||
            die "$name must be set, without spaces, quotes or backslashes (Sentinel rewrites it into its config unquoted)"
    done
    [[ $KEY_PREFIX != *[[:space:]*?\[\]\\]* ]] ||
        die "KEY_PREFIX must not contain spaces or glob characters (*?[]\\): the instances' Redis user is limited to \"\$KEY_PREFIX:*\""
    local ports=("${APP_PORTS[@]}" "${GRPC_PORTS[@]}" "$NGINX_PORT" "$GATEWAY_PORT")
    [[ $gateway == no ]] || ports+=("$UPSTREAM_PORT" "$UPSTREAM_COUNT_PORT")
    [[ $observability == no ]] || ports+=("$PROMETHEUS_PORT")
    [[ $mode == redis-cluster ]] || ports+=("${DATA_PORTS[@]}" "${SENTINEL_PORTS[@]}")
    [[ $mode == sentinel ]] || for port in "${CLUSTER_PORTS[@]}"; do ports+=("$port" $((port + 10000))); done
    for port in "${ports[@]}"; do port_open "$port" && busy+=("$port"); done
    ((${#busy[@]} == 0)) || die "port(s) already in use on $LOOPBACK: ${busy[*]} (see: ss -ltnp 'sport = :${busy[0]}')"
    need_binary RATELIMITER_BIN ratelimiter
    [[ $gateway == no ]] || need_binary DEMO_UPSTREAM_BIN demo-upstream

    say "run folder: $(rel "$CLUSTER_DIR")"
    mkdir -p "$CLUSTER_DIR"
    # The other topology's folders go too, so that `logs` shows this one's only.
    rm -rf "$PIDS_FILE" "$CLUSTER_DIR"/redis-* "$CLUSTER_DIR"/sentinel-*
    echo "$mode" >"$MODE_FILE"
    # From here on, a failure (or Ctrl-C) stops what was started; logs stay.
    trap 'code=$?; if ((code != 0)); then warn "up failed; stopping what was started"; down; fi' EXIT
    trap 'exit 130' INT TERM

    if [[ $mode == redis-cluster ]]; then
        start_redis_cluster
        store=("REDIS_CLUSTER_NODES=$(printf "$LOOPBACK:%s\n" "${CLUSTER_PORTS[@]:0:3}" | paste -sd, -)")
    else
        start_sentinel_group
        # The instances believe no master outside REDIS_DATA_NODES, whatever a sentinel names.
        store=("SENTINEL_HOSTS=$(printf "$LOOPBACK:%s\n" "${SENTINEL_PORTS[@]}" | paste -sd, -)"
            "REDIS_DATA_NODES=$(printf "$LOOPBACK:%s\n" "${DATA_PORTS[@]}" | paste -sd, -)"
            "REDIS_MASTER=$MASTER_NAME" "SENTINEL_USERNAME=ratelimiter" "SENTINEL_PASSWORD=$SENTINEL_SERVICE_PASSWORD")
    fi
    say "instances: RATE_LIMIT=${RATE_LIMIT:-(default)} TIME_WINDOW=${TIME_WINDOW:-(default)} BURST=${BURST:-(default)} FAIL_MODE=${FAIL_MODE:-(default)}"
    for i in 0 1; do
        rm -rf "${CLUSTER_DIR:?}/${APP_NAMES[i]}" && mkdir -p "$CLUSTER_DIR/${APP_NAMES[i]}"
        # REDIS_URL would name a single server instead; of the other two, this mode's only.
        # Each instance gets its share of the cores as actix workers (both share the machine).
        start "${APP_NAMES[i]}" "$CLUSTER_DIR/${APP_NAMES[i]}/app.log" env -u REDIS_URL -u SENTINEL_HOSTS \
            -u REDIS_MASTER -u REDIS_CLUSTER_NODES HOST="$LOOPBACK" PORT="${APP_PORTS[i]}" GRPC_PORT="${GRPC_PORTS[i]}" \
            RLS_CONFIG="${RLS_CONFIG:-$ROOT/config/rls.example.yaml}" \
            INSTANCE_NAME="${APP_NAMES[i]}" "${store[@]}" REDIS_USERNAME=ratelimiter \
            REDIS_PASSWORD="$REDIS_PASSWORD" KEY_PREFIX="$KEY_PREFIX" TRUSTED_PROXIES="$TRUSTED_PROXY" \
            UNIX_SOCKET="$(app_socket "$i")" UNIX_SOCKET_MODE="$SOCKET_MODE" \
            RUST_LOG="${RUST_LOG:-info}" WORKERS="${WORKERS:-$(($(nproc) / 2 > 1 ? $(nproc) / 2 : 1))}" "$BIN"
    done
    for i in 0 1; do wait_for "${APP_NAMES[i]}" "GET /ready on ${APP_PORTS[i]} answers 200" http_ok "http://$LOOPBACK:${APP_PORTS[i]}/ready"; done
    say "instances are ready: ${APP_NAMES[*]} on ${APP_PORTS[*]} (gRPC ${GRPC_PORTS[*]})"
    if [[ $gateway == yes ]]; then
        mkdir -p "$CLUSTER_DIR/demo-upstream"
        start demo-upstream "$CLUSTER_DIR/demo-upstream/demo-upstream.log" "$UPSTREAM_BIN" \
            --listen "$LOOPBACK:$UPSTREAM_PORT" --count-listen "$LOOPBACK:$UPSTREAM_COUNT_PORT"
        wait_for demo-upstream "GET /health on $UPSTREAM_COUNT_PORT answers 200" http_ok "http://$LOOPBACK:$UPSTREAM_COUNT_PORT/health"
        say "demo upstream is ready on $UPSTREAM_PORT (counts: http://$LOOPBACK:$UPSTREAM_COUNT_PORT/__upstream/count)"
        GATEWAY_UPSTREAM=$LOOPBACK:$UPSTREAM_PORT
    fi
    start_nginx
    [[ $observability == no ]] || start_prometheus

    trap - EXIT INT TERM
    local redis="master $LOOPBACK:$MASTER_PORT"
    [[ $mode == sentinel ]] || redis="Redis Cluster on $LOOPBACK:${CLUSTER_PORTS[0]}-${CLUSTER_PORTS[-1]}"
    say "the cluster is up in $((SECONDS - started))s: http://$LOOPBACK:$NGINX_PORT/ (Nginx) -> ${APP_NAMES[*]}; $redis"
    say "gateway: http://$LOOPBACK:$GATEWAY_PORT/ -> $GATEWAY_UPSTREAM (GATEWAY_FAIL_MODE=$GATEWAY_FAIL_MODE)"
}

# --- down, status, failover, logs ---------------------------------------------------

down() {
    [[ -f $PIDS_FILE ]] || { say "nothing to stop (no $(rel "$PIDS_FILE"))"; return 0; }
    # Newest first: Nginx, instances, sentinels (no failover while the data nodes stop), replicas.
    stop_recorded "$PIDS_FILE"
    say "stopped ($(recorded_mode) mode); logs remain in $(rel "$CLUSTER_DIR")"
}

# node_line PORT [ELECTED]: the data node's role and link from its INFO replication; fails
# unless it answers, as a replica has its link up, and as a master has a replica. A master
# the sentinels do not name (ELECTED, host:port) is stale: Sentinel demotes it in seconds.
node_line() {
    local info link replicas
    info=$(rcli "$1" INFO replication)
    link=$(sed -n 's/^master_link_status://p' <<<"$info") replicas=$(sed -n 's/^connected_slaves://p' <<<"$info")
    case $(sed -n 's/^role://p' <<<"$info") in
    master)
        [[ ${2:-$LOOPBACK:$1} == "$LOOPBACK:$1" ]] || { printf '  %s  master (stale: the sentinels name %s)\n' "$1" "$2" && return; }
        printf '  %s  master, %s replica(s) connected\n' "$1" "$replicas" && ((replicas > 0))
        ;;
    slave)
        printf '  %s  replica of %s, link %s\n' "$1" "$(sed -n 's/^master_host://p; s/^master_port://p' <<<"$info" | paste -sd: -)" "$link"
        [[ $link == up ]]
        ;;
    *) printf '  %s  not answering\n' "$1" && return 1 ;;
    esac
}

status() {
    local healthy=yes port addr code i
    if [[ $(recorded_mode) == redis-cluster ]]; then
        for port in "${CLUSTER_PORTS[@]}"; do answers "$port" && break; done
        say "Redis Cluster (redis-cli --cluster check $LOOPBACK:$port):"
        # Without its colours, which it prints even into a pipe.
        REDISCLI_AUTH=$REDIS_ADMIN_PASSWORD timeout 10 redis-cli --cluster check "$LOOPBACK:$port" 2>&1 |
            sed 's/\x1b\[[0-9;]*m//g; /^$/d; s/^/  /' || healthy=no
        say "nodes:"
        for port in "${CLUSTER_PORTS[@]}"; do node_line "$port" || healthy=no; done
    else
        say "data nodes:"
        addr=$(master_by "${SENTINEL_PORTS[0]}")
        for port in "${DATA_PORTS[@]}"; do node_line "$port" "$addr" || healthy=no; done
        say "sentinels (master of $MASTER_NAME according to each):"
        for port in "${SENTINEL_PORTS[@]}"; do
            addr=$(master_by "$port")
            [[ -n $addr ]] && addr+="; $(scli "$port" SENTINEL CKQUORUM "$MASTER_NAME")" || { addr="not answering" && healthy=no; }
            printf '  %s  %s\n' "$port" "$addr"
        done
    fi
    say "instances:"
    for i in 0 1; do probe "${APP_PORTS[i]}  ${APP_NAMES[i]}  /ready CODE" "${APP_PORTS[i]}/ready" || healthy=no; done
    probe "$NGINX_PORT  nginx  /health CODE" "$NGINX_PORT/health" || healthy=no
    # The gateway is only looked at: a request through it would reach the application.
    port_open "$GATEWAY_PORT" || healthy=no
    printf '  %s  nginx gateway  %slistening\n' "$GATEWAY_PORT" "$(port_open "$GATEWAY_PORT" || echo 'not ')"
    ! grep -qs '^demo-upstream ' "$PIDS_FILE" ||
        probe "$UPSTREAM_PORT  demo-upstream  /health CODE (counts on $UPSTREAM_COUNT_PORT)" "$UPSTREAM_COUNT_PORT/health" || healthy=no
    ! grep -qs '^prometheus ' "$PIDS_FILE" || probe "$PROMETHEUS_PORT  prometheus  /-/ready CODE" "$PROMETHEUS_PORT/-/ready" || healthy=no
    [[ $healthy == yes ]]
}

# probe LINE PORT/PATH: LINE with its CODE the status of GET PORT/PATH; fails unless 200.
probe() {
    local code
    code=$(http_code "http://$LOOPBACK:$2")
    printf '  %s\n' "${1/CODE/${code/000/not answering}}"
    [[ $code == 200 ]]
}

# Sentinel mode: every sentinel names a master other than $1.
master_moved_from() {
    local port addr
    for port in "${SENTINEL_PORTS[@]}"; do addr=$(master_by "$port") && [[ -n $addr && $addr != "$1" ]] || return 1; done
}
# min-replicas-to-write 1: a new master takes writes once a replica follows it.
takes_writes() {
    local good
    good=$(info_field "$1" replication min_slaves_good_slaves)
    [[ $(info_field "$1" replication role) == master ]] && ((${good:-0} >= 1))
}
# Cluster mode: $1 is a master followed by $2, and sees the cluster whole.
took_over_from() { [[ $(info_field "$1" replication role) == master ]] && replica_of "$2" "$1" && cluster_whole "$1"; }

failover_redis_cluster() {
    local started=$SECONDS port reply master="" replica=""
    # 06S is a key of slot 0 (CRC16 mod 16384): its master answers for it, any other node
    # names that master (MOVED 0 host:port).
    for port in "${CLUSTER_PORTS[@]}"; do
        reply=$(rcli "$port" EXISTS 06S)
        [[ $reply != [01] ]] || { master=$port && break; }
        [[ $reply != MOVED* ]] || { master=${reply##*:} && break; }
    done
    [[ -n $master ]] || die "no node answers on ${CLUSTER_PORTS[*]}; is the cluster up?"
    for port in "${CLUSTER_PORTS[@]}"; do replica_of "$port" "$master" && replica=$port && break; done
    [[ -n $replica ]] || die "the master of slot 0 ($master) has no linked replica to fail over to"
    say "master of slot 0: $LOOPBACK:$master; asking its replica $LOOPBACK:$replica to take over (CLUSTER FAILOVER)"
    reply=$(rcli "$replica" CLUSTER FAILOVER)
    [[ $reply == OK ]] || die "CLUSTER FAILOVER on $replica answered: ${reply:-nothing}"
    wait_for - "$replica is a master with $master its linked replica" took_over_from "$replica" "$master"
    say "failover done in $((SECONDS - started))s: $master -> $replica, which serves slot 0; $master follows it"
}

failover() {
    [[ $(recorded_mode) == sentinel ]] || { failover_redis_cluster; return; }
    local old new reply started=$SECONDS port
    for port in "${SENTINEL_PORTS[@]}"; do old=$(master_by "$port") && [[ -n $old ]] && break; done
    [[ -n $old ]] || die "no sentinel answers on ${SENTINEL_PORTS[*]}; is the cluster up?"
    say "current master: $old; asking sentinel ${SENTINEL_PORTS[0]} for a failover"
    reply=$(scli "${SENTINEL_PORTS[0]}" SENTINEL FAILOVER "$MASTER_NAME")
    [[ $reply == OK ]] || die "SENTINEL FAILOVER $MASTER_NAME answered: ${reply:-nothing}"
    wait_for - "the sentinels all name a new master (was $old)" master_moved_from "$old"
    new=$(master_by "${SENTINEL_PORTS[0]}")
    say "the sentinels name the new master: $new"
    wait_for - "the new master $new has a replica in sync" takes_writes "${new##*:}"
    say "failover done in $((SECONDS - started))s: $old -> $new, which takes writes"
}

logs() {
    local files=() follow=()
    [[ ${1:-} != -f ]] || follow=(-F)
    [[ -d $CLUSTER_DIR ]] && mapfile -t files < <(find "$CLUSTER_DIR" -name '*.log' | sort)
    ((${#files[@]} > 0)) || die "no logs in $(rel "$CLUSTER_DIR"); has the cluster been started?"
    say "mode: $(recorded_mode) ($(rel "$MODE_FILE"))"
    tail -n 20 "${follow[@]}" "${files[@]}"
}

# --- main -------------------------------------------------------------------------

tools=(redis-server=redis-server redis-sentinel=redis-sentinel redis-cli=redis-tools nginx=nginx-light curl=curl)
[[ " $* " != *" --observability "* ]] || tools+=(prometheus=prometheus)
[[ ${1:-} != --install ]] || { tools=(--install "${tools[@]}") && shift; }
command=${1:-}
shift $(($# > 0))
case $command in
up | failover) INSTALL_HINT="(or run: scripts/cluster.sh --install $command)" need_tools "${tools[@]}" && "$command" "$@" ;;
down | status) "$command" ;;
logs) logs "$@" ;;
*) usage ;;
esac

#!/usr/bin/env bash
# The whole distributed rate limiter on loopback, without containers:
#
#   Redis master 6379, replicas 6380 and 6381   (redis/master.conf, redis/replica.conf)
#   Sentinels 26379, 26380, 26381                (redis/sentinel.conf, one copy each)
#   or, with --redis-cluster, a Redis Cluster instead of both:
#   cluster nodes 7000-7005 (bus 17000-17005)    (redis/cluster-node.conf): 3 masters and 3
#                                                replicas, made by redis-cli --cluster create
#
# Every config is a template rendered into the run folder by scripts/render-config.sh, as
# docker/compose.yaml renders the same templates in its containers.
#   app-1 on 8001, app-2 on 8002                 (target/release/ratelimiter)
#   Nginx on 8000, and on 80 when it may bind it (nginx/nginx.conf.template): the public server
#   Nginx on 8080: the gateway, which asks an instance's /v1/check about every request and
#                  sends the admitted ones to GATEWAY_UPSTREAM (default 127.0.0.1:8081)
#   with --gateway: the demo upstream on 8081, its counts on 8082 (target/release/demo-upstream)
#
# Nginx reaches the instances from 127.0.0.2 (proxy_bind) and the instances trust only
# that address as a proxy, so a client on 127.0.0.1 that talks to an instance directly
# cannot choose its identity with X-Forwarded-For.
#
# Usage: scripts/cluster.sh [--install] up [--gateway] [--redis-cluster]|down|status|failover|logs [-f]
#
#   up        start everything, wait until it is ready (replication linked, sentinels
#             agree, instances ready) and say so; builds the release binary if needed
#             --gateway: also the demo upstream behind the gateway (GATEWAY_UPSTREAM is
#             then its address; curl http://127.0.0.1:8082/__upstream/count shows what
#             reached it)
#             --redis-cluster: a Redis Cluster instead of the Sentinel group (every slot
#             covered, every replica linked); the instances get REDIS_CLUSTER_NODES
#   down      stop exactly the processes `up` started (their recorded pids); idempotent
#   status    roles of the data nodes, the master per sentinel, each instance's /ready;
#             in Cluster mode the slot map: each master's slots and its replica
#   failover  SENTINEL FAILOVER, then wait until the new master takes writes; in Cluster
#             mode CLUSTER FAILOVER on the replica of the master of slot 0
#   logs      the last lines of every log; `logs -f` follows them
#   --install install missing packages with apt-get first (never done otherwise)
#
# Environment: every variable the service reads (README.md) passes through to both
# instances (RATE_LIMIT, TIME_WINDOW, BURST, FAIL_MODE, DENY_CACHE_SIZE, ...), except
# REDIS_URL, SENTINEL_HOSTS and REDIS_CLUSTER_NODES, which this topology sets (one of the
# last two, by mode), and REDIS_USERNAME (ratelimiter, the instances'
# user of redis/users.acl). The passwords, each with a default for loopback development only:
#   REDIS_PASSWORD          the instances' user on the data nodes (ratelimiter-dev-password)
#   REDIS_ADMIN_PASSWORD    the data nodes' default user, for operators and this script
#   REDIS_REPLICA_PASSWORD  the replication user (masteruser/masterauth)
#   SENTINEL_AUTH_PASSWORD  the sentinels' user on the data nodes
#   SENTINEL_PASSWORD       what every sentinel requires (the instances use it too)
# KEY_PREFIX (default ratelimit) is also what the instances' user may touch (redis/users.acl).
# WORKERS defaults to half the CPUs (at least 1): the two instances share the machine.
# GATEWAY_UPSTREAM (host:port, default 127.0.0.1:8081) is the application the gateway guards;
# GATEWAY_FAIL_MODE (closed, the default, or open) what the gateway does when no instance
# answers its check (README.md, "Put it in front of your API").
# CLUSTER_DIR (default run/cluster, ignored by git) holds configs, data, logs and pids, and
# in the file `mode` which of the two Redis topologies `up` started (sentinel or
# redis-cluster), which `status`, `failover` and `logs` follow.
# CLUSTER_PORT_OFFSET (default 0) is added to every port above (data nodes, sentinels,
# Cluster mode's nodes, instances, Nginx, gateway, demo upstream), so a second cluster
# (scripts/soak.sh uses 1000: Nginx on 9000, master 7379) runs beside one on the default
# ports; give it its own CLUSTER_DIR too. With an offset, Nginx never listens on port 80.
# CLUSTER_WAIT_SECS (default 30) bounds each wait. RATELIMITER_BIN runs another binary
# instead of building target/release/ratelimiter; DEMO_UPSTREAM_BIN likewise for
# target/release/demo-upstream.
set -euo pipefail

# A CLUSTER_DIR given relative to where the script was called from stays that.
[[ -z ${CLUSTER_DIR:-} ]] || CLUSTER_DIR=$(realpath -m -- "$CLUSTER_DIR")
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

CLUSTER_DIR=${CLUSTER_DIR:-$ROOT/run/cluster}
PIDS_FILE=$CLUSTER_DIR/pids
MODE_FILE=$CLUSTER_DIR/mode
WAIT_SECS=${CLUSTER_WAIT_SECS:-30}

# The default passwords of the native cluster: loopback development only.
REDIS_PASSWORD=${REDIS_PASSWORD:-ratelimiter-dev-password}
REDIS_ADMIN_PASSWORD=${REDIS_ADMIN_PASSWORD:-ratelimiter-dev-admin-password}
REDIS_REPLICA_PASSWORD=${REDIS_REPLICA_PASSWORD:-ratelimiter-dev-replica-password}
SENTINEL_AUTH_PASSWORD=${SENTINEL_AUTH_PASSWORD:-ratelimiter-dev-sentinel-auth-password}
SENTINEL_PASSWORD=${SENTINEL_PASSWORD:-ratelimiter-dev-sentinel-password}
PASSWORD_NAMES=(REDIS_PASSWORD REDIS_ADMIN_PASSWORD REDIS_REPLICA_PASSWORD SENTINEL_AUTH_PASSWORD SENTINEL_PASSWORD)
# The instances' user of redis/users.acl, and the keys it may touch.
REDIS_USERNAME=ratelimiter
KEY_PREFIX=${KEY_PREFIX:-ratelimit}

PORT_OFFSET=${CLUSTER_PORT_OFFSET:-0}
[[ $PORT_OFFSET =~ ^[0-9]+$ ]] && ((PORT_OFFSET <= 30000)) ||
    die "CLUSTER_PORT_OFFSET must be a whole number from 0 to 30000, got \"$PORT_OFFSET\""
PROXY_ADDR=127.0.0.2
MASTER_NAME=redis-master
MASTER_PORT=$((6379 + PORT_OFFSET))
REPLICA_PORTS=($((6380 + PORT_OFFSET)) $((6381 + PORT_OFFSET)))
DATA_PORTS=("$MASTER_PORT" "${REPLICA_PORTS[@]}")
SENTINEL_PORTS=($((26379 + PORT_OFFSET)) $((26380 + PORT_OFFSET)) $((26381 + PORT_OFFSET)))
# Cluster mode: six nodes, of which redis-cli --cluster create makes three masters. Each also
# listens on its port + 10000, the cluster bus.
CLUSTER_PORTS=()
for port in 7000 7001 7002 7003 7004 7005; do CLUSTER_PORTS+=($((port + PORT_OFFSET))); done
CLUSTER_SLOTS=16384
APP_NAMES=(app-1 app-2)
APP_PORTS=($((8001 + PORT_OFFSET)) $((8002 + PORT_OFFSET)))
NGINX_PORT=$((8000 + PORT_OFFSET))
GATEWAY_PORT=$((8080 + PORT_OFFSET))
UPSTREAM_PORT=$((8081 + PORT_OFFSET))
UPSTREAM_COUNT_PORT=$((8082 + PORT_OFFSET))
GATEWAY_UPSTREAM=${GATEWAY_UPSTREAM:-$LOOPBACK:$UPSTREAM_PORT}
GATEWAY_FAIL_MODE=${GATEWAY_FAIL_MODE:-closed}

# Both instances share this machine's cores with Nginx and Redis: each gets its share as
# actix workers rather than one per core, which would put twice as many busy threads as
# cores and have them preempt each other (WORKERS overrides).
INSTANCE_WORKERS=$(( $(nproc) / 2 > 1 ? $(nproc) / 2 : 1 ))

BIN=${RATELIMITER_BIN:-$(release_binary ratelimiter)}
UPSTREAM_BIN=${DEMO_UPSTREAM_BIN:-$(release_binary demo-upstream)}

usage() {
    script_usage "${BASH_SOURCE[0]}" '^#   --install' >&2
    exit 2
}

# --- tools ------------------------------------------------------------------------

check_tools() {
    local options=()
    [[ $1 == yes ]] && options=(--install)
    INSTALL_HINT="(or run: scripts/cluster.sh --install up)" need_tools "${options[@]}" \
        redis-server=redis-server redis-sentinel=redis-sentinel redis-cli=redis-tools \
        nginx=nginx-light curl=curl
}

# --- helpers ----------------------------------------------------------------------

# redis-cli against a data node as its default (operators') user, authenticated through the
# environment (not argv). Prints the reply without carriage returns, or nothing when the
# node does not answer; callers judge the reply, never the exit status.
rcli() {
    local port=$1 reply
    shift
    reply=$(REDISCLI_AUTH=$REDIS_ADMIN_PASSWORD timeout 3 redis-cli -h "$LOOPBACK" -p "$port" "$@" 2>/dev/null) || true
    printf '%s\n' "${reply//$'\r'/}"
}

# redis-cli against a sentinel, likewise.
scli() {
    local port=$1 reply
    shift
    reply=$(REDISCLI_AUTH=$SENTINEL_PASSWORD timeout 3 redis-cli -h "$LOOPBACK" -p "$port" "$@" 2>/dev/null) || true
    printf '%s\n' "${reply//$'\r'/}"
}

# The value of FIELD in an INFO section of a data node; empty when it does not answer.
info_field() {
    local port=$1 section=$2 field=$3 info
    info=$(rcli "$port" INFO "$section")
    sed -n "s/^$field://p" <<<"$info"
}

# The master's host:port according to the sentinel on PORT; empty when it does not answer.
master_by() {
    local reply
    reply=$(scli "$1" SENTINEL GET-MASTER-ADDR-BY-NAME "$MASTER_NAME")
    [[ $reply == *$'\n'* ]] && printf '%s:%s\n' "${reply%%$'\n'*}" "${reply#*$'\n'}"
    return 0
}

can_bind_port_80() {
    [[ $(id -u) == 0 ]] && return 0
    local start
    start=$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start 2>/dev/null || echo 1024)
    ((start <= 80))
}

# Start a process in the background with its output in LOG, and record its pid and
# start time, so that `down` stops that process and no other.
start() {
    record_start "$PIDS_FILE" "$@"
}

# The record (pid, start time) of NAME.
record_of() {
    local name=$1 n pid since log
    while read -r n pid since log; do
        [[ $n == "$name" ]] && echo "$pid $since"
    done <"$PIDS_FILE"
    return 0
}

log_of() {
    local name=$1 n pid since log
    while read -r n pid since log; do
        [[ $n == "$name" ]] && echo "$log"
    done <"$PIDS_FILE"
    return 0
}

# Fail naming what is not ready and why, with the end of its log.
not_ready() {
    local name=$1 why=$2 log
    log=$(log_of "$name")
    warn "error: $name $why"
    if [[ -n $log && -f $log ]]; then
        warn "last lines of ${log#"$ROOT"/}:"
        tail -n 15 "$log" | sed 's/^/    /' >&2
    fi
    exit 1
}

# Poll CHECK (a command) until it succeeds, at most WAIT_SECS; fail naming NAME if the
# process died or the time ran out.
wait_for() {
    local name=$1 what=$2
    shift 2
    local deadline=$((SECONDS + WAIT_SECS))
    until "$@"; do
        # shellcheck disable=SC2046 # the record is two words on purpose
        still_running $(record_of "$name") || not_ready "$name" "exited before it was ready (waiting until $what)"
        ((SECONDS < deadline)) || not_ready "$name" "is not ready after ${WAIT_SECS}s (waiting until $what)"
        sleep 0.2
    done
}

# --- up ---------------------------------------------------------------------------

# check_ports_free MODE PORT...: the ports of the topology of MODE, and these, are free.
check_ports_free() {
    local mode=$1 port busy=() redis_ports=()
    shift
    if [[ $mode == redis-cluster ]]; then
        for port in "${CLUSTER_PORTS[@]}"; do redis_ports+=("$port" $((port + 10000))); done
    else
        redis_ports=("${DATA_PORTS[@]}" "${SENTINEL_PORTS[@]}")
    fi
    for port in "${redis_ports[@]}" "${APP_PORTS[@]}" "$NGINX_PORT" "$GATEWAY_PORT" "$@"; do
        port_open "$port" && busy+=("$port")
    done
    ((${#busy[@]} == 0)) ||
        die "port(s) already in use on $LOOPBACK: ${busy[*]} (see: ss -ltnp 'sport = :${busy[0]}')"
}

build_binary() {
    if [[ -n ${RATELIMITER_BIN:-} ]]; then
        [[ -x $BIN ]] || die "RATELIMITER_BIN=$BIN is not an executable file"
        say "using $BIN"
        return 0
    fi
    command -v cargo >/dev/null ||
        die "cargo is not installed (https://rustup.rs), and no RATELIMITER_BIN was given"
    build_service
}

build_upstream_binary() {
    if [[ -n ${DEMO_UPSTREAM_BIN:-} ]]; then
        [[ -x $UPSTREAM_BIN ]] || die "DEMO_UPSTREAM_BIN=$UPSTREAM_BIN is not an executable file"
        say "using $UPSTREAM_BIN"
        return 0
    fi
    command -v cargo >/dev/null ||
        die "cargo is not installed (https://rustup.rs), and no DEMO_UPSTREAM_BIN was given"
    build_demo_upstream
}

# The configs: the shared templates, rendered the one way (scripts/render-config.sh).
# A data node's users (redis/users.acl) go beside its config, which loads them from there.
render_data_conf() {
    REDIS_ADMIN_PASSWORD=$REDIS_ADMIN_PASSWORD REDIS_PASSWORD=$REDIS_PASSWORD KEY_PREFIX=$KEY_PREFIX \
        REDIS_REPLICA_PASSWORD=$REDIS_REPLICA_PASSWORD SENTINEL_AUTH_PASSWORD=$SENTINEL_AUTH_PASSWORD \
        scripts/render-config.sh redis/users.acl "$(dirname "$2")/users.acl"
    REDIS_REPLICA_PASSWORD=$REDIS_REPLICA_PASSWORD scripts/render-config.sh "$1" "$2"
}

render_sentinel_conf() {
    MASTER_HOST=$LOOPBACK MASTER_PORT=$MASTER_PORT SENTINEL_AUTH_PASSWORD=$SENTINEL_AUTH_PASSWORD \
        SENTINEL_PASSWORD=$SENTINEL_PASSWORD scripts/render-config.sh redis/sentinel.conf "$1"
}

render_nginx_conf() {
    local prefix=$1 out=$2 listen
    listen="listen $LOOPBACK:$NGINX_PORT;"
    if ((PORT_OFFSET != 0)); then
        say "note: not listening on port 80 (CLUSTER_PORT_OFFSET=$PORT_OFFSET); port $NGINX_PORT only"
    elif ! can_bind_port_80; then
        say "note: not listening on port 80 (needs root or net.ipv4.ip_unprivileged_port_start <= 80); port $NGINX_PORT only"
    elif port_open 80; then
        say "note: port 80 is already in use; Nginx listens on port $NGINX_PORT only"
    else
        listen+=" listen $LOOPBACK:80;"
    fi
    PID_FILE=$prefix/nginx.pid ERROR_LOG=$prefix/logs/error.log ACCESS_LOG=$prefix/logs/access.log \
        TEMP_DIR=$prefix/temp LISTEN=$listen APP_1=$LOOPBACK:${APP_PORTS[0]} \
        APP_2=$LOOPBACK:${APP_PORTS[1]} PROXY_BIND=$PROXY_ADDR \
        GATEWAY_LISTEN="listen $LOOPBACK:$GATEWAY_PORT;" GATEWAY_UPSTREAM=$GATEWAY_UPSTREAM \
        GATEWAY_FAIL_MODE=$GATEWAY_FAIL_MODE \
        scripts/render-config.sh nginx/nginx.conf.template "$out"
}

replica_linked() {
    [[ $(info_field "$1" replication master_link_status) == up ]]
}

data_node_answers() {
    [[ $(rcli "$1" PING) == PONG ]]
}

sentinel_ready() {
    local port=$1 master
    # It agrees with the others (quorum reachable, a majority to authorize a failover)
    # and knows both replicas, so a failover can start right away.
    [[ $(scli "$port" SENTINEL CKQUORUM "$MASTER_NAME") == OK* ]] || return 1
    master=$(scli "$port" SENTINEL MASTER "$MASTER_NAME")
    [[ $(sed -n '/^num-slaves$/{n;p}' <<<"$master") == "${#REPLICA_PORTS[@]}" ]]
}

# The mode `up` recorded in the run folder: sentinel (also when nothing was recorded, as
# before the file existed) or redis-cluster.
recorded_mode() {
    local mode=sentinel
    [[ -s $MODE_FILE ]] && mode=$(<"$MODE_FILE")
    echo "$mode"
}

# The node on PORT sees a cluster of all six nodes with every slot served.
cluster_whole() {
    local port=$1 info
    info=$(rcli "$port" CLUSTER INFO)
    [[ $info == *cluster_state:ok* && $info == *"cluster_slots_ok:$CLUSTER_SLOTS"* &&
        $info == *"cluster_known_nodes:${#CLUSTER_PORTS[@]}"* ]]
}

# Three masters answer, and every other node is a replica with its link up.
replicas_linked() {
    local port role masters=0
    for port in "${CLUSTER_PORTS[@]}"; do
        role=$(info_field "$port" replication role)
        case $role in
        master) masters=$((masters + 1)) ;;
        slave) replica_linked "$port" || return 1 ;;
        *) return 1 ;;
        esac
    done
    ((masters == ${#CLUSTER_PORTS[@]} / 2)) || return 1
    # And every node has heard so: until gossip reaches it, a node lists a new replica as a
    # master without slots.
    for port in "${CLUSTER_PORTS[@]}"; do
        (($(rcli "$port" CLUSTER NODES | awk '$3 ~ /(^|,)slave(,|$)/' | grep -c .) == masters)) || return 1
    done
}

# The Redis Cluster of Cluster mode: six empty nodes, joined by redis-cli --cluster create.
start_redis_cluster() {
    local port dir addresses=()
    for port in "${CLUSTER_PORTS[@]}"; do
        dir=$CLUSTER_DIR/redis-cluster-$port
        rm -rf "$dir" && mkdir -m 700 "$dir"
        render_data_conf redis/cluster-node.conf "$dir/redis.conf"
        start "redis-cluster-$port" "$dir/redis.log" redis-server "$dir/redis.conf" \
            --port "$port" --bind "$LOOPBACK" --dir "$dir"
        addresses+=("$LOOPBACK:$port")
    done
    for port in "${CLUSTER_PORTS[@]}"; do
        wait_for "redis-cluster-$port" "it answers PING on port $port" data_node_answers "$port"
    done
    local log=$CLUSTER_DIR/redis-cluster-create.log
    say "redis-cli --cluster create ${addresses[*]} --cluster-replicas 1 (log: $(rel "$log"))"
    REDISCLI_AUTH=$REDIS_ADMIN_PASSWORD timeout "$WAIT_SECS" redis-cli --cluster create "${addresses[@]}" \
        --cluster-replicas 1 --cluster-yes </dev/null >"$log" 2>&1 || {
        warn "last lines of $(rel "$log"):"
        tail -n 15 "$log" | sed 's/^/    /' >&2
        die "redis-cli --cluster create failed"
    }
    for port in "${CLUSTER_PORTS[@]}"; do
        wait_for "redis-cluster-$port" "CLUSTER INFO shows cluster_state:ok, $CLUSTER_SLOTS slots served, ${#CLUSTER_PORTS[@]} nodes known" \
            cluster_whole "$port"
    done
    wait_for "redis-cluster-${CLUSTER_PORTS[0]}" "three masters answer, every replica's link is up and every node lists the three replicas" replicas_linked
    say "the Redis Cluster is whole: every slot served, every replica linked (${CLUSTER_PORTS[0]}-${CLUSTER_PORTS[-1]})"
}

up() {
    local started=$SECONDS gateway=no mode=sentinel arg
    for arg in "$@"; do
        case $arg in
        --gateway) gateway=yes ;;
        --redis-cluster) mode=redis-cluster ;;
        *) usage ;;
        esac
    done
    [[ $GATEWAY_FAIL_MODE == open || $GATEWAY_FAIL_MODE == closed ]] ||
        die "GATEWAY_FAIL_MODE must be open or closed, got \"$GATEWAY_FAIL_MODE\""
    if any_recorded_running "$PIDS_FILE"; then
        die "the cluster is already running (pids in ${PIDS_FILE#"$ROOT"/}); run: scripts/cluster.sh down"
    fi
    local name
    for name in "${PASSWORD_NAMES[@]}"; do
        [[ -n ${!name} ]] || die "$name must not be empty: every data node user and every sentinel has a password"
        # Sentinel writes these into its config file unquoted when it rewrites it, and an
        # ACL file splits its lines at spaces.
        [[ ${!name} != *[[:space:]\"\'\\]* ]] ||
            die "$name must not contain spaces, quotes or backslashes (Sentinel rewrites it into its config unquoted)"
    done
    [[ $KEY_PREFIX != *[[:space:]*?\[\]\\]* ]] ||
        die "KEY_PREFIX must not contain spaces or glob characters (*?[]\\): the instances' Redis user is limited to \"\$KEY_PREFIX:*\""
    if [[ $gateway == yes ]]; then
        check_ports_free "$mode" "$UPSTREAM_PORT" "$UPSTREAM_COUNT_PORT"
    else
        check_ports_free "$mode"
    fi
    build_binary
    [[ $gateway == no ]] || build_upstream_binary

    say "run folder: ${CLUSTER_DIR#"$ROOT"/}"
    mkdir -p "$CLUSTER_DIR"
    rm -f "$PIDS_FILE"
    echo "$mode" >"$MODE_FILE"
    # From here on, a failure (or Ctrl-C) stops what was started; logs stay.
    trap 'code=$?; if ((code != 0)); then warn "up failed; stopping what was started"; down; fi' EXIT
    trap 'exit 130' INT TERM

    local port dir i store_env
    if [[ $mode == redis-cluster ]]; then
        # The other topology's folders go, so that `logs` shows this one's only.
        rm -rf "${DATA_PORTS[@]/#/$CLUSTER_DIR/redis-}" "${SENTINEL_PORTS[@]/#/$CLUSTER_DIR/sentinel-}"
        start_redis_cluster
        store_env=("REDIS_CLUSTER_NODES=$(printf "$LOOPBACK:%s," "${CLUSTER_PORTS[@]:0:3}")")
        store_env[0]=${store_env[0]%,}
    else
        rm -rf "${CLUSTER_PORTS[@]/#/$CLUSTER_DIR/redis-cluster-}" "$CLUSTER_DIR/redis-cluster-create.log"
        start_sentinel_group
        local sentinel_hosts data_nodes
        sentinel_hosts=$(printf "$LOOPBACK:%s," "${SENTINEL_PORTS[@]}")
        # The instances believe no master outside these, whatever a sentinel names.
        data_nodes=$(printf "$LOOPBACK:%s," "${DATA_PORTS[@]}")
        store_env=("SENTINEL_HOSTS=${sentinel_hosts%,}" "REDIS_MASTER=$MASTER_NAME"
            "REDIS_DATA_NODES=${data_nodes%,}" "SENTINEL_PASSWORD=$SENTINEL_PASSWORD")
    fi

    say "instances: RATE_LIMIT=${RATE_LIMIT:-(default)} TIME_WINDOW=${TIME_WINDOW:-(default)} BURST=${BURST:-(default)} FAIL_MODE=${FAIL_MODE:-(default)}"
    for i in "${!APP_NAMES[@]}"; do
        dir=$CLUSTER_DIR/${APP_NAMES[i]}
        rm -rf "$dir" && mkdir -p "$dir"
        # REDIS_URL would name a single server instead: not this topology; and of the
        # other two, only this mode's own.
        start "${APP_NAMES[i]}" "$dir/app.log" env -u REDIS_URL -u SENTINEL_HOSTS -u REDIS_MASTER \
            -u REDIS_CLUSTER_NODES \
            HOST="$LOOPBACK" PORT="${APP_PORTS[i]}" INSTANCE_NAME="${APP_NAMES[i]}" \
            "${store_env[@]}" \
            REDIS_USERNAME="$REDIS_USERNAME" REDIS_PASSWORD="$REDIS_PASSWORD" KEY_PREFIX="$KEY_PREFIX" \
            TRUSTED_PROXIES="$PROXY_ADDR" \
            RUST_LOG="${RUST_LOG:-info}" WORKERS="${WORKERS:-$INSTANCE_WORKERS}" \
            "$BIN"
    done
    for i in "${!APP_NAMES[@]}"; do
        wait_for "${APP_NAMES[i]}" "GET http://$LOOPBACK:${APP_PORTS[i]}/ready answers 200" \
            http_ok "http://$LOOPBACK:${APP_PORTS[i]}/ready"
    done
    say "instances are ready: ${APP_NAMES[*]} on ${APP_PORTS[*]}"

    if [[ $gateway == yes ]]; then
        dir=$CLUSTER_DIR/demo-upstream
        rm -rf "$dir" && mkdir -p "$dir"
        start demo-upstream "$dir/demo-upstream.log" "$UPSTREAM_BIN" \
            --listen "$LOOPBACK:$UPSTREAM_PORT" --count-listen "$LOOPBACK:$UPSTREAM_COUNT_PORT"
        wait_for demo-upstream "GET http://$LOOPBACK:$UPSTREAM_COUNT_PORT/health answers 200" \
            http_ok "http://$LOOPBACK:$UPSTREAM_COUNT_PORT/health"
        say "demo upstream is ready on $UPSTREAM_PORT (counts: http://$LOOPBACK:$UPSTREAM_COUNT_PORT/__upstream/count)"
        GATEWAY_UPSTREAM=$LOOPBACK:$UPSTREAM_PORT
    fi

    dir=$CLUSTER_DIR/nginx
    rm -rf "$dir" && mkdir -p "$dir/logs" "$dir/temp"
    render_nginx_conf "$dir" "$dir/nginx.conf"
    # -e: the log Nginx opens before it reads its config (the built-in one is root's).
    nginx -t -q -e "$dir/logs/error.log" -p "$dir/" -c "$dir/nginx.conf" ||
        die "nginx rejects ${dir#"$ROOT"/}/nginx.conf (rendered from nginx/nginx.conf.template)"
    start nginx "$dir/logs/error.log" nginx -e "$dir/logs/error.log" -p "$dir/" -c "$dir/nginx.conf"
    wait_for nginx "GET http://$LOOPBACK:$NGINX_PORT/health answers 200" \
        http_ok "http://$LOOPBACK:$NGINX_PORT/health"
    wait_for nginx "the gateway listens on $GATEWAY_PORT" port_open "$GATEWAY_PORT"

    trap - EXIT INT TERM
    local redis=" master $LOOPBACK:$MASTER_PORT"
    [[ $mode == sentinel ]] || redis=" Redis Cluster on $LOOPBACK:${CLUSTER_PORTS[0]}-${CLUSTER_PORTS[-1]}"
    say "the cluster is up in $((SECONDS - started))s: http://$LOOPBACK:$NGINX_PORT/ (Nginx) -> ${APP_NAMES[*]};$redis"
    say "gateway: http://$LOOPBACK:$GATEWAY_PORT/ -> $GATEWAY_UPSTREAM (GATEWAY_FAIL_MODE=$GATEWAY_FAIL_MODE)"
}

# The Sentinel group: a master, two replicas, three sentinels.
start_sentinel_group() {
    local port dir
    for port in "${DATA_PORTS[@]}"; do
        dir=$CLUSTER_DIR/redis-$port
        # Private: Redis and Sentinel rewrite their configs, password included, as 0644.
        rm -rf "$dir" && mkdir -m 700 "$dir"
        if [[ $port == "$MASTER_PORT" ]]; then
            render_data_conf redis/master.conf "$dir/redis.conf"
            start "redis-$port" "$dir/redis.log" redis-server "$dir/redis.conf" \
                --port "$port" --bind "$LOOPBACK" --dir "$dir"
            wait_for "redis-$port" "it answers PING on port $port" data_node_answers "$port"
        else
            render_data_conf redis/replica.conf "$dir/redis.conf"
            start "redis-$port" "$dir/redis.log" redis-server "$dir/redis.conf" \
                --port "$port" --bind "$LOOPBACK" --dir "$dir" \
                --replicaof "$LOOPBACK" "$MASTER_PORT"
        fi
    done
    for port in "${REPLICA_PORTS[@]}"; do
        wait_for "redis-$port" "INFO replication shows master_link_status:up (replica of $LOOPBACK:$MASTER_PORT)" \
            replica_linked "$port"
    done
    say "replication is linked: $MASTER_PORT -> ${REPLICA_PORTS[*]}"

    for port in "${SENTINEL_PORTS[@]}"; do
        dir=$CLUSTER_DIR/sentinel-$port
        rm -rf "$dir" && mkdir -m 700 "$dir"
        render_sentinel_conf "$dir/sentinel.conf"
        start "sentinel-$port" "$dir/sentinel.log" redis-sentinel "$dir/sentinel.conf" \
            --port "$port" --bind "$LOOPBACK" --dir "$dir"
    done
    for port in "${SENTINEL_PORTS[@]}"; do
        wait_for "sentinel-$port" "SENTINEL CKQUORUM $MASTER_NAME is OK and it knows both replicas" \
            sentinel_ready "$port"
    done
    say "sentinels agree (CKQUORUM OK on ${SENTINEL_PORTS[*]})"
}

# --- down -------------------------------------------------------------------------

down() {
    if [[ ! -f $PIDS_FILE ]]; then
        say "nothing to stop (no ${PIDS_FILE#"$ROOT"/})"
        return 0
    fi
    # Reverse start order: Nginx, instances, sentinels (no failover while the data nodes
    # stop), replicas, master.
    stop_recorded "$PIDS_FILE"
    say "stopped ($(recorded_mode) mode); logs remain in ${CLUSTER_DIR#"$ROOT"/}"
}

# --- status -----------------------------------------------------------------------

# The master's address according to the first sentinel that answers.
current_master() {
    local port addr
    for port in "${SENTINEL_PORTS[@]}"; do
        addr=$(master_by "$port")
        [[ -n $addr ]] && {
            echo "$addr"
            return 0
        }
    done
    return 1
}

# CLUSTER NODES of the first node that answers, and that node's port on the first line.
cluster_nodes() {
    local port nodes
    for port in "${CLUSTER_PORTS[@]}"; do
        nodes=$(rcli "$port" CLUSTER NODES)
        if [[ -n ${nodes//[[:space:]]/} ]]; then
            printf '%s\n%s\n' "$port" "$nodes"
            return 0
        fi
    done
    return 1
}

# The slot map from CLUSTER NODES (on stdin, after the line naming who was asked): per
# master its slots and its replicas, then the nodes the cluster counts as failed.
# Lines: "master PORT SLOTS COUNT REPLICA-PORTS", "failed PORT FLAGS".
slot_map() {
    awk '
        NR == 1 { next }
        {
            addr = $2; sub(/@.*/, "", addr); port = addr; sub(/.*:/, "", port)
            port_of[$1] = port
            is_master = is_failed = 0
            n = split($3, flags, ",")
            for (i = 1; i <= n; i++) {
                if (flags[i] == "master") is_master = 1
                if (flags[i] == "fail") is_failed = 1
            }
            if (is_failed) { failed[port] = $3 }
            if (is_master && !is_failed) {
                masters[port] = 1; ranges = ""; count = 0
                for (i = 9; i <= NF; i++) {
                    if ($i ~ /^\[/) continue
                    n = split($i, ends, "-")
                    count += (n == 2) ? ends[2] - ends[1] + 1 : 1
                    ranges = ranges (ranges == "" ? "" : ",") $i
                }
                slots[port] = (ranges == "" ? "none" : ranges); counts[port] = count
            } else if ($4 != "-") { follows[port] = $4 }
        }
        END {
            for (r in follows) if (!(r in failed)) replicas[port_of[follows[r]]] = replicas[port_of[follows[r]]] " " r
            for (m in masters) printf "master %s %s %d%s\n", m, slots[m], counts[m], replicas[m]
            for (f in failed) printf "failed %s %s\n", f, failed[f]
        }' | sort -k1,1r -k2n
}

status_redis_cluster() {
    local healthy=yes nodes asked line kind port slots count replica role link masters=0 info
    say "Redis Cluster:"
    if ! nodes=$(cluster_nodes); then
        printf '  no node answers on %s\n' "${CLUSTER_PORTS[*]}"
        return 1
    fi
    asked=${nodes%%$'\n'*}
    info=$(rcli "$asked" CLUSTER INFO)
    printf '  as %s sees it: cluster_state:%s, %s of %s slots served, %s nodes known\n' "$asked" \
        "$(sed -n 's/^cluster_state://p' <<<"$info")" "$(sed -n 's/^cluster_slots_ok://p' <<<"$info")" \
        "$CLUSTER_SLOTS" "$(sed -n 's/^cluster_known_nodes://p' <<<"$info")"
    cluster_whole "$asked" || healthy=no
    while read -r kind port slots count replica; do
        case $kind in
        master)
            masters=$((masters + 1))
            printf '  %s  master of slots %s (%s slots)\n' "$port" "$slots" "$count"
            if [[ -z $replica ]]; then
                printf '          no replica\n'
                healthy=no
            fi
            for replica in $replica; do
                link=$(info_field "$replica" replication master_link_status)
                printf '          replica %s, link %s\n' "$replica" "${link:-not answering}"
                [[ $link == up ]] || healthy=no
            done
            ;;
        failed)
            printf '  %s  failed (%s)\n' "$port" "$slots"
            healthy=no
            ;;
        esac
    done < <(slot_map <<<"$nodes")
    ((masters == ${#CLUSTER_PORTS[@]} / 2)) || healthy=no
    for port in "${CLUSTER_PORTS[@]}"; do
        role=$(info_field "$port" replication role)
        [[ -n $role ]] || {
            printf '  %s  not answering\n' "$port"
            healthy=no
        }
    done
    [[ $healthy == yes ]]
}

status() {
    local port role healthy=yes addr code i elected note
    if [[ $(recorded_mode) == redis-cluster ]]; then
        status_redis_cluster || healthy=no
        status_front || healthy=no
        [[ $healthy == yes ]]
        return
    fi
    elected=$(current_master || true)
    say "data nodes:"
    for port in "${DATA_PORTS[@]}"; do
        role=$(info_field "$port" replication role)
        case $role in
        master)
            note=
            [[ -z $elected || $elected == "$LOOPBACK:$port" ]] ||
                note=" (stale: the sentinels name $elected; Sentinel turns it into a replica within about 10s)"
            printf '  %s  master, %s replica(s) connected, %s with lag <= min-replicas-max-lag%s\n' "$port" \
                "$(info_field "$port" replication connected_slaves)" \
                "$(info_field "$port" replication min_slaves_good_slaves)" "$note"
            ;;
        slave)
            printf '  %s  replica of %s:%s, link %s\n' "$port" \
                "$(info_field "$port" replication master_host)" \
                "$(info_field "$port" replication master_port)" \
                "$(info_field "$port" replication master_link_status)"
            ;;
        *)
            printf '  %s  not answering\n' "$port"
            healthy=no
            ;;
        esac
    done
    say "sentinels (master of $MASTER_NAME according to each):"
    for port in "${SENTINEL_PORTS[@]}"; do
        addr=$(master_by "$port")
        if [[ -n $addr ]]; then
            printf '  %s  %s; %s\n' "$port" "$addr" "$(scli "$port" SENTINEL CKQUORUM "$MASTER_NAME")"
        else
            printf '  %s  not answering\n' "$port"
            healthy=no
        fi
    done
    status_front || healthy=no
    [[ $healthy == yes ]]
}

# The instances, Nginx and the demo upstream.
status_front() {
    local healthy=yes code i
    say "instances:"
    for i in "${!APP_NAMES[@]}"; do
        code=$(http_code "http://$LOOPBACK:${APP_PORTS[i]}/ready")
        printf '  %s  %s  /ready %s\n' "${APP_PORTS[i]}" "${APP_NAMES[i]}" "${code/000/not answering}"
        [[ $code == 200 ]] || healthy=no
    done
    code=$(http_code "http://$LOOPBACK:$NGINX_PORT/health")
    printf '  %s  nginx  /health %s\n' "$NGINX_PORT" "${code/000/not answering}"
    [[ $code == 200 ]] || healthy=no
    # The gateway is only looked at: a request through it would reach the application.
    if port_open "$GATEWAY_PORT"; then
        printf '  %s  nginx gateway  listening\n' "$GATEWAY_PORT"
    else
        printf '  %s  nginx gateway  not listening\n' "$GATEWAY_PORT"
        healthy=no
    fi
    if [[ -f $PIDS_FILE && -n $(record_of demo-upstream) ]]; then
        code=$(http_code "http://$LOOPBACK:$UPSTREAM_COUNT_PORT/health")
        printf '  %s  demo-upstream  /health %s (counts on %s)\n' "$UPSTREAM_PORT" \
            "${code/000/not answering}" "$UPSTREAM_COUNT_PORT"
        [[ $code == 200 ]] || healthy=no
    fi
    [[ $healthy == yes ]]
}

# --- failover ---------------------------------------------------------------------

# The port of the master that serves SLOT, and of its first replica, from the slot map.
master_and_replica_of_slot() {
    local slot=$1 nodes kind port slots count replicas range
    nodes=$(cluster_nodes) || return 1
    while read -r kind port slots count replicas; do
        [[ $kind == master ]] || continue
        for range in ${slots//,/ }; do
            if ((slot >= ${range%-*} && slot <= ${range#*-})); then
                echo "$port ${replicas%% *}"
                return 0
            fi
        done
    done < <(slot_map <<<"$nodes")
    return 1
}

failover_redis_cluster() {
    local started=$SECONDS deadline pair master replica reply
    pair=$(master_and_replica_of_slot 0) ||
        die "no node answers on ${CLUSTER_PORTS[*]}, or none serves slot 0; is the cluster up?"
    read -r master replica <<<"$pair"
    [[ -n $replica ]] || die "the master of slot 0 ($master) has no replica to fail over to"
    say "master of slot 0: $LOOPBACK:$master; asking its replica $LOOPBACK:$replica to take over (CLUSTER FAILOVER)"
    reply=$(rcli "$replica" CLUSTER FAILOVER)
    [[ $reply == OK ]] || die "CLUSTER FAILOVER on $replica answered: ${reply:-nothing}"
    deadline=$((SECONDS + WAIT_SECS))
    until [[ $(info_field "$replica" replication role) == master ]] && cluster_whole "$replica" &&
        [[ $(master_and_replica_of_slot 0) == "$replica $master" ]] && replica_linked "$master"; do
        ((SECONDS < deadline)) || die "after ${WAIT_SECS}s $replica is not the master of slot 0 with $master its linked replica; see scripts/cluster.sh status"
        sleep 0.2
    done
    say "failover done in $((SECONDS - started))s: $master -> $replica, which serves slot 0; $master follows it"
}

master_moved_everywhere() {
    local old=$1 port addr
    for port in "${SENTINEL_PORTS[@]}"; do
        addr=$(master_by "$port")
        [[ -n $addr && $addr != "$old" ]] || return 1
    done
}

takes_writes() {
    local port=$1 good
    [[ $(info_field "$port" replication role) == master ]] || return 1
    good=$(info_field "$port" replication min_slaves_good_slaves)
    [[ ${good:-0} -ge 1 ]]
}

failover() {
    local old new reply started=$SECONDS deadline
    if [[ $(recorded_mode) == redis-cluster ]]; then
        failover_redis_cluster
        return
    fi
    old=$(current_master) || die "no sentinel answers on ${SENTINEL_PORTS[*]}; is the cluster up?"
    say "current master: $old; asking sentinel ${SENTINEL_PORTS[0]} for a failover"
    reply=$(scli "${SENTINEL_PORTS[0]}" SENTINEL FAILOVER "$MASTER_NAME")
    [[ $reply == OK ]] || die "SENTINEL FAILOVER $MASTER_NAME answered: ${reply:-nothing}"

    deadline=$((SECONDS + WAIT_SECS))
    until master_moved_everywhere "$old"; do
        ((SECONDS < deadline)) || die "after ${WAIT_SECS}s the sentinels still do not all name a new master (was $old); see scripts/cluster.sh status"
        sleep 0.2
    done
    new=$(current_master)
    say "the sentinels name the new master: $new"
    # min-replicas-to-write 1: the new master takes writes once a replica follows it.
    until takes_writes "${new##*:}"; do
        ((SECONDS < deadline)) || die "the new master $new has no replica in sync after ${WAIT_SECS}s; see scripts/cluster.sh status"
        sleep 0.2
    done
    say "failover done in $((SECONDS - started))s: $old -> $new, which takes writes"
}

# --- logs -------------------------------------------------------------------------

logs() {
    [[ -d $CLUSTER_DIR ]] || die "no ${CLUSTER_DIR#"$ROOT"/}; has the cluster been started?"
    local files=()
    mapfile -t files < <(find "$CLUSTER_DIR" -name '*.log' | sort)
    ((${#files[@]} > 0)) || die "no logs in ${CLUSTER_DIR#"$ROOT"/}"
    say "mode: $(recorded_mode) (${MODE_FILE#"$ROOT"/})"
    if [[ ${1:-} == -f ]]; then
        tail -n 20 -F "${files[@]}"
    else
        tail -n 20 "${files[@]}"
    fi
}

# --- main -------------------------------------------------------------------------

install=no
if [[ ${1:-} == --install ]]; then
    install=yes
    shift
fi
command=${1:-}
(($# > 0)) && shift
case $command in
up)
    check_tools "$install"
    up "$@"
    ;;
down) down ;;
status) status ;;
failover)
    check_tools "$install"
    failover
    ;;
logs) logs "$@" ;;
*) usage ;;
esac

//! Every phase of scripts/bench.sh as data: where the instances run, under which
//! settings and policy, and what load goes where. One loop (`throughput::Bench::phase`)
//! measures any of them; its results are JSON records (run/bench/results.jsonl), from
//! which `report` renders every table.

use serde::{Deserialize, Serialize};

/// How a request reaches the service: through the cluster's Nginx, straight to one
/// instance, through the gateway (Nginx asks an instance, then proxies to the demo
/// upstream), through the bench's own Nginx straight to the demo upstream (no check), or
/// through the bench's Nginx running an in-Nginx Redis limiter, `lua-resty-redis-ratelimit`
/// from the folder `PEER_LUA` names (skipped, saying so, without it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Nginx,
    Direct,
    Gateway,
    Proxy,
    Peer,
}

/// The load generator: wrk with scripts/bench/report.lua, or with scripts/bench/keys.lua
/// (a key of its own in every request's X-Bench-Key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tool {
    Wrk,
    WrkKeys,
}

/// Where the instances run: `scripts/cluster.sh up` with these flags (in
/// run/bench-cluster), or one instance with the embedded store (no Redis) on a free port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    Cluster(&'static [&'static str]),
    Embedded,
}

/// Each target of a phase: every way in, each path, at each connection count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load(
    Tool,
    &'static [Via],
    &'static [&'static str],
    &'static [u32],
);

/// One measurement's target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub tool: Tool,
    pub via: Via,
    pub path: &'static str,
    pub connections: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Phase {
    /// Its name in the results and tables.
    pub name: &'static str,
    /// What `--phases` calls it: the cluster phase is two, Sentinel then Cluster mode.
    pub chosen_by: &'static str,
    pub topology: Topology,
    /// The instances' settings, `NAME=value` words.
    pub env: &'static str,
    /// A POLICY_FILE for the instances, written to run/bench/NAME.toml.
    pub policy: Option<&'static str>,
    pub load: Load,
}

const fn phase(name: &'static str, env: &'static str, load: Load) -> Phase {
    let (topology, policy, chosen_by) = (Topology::Cluster(&[]), None, name);
    Phase {
        name,
        chosen_by,
        topology,
        env,
        policy,
        load,
    }
}

impl Phase {
    const fn on(self, topology: Topology) -> Self {
        Self { topology, ..self }
    }

    const fn policy(self, policy: &'static str) -> Self {
        Self {
            policy: Some(policy),
            ..self
        }
    }

    /// For each connection count, each way in, each path.
    pub fn targets(&self) -> Vec<Target> {
        let Load(tool, vias, paths, connections) = self.load;
        let each_via = |&connections| vias.iter().map(move |&via| (via, connections));
        let each_path =
            |(via, connections)| paths.iter().map(move |&path| (via, path, connections));
        let all = connections.iter().flat_map(each_via).flat_map(each_path);
        all.map(|(via, path, connections)| Target {
            tool,
            via,
            path,
            connections,
        })
        .collect()
    }
}

pub const LIMITED: &str = "/limited_endpoint";
/// What wrk asks for through the gateway: any path reaches the demo upstream.
pub const GATEWAY_PATH: &str = "/api/items";
/// The settings phases decide; any other reaches the instances as the caller set it.
pub const PHASE_VARS: &str =
    "RATE_LIMIT TIME_WINDOW BURST DENY_CACHE_SIZE FAIL_MODE REDIS_CLIENT METRICS POLICY_FILE";

/// 10^9 per 1 s: every request runs the whole decision and is admitted.
macro_rules! allow {
    () => {
        "RATE_LIMIT=1000000000 TIME_WINDOW=1 BURST=1000000000"
    };
}
/// The shipped policy, 10 per 60 s: one client flooding is denied almost always.
const FLOOD: &str = "RATE_LIMIT=10 TIME_WINDOW=60";
const BOTH: &[Via] = &[Via::Nginx, Via::Direct];
const PATHS: &[&str] = &[LIMITED, "/"];
const WRK_BOTH: Load = Load(Tool::Wrk, BOTH, PATHS, &[16, 64]);
const WRK_64: Load = Load(Tool::Wrk, BOTH, PATHS, &[64]);
const NGINX_64: Load = Load(Tool::Wrk, &[Via::Nginx], PATHS, &[64]);

/// One policy of two limits on `/limited_endpoint`, both admitting everything: decided in
/// one script call over one hash.
const TWO_LIMITS: &str = r#"[[policy]]
name = "two"
match = { path = "/limited_endpoint" }
limits = [
    { name = "second", rate = 1000000000, per = "1s" },
    { name = "minute", rate = 1000000000, per = "1m" },
]
"#;

/// One policy on every path (no `match`), keyed by X-Bench-Key as an API would be by its
/// key (the Lua peer keys by the same header), admitting everything: every request through
/// the gateway runs the whole decision.
const GATEWAY_POLICY: &str = r#"[[policy]]
name = "gateway"
key = ["header:x-bench-key"]
on_missing = "client_ip"
limits = [{ name = "second", rate = 1000000000, per = "1s" }]
"#;

/// `/limited_endpoint` keyed by X-Bench-Key (scripts/bench/keys.lua sets it), admitting
/// everything: one load generator decides many keys, spread over every master in Cluster
/// mode (tests/cluster checks how evenly). A request without the header is not limited.
pub const KEYED_POLICY: &str = r#"[[policy]]
name = "keyed"
match = { path = "/limited_endpoint" }
key = ["header:x-bench-key"]
on_missing = "skip"
limits = [{ name = "second", rate = 1000000000, per = "1s" }]
"#;

const KEYED: Load = Load(Tool::WrkKeys, BOTH, &[LIMITED], &[64]);
const GATEWAY: Load = Load(
    Tool::WrkKeys,
    &[Via::Gateway, Via::Peer, Via::Proxy],
    &[GATEWAY_PATH],
    &[64],
);

/// Every phase of the bench, in the order they run.
pub const PHASES: &[Phase] = &[
    // The whole Redis decision on every request.
    phase("allow", allow!(), WRK_BOTH),
    phase("two-limits", "", WRK_64).policy(TWO_LIMITS),
    // What /metrics costs.
    phase("metrics-off", concat!(allow!(), " METRICS=off"), WRK_64),
    // r2d2 on tokio's blocking pool instead of the default client.
    phase(
        "allow-pool",
        concat!(allow!(), " REDIS_CLIENT=pool"),
        WRK_BOTH,
    ),
    // The decision without the Redis round trip.
    phase(
        "memory-store",
        allow!(),
        Load(Tool::Wrk, &[Via::Direct], PATHS, &[16, 64]),
    )
    .on(Topology::Embedded),
    // One client flooding through Nginx, with the deny cache and without.
    phase("flood", FLOOD, NGINX_64),
    phase(
        "flood-nocache",
        "RATE_LIMIT=10 TIME_WINDOW=60 DENY_CACHE_SIZE=0",
        NGINX_64,
    ),
    // The gateway beside an in-Nginx Redis limiter and the bench's own Nginx straight to
    // the same upstream, in alternating order.
    phase("gateway", "", GATEWAY)
        .on(Topology::Cluster(&["--gateway"]))
        .policy(GATEWAY_POLICY),
    // Sentinel mode, then Cluster mode (3 masters, 3 replicas), under one keyed policy.
    Phase {
        chosen_by: "cluster",
        ..phase("cluster-sentinel", "", KEYED).policy(KEYED_POLICY)
    },
    Phase {
        chosen_by: "cluster",
        ..phase("cluster-redis", "", KEYED).policy(KEYED_POLICY)
    }
    .on(Topology::Cluster(&["--redis-cluster"])),
];

/// The names `--phases` accepts, in the order their phases run.
pub fn names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = PHASES.iter().map(|p| p.chosen_by).collect();
    names.dedup();
    names
}

/// `--phases`: `all`, or names separated by commas (repeats and order do not matter);
/// the phases they choose, in the usual order.
pub fn parse(text: &str) -> Result<Vec<&'static Phase>, String> {
    let chosen = text.split(',').map(str::trim).filter(|n| !n.is_empty());
    let chosen: Vec<&str> = chosen.collect();
    let (known, all) = (names(), chosen == ["all"]);
    let wrong = chosen.iter().find(|n| !all && !known.contains(n));
    let is_chosen = |p: &&Phase| all || chosen.contains(&p.chosen_by);
    let phases: Vec<&Phase> = PHASES.iter().filter(is_chosen).collect();
    let known = known.join(",");
    match wrong {
        Some(name) => Err(format!(
            "no phase '{name}'; the phases: {known} (or all, alone)"
        )),
        None if phases.is_empty() => Err(format!("name at least one phase (or all): {known}")),
        None => Ok(phases),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_of_the_script_is_in_the_table_and_chosen_by_name_in_its_order() {
        let all = "allow,two-limits,metrics-off,allow-pool,memory-store,flood,flood-nocache,gateway,cluster";
        assert_eq!(names().join(","), all);
        assert_eq!(parse("all").unwrap().len(), PHASES.len());
        let some = parse("gateway, allow,cluster,allow").unwrap();
        let some: Vec<&str> = some.iter().map(|p| p.name).collect();
        let in_order = ["allow", "gateway", "cluster-sentinel", "cluster-redis"];
        assert_eq!(some, in_order);
        let unknown = parse("allow,gatway").unwrap_err();
        assert!(
            unknown.starts_with("no phase 'gatway'; the phases: allow,"),
            "{unknown}"
        );
        // Nothing chosen is an error, and so is `all` beside a name.
        assert!(parse(" , ").is_err() && parse("all,allow").is_err());
    }

    #[test]
    fn a_phase_measures_each_path_per_way_in_and_connection_count() {
        let key = |t: &Target| (t.via, t.path, t.connections);
        let allow: Vec<_> = PHASES[0].targets().iter().map(key).collect();
        let (first, fourth) = ((Via::Nginx, LIMITED, 16), (Via::Direct, "/", 16));
        assert_eq!((allow.len(), allow[0], allow[3]), (8, first, fourth));
        let gateway: Vec<_> = PHASES[7].targets().iter().map(key).collect();
        let at_64 = |via| (via, GATEWAY_PATH, 64);
        assert_eq!(gateway, [Via::Gateway, Via::Peer, Via::Proxy].map(at_64));
        let metrics_off = "RATE_LIMIT=1000000000 TIME_WINDOW=1 BURST=1000000000 METRICS=off";
        assert_eq!(PHASES[2].env, metrics_off);
        let [sentinel, cluster] = [PHASES[8], PHASES[9]];
        let measured = |p: Phase| (p.policy, p.load);
        assert_eq!(measured(sentinel), measured(cluster));
        assert_eq!(cluster.topology, Topology::Cluster(&["--redis-cluster"]));
    }
}

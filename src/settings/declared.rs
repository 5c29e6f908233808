//! Every setting, declared once: its name, its default, what it accepts, and the line of
//! documentation the README's table shows. The loader, the known-names filter, the logged
//! configuration and the tests that hold `config/default.toml` and the README to this list
//! all read it from here.

use strum::VariantNames;

use crate::http::headers::HeaderMode;
use crate::limiter::FailMode;
use crate::store::redis::ConnectionMode;

/// One setting: `name` in the environment, `name` in lower case in TOML files.
#[derive(Debug)]
pub struct Setting {
    pub name: &'static str,
    pub preset: Preset,
    pub expects: Expect,
    /// The README's "meaning" column, Markdown.
    pub doc: &'static str,
}

/// What a setting is when nothing sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// This text, parsed like any other value.
    Value(&'static str),
    /// Nothing; the service derives something, as the README describes it.
    Unset(&'static str),
}

/// What a setting accepts; the loader says so when a value does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Whole {
        min: u64,
        max: u64,
    },
    /// One of these words, in any case.
    Word(&'static [&'static str]),
    /// on/off, true/false, 1/0.
    Switch,
    /// Text the loader checks in its own way.
    Text,
    /// Text that is never printed: logged as `***`.
    Secret,
    /// A URL whose credentials are never printed.
    Url,
}

impl Setting {
    /// The key in `config/default.toml` and `CONFIG_FILE`.
    pub fn file_key(&self) -> String {
        self.name.to_ascii_lowercase()
    }
}

const MAX_COUNT: u64 = 1_000_000_000;

macro_rules! settings {
    ($($name:ident: $preset:expr, $expects:expr, $doc:literal;)*) => {
        $(pub const $name: Setting = Setting {
            name: stringify!($name),
            preset: $preset,
            expects: $expects,
            doc: $doc,
        };)*

        /// The layered settings, in the order the README and `config/default.toml` list them.
        pub const LAYERED: &[&Setting] = &[$(&$name),*];
    };
}

use Expect::*;
use Preset::*;

settings! {
    RATE_LIMIT: Value("10"), Whole { min: 1, max: MAX_COUNT },
        "tokens added per `TIME_WINDOW`";
    TIME_WINDOW: Value("60"), Whole { min: 1, max: 365 * 86_400 },
        "seconds";
    BURST: Unset("`RATE_LIMIT`"), Whole { min: 1, max: MAX_COUNT },
        "bucket capacity";
    REDIS_URL: Unset("unset"), Url,
        "one Redis server, e.g. `redis://:password@127.0.0.1:6379`";
    SENTINEL_HOSTS: Unset("unset"), Text,
        "`host:port,host:port,…`: Sentinel mode (exclusive with `REDIS_URL`)";
    REDIS_CLUSTER_NODES: Unset("unset"), Text,
        "`host:port,host:port,…`: seed nodes of a Redis Cluster (the others are discovered): Cluster mode (exclusive with `REDIS_URL` and `SENTINEL_HOSTS`)";
    REDIS_MASTER: Value("redis-master"), Text,
        "the name the sentinels monitor";
    REDIS_USERNAME: Unset("the default user"), Text,
        "the Redis ACL user this instance logs in to every data node as (Sentinel-named masters, the pool and Cluster nodes alike); the shipped topologies use `ratelimiter`, limited to `KEY_PREFIX` and the commands the service sends (`redis/users.acl`); a `REDIS_URL` that names a user keeps it";
    REDIS_PASSWORD: Unset("unset"), Secret,
        "the password of `REDIS_USERNAME` (or of the default user) on every data node (all share it)";
    SENTINEL_PASSWORD: Unset("unset"), Secret,
        "what the sentinels require (their `requirepass`); every shipped topology sets one";
    SENTINEL_POLL_MS: Value("1000"), Whole { min: 10, max: 3_600_000 },
        "how often the resolver re-asks the sentinels (`+switch-master` events are seen at once)";
    REDIS_DATA_NODES: Unset("any"), Text,
        "`host:port,host:port,…`: with `SENTINEL_HOSTS`, the only addresses the instances believe a sentinel names as the master, written as the sentinels name them; another is ignored and logged as a warning";
    REDIS_TIMEOUT_MS: Value("100"), Whole { min: 1, max: 60_000 },
        "connect, read and write timeout of every Redis call, and the pool checkout timeout";
    REDIS_CLIENT: Value("multiplexed"), Word(ConnectionMode::VARIANTS),
        "how decisions reach Redis: `multiplexed` (one pipelined async connection per worker thread) or `pool` (an r2d2 pool of blocking connections, used from blocking threads); `docs/BENCHMARKS.md` compares them";
    REDIS_POOL_SIZE: Value("16"), Whole { min: 1, max: 1024 },
        "connections per instance to the master, with `REDIS_CLIENT=pool`";
    KEY_PREFIX: Value("ratelimit"), Text,
        "prefix of the bucket keys";
    FAIL_MODE: Value("local"), Word(FailMode::VARIANTS),
        "when Redis cannot decide: `local` (this instance's share of the limits), `open` (admit), `closed` (503 with `Retry-After: 1`)";
    FALLBACK_INSTANCES: Unset("counted"), Whole { min: 1, max: 10_000 },
        "how many instances share the limits in `local` mode; by default the instances announced in Redis (an announcement lasts three `SENTINEL_POLL_MS`, at least 5 s), and 4 until this instance has counted them once";
    DENY_CACHE_SIZE: Value("100000"), Whole { min: 0, max: 100_000_000 },
        "keys whose denial is answered locally until it expires; `0` turns it off";
    MEMORY_STORE_MAX_BUCKETS: Value("200000"), Whole { min: 1, max: 100_000_000 },
        "most buckets kept in the instance's memory (the embedded store, and the `local` fallback); beyond it the buckets closest to full are forgotten first, so those clients regain a few tokens early";
    TRUSTED_PROXIES: Unset("none"), Text,
        "IPs or CIDRs whose forwarding headers are believed";
    TRUSTED_PROXIES_ALLOW_ALL: Value("off"), Switch,
        "`on` accepts a `TRUSTED_PROXIES` entry that trusts every address (`0.0.0.0/0`, `::/0`), refused otherwise: every client could then name its own address and escape its limit";
    IPV6_PREFIX_LEN: Value("64"), Whole { min: 1, max: 128 },
        "IPv6 clients are keyed by this prefix";
    RATELIMIT_HEADERS: Value("draft"), Word(HeaderMode::VARIANTS),
        "`draft`, `legacy`, `both` or `none`";
    HOST: Value("0.0.0.0"), Text,
        "address to listen on";
    PORT: Value("8000"), Whole { min: 0, max: 65_535 },
        "port to listen on (`0`: any free port)";
    WORKERS: Unset("CPUs"), Whole { min: 1, max: 1024 },
        "HTTP worker threads";
    INSTANCE_NAME: Unset("host name"), Text,
        "reported in bodies, `X-Instance` and logs";
    ACCESS_LOG: Value("off"), Switch,
        "one `info` line per request";
    LOG_QUEUE_LINES: Value("8192"), Whole { min: 1, max: 1_000_000 },
        "log lines that may wait for the thread that writes them to stderr; past that, lines are dropped and counted (`ratelimit_log_lines_dropped_total`), so a slow stderr never stalls a request";
    METRICS: Value("on"), Switch,
        "`off` records nothing for `/metrics`; `scripts/bench.sh` compares both and found no measurable difference in CPU per request";
    SHUTDOWN_TIMEOUT_S: Value("10"), Whole { min: 0, max: 3600 },
        "on SIGTERM/SIGINT, how long in-flight requests may take";
    POLICY_FILE: Unset("unset"), Text,
        "a TOML file of policies (`config/policies.example.toml`); unset: one policy, `RATE_LIMIT` per `TIME_WINDOW` per client IP on `/limited_endpoint`";
    POLICY_POLL_MS: Value("1000"), Whole { min: 50, max: 3_600_000 },
        "how often `POLICY_FILE` is checked for changes (`SIGHUP` reloads at once)";
    POLICY_KEY_SECRET: Unset("unset"), Secret,
        "keys the hash that replaces header values (API keys) in bucket keys; every instance must share it; unset: a fixed public key";
    ADMIN_TOKEN: Unset("unset"), Secret,
        "the `Authorization: Bearer` token `/v1/decide` and `/v1/buckets/…` require; unset: they answer local callers only (loopback peer, not forwarded for another client)";
}

/// Read from the environment only, before any layering.
pub const RUST_LOG: Setting = Setting {
    name: "RUST_LOG",
    preset: Value("info"),
    expects: Text,
    doc: "log filter, as env_logger reads it",
};

/// Names the TOML file layered between `config/default.toml` and the environment.
pub const CONFIG_FILE: Setting = Setting {
    name: "CONFIG_FILE",
    preset: Unset("unset"),
    expects: Text,
    doc: "a TOML file with the settings above in lower case",
};

/// Every variable the service reads, in the README's order.
pub fn all() -> impl Iterator<Item = &'static Setting> {
    LAYERED.iter().copied().chain([&RUST_LOG, &CONFIG_FILE])
}

/// The README's table of variables, as this list says it must read.
pub fn readme_table() -> String {
    let mut table = String::from("| variable | default | meaning |\n|---|---|---|\n");
    for setting in all() {
        let preset = match setting.preset {
            Value(value) => format!("`{value}`"),
            Unset(described) => described.to_string(),
        };
        table.push_str(&format!(
            "| `{}` | {preset} | {} |\n",
            setting.name, setting.doc
        ));
    }
    table
}

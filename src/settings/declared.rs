//! Every setting, declared once: its name, its type, its preset, what it accepts and how its
//! text becomes the value, and the line of documentation the README's table shows.
//!
//! From the one list in `settings!` below follow: a [`Setting`] constant per variable (the
//! names the environment is filtered by, the logged configuration, problem messages), the
//! [`Given`] text of each, read from the layered configuration, and [`Declared`], each
//! setting's typed value on its own, read by [`Problems`], which collects what does not
//! parse. Tests hold `config/default.toml` and the README's table ([`readme_table`]) to this
//! list.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use redis::ConnectionInfo;
use secrecy::SecretString;
use serde::Deserialize;
use strum::VariantNames;

pub use super::parse::Expect;
use super::parse::*;
use crate::limiter::FailMode;
use crate::quota_headers::HeaderMode;

/// One setting: `name` in the environment, `key` in TOML files.
#[derive(Debug)]
pub struct Setting {
    pub name: &'static str,
    pub key: &'static str,
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

const MAX_COUNT: u64 = 1_000_000_000;

/// Declares the settings. Each entry reads
///
/// ```text
/// /// the README's line
/// NAME / key: Type = Preset, Expect => parser;
/// ```
///
/// `NAME` is the environment variable, `key` its lower-case name in TOML files and its field
/// in [`Declared`]. With `Value("…")` the field is `Type`; with `Unset("…")` (the text says
/// what the service does instead) it is `Option<…>`. `parser` is a [`Parse`] function from
/// `super::parse` that turns the text into the field's value.
macro_rules! settings {
    ($(
        #[doc = $doc:literal]
        $name:ident / $key:ident: $ty:ty = $preset:ident($preset_text:literal),
            $expects:expr => $parse:ident;
    )*) => {
        $(pub const $name: Setting = Setting {
            name: stringify!($name),
            key: stringify!($key),
            preset: Preset::$preset($preset_text),
            expects: $expects,
            doc: $doc.trim_ascii_start(),
        };)*

        /// The layered settings, in the order the README and `config/default.toml` list them.
        pub const LAYERED: &[&Setting] = &[$(&$name),*];

        /// The text each layered setting was given, as the layers left it.
        #[derive(Deserialize)]
        pub(super) struct Given {
            $($key: Option<String>,)*
        }

        impl Given {
            /// Each setting with its text; an empty text means "not set".
            pub fn each(&self) -> Vec<(&'static Setting, Option<&str>)> {
                vec![$((&$name, given_text(&self.$key))),*]
            }

            /// Each setting's value on its own; every value that does not parse is reported
            /// in `problems`.
            pub fn read(&self, problems: &mut Problems) -> Declared {
                Declared {$(
                    $key: settings!(
                        @read $preset, problems, &$name, given_text(&self.$key), $parse
                    ),
                )*}
            }
        }

        /// Each setting's value on its own; the rules between settings make
        /// [`super::Settings`] of it.
        pub(super) struct Declared {
            $(#[doc = $doc] pub $key: $ty,)*
        }
    };
    (@read Value, $problems:ident, $setting:expr, $given:expr, $parse:ident) => {
        $problems.parse_or_preset($setting, $given, $parse)
    };
    (@read Unset, $problems:ident, $setting:expr, $given:expr, $parse:ident) => {
        $problems.parse_if_given($setting, $given, $parse)
    };
}

fn given_text(text: &Option<String>) -> Option<&str> {
    text.as_deref()
        .map(str::trim)
        .filter(|text| !text.is_empty())
}

impl Given {
    /// Whether `setting` was given a value, whether or not it parses.
    pub fn is_set(&self, setting: &Setting) -> bool {
        self.each()
            .iter()
            .any(|(each, text)| each.name == setting.name && text.is_some())
    }
}

use Expect::*;

settings! {
    /// tokens added per `TIME_WINDOW`
    RATE_LIMIT / rate_limit: u64 = Value("10"),
        Whole { min: 1, max: MAX_COUNT } => whole;
    /// seconds
    TIME_WINDOW / time_window: u64 = Value("60"),
        Whole { min: 1, max: 365 * 86_400 } => whole;
    /// bucket capacity
    BURST / burst: Option<u64> = Unset("`RATE_LIMIT`"),
        Whole { min: 1, max: MAX_COUNT } => whole;
    /// one Redis server, e.g. `redis://:password@127.0.0.1:6379`
    REDIS_URL / redis_url: Option<ConnectionInfo> = Unset("unset"),
        Url => redis_url;
    /// `host:port,host:port,…`: Sentinel mode (exclusive with `REDIS_URL`)
    SENTINEL_HOSTS / sentinel_hosts: Option<Vec<HostPort>> = Unset("unset"),
        Text => host_ports;
    /// `host:port,host:port,…`: seed nodes of a Redis Cluster (the others are discovered): Cluster mode (exclusive with `REDIS_URL` and `SENTINEL_HOSTS`)
    REDIS_CLUSTER_NODES / redis_cluster_nodes: Option<Vec<HostPort>> = Unset("unset"),
        Text => host_ports;
    /// the name the sentinels monitor
    REDIS_MASTER / redis_master: String = Value("redis-master"),
        Text => text;
    /// the Redis ACL user this instance logs in to every data node as (Sentinel-named masters, the pool and Cluster nodes alike); the shipped topologies use `ratelimiter`, limited to `KEY_PREFIX` and the commands the service sends (`redis/users.acl`); a `REDIS_URL` that names a user keeps it
    REDIS_USERNAME / redis_username: Option<String> = Unset("the default user"),
        Text => redis_user;
    /// the password of `REDIS_USERNAME` (or of the default user) on every data node (all share it)
    REDIS_PASSWORD / redis_password: Option<SecretString> = Unset("unset"),
        Secret => secret;
    /// the ACL user this instance logs in to every sentinel as; the shipped topologies use `ratelimiter`, allowed only to read the master's address and to follow `+switch-master`, so that its password cannot reconfigure a sentinel (`redis/sentinel.conf`)
    SENTINEL_USERNAME / sentinel_username: Option<String> = Unset("the default user"),
        Text => redis_user;
    /// the password of `SENTINEL_USERNAME` on every sentinel, or without it what the sentinels require of their default user (`requirepass`); every shipped topology sets one
    SENTINEL_PASSWORD / sentinel_password: Option<SecretString> = Unset("unset"),
        Secret => secret;
    /// how often the resolver re-asks the sentinels (`+switch-master` events are seen at once)
    SENTINEL_POLL_MS / sentinel_poll_ms: Duration = Value("1000"),
        Whole { min: 10, max: 3_600_000 } => millis;
    /// `host:port,host:port,…`: with `SENTINEL_HOSTS`, the only addresses the instances believe a sentinel names as the master, written as the sentinels name them; another is ignored and logged as a warning
    REDIS_DATA_NODES / redis_data_nodes: Option<Vec<HostPort>> = Unset("any"),
        Text => host_ports;
    /// connect, read and write timeout of every Redis call, and the pool checkout timeout
    REDIS_TIMEOUT_MS / redis_timeout_ms: Duration = Value("100"),
        Whole { min: 1, max: 60_000 } => millis;
    /// how decisions reach Redis: `multiplexed` (one pipelined async connection per worker thread) or `pool` (an r2d2 pool of blocking connections, used from blocking threads); `docs/BENCHMARKS.md` compares them
    REDIS_CLIENT / redis_client: RedisClient = Value("multiplexed"),
        Word(RedisClient::VARIANTS) => word;
    /// connections per instance to the master, with `REDIS_CLIENT=pool`
    REDIS_POOL_SIZE / redis_pool_size: u32 = Value("16"),
        Whole { min: 1, max: 1024 } => whole;
    /// with `REDIS_CLIENT=multiplexed` or `REDIS_CLUSTER_NODES`, the most decisions sent in one call: while a call is in flight on a worker's connection (in Cluster mode: for one hash slot) the decisions that arrive queue, and go together when it completes; a decision that finds nothing in flight goes at once. `1` sends each alone; the pool always does
    REDIS_BATCH_MAX / redis_batch_max: usize = Value("32"),
        Whole { min: 1, max: 1024 } => whole;
    /// prefix of the bucket keys
    KEY_PREFIX / key_prefix: String = Value("ratelimit"),
        Text => key_prefix;
    /// when Redis cannot decide: `local` (this instance's share of the limits), `open` (admit), `closed` (503 with `Retry-After: 1`)
    FAIL_MODE / fail_mode: FailMode = Value("local"),
        Word(FailMode::VARIANTS) => word;
    /// how many instances share the limits in `local` mode; by default the instances announced in Redis (an announcement lasts three `SENTINEL_POLL_MS`, at least 5 s), and 4 until this instance has counted them once
    FALLBACK_INSTANCES / fallback_instances: Option<u64> = Unset("counted"),
        Whole { min: 1, max: 10_000 } => whole;
    /// keys whose denial is answered locally until it expires; `0` turns it off
    DENY_CACHE_SIZE / deny_cache_size: usize = Value("100000"),
        Whole { min: 0, max: 100_000_000 } => whole;
    /// most buckets kept in the instance's memory (the embedded store, and the `local` fallback); beyond it the buckets closest to full are forgotten first, so those clients regain a few tokens early
    MEMORY_STORE_MAX_BUCKETS / memory_store_max_buckets: usize = Value("200000"),
        Whole { min: 1, max: 100_000_000 } => whole;
    /// IPs or CIDRs whose forwarding headers are believed
    TRUSTED_PROXIES / trusted_proxies: Option<Vec<IpNet>> = Unset("none"),
        Text => ip_nets;
    /// `on` accepts a `TRUSTED_PROXIES` entry that trusts every address (`0.0.0.0/0`, `::/0`), refused otherwise: every client could then name its own address and escape its limit
    TRUSTED_PROXIES_ALLOW_ALL / trusted_proxies_allow_all: bool = Value("off"),
        Switch => switch;
    /// IPv6 clients are keyed by this prefix
    IPV6_PREFIX_LEN / ipv6_prefix_len: u8 = Value("64"),
        Whole { min: 1, max: 128 } => whole;
    /// `draft`, `legacy`, `both` or `none`
    RATELIMIT_HEADERS / ratelimit_headers: HeaderMode = Value("draft"),
        Word(HeaderMode::VARIANTS) => word;
    /// address to listen on
    HOST / host: IpAddr = Value("0.0.0.0"),
        Text => listen_addr;
    /// port to listen on (`0`: any free port; `off`: none, with `UNIX_SOCKET`)
    PORT / port: Option<u16> = Value("8000"),
        Whole { min: 0, max: 65_535 } => port_or_off;
    /// a Unix domain socket to serve HTTP on as well, for an Nginx on the same host; its peer is trusted as a proxy like a `TRUSTED_PROXIES` address, and one that forwards nothing counts as a caller on this host (`docs/OPERATIONS.md`); a socket left by a stopped instance is replaced, one a process listens on stops the start; removed at stop
    UNIX_SOCKET / unix_socket: Option<PathBuf> = Unset("none"),
        Text => socket_path;
    /// permissions of `UNIX_SOCKET`, octal: connecting needs write permission, so these (and the folder's) say who on the host may act as the trusted proxy
    UNIX_SOCKET_MODE / unix_socket_mode: u32 = Value("660"),
        Text => file_mode;
    /// port of Envoy's rate-limit service (gRPC `ShouldRateLimit` and `grpc.health.v1`) on `HOST`, beside the HTTP port (`0`: any free port); unset: no gRPC listener ("Behind Envoy")
    GRPC_PORT / grpc_port: Option<u16> = Unset("off"),
        Whole { min: 0, max: 65_535 } => whole;
    /// HTTP worker threads
    WORKERS / workers: Option<usize> = Unset("CPUs"),
        Whole { min: 1, max: 1024 } => whole;
    /// reported in bodies, `X-Instance` and logs
    INSTANCE_NAME / instance_name: Option<String> = Unset("host name"),
        Text => printable;
    /// one `info` line per request
    ACCESS_LOG / access_log: bool = Value("off"),
        Switch => switch;
    /// log lines that may wait for the thread that writes them to stderr; past that, lines are dropped and counted (`ratelimit_log_lines_dropped_total`), so a slow stderr never stalls a request
    LOG_QUEUE_LINES / log_queue_lines: usize = Value("8192"),
        Whole { min: 1, max: 1_000_000 } => whole;
    /// `off` records nothing for `/metrics`; `scripts/bench.sh` compares both and found no measurable difference in CPU per request
    METRICS / metrics: bool = Value("on"),
        Switch => switch;
    /// on SIGTERM/SIGINT, how long in-flight requests may take
    SHUTDOWN_TIMEOUT_S / shutdown_timeout_s: Duration = Value("10"),
        Whole { min: 0, max: 3600 } => seconds;
    /// a TOML file of policies (`config/policies.example.toml`); unset: one policy, `RATE_LIMIT` per `TIME_WINDOW` per client IP on `/limited_endpoint`
    POLICY_FILE / policy_file: Option<PathBuf> = Unset("unset"),
        Text => path;
    /// `on`: each `ShouldRateLimit` answer asks Envoy to add to its response (`response_headers_to_add`) the quota headers `RATELIMIT_HEADERS` names, as an HTTP client of this service gets them
    RLS_RESPONSE_HEADERS / rls_response_headers: bool = Value("off"),
        Switch => switch;
    /// envoyproxy/ratelimit's YAML rules for the rate-limit service: one file, or a folder of `*.yaml`/`*.yml` files, one domain each (`config/rls.example.yaml`); needs `GRPC_PORT`; unset: no rules, so every domain is unknown and every answer `OK`
    RLS_CONFIG / rls_config: Option<PathBuf> = Unset("unset"),
        Text => path;
    /// how often `POLICY_FILE` and `RLS_CONFIG` are checked for changes (`SIGHUP` reloads both at once)
    POLICY_POLL_MS / policy_poll_ms: Duration = Value("1000"),
        Whole { min: 50, max: 3_600_000 } => millis;
    /// keys the hash that replaces header values (API keys) and long rate-limit descriptor values in bucket keys; every instance must share it; unset: a fixed public key
    POLICY_KEY_SECRET / policy_key_secret: Option<SecretString> = Unset("unset"),
        Secret => secret;
    /// the `Authorization: Bearer` token `/v1/decide` and `/v1/buckets/…` require; unset: they answer local callers only (loopback peer, not forwarded for another client)
    ADMIN_TOKEN / admin_token: Option<SecretString> = Unset("unset"),
        Secret => secret;
}

/// Every problem found in one load, in the order found, so that one restart fixes them all.
#[derive(Default)]
pub struct Problems {
    lines: Vec<String>,
    /// Settings whose own value was refused; they hold their preset from then on.
    refused: Vec<&'static str>,
}

impl Problems {
    /// The value of a setting with a preset: its text if given, else the preset. A value that
    /// does not parse is reported and replaced by the preset, so that the rules between
    /// settings still run (see [`Problems::add_unless_refused`]).
    pub fn parse_or_preset<T>(
        &mut self,
        setting: &'static Setting,
        given: Option<&str>,
        parse: Parse<T>,
    ) -> T {
        let Preset::Value(preset) = setting.preset else {
            unreachable!("{} is declared without a preset value", setting.name)
        };
        let text = given.unwrap_or(preset);
        parse(&setting.expects, text).unwrap_or_else(|refused| {
            self.refuse(setting, refused, text);
            // `config/default.toml` holds every preset and is parsed on every load, so a
            // preset that did not parse would fail every test.
            parse(&setting.expects, preset)
                .unwrap_or_else(|_| panic!("{}'s preset {preset:?} parses", setting.name))
        })
    }

    /// The value of a setting without a preset: `None` when not given, or when its text was
    /// refused (and reported).
    pub fn parse_if_given<T>(
        &mut self,
        setting: &'static Setting,
        given: Option<&str>,
        parse: Parse<T>,
    ) -> Option<T> {
        let text = given?;
        parse(&setting.expects, text)
            .map_err(|refused| self.refuse(setting, refused, text))
            .ok()
    }

    fn refuse(&mut self, setting: &'static Setting, refused: Refused, text: &str) {
        let got = refused.part.as_deref().unwrap_or(text);
        let shown = match setting.expects {
            Expect::Secret => "***".to_string(),
            Expect::Url => mask_url(got),
            _ => got.to_string(),
        };
        self.lines.push(format!(
            "{}: expected {}, got {shown:?}",
            setting.name, refused.expected
        ));
        self.refused.push(setting.name);
    }

    /// A problem about which settings are given together; it holds whatever their values.
    pub fn add(&mut self, line: String) {
        self.lines.push(line);
    }

    /// A problem a rule found in the values of `settings`. Left out when one of them was
    /// refused on its own: the rule then judged its preset, not what was given.
    pub fn add_unless_refused(&mut self, settings: &[&Setting], line: String) {
        if !settings.iter().any(|s| self.refused.contains(&s.name)) {
            self.lines.push(line);
        }
    }

    pub fn extend(&mut self, lines: impl IntoIterator<Item = String>) {
        self.lines.extend(lines);
    }

    /// What `parsed` holds, or `None` with each of its problems added.
    pub fn take<T, E: IntoIterator<Item = String>>(&mut self, parsed: Result<T, E>) -> Option<T> {
        parsed.map_err(|lines| self.extend(lines)).ok()
    }

    /// `value` when nothing was reported, else every problem; every rule that gives `None`
    /// reports why.
    pub fn finish<T>(self, value: Option<T>) -> Result<T, Vec<String>> {
        match value {
            Some(value) if self.lines.is_empty() => Ok(value),
            _ => Err(self.lines),
        }
    }
}

/// Read from the environment only, before any layering.
pub const RUST_LOG: Setting = Setting {
    name: "RUST_LOG",
    key: "rust_log",
    preset: Preset::Value("info"),
    expects: Text,
    doc: "log filter, as env_logger reads it",
};

/// Names the TOML file layered between `config/default.toml` and the environment.
pub const CONFIG_FILE: Setting = Setting {
    name: "CONFIG_FILE",
    key: "config_file",
    preset: Preset::Unset("unset"),
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
            Preset::Value(value) => format!("`{value}`"),
            Preset::Unset(described) => described.to_string(),
        };
        table.push_str(&format!(
            "| `{}` | {preset} | {} |\n",
            setting.name, setting.doc
        ));
    }
    table
}

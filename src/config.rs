//! Settings: `config/default.toml` (compiled in), then an optional `CONFIG_FILE`, then
//! environment variables; parsed once, at start-up, into validated types.
//!
//! Every problem is reported, each on its own line naming the variable and the value it
//! got, so that one restart fixes them all.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use ipnet::IpNet;
use serde::Deserialize;
use thiserror::Error;

use crate::identity::IdentityRules;
use crate::limiter::Policy;
use crate::store::memory::DEFAULT_MAX_BUCKETS;
use crate::store::redis::ConnectionMode;

const DEFAULTS: &str = include_str!("../config/default.toml");

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
    #[error("cannot read the settings: {0}")]
    Unreadable(String),
}

/// How a limited response describes the client's quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderMode {
    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers-10).
    Draft,
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset`.
    Legacy,
    Both,
    None,
}

/// What to do when Redis cannot decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// Decide in this process with this instance's share of the limits.
    Local,
    /// Admit everything.
    Open,
    /// Answer 503.
    Closed,
}

impl FailMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FailMode::Local => "local",
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        }
    }
}

impl HeaderMode {
    pub fn as_str(self) -> &'static str {
        match self {
            HeaderMode::Draft => "draft",
            HeaderMode::Legacy => "legacy",
            HeaderMode::Both => "both",
            HeaderMode::None => "none",
        }
    }
}

/// Where buckets live.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreSettings {
    Memory,
    Redis {
        url: String,
    },
    Sentinel {
        hosts: Vec<(String, u16)>,
        master_name: String,
        sentinel_password: Option<String>,
    },
}

#[derive(Clone)]
pub struct RedisSettings {
    pub mode: ConnectionMode,
    pub password: Option<String>,
    pub timeout: Duration,
    pub pool_size: u32,
    pub poll: Duration,
    pub key_prefix: String,
}

#[derive(Clone)]
pub struct Settings {
    pub policy: Policy,
    pub store: StoreSettings,
    pub redis: RedisSettings,
    pub fail_mode: FailMode,
    pub fallback_instances: Option<u64>,
    pub identity: IdentityRules,
    pub trusted_proxies: Vec<IpNet>,
    pub host: IpAddr,
    pub port: u16,
    pub workers: Option<usize>,
    pub instance_name: String,
    pub headers: HeaderMode,
    pub access_log: bool,
    pub shutdown_timeout: Duration,
    pub deny_cache_size: usize,
    pub memory_store_max_buckets: usize,
    pub metrics: bool,
}

/// The settings as layered text, before any of it is believed.
#[derive(Debug, Deserialize)]
struct Raw {
    rate_limit: Option<String>,
    time_window: Option<String>,
    burst: Option<String>,
    redis_url: Option<String>,
    sentinel_hosts: Option<String>,
    redis_master: Option<String>,
    redis_password: Option<String>,
    sentinel_password: Option<String>,
    sentinel_poll_ms: Option<String>,
    redis_timeout_ms: Option<String>,
    redis_pool_size: Option<String>,
    redis_client: Option<String>,
    key_prefix: Option<String>,
    fail_mode: Option<String>,
    fallback_instances: Option<String>,
    trusted_proxies: Option<String>,
    ipv6_prefix_len: Option<String>,
    host: Option<String>,
    port: Option<String>,
    workers: Option<String>,
    instance_name: Option<String>,
    ratelimit_headers: Option<String>,
    access_log: Option<String>,
    shutdown_timeout_s: Option<String>,
    deny_cache_size: Option<String>,
    memory_store_max_buckets: Option<String>,
    metrics: Option<String>,
}

impl Settings {
    /// Loads from the process environment.
    pub fn load() -> Result<Self, ConfigError> {
        Self::load_from(std::env::vars().collect())
    }

    /// Loads from `env` instead of the process environment (tests use this).
    pub fn load_from(env: HashMap<String, String>) -> Result<Self, ConfigError> {
        let mut builder = Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml));
        if let Some(path) = env.get("CONFIG_FILE").filter(|p| !p.is_empty()) {
            if !std::path::Path::new(path).is_file() {
                return Err(ConfigError::Invalid(vec![format!(
                    "CONFIG_FILE: no such file, got {path:?}"
                )]));
            }
            builder = builder.add_source(File::new(path, FileFormat::Toml));
        }
        let known: HashMap<String, String> = env
            .into_iter()
            .filter(|(name, _)| KNOWN.contains(&name.as_str()))
            .collect();
        let raw: Raw = builder
            .add_source(Environment::default().source(Some(known)))
            .build()
            .and_then(Config::try_deserialize)
            .map_err(|err| ConfigError::Unreadable(err.to_string()))?;
        Parser::default().parse(raw)
    }
}

/// The environment variables this service reads (besides `CONFIG_FILE` and `RUST_LOG`).
pub const KNOWN: &[&str] = &[
    "RATE_LIMIT",
    "TIME_WINDOW",
    "BURST",
    "REDIS_URL",
    "SENTINEL_HOSTS",
    "REDIS_MASTER",
    "REDIS_PASSWORD",
    "SENTINEL_PASSWORD",
    "SENTINEL_POLL_MS",
    "REDIS_TIMEOUT_MS",
    "REDIS_POOL_SIZE",
    "REDIS_CLIENT",
    "KEY_PREFIX",
    "FAIL_MODE",
    "FALLBACK_INSTANCES",
    "TRUSTED_PROXIES",
    "IPV6_PREFIX_LEN",
    "HOST",
    "PORT",
    "WORKERS",
    "INSTANCE_NAME",
    "RATELIMIT_HEADERS",
    "ACCESS_LOG",
    "SHUTDOWN_TIMEOUT_S",
    "DENY_CACHE_SIZE",
    "MEMORY_STORE_MAX_BUCKETS",
    "METRICS",
];

/// Turns raw text into typed values, collecting every problem instead of stopping at one.
#[derive(Default)]
struct Parser {
    problems: Vec<String>,
}

/// The words a switch accepts.
const ON_OFF: &[(&str, bool)] = &[
    ("on", true),
    ("off", false),
    ("true", true),
    ("false", false),
    ("1", true),
    ("0", false),
];

/// An unset or empty value.
fn given(raw: &Option<String>) -> Option<&str> {
    raw.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

impl Parser {
    fn problem(&mut self, name: &str, expected: &str, raw: &str) {
        self.problems
            .push(format!("{name}: expected {expected}, got {raw:?}"));
    }

    fn number(&mut self, name: &str, raw: &Option<String>, min: u64, max: u64) -> Option<u64> {
        let text = given(raw)?;
        match text.parse::<u64>() {
            Ok(value) if (min..=max).contains(&value) => Some(value),
            _ => {
                self.problem(name, &format!("a whole number from {min} to {max}"), text);
                None
            }
        }
    }

    fn required_number(
        &mut self,
        name: &str,
        raw: &Option<String>,
        min: u64,
        max: u64,
    ) -> Option<u64> {
        if given(raw).is_none() {
            self.problem(name, &format!("a whole number from {min} to {max}"), "");
            return None;
        }
        self.number(name, raw, min, max)
    }

    fn choice<T: Copy>(
        &mut self,
        name: &str,
        raw: &Option<String>,
        choices: &[(&str, T)],
    ) -> Option<T> {
        let text = given(raw)?;
        let lowered = text.to_ascii_lowercase();
        let found = choices
            .iter()
            .find(|(word, _)| *word == lowered)
            .map(|(_, v)| *v);
        if found.is_none() {
            let words: Vec<&str> = choices.iter().map(|(word, _)| *word).collect();
            self.problem(name, &format!("one of {}", words.join(", ")), text);
        }
        found
    }

    fn parse(mut self, raw: Raw) -> Result<Settings, ConfigError> {
        let max_count = 1_000_000_000;
        let rate_limit = self.required_number("RATE_LIMIT", &raw.rate_limit, 1, max_count);
        let time_window = self.required_number("TIME_WINDOW", &raw.time_window, 1, 365 * 86_400);
        let burst = self.number("BURST", &raw.burst, 1, max_count);
        let policy = match (rate_limit, time_window) {
            (Some(rate), Some(window)) => {
                match Policy::parse(rate, window, burst.unwrap_or(rate)) {
                    Ok(policy) => Some(policy),
                    Err(err) => {
                        self.problems.push(err.to_string());
                        None
                    }
                }
            }
            _ => None,
        };

        let store = self.store(&raw);
        let timeout_ms = self.number("REDIS_TIMEOUT_MS", &raw.redis_timeout_ms, 1, 60_000);
        let poll_ms = self.number("SENTINEL_POLL_MS", &raw.sentinel_poll_ms, 10, 3_600_000);
        let pool_size = self.number("REDIS_POOL_SIZE", &raw.redis_pool_size, 1, 1024);
        let mode = self.choice(
            "REDIS_CLIENT",
            &raw.redis_client,
            &[
                ("multiplexed", ConnectionMode::Multiplexed),
                ("pool", ConnectionMode::Pool),
            ],
        );
        let key_prefix = given(&raw.key_prefix).unwrap_or("ratelimit").to_string();
        if key_prefix
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            self.problem("KEY_PREFIX", "no spaces or control characters", &key_prefix);
        }

        let fail_mode = self.choice(
            "FAIL_MODE",
            &raw.fail_mode,
            &[
                ("local", FailMode::Local),
                ("open", FailMode::Open),
                ("closed", FailMode::Closed),
            ],
        );
        let fallback_instances =
            self.number("FALLBACK_INSTANCES", &raw.fallback_instances, 1, 10_000);

        let trusted_proxies = self.trusted_proxies(&raw.trusted_proxies);
        let ipv6_prefix_len = self.number("IPV6_PREFIX_LEN", &raw.ipv6_prefix_len, 1, 128);

        let host = given(&raw.host).unwrap_or("0.0.0.0");
        let host = match host.parse::<IpAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.problem(
                    "HOST",
                    "an IP address to listen on, such as 0.0.0.0 or ::",
                    host,
                );
                None
            }
        };
        let port = self.number("PORT", &raw.port, 0, u64::from(u16::MAX));
        let workers = self.number("WORKERS", &raw.workers, 1, 1024);
        let headers = self.choice(
            "RATELIMIT_HEADERS",
            &raw.ratelimit_headers,
            &[
                ("draft", HeaderMode::Draft),
                ("legacy", HeaderMode::Legacy),
                ("both", HeaderMode::Both),
                ("none", HeaderMode::None),
            ],
        );
        let metrics = self.choice("METRICS", &raw.metrics, ON_OFF);
        let access_log = self.choice("ACCESS_LOG", &raw.access_log, ON_OFF);
        let shutdown_timeout = self.number("SHUTDOWN_TIMEOUT_S", &raw.shutdown_timeout_s, 0, 3600);
        let deny_cache_size = self.number("DENY_CACHE_SIZE", &raw.deny_cache_size, 0, 100_000_000);
        let memory_store_max_buckets = self.number(
            "MEMORY_STORE_MAX_BUCKETS",
            &raw.memory_store_max_buckets,
            1,
            100_000_000,
        );

        let instance_name = given(&raw.instance_name)
            .map(str::to_string)
            .unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned());
        if instance_name.is_empty() || instance_name.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
            self.problem(
                "INSTANCE_NAME",
                "printable ASCII without spaces",
                &instance_name,
            );
        }

        let (Some(policy), Some(store), Some(host), Some(trusted_proxies)) =
            (policy, store, host, trusted_proxies)
        else {
            return Err(ConfigError::Invalid(self.problems));
        };
        if !self.problems.is_empty() {
            return Err(ConfigError::Invalid(self.problems));
        }
        let ipv6_prefix_len = ipv6_prefix_len.unwrap_or(64) as u8;
        Ok(Settings {
            policy,
            store,
            redis: RedisSettings {
                mode: mode.unwrap_or(ConnectionMode::Multiplexed),
                password: given(&raw.redis_password).map(str::to_string),
                timeout: Duration::from_millis(timeout_ms.unwrap_or(100)),
                pool_size: pool_size.unwrap_or(16) as u32,
                poll: Duration::from_millis(poll_ms.unwrap_or(1000)),
                key_prefix,
            },
            fail_mode: fail_mode.unwrap_or(FailMode::Local),
            fallback_instances,
            identity: IdentityRules::new(trusted_proxies.clone(), ipv6_prefix_len),
            trusted_proxies,
            host,
            port: port.unwrap_or(8000) as u16,
            workers: workers.map(|w| w as usize),
            instance_name,
            headers: headers.unwrap_or(HeaderMode::Draft),
            access_log: access_log.unwrap_or(false),
            shutdown_timeout: Duration::from_secs(shutdown_timeout.unwrap_or(10)),
            deny_cache_size: deny_cache_size.unwrap_or(100_000) as usize,
            memory_store_max_buckets: memory_store_max_buckets
                .map_or(DEFAULT_MAX_BUCKETS, |max| max as usize),
            metrics: metrics.unwrap_or(true),
        })
    }

    fn store(&mut self, raw: &Raw) -> Option<StoreSettings> {
        match (given(&raw.redis_url), given(&raw.sentinel_hosts)) {
            (Some(_), Some(_)) => {
                self.problems.push(
                    "REDIS_URL and SENTINEL_HOSTS are both set: set REDIS_URL for one Redis server or SENTINEL_HOSTS for Sentinel, not both".into(),
                );
                None
            }
            (Some(url), None) => {
                if redis::parse_redis_url(url).is_none() || !url.starts_with("redis://") {
                    self.problem(
                        "REDIS_URL",
                        "a URL such as redis://:password@host:6379",
                        &mask_url(url),
                    );
                    return None;
                }
                Some(StoreSettings::Redis {
                    url: url.to_string(),
                })
            }
            (None, Some(hosts)) => {
                let mut parsed = Vec::new();
                for entry in hosts.split(',').map(str::trim) {
                    match parse_host_port(entry) {
                        Some(host_port) => parsed.push(host_port),
                        None => {
                            self.problem("SENTINEL_HOSTS", "host:port,host:port,...", hosts);
                            return None;
                        }
                    }
                }
                let master_name = given(&raw.redis_master)
                    .unwrap_or("redis-master")
                    .to_string();
                Some(StoreSettings::Sentinel {
                    hosts: parsed,
                    master_name,
                    sentinel_password: given(&raw.sentinel_password).map(str::to_string),
                })
            }
            (None, None) => Some(StoreSettings::Memory),
        }
    }

    fn trusted_proxies(&mut self, raw: &Option<String>) -> Option<Vec<IpNet>> {
        let Some(text) = given(raw) else {
            return Some(Vec::new());
        };
        let mut nets = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let net = entry
                .parse::<IpNet>()
                .ok()
                .or_else(|| entry.parse::<IpAddr>().ok().map(IpNet::from));
            match net {
                Some(net) => nets.push(net.trunc()),
                None => {
                    self.problem(
                        "TRUSTED_PROXIES",
                        "comma-separated IP addresses or CIDRs",
                        entry,
                    );
                    return None;
                }
            }
        }
        Some(nets)
    }
}

fn parse_host_port(entry: &str) -> Option<(String, u16)> {
    let (host, port) = entry.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port.parse().ok().filter(|p| *p > 0)?))
}

/// `url` with any password replaced, fit for logs and error messages.
pub fn mask_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl fmt::Display for Settings {
    /// The effective configuration, on one line, with secrets masked.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let store = match &self.store {
            StoreSettings::Memory => "memory (per instance, not distributed)".to_string(),
            StoreSettings::Redis { url } => format!("redis {}", mask_url(url)),
            StoreSettings::Sentinel {
                hosts,
                master_name,
                sentinel_password,
            } => {
                let hosts: Vec<String> = hosts.iter().map(|(h, p)| format!("{h}:{p}")).collect();
                format!(
                    "sentinel {} master={master_name} sentinel_password={}",
                    hosts.join(","),
                    if sentinel_password.is_some() {
                        "***"
                    } else {
                        "(none)"
                    }
                )
            }
        };
        let proxies: Vec<String> = self
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        write!(
            f,
            "instance={} listen={}:{} policy=burst {} per {} s (rate {} per {} s) store={store} redis_password={} redis_timeout={}ms client={} pool={} key_prefix={} fail_mode={} trusted_proxies=[{}] headers={} deny_cache={} memory_store_max_buckets={} metrics={} workers={}",
            self.instance_name,
            self.host,
            self.port,
            self.policy.capacity(),
            self.policy.window_secs(),
            self.policy.rate_limit(),
            self.policy.window_secs(),
            if self.redis.password.is_some() {
                "***"
            } else {
                "(none)"
            },
            self.redis.timeout.as_millis(),
            self.redis.mode.as_str(),
            self.redis.pool_size,
            self.redis.key_prefix,
            self.fail_mode.as_str(),
            proxies.join(","),
            self.headers.as_str(),
            self.deny_cache_size,
            self.memory_store_max_buckets,
            if self.metrics { "on" } else { "off" },
            self.workers
                .map_or("per CPU".to_string(), |w| w.to_string()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load_from(
            vars.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn problems(vars: &[(&str, &str)]) -> String {
        match load(vars) {
            Err(err) => err.to_string(),
            Ok(_) => panic!("{vars:?} should be rejected"),
        }
    }

    #[test]
    fn the_defaults_are_ten_per_minute_in_memory() {
        let settings = load(&[]).unwrap();
        assert_eq!(settings.policy, Policy::parse(10, 60, 10).unwrap());
        assert!(settings.store == StoreSettings::Memory);
        assert_eq!(settings.port, 8000);
        assert_eq!(settings.fail_mode, FailMode::Local);
        assert_eq!(settings.headers, HeaderMode::Draft);
    }

    #[test]
    fn environment_variables_override_the_defaults() {
        let settings =
            load(&[("RATE_LIMIT", "20"), ("TIME_WINDOW", "30"), ("BURST", "40")]).unwrap();
        assert_eq!(settings.policy, Policy::parse(20, 30, 40).unwrap());
    }

    #[test]
    fn a_config_file_sits_between_defaults_and_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("custom.toml");
        std::fs::write(&path, "rate_limit = 7\nport = 9000\n").unwrap();
        let path = path.to_str().unwrap();
        let settings = load(&[("CONFIG_FILE", path), ("PORT", "9100")]).unwrap();
        assert_eq!(settings.policy.capacity(), 7);
        assert_eq!(settings.port, 9100);
    }

    #[test]
    fn every_bad_value_is_named_with_what_it_got() {
        let message = problems(&[
            ("RATE_LIMIT", "abc"),
            ("TIME_WINDOW", "-1"),
            ("TRUSTED_PROXIES", "10.0.0.0/33"),
            ("RATELIMIT_HEADERS", "fancy"),
        ]);
        assert!(
            message
                .contains("RATE_LIMIT: expected a whole number from 1 to 1000000000, got \"abc\""),
            "{message}"
        );
        assert!(
            message.contains("TIME_WINDOW: expected a whole number from 1 to 31536000, got \"-1\""),
            "{message}"
        );
        assert!(message.contains("TRUSTED_PROXIES: expected comma-separated IP addresses or CIDRs, got \"10.0.0.0/33\""), "{message}");
        assert!(
            message.contains(
                "RATELIMIT_HEADERS: expected one of draft, legacy, both, none, got \"fancy\""
            ),
            "{message}"
        );
        assert_eq!(message.lines().count(), 4, "{message}");
    }

    #[test]
    fn a_zero_rate_is_rejected() {
        assert!(
            problems(&[("RATE_LIMIT", "0")]).contains("RATE_LIMIT: expected a whole number from 1")
        );
    }

    #[test]
    fn a_missing_config_file_is_named() {
        assert!(
            problems(&[("CONFIG_FILE", "/nonexistent.toml")]).contains("CONFIG_FILE: no such file")
        );
    }

    #[test]
    fn redis_url_and_sentinel_hosts_exclude_each_other() {
        let message = problems(&[
            ("REDIS_URL", "redis://127.0.0.1:6379"),
            ("SENTINEL_HOSTS", "127.0.0.1:26379"),
        ]);
        assert!(message.contains("not both"), "{message}");
    }

    #[test]
    fn sentinel_hosts_are_parsed_with_the_master_name() {
        let settings = load(&[
            ("SENTINEL_HOSTS", "s1:26379, 127.0.0.1:26380"),
            ("REDIS_MASTER", "mymaster"),
        ])
        .unwrap();
        let StoreSettings::Sentinel {
            hosts, master_name, ..
        } = settings.store
        else {
            panic!("not sentinel mode");
        };
        assert_eq!(
            hosts,
            vec![("s1".to_string(), 26379), ("127.0.0.1".to_string(), 26380)]
        );
        assert_eq!(master_name, "mymaster");
        assert!(
            problems(&[("SENTINEL_HOSTS", "s1")]).contains("SENTINEL_HOSTS: expected host:port")
        );
    }

    #[test]
    fn passwords_never_reach_the_logged_configuration() {
        let settings = load(&[
            ("REDIS_URL", "redis://:s3cret@127.0.0.1:6379"),
            ("REDIS_PASSWORD", "hunter2"),
        ])
        .unwrap();
        let logged = settings.to_string();
        assert!(
            !logged.contains("s3cret") && !logged.contains("hunter2"),
            "{logged}"
        );
        assert!(logged.contains("redis://:***@127.0.0.1:6379"), "{logged}");
    }

    #[test]
    fn trusted_proxies_accept_addresses_and_networks() {
        let settings = load(&[("TRUSTED_PROXIES", "127.0.0.2, 10.0.0.0/8,::1")]).unwrap();
        let nets: Vec<String> = settings
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(nets, vec!["127.0.0.2/32", "10.0.0.0/8", "::1/128"]);
    }

    #[test]
    fn unrelated_environment_variables_are_ignored() {
        assert!(load(&[("PATH", "/usr/bin"), ("HOME", "x")]).is_ok());
    }
}

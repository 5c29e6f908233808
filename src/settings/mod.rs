//! Settings: `config/default.toml` (compiled in), then an optional `CONFIG_FILE`, then
//! environment variables; parsed once, at start-up, into the domain's own types.
//!
//! Each setting is declared once, in [`declared`]. Every problem is reported, each on its
//! own line naming the variable and the value it got, so that one restart fixes them all.
//! This module depends on the domain (limits, fail modes, header modes); the domain never
//! depends on it.

pub mod declared;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use ipnet::IpNet;
use secrecy::SecretString;
use thiserror::Error;

use crate::bucket::LimitSpec;
use crate::http::headers::HeaderMode;
use crate::identity::IdentityRules;
use crate::limiter::FailMode;
use crate::policy::{HashKey, PolicySet};
use crate::store::redis::ConnectionMode;
use declared::{Expect, Preset, Setting};

/// `config/default.toml`, the base layer.
pub const DEFAULTS: &str = include_str!("../../config/default.toml");

#[derive(Debug, Error)]
pub enum SettingsError {
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
    #[error("cannot read the settings: {0}")]
    Unreadable(String),
}

/// Where buckets live.
#[derive(Clone)]
pub enum StoreSettings {
    Memory,
    Redis {
        url: SecretString,
    },
    Sentinel {
        hosts: Vec<(String, u16)>,
        master_name: String,
        sentinel_password: Option<SecretString>,
        /// `REDIS_DATA_NODES`: the only masters to believe; `None` believes any.
        data_nodes: Option<Vec<(String, u16)>>,
    },
    /// Redis Cluster: seed nodes, which tell of the others.
    Cluster {
        nodes: Vec<(String, u16)>,
    },
}

#[derive(Clone)]
pub struct RedisSettings {
    pub mode: ConnectionMode,
    /// `REDIS_USERNAME`: the ACL user on every data node; `None` is Redis's default user.
    pub username: Option<String>,
    pub password: Option<SecretString>,
    pub timeout: Duration,
    pub pool_size: u32,
    pub poll: Duration,
    pub key_prefix: String,
}

/// Where the policies come from.
#[derive(Clone)]
pub enum PolicySource {
    /// No `POLICY_FILE`: the one default policy.
    Single,
    /// `POLICY_FILE`, as read at start; reloaded while the service runs.
    File {
        path: std::path::PathBuf,
        text: String,
        poll: Duration,
    },
}

#[derive(Clone)]
pub struct Settings {
    /// The policies in force at start.
    pub policies: std::sync::Arc<PolicySet>,
    pub policy_source: PolicySource,
    /// Keys the hash of header values in bucket keys (`POLICY_KEY_SECRET`).
    pub policy_hash_key: HashKey,
    pub store: StoreSettings,
    pub redis: RedisSettings,
    pub fail_mode: FailMode,
    pub fallback_instances: Option<u64>,
    pub identity: IdentityRules,
    pub host: IpAddr,
    pub port: u16,
    pub workers: Option<usize>,
    pub instance_name: String,
    pub headers: HeaderMode,
    pub access_log: bool,
    /// `LOG_QUEUE_LINES`: how many log lines may wait for the writer thread.
    pub log_queue_lines: usize,
    pub shutdown_timeout: Duration,
    pub deny_cache_size: usize,
    pub memory_store_max_buckets: usize,
    pub metrics: bool,
    /// `ADMIN_TOKEN`: what the decision and bucket API require as a bearer token; `None`
    /// serves them to local callers only.
    pub admin_token: Option<SecretString>,
    /// Every setting's effective value, secrets masked, for the start-up log line.
    effective: String,
}

impl Settings {
    /// Loads from the process environment.
    pub fn load() -> Result<Self, SettingsError> {
        Self::load_from(std::env::vars().collect())
    }

    /// Loads from `env` instead of the process environment (tests use this).
    pub fn load_from(env: HashMap<String, String>) -> Result<Self, SettingsError> {
        let mut builder = Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml));
        if let Some(path) = env
            .get(declared::CONFIG_FILE.name)
            .filter(|p| !p.is_empty())
        {
            if !std::path::Path::new(path).is_file() {
                return Err(SettingsError::Invalid(vec![format!(
                    "CONFIG_FILE: no such file, got {path:?}"
                )]));
            }
            builder = builder.add_source(File::new(path, FileFormat::Toml));
        }
        let known: HashMap<String, String> = env
            .into_iter()
            .filter(|(name, _)| declared::LAYERED.iter().any(|s| s.name == name))
            .collect();
        let layered = builder
            .add_source(Environment::default().source(Some(known)))
            .build()
            .map_err(|err| SettingsError::Unreadable(err.to_string()))?;
        let mut raw = HashMap::new();
        for setting in declared::LAYERED {
            // A number in TOML reads as its text; anything else (a table, a list) is a
            // problem to report, not a reason to stop reading the others.
            match layered.get_string(&setting.file_key()) {
                Ok(text) => {
                    raw.insert(setting.name, text);
                }
                Err(config::ConfigError::NotFound(_)) => {}
                Err(err) => {
                    return Err(SettingsError::Unreadable(format!(
                        "{}: {err}",
                        setting.name
                    )));
                }
            }
        }
        Parser {
            raw,
            problems: Vec::new(),
        }
        .parse()
    }
}

impl std::fmt::Display for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.effective)
    }
}

/// Turns raw text into typed values, collecting every problem instead of stopping at one.
struct Parser {
    /// The layered text of each setting that any layer gave.
    raw: HashMap<&'static str, String>,
    problems: Vec<String>,
}

impl Parser {
    /// The setting's text, or its preset when no layer gave one (an empty value means
    /// "not set").
    fn text(&self, setting: &Setting) -> Option<&str> {
        let given = self
            .raw
            .get(setting.name)
            .map(|text| text.trim())
            .filter(|text| !text.is_empty());
        match (given, setting.preset) {
            (Some(text), _) => Some(text),
            (None, Preset::Value(preset)) => Some(preset),
            (None, Preset::Unset(_)) => None,
        }
    }

    fn problem(&mut self, setting: &Setting, expected: &str, got: &str) {
        self.problems.push(format!(
            "{}: expected {expected}, got {got:?}",
            setting.name
        ));
    }

    fn whole(&mut self, setting: &Setting) -> Option<u64> {
        let Expect::Whole { min, max } = setting.expects else {
            unreachable!("{} is not declared as a whole number", setting.name)
        };
        let text = self.text(setting)?;
        match text.parse::<u64>() {
            Ok(value) if (min..=max).contains(&value) => Some(value),
            _ => {
                let text = text.to_string();
                self.problem(
                    setting,
                    &format!("a whole number from {min} to {max}"),
                    &text,
                );
                None
            }
        }
    }

    fn word<T: FromStr>(&mut self, setting: &Setting) -> Option<T> {
        let Expect::Word(words) = setting.expects else {
            unreachable!("{} is not declared as a word", setting.name)
        };
        let text = self.text(setting)?;
        match text.parse::<T>() {
            Ok(value) => Some(value),
            Err(_) => {
                let text = text.to_string();
                self.problem(setting, &format!("one of {}", words.join(", ")), &text);
                None
            }
        }
    }

    fn switch(&mut self, setting: &Setting) -> Option<bool> {
        let text = self.text(setting)?;
        match text.to_ascii_lowercase().as_str() {
            "on" | "true" | "1" => Some(true),
            "off" | "false" | "0" => Some(false),
            _ => {
                let text = text.to_string();
                self.problem(setting, "one of on, off, true, false, 1, 0", &text);
                None
            }
        }
    }

    fn secret(&self, setting: &Setting) -> Option<SecretString> {
        self.text(setting).map(SecretString::from)
    }

    fn parse(mut self) -> Result<Settings, SettingsError> {
        use declared::*;
        let effective = self.effective();
        let rate = self.whole(&RATE_LIMIT);
        let window_s = self.whole(&TIME_WINDOW);
        let burst = self.whole(&BURST);
        let spec = match (rate, window_s) {
            (Some(rate), Some(window_s)) => Some(LimitSpec {
                rate,
                window_s,
                burst: burst.unwrap_or(rate),
            }),
            _ => None,
        };
        let policy_hash_key = self
            .text(&POLICY_KEY_SECRET)
            .map_or_else(HashKey::default, |secret| {
                HashKey::from_secret(secret.as_bytes())
            });
        let policy_poll = self.whole(&POLICY_POLL_MS).map(Duration::from_millis);
        let policies = self.policies(spec, &policy_hash_key, policy_poll);

        let store = self.store();
        let timeout_ms = self.whole(&REDIS_TIMEOUT_MS);
        let poll_ms = self.whole(&SENTINEL_POLL_MS);
        let pool_size = self.whole(&REDIS_POOL_SIZE);
        let mode = self.word::<ConnectionMode>(&REDIS_CLIENT);
        let key_prefix = self.text(&KEY_PREFIX).unwrap_or_default().to_string();
        if key_prefix
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            self.problem(&KEY_PREFIX, "no spaces or control characters", &key_prefix);
        }

        if matches!(store, Some(StoreSettings::Cluster { .. })) {
            if mode == Some(ConnectionMode::Pool) {
                self.problems.push(
                    "REDIS_CLIENT: pool does not apply with REDIS_CLUSTER_NODES (Cluster mode keeps one multiplexed connection per node and worker); unset it".into(),
                );
            }
            if key_prefix.contains(['{', '}']) {
                self.problem(
                    &KEY_PREFIX,
                    "no braces with REDIS_CLUSTER_NODES (a {…} in the prefix would put every bucket in one hash slot)",
                    &key_prefix,
                );
            }
        }

        let fail_mode = self.word::<FailMode>(&FAIL_MODE);
        let fallback_instances = self.whole(&FALLBACK_INSTANCES);
        let trusted_proxies = self.trusted_proxies();
        let ipv6_prefix_len = self.whole(&IPV6_PREFIX_LEN);

        let host = self.text(&HOST).unwrap_or_default().to_string();
        let host = host
            .parse::<IpAddr>()
            .map_err(|_| {
                self.problem(
                    &HOST,
                    "an IP address to listen on, such as 0.0.0.0 or ::",
                    &host,
                )
            })
            .ok();
        let port = self.whole(&PORT);
        let workers = self.whole(&WORKERS);
        let headers = self.word::<HeaderMode>(&RATELIMIT_HEADERS);
        let metrics = self.switch(&METRICS);
        let access_log = self.switch(&ACCESS_LOG);
        let log_queue_lines = self.whole(&LOG_QUEUE_LINES);
        let shutdown_timeout = self.whole(&SHUTDOWN_TIMEOUT_S);
        let deny_cache_size = self.whole(&DENY_CACHE_SIZE);
        let memory_store_max_buckets = self.whole(&MEMORY_STORE_MAX_BUCKETS);

        let instance_name = self
            .text(&INSTANCE_NAME)
            .map(str::to_string)
            .unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned());
        if instance_name.is_empty() || instance_name.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
            self.problem(
                &INSTANCE_NAME,
                "printable ASCII without spaces",
                &instance_name,
            );
        }
        let redis_username = self.text(&REDIS_USERNAME).map(str::to_string);
        if let Some(username) = &redis_username
            && username.bytes().any(|b| !(0x21..0x7f).contains(&b))
        {
            // Redis refuses such a name in an ACL rule; saying so here beats a WRONGPASS.
            self.problem(
                &REDIS_USERNAME,
                "a Redis user name: printable ASCII without spaces",
                username,
            );
        }
        let redis_password = self.secret(&REDIS_PASSWORD);
        let admin_token = self.secret(&ADMIN_TOKEN);

        // Every setting with a preset parses to Some unless it was reported.
        let (
            Some((policies, policy_source)),
            Some(store),
            Some(timeout_ms),
            Some(poll_ms),
            Some(pool_size),
            Some(mode),
            Some(fail_mode),
            Some(trusted_proxies),
            Some(ipv6_prefix_len),
            Some(host),
            Some(port),
            Some(headers),
            Some(metrics),
            Some(access_log),
            Some(log_queue_lines),
            Some(shutdown_timeout),
            Some(deny_cache_size),
            Some(memory_store_max_buckets),
        ) = (
            policies,
            store,
            timeout_ms,
            poll_ms,
            pool_size,
            mode,
            fail_mode,
            trusted_proxies,
            ipv6_prefix_len,
            host,
            port,
            headers,
            metrics,
            access_log,
            log_queue_lines,
            shutdown_timeout,
            deny_cache_size,
            memory_store_max_buckets,
        )
        else {
            return Err(SettingsError::Invalid(self.problems));
        };
        if !self.problems.is_empty() {
            return Err(SettingsError::Invalid(self.problems));
        }
        Ok(Settings {
            policies: std::sync::Arc::new(policies),
            policy_source,
            policy_hash_key,
            store,
            redis: RedisSettings {
                mode,
                username: redis_username,
                password: redis_password,
                timeout: Duration::from_millis(timeout_ms),
                pool_size: pool_size as u32,
                poll: Duration::from_millis(poll_ms),
                key_prefix,
            },
            fail_mode,
            fallback_instances,
            identity: IdentityRules::new(trusted_proxies, ipv6_prefix_len as u8),
            host,
            port: port as u16,
            workers: workers.map(|w| w as usize),
            instance_name,
            headers,
            access_log,
            log_queue_lines: log_queue_lines as usize,
            shutdown_timeout: Duration::from_secs(shutdown_timeout),
            deny_cache_size: deny_cache_size as usize,
            memory_store_max_buckets: memory_store_max_buckets as usize,
            metrics,
            admin_token,
            effective,
        })
    }

    /// `NAME=value` for every layered setting, as the service will use it.
    fn effective(&self) -> String {
        let mut line = String::new();
        for setting in declared::LAYERED {
            let shown = match (self.text(setting), setting.expects) {
                (None, _) => "(unset)".to_string(),
                (Some(_), Expect::Secret) => "***".to_string(),
                (Some(url), Expect::Url) => mask_url(url),
                (Some(text), _) => text.to_string(),
            };
            let separator = if line.is_empty() { "" } else { " " };
            let _ = write!(line, "{separator}{}={shown}", setting.name);
        }
        line
    }

    /// The policy file's set, or the default policy; a file that cannot be read or does not
    /// parse is reported as `POLICY_FILE` problems, one line each (`file:line: message`).
    fn policies(
        &mut self,
        spec: Option<LimitSpec>,
        hash_key: &HashKey,
        poll: Option<Duration>,
    ) -> Option<(PolicySet, PolicySource)> {
        let Some(path) = self
            .text(&declared::POLICY_FILE)
            .map(std::path::PathBuf::from)
        else {
            let set = PolicySet::single(spec?)
                .map_err(|err| {
                    self.problems
                        .push(format!("RATE_LIMIT, TIME_WINDOW, BURST: {err}"))
                })
                .ok()?;
            return Some((set, PolicySource::Single));
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) => {
                self.problems.push(format!(
                    "POLICY_FILE: cannot read {:?}: {err}",
                    path.display().to_string()
                ));
                return None;
            }
        };
        match PolicySet::parse_with_hash_key(&text, &path.display().to_string(), hash_key.clone()) {
            Ok(set) => Some((
                set,
                PolicySource::File {
                    path,
                    text,
                    poll: poll?,
                },
            )),
            Err(err) => {
                self.problems.extend(err.problems);
                None
            }
        }
    }

    fn store(&mut self) -> Option<StoreSettings> {
        use declared::*;
        let url = self.text(&REDIS_URL).map(str::to_string);
        let hosts = self.text(&SENTINEL_HOSTS).map(str::to_string);
        let data_nodes = self.text(&REDIS_DATA_NODES).map(str::to_string);
        if data_nodes.is_some() && hosts.is_none() {
            self.problems.push(
                "REDIS_DATA_NODES: applies only with SENTINEL_HOSTS (it limits the masters a sentinel may name); unset it, or set SENTINEL_HOSTS".into(),
            );
            return None;
        }
        if let Some(nodes) = self.text(&REDIS_CLUSTER_NODES).map(str::to_string) {
            let others: Vec<&str> = [(&url, REDIS_URL.name), (&hosts, SENTINEL_HOSTS.name)]
                .into_iter()
                .filter_map(|(set, name)| set.as_ref().map(|_| name))
                .collect();
            if !others.is_empty() {
                self.problems.push(format!(
                    "REDIS_CLUSTER_NODES and {} are both set: set REDIS_CLUSTER_NODES for Redis Cluster, SENTINEL_HOSTS for Sentinel or REDIS_URL for one Redis server, only one of them",
                    others.join(" and ")
                ));
                return None;
            }
            let nodes = self.host_ports(&REDIS_CLUSTER_NODES, &nodes)?;
            return Some(StoreSettings::Cluster { nodes });
        }
        match (url, hosts) {
            (Some(_), Some(_)) => {
                self.problems.push(
                    "REDIS_URL and SENTINEL_HOSTS are both set: set REDIS_URL for one Redis server or SENTINEL_HOSTS for Sentinel, not both".into(),
                );
                None
            }
            (Some(url), None) => {
                if redis::parse_redis_url(&url).is_none() || !url.starts_with("redis://") {
                    self.problem(
                        &REDIS_URL,
                        "a URL such as redis://:password@host:6379",
                        &mask_url(&url),
                    );
                    return None;
                }
                Some(StoreSettings::Redis {
                    url: SecretString::from(url),
                })
            }
            (None, Some(hosts)) => Some(StoreSettings::Sentinel {
                hosts: self.host_ports(&SENTINEL_HOSTS, &hosts)?,
                master_name: self.text(&REDIS_MASTER).unwrap_or_default().to_string(),
                sentinel_password: self.secret(&SENTINEL_PASSWORD),
                data_nodes: match data_nodes {
                    Some(nodes) => Some(self.host_ports(&REDIS_DATA_NODES, &nodes)?),
                    None => None,
                },
            }),
            (None, None) => Some(StoreSettings::Memory),
        }
    }

    /// `text` as `host:port,host:port,…`, or a problem reported for `setting`.
    fn host_ports(&mut self, setting: &Setting, text: &str) -> Option<Vec<(String, u16)>> {
        let mut parsed = Vec::new();
        for entry in text.split(',').map(str::trim) {
            match parse_host_port(entry) {
                Some(host_port) => parsed.push(host_port),
                None => {
                    self.problem(setting, "host:port,host:port,...", text);
                    return None;
                }
            }
        }
        Some(parsed)
    }

    fn trusted_proxies(&mut self) -> Option<Vec<IpNet>> {
        let Some(text) = self.text(&declared::TRUSTED_PROXIES).map(str::to_string) else {
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
                        &declared::TRUSTED_PROXIES,
                        "comma-separated IP addresses or CIDRs",
                        entry,
                    );
                    return None;
                }
            }
        }
        let allow_all = self.switch(&declared::TRUSTED_PROXIES_ALLOW_ALL)?;
        if let Some(everything) = nets.iter().find(|net| net.prefix_len() == 0)
            && !allow_all
        {
            self.problems.push(format!(
                "TRUSTED_PROXIES: {everything} trusts every address as a proxy, so any client \
                 could set X-Forwarded-For to a new address on each request and never be \
                 limited; list your proxies' addresses, or set TRUSTED_PROXIES_ALLOW_ALL=on \
                 if no client can reach the instances except through them"
            ));
            return None;
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

/// `url` with its credentials masked, fit for logs and error messages: a password
/// (`user:secret@`), a lone user part (`secret@`, which Redis takes as a password when it
/// has no ACL users) and `password=`/`pass=` query parameters all become `***`.
pub fn mask_url(url: &str) -> String {
    let (rest, query) = match url.split_once('?') {
        Some((rest, query)) => (rest, Some(query)),
        None => (url, None),
    };
    let mut masked = match (rest.find("://"), rest.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &rest[scheme_end + 3..at];
            let shown = match credentials.split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => "***".to_string(),
            };
            format!("{}{shown}{}", &rest[..scheme_end + 3], &rest[at..])
        }
        _ => rest.to_string(),
    };
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((name, _))
                    if name.eq_ignore_ascii_case("password")
                        || name.eq_ignore_ascii_case("pass") =>
                {
                    format!("{name}=***")
                }
                _ => param.to_string(),
            })
            .collect();
        masked.push('?');
        masked.push_str(&params.join("&"));
    }
    masked
}

#[cfg(test)]
mod tests;

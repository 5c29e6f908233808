//! Settings: `config/default.toml` (compiled in), then an optional `CONFIG_FILE`, then
//! environment variables; parsed once, at start-up, into the domain's own types.
//!
//! Each setting is declared once, in [`declared`], with the parser that turns its text into
//! its value; the rules between settings (which store, which policies, which proxies) are
//! here and in `store`. Every problem is reported, each on its own line naming the variable
//! and the value it got, so that one restart fixes them all. This module depends on the
//! domain (limits, fail modes, header modes, connection modes); the domain never depends
//! on it.

pub mod declared;
mod parse;
mod store;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use secrecy::{ExposeSecret, SecretString};
use thiserror::Error;

use crate::bucket::LimitSpec;
use crate::http::socket::UnixSocket;
use crate::identity::IdentityRules;
use crate::limiter::FailMode;
use crate::policy::{HashKey, PolicySet};
use crate::quota_headers::HeaderMode;
use crate::rls::{RlsConfigError, RuleSet};
use declared::{
    BURST, Declared, Expect, GRPC_PORT, Given, INSTANCE_NAME, PORT, Preset, Problems, RATE_LIMIT,
    RLS_CONFIG, TIME_WINDOW, TRUSTED_PROXIES, TRUSTED_PROXIES_ALLOW_ALL, UNIX_SOCKET,
};
pub use parse::{HostPort, RedisClient, mask_url};
pub use store::{MasterSettings, NodeAccess, StoreSettings};

/// `config/default.toml`, the base layer.
pub const DEFAULTS: &str = include_str!("../../config/default.toml");

#[derive(Debug, Error)]
pub enum SettingsError {
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
    #[error("cannot read the settings: {0}")]
    Unreadable(String),
}

/// Where the policies come from.
#[derive(Clone)]
pub enum PolicySource {
    /// No `POLICY_FILE`: the one default policy.
    Single,
    /// `POLICY_FILE`, and its text as read and parsed at start.
    File { file: PolicyFile, text: String },
}

/// `POLICY_FILE`, and how its text becomes policies: at start and at every reload alike.
#[derive(Clone)]
pub struct PolicyFile {
    pub path: PathBuf,
    /// `POLICY_POLL_MS`: how often the file is checked for a change.
    pub poll: Duration,
    /// Keys the hash of header values in bucket keys (`POLICY_KEY_SECRET`).
    hash_key: HashKey,
}

impl PolicyFile {
    /// The policies `text` declares, or every problem in it (`file:line: message`).
    pub fn parse(&self, text: &str) -> Result<PolicySet, Vec<String>> {
        let file_name = self.path.display().to_string();
        PolicySet::parse_with_hash_key(text, &file_name, self.hash_key.clone())
            .map_err(|err| err.problems)
    }
}

/// Where the rate-limit service's rules come from.
#[derive(Clone)]
pub enum RlsSource {
    /// No `RLS_CONFIG`: no rules.
    Empty,
    /// `RLS_CONFIG`, and its files as read and parsed at start.
    Config {
        config: RlsConfig,
        files: Vec<(String, String)>,
    },
}

/// `RLS_CONFIG`, and how its files become rules: at start and at every reload alike.
#[derive(Clone)]
pub struct RlsConfig {
    /// One YAML file, or a folder of them.
    pub path: PathBuf,
    /// `POLICY_POLL_MS`: how often the files are checked for a change.
    pub poll: Duration,
    /// Keys the hash of long descriptor values in bucket keys (`POLICY_KEY_SECRET`).
    hash_key: HashKey,
}

impl RlsConfig {
    /// The files as they are now, as (name, text), or why they cannot be read.
    pub fn read(&self) -> Result<Vec<(String, String)>, String> {
        RuleSet::read_files(&self.path).map_err(|err| err.to_string())
    }

    /// The rules `files` declare, or every problem in them (`file:line: message`).
    pub fn parse(&self, files: &[(String, String)]) -> Result<RuleSet, Vec<String>> {
        let files: Vec<(&str, &str)> = files
            .iter()
            .map(|(name, text)| (name.as_str(), text.as_str()))
            .collect();
        RuleSet::parse(&files, self.hash_key.clone()).map_err(|err| match err {
            RlsConfigError::Invalid { problems } => {
                problems.iter().map(ToString::to_string).collect()
            }
            other => vec![other.to_string()],
        })
    }
}

/// What the service runs with. The fields each declared setting fills on its own carry its
/// name when it differs; its doc is in [`declared`].
#[derive(Clone)]
pub struct Settings {
    /// The policies in force at start.
    pub policies: Arc<PolicySet>,
    pub policy_source: PolicySource,
    pub store: StoreSettings,
    /// Begins every bucket key, whichever the store.
    pub key_prefix: String,
    pub fail_mode: FailMode,
    pub fallback_instances: Option<u64>,
    /// `TRUSTED_PROXIES` and `IPV6_PREFIX_LEN`.
    pub identity: IdentityRules,
    /// The rate-limit service's rules in force at start.
    pub rules: Arc<RuleSet>,
    pub rls_source: RlsSource,
    pub host: IpAddr,
    /// `PORT`; `None` (`off`): HTTP on the socket only.
    pub port: Option<u16>,
    /// `UNIX_SOCKET` and `UNIX_SOCKET_MODE`; `None`: no socket.
    pub unix_socket: Option<UnixSocket>,
    /// `GRPC_PORT`: where the rate-limit service listens, on `host`; `None`: it does not.
    pub grpc_port: Option<u16>,
    pub workers: Option<usize>,
    /// `INSTANCE_NAME`, or the host name.
    pub instance_name: String,
    /// `RATELIMIT_HEADERS`
    pub headers: HeaderMode,
    /// The headers a `ShouldRateLimit` answer asks Envoy to add (`RLS_RESPONSE_HEADERS`);
    /// `None`: none.
    pub rls_headers: Option<HeaderMode>,
    pub access_log: bool,
    pub log_queue_lines: usize,
    /// `SHUTDOWN_TIMEOUT_S`
    pub shutdown_timeout: Duration,
    pub deny_cache_size: usize,
    pub memory_store_max_buckets: usize,
    pub metrics: bool,
    /// What the decision and bucket API require as a bearer token; `None` serves them to
    /// local callers only.
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
        // Each setting is read as text: an environment variable is text, and a number or a
        // switch in TOML reads as its text, so every layer is parsed by the same parser.
        let given: Given = builder
            .add_source(Environment::default().source(Some(known)))
            .build()
            .and_then(Config::try_deserialize)
            .map_err(|err| SettingsError::Unreadable(err.to_string()))?;
        let mut problems = Problems::default();
        let declared = given.read(&mut problems);
        let settings = Self::assemble(declared, &given, &mut problems);
        problems.finish(settings).map_err(SettingsError::Invalid)
    }

    /// Applies the rules between settings. Every rule runs whatever the others found, so
    /// that their problems are reported together; `None` only when one was reported.
    fn assemble(declared: Declared, given: &Given, problems: &mut Problems) -> Option<Self> {
        let policies = policies(&declared, problems);
        let rules = rules(&declared, given, problems);
        let store = store::store(&declared, given, problems);
        let identity = identity(&declared, problems);
        let instance_name = instance_name(&declared, given, problems);
        let unix_socket = unix_socket(&declared, problems);
        let (policies, policy_source) = policies?;
        let (rules, rls_source) = rules?;
        Some(Settings {
            policies: Arc::new(policies),
            policy_source,
            rules: Arc::new(rules),
            rls_source,
            store: store?,
            key_prefix: declared.key_prefix,
            fail_mode: declared.fail_mode,
            fallback_instances: declared.fallback_instances,
            identity: identity?,
            host: declared.host,
            port: declared.port,
            unix_socket: unix_socket?,
            grpc_port: declared.grpc_port,
            workers: declared.workers,
            instance_name: instance_name?,
            headers: declared.ratelimit_headers,
            rls_headers: declared
                .rls_response_headers
                .then_some(declared.ratelimit_headers),
            access_log: declared.access_log,
            log_queue_lines: declared.log_queue_lines,
            shutdown_timeout: declared.shutdown_timeout_s,
            deny_cache_size: declared.deny_cache_size,
            memory_store_max_buckets: declared.memory_store_max_buckets,
            metrics: declared.metrics,
            admin_token: declared.admin_token,
            effective: effective(given),
        })
    }
}

impl std::fmt::Display for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.effective)
    }
}

/// The policy file's set, or the one default policy of `RATE_LIMIT`, `TIME_WINDOW` and
/// `BURST`. A file that cannot be read or does not parse is reported as `POLICY_FILE`
/// problems, one line each (`file:line: message`).
fn policies(declared: &Declared, problems: &mut Problems) -> Option<(PolicySet, PolicySource)> {
    let Some(path) = &declared.policy_file else {
        let spec = LimitSpec {
            rate: declared.rate_limit,
            window_s: declared.time_window,
            burst: declared.burst.unwrap_or(declared.rate_limit),
        };
        return match PolicySet::single(spec) {
            Ok(set) => Some((set, PolicySource::Single)),
            Err(err) => {
                problems.add_unless_refused(
                    &[&RATE_LIMIT, &TIME_WINDOW, &BURST],
                    format!("RATE_LIMIT, TIME_WINDOW, BURST: {err}"),
                );
                None
            }
        };
    };
    let file = PolicyFile {
        path: path.clone(),
        poll: declared.policy_poll_ms,
        hash_key: hash_key(declared),
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) => {
            problems.add(format!(
                "POLICY_FILE: cannot read {:?}: {err}",
                path.display().to_string()
            ));
            return None;
        }
    };
    let set = problems.take(file.parse(&text))?;
    Some((set, PolicySource::File { file, text }))
}

/// `POLICY_KEY_SECRET`'s key, or the fixed public one.
fn hash_key(declared: &Declared) -> HashKey {
    declared
        .policy_key_secret
        .as_ref()
        .map_or_else(HashKey::default, |secret| {
            HashKey::from_secret(secret.expose_secret().as_bytes())
        })
}

/// The rate-limit service's rules from `RLS_CONFIG`, or none. Its files are read and
/// parsed here, once: a folder that cannot be read is an `RLS_CONFIG` problem, and each
/// problem of a file is a line of its own (`file:line: message`). The rules are served
/// over gRPC only, so `RLS_CONFIG` without `GRPC_PORT` is a mistake said at start rather
/// than a service that answers no one.
fn rules(
    declared: &Declared,
    given: &Given,
    problems: &mut Problems,
) -> Option<(RuleSet, RlsSource)> {
    if let (Some(grpc), Some(port)) = (declared.grpc_port, declared.port)
        && grpc == port
        && grpc != 0
    {
        problems.add_unless_refused(
            &[&GRPC_PORT, &PORT],
            format!("GRPC_PORT: expected a port other than PORT's, got \"{grpc}\" for both"),
        );
    }
    let Some(path) = &declared.rls_config else {
        return Some((RuleSet::empty(hash_key(declared)), RlsSource::Empty));
    };
    if !given.is_set(&GRPC_PORT) {
        problems.add(
            "RLS_CONFIG: applies only with GRPC_PORT (its rules answer Envoy's rate-limit service, served over gRPC); set GRPC_PORT, or unset RLS_CONFIG".into(),
        );
        return None;
    }
    let config = RlsConfig {
        path: path.clone(),
        poll: declared.policy_poll_ms,
        hash_key: hash_key(declared),
    };
    let files = match config.read() {
        Ok(files) => files,
        Err(err) => {
            problems.add(format!("{}: {err}", RLS_CONFIG.name));
            return None;
        }
    };
    let rules = problems.take(config.parse(&files))?;
    Some((rules, RlsSource::Config { config, files }))
}

/// Whose forwarding headers are believed. A network that holds every address is refused
/// unless `TRUSTED_PROXIES_ALLOW_ALL` says the instances are reachable only through proxies.
fn identity(declared: &Declared, problems: &mut Problems) -> Option<IdentityRules> {
    let proxies = declared.trusted_proxies.clone().unwrap_or_default();
    if let Some(everything) = proxies.iter().find(|net| net.prefix_len() == 0)
        && !declared.trusted_proxies_allow_all
    {
        problems.add_unless_refused(
            &[&TRUSTED_PROXIES, &TRUSTED_PROXIES_ALLOW_ALL],
            format!(
                "TRUSTED_PROXIES: {everything} trusts every address as a proxy, so any client \
                 could set X-Forwarded-For to a new address on each request and never be \
                 limited; list your proxies' addresses, or set TRUSTED_PROXIES_ALLOW_ALL=on \
                 if no client can reach the instances except through them"
            ),
        );
        return None;
    }
    Some(IdentityRules::new(proxies, declared.ipv6_prefix_len))
}

/// `UNIX_SOCKET` with its mode; with `PORT=off` it must be set, or nothing would listen.
fn unix_socket(declared: &Declared, problems: &mut Problems) -> Option<Option<UnixSocket>> {
    let socket = declared.unix_socket.clone().map(|path| UnixSocket {
        path,
        mode: declared.unix_socket_mode,
    });
    if declared.port.is_none() && socket.is_none() {
        problems.add_unless_refused(
            &[&PORT, &UNIX_SOCKET],
            "PORT: off leaves nothing to listen on without UNIX_SOCKET; set UNIX_SOCKET, or a port"
                .into(),
        );
        return None;
    }
    Some(socket)
}

/// `INSTANCE_NAME`, or else the host name, held to the same rule since it ends up in the
/// same headers and logs.
fn instance_name(declared: &Declared, given: &Given, problems: &mut Problems) -> Option<String> {
    if given.is_set(&INSTANCE_NAME) {
        return declared.instance_name.clone();
    }
    let host_name = gethostname::gethostname().to_string_lossy().into_owned();
    problems.parse_if_given(&INSTANCE_NAME, Some(&host_name), parse::printable)
}

/// `NAME=value` for every layered setting, as the service will use it.
fn effective(given: &Given) -> String {
    given
        .each()
        .into_iter()
        .map(|(setting, text)| {
            let text = text.or(match setting.preset {
                Preset::Value(preset) => Some(preset),
                Preset::Unset(_) => None,
            });
            let shown = match (text, setting.expects) {
                (None, _) => "(unset)".to_string(),
                (Some(_), Expect::Secret) => "***".to_string(),
                (Some(url), Expect::Url) => mask_url(url),
                (Some(text), _) => text.to_string(),
            };
            format!("{}={shown}", setting.name)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests;
